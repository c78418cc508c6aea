"""Block scales: absmax (the paper's) or the scale that minimises each block's squared error (`mse`).

For a block w (B values), a scale s and a codebook C, quantization stores s and the codes
q_i = nearest(clamp(w_i / s, -1, 1)); the block's error is E(s) = sum_i (w_i - s * C[q_i])^2.
`absmax` takes s = max |w_i| (nothing clips). `mse` tries, per block, s = alpha * absmax for alpha in
GRID_ALPHAS (below 1 clips the block's largest weights; above 1 widens the levels so that the inner
ones land better), keeps the best, then takes LS_STEPS least-squares steps: for the best codes c so
far the scale s = <w, c> / <c, c> minimises E for those codes, and rounding to nearest at that scale
can only lower it further. Every candidate is rounded to the storage dtype (fp16/fp32) before it is
tried, so the scale that wins is exactly the one written to disk and read by the kernels. With
`dq8` the chosen scales are double-quantized afterwards like absmax scales (no guarantee there).

Candidates are evaluated cheaply: codes from one gather of a table over 2 * GRID uniform cells of
[-1, 1] (a cell holding a decision threshold maps to the value nearest its left edge: a valid, if
not always nearest, choice of codes) and E(s) = sum w^2 - 2 s <w, c> + s^2 <c, c> from two float32
sums. The winner's error is then summed directly from its grid codes (an upper bound of its real
error, which exact nearest rounding at conversion can only lower) and compared with the exact
absmax error (the quantizer's own arithmetic: IEEE division by the stored scale, clamp, exact
nearest index); a block keeps its absmax scale unless the winner is better by MARGIN, so no block's
error ever grows. Vectorized over row chunks that stay in cache.

Importance: with a per-input-column weight v (K,) >= 0 every error above is the weighted one,
E(s) = sum_i v_i (w_i - s C[q_i])^2 (the least-squares step becomes s = <v w, c> / <v c, c>). For a
linear y = W x with E[x_j^2] proportional to v_j and uncorrelated inputs, that is its expected output
error. Zero-shot, v comes from the checkpoint (the gain of the norm the linear reads, converter);
one-shot, from the calibration Hessian's diagonal (GPTQ). The winner is compared with absmax under
the same weighted error, so no block's weighted error grows. `keep_max` restricts the candidates to
scales >= the absmax (no clipping: the block's largest weight stays in range).
"""

from __future__ import annotations

import functools

import torch

from kbitrt.format import dtypes
from kbitrt.format.blockwise import FP16_MAX, block_absmax
from kbitrt.format.config import SCALES, KbitFormatError

# scale candidates, as fractions of the absmax (1.0 is always tried first): below 1 clips the block's
# largest weights, above 1 widens the levels so that the inner ones land better
GRID_ALPHAS = (0.85, 0.9, 0.95, 1.05)
LS_STEPS = 2  # then least-squares steps: s = <w, c> / <c, c> for the best codes c so far
# the winner replaces the absmax scale only when its error is lower by this relative margin, so
# float32 rounding in the sums can never make the stored choice worse than absmax
MARGIN = 4e-6
CHUNK = 1 << 16  # values per row chunk
GRID = 2048  # cells per unit of the candidates' rounding table


def round_scale(s: torch.Tensor, absmax_dtype: str) -> torch.Tensor:
    """The float32 value a scale has once stored (fp16 rounds; fp32 and dq8 candidates stay)."""
    if absmax_dtype == "fp16":
        return s.clamp(max=FP16_MAX).half().float()
    return s


def block_scales(w: torch.Tensor, block_size: int, method: str, codebook: torch.Tensor,
                 absmax_dtype: str = "fp16", importance: torch.Tensor | None = None,
                 keep_max: bool = False) -> torch.Tensor:
    """float32 (N, n_blocks) per-block scales of a float (N, K) tensor, as `method` chooses them;
    `importance` (K,) weights each input column's squared error (mse only)."""
    absmax = block_absmax(w, block_size)
    if method == "absmax":
        return absmax
    if method != "mse":
        raise KbitFormatError(f"--scales {method!r} is unknown: use one of {', '.join(SCALES)}")
    if not torch.isfinite(absmax).all():
        return absmax  # the caller reports the broken weights
    return mse_scales(w, absmax, codebook, block_size, absmax_dtype, importance, keep_max)


def column_weights(importance: torch.Tensor | None, k: int, block_size: int) -> torch.Tensor | None:
    """(n_blocks, B) float32 weights of the (padded) columns, or None for uniform; padding gets 0."""
    if importance is None:
        return None
    v = importance.detach().reshape(-1).float().cpu()
    if v.numel() != k:
        raise KbitFormatError(f"importance has {v.numel()} values for {k} input columns")
    if not (torch.isfinite(v).all() and (v >= 0).all()):
        raise KbitFormatError("importance values must be finite and >= 0")
    nb = -(-k // block_size)
    return torch.nn.functional.pad(v, (0, nb * block_size - k)).view(nb, block_size)


def _lookup(table: dtypes.NearestTable, x: torch.Tensor) -> torch.Tensor:
    """int32 nearest indices of contiguous float32 x (the arithmetic of NearestTable.lookup)."""
    if table.table is None:
        return torch.bucketize(x, table.thresholds, right=True, out_int32=True)
    r = x.reshape(-1).view(torch.int32)
    cell = torch.bitwise_right_shift(r, table.shift).bitwise_and_((1 << (32 - table.shift)) - 1)
    e = torch.index_select(table.table, 0, cell)
    cell = torch.bitwise_right_shift(r, 31, out=cell).bitwise_xor_(r)
    return e.add_(cell).bitwise_right_shift_(table.shift)


@functools.lru_cache(maxsize=32)
def _grid_table(key: bytes) -> torch.Tensor:
    cb = torch.frombuffer(bytearray(key), dtype=torch.float32)
    left = torch.arange(-GRID, GRID, dtype=torch.float64) / GRID
    return cb[dtypes.nearest_index(left.float(), cb).long()].contiguous()


def _grid_codes(wb: torch.Tensor, s: torch.Tensor, grid_table: torch.Tensor) -> torch.Tensor:
    """Normalised codebook values of the codes the grid table picks for wb at stored scales s: a
    valid code choice, so their error is >= the exact nearest error at the same scale."""
    safe = torch.where(s > 0, s, torch.ones_like(s))[..., None]
    idx = (wb * (GRID / safe)).add_(GRID).clamp_(0, 2 * GRID - 1).to(torch.int32)
    return torch.index_select(grid_table, 0, idx.view(-1)).view(wb.shape)


def _sums(wb: torch.Tensor, c: torch.Tensor, s: torch.Tensor, v: torch.Tensor | None = None):
    """(squared error, sum v*w*c, sum v*c*c) per block of codes with normalised values c at scales
    s; v (nb, B) weights the columns (None: all 1)."""
    vc = c if v is None else c * v
    wc, cc = (vc * wb).sum(-1), (vc * c).sum(-1)
    err = c.mul_(s[..., None]).sub_(wb).square_()
    if v is not None:
        err.mul_(v)
    return err.sum(-1), wc, cc


def _exact(wb: torch.Tensor, s: torch.Tensor, codebook: torch.Tensor, table: dtypes.NearestTable,
           v: torch.Tensor | None = None):
    """(squared error, sum v*w*c, sum v*c*c) per block of wb (m, nb, B) quantized as the converter
    does with stored scales s (m, nb): c are the normalised codebook values of the codes."""
    safe = torch.where(s > 0, s, torch.ones_like(s))[..., None]
    x = (wb / safe).clamp_(-1.0, 1.0)
    c = torch.index_select(codebook, 0, _lookup(table, x).view(-1)).view(wb.shape)
    return _sums(wb, c, s, v)


def mse_scales(w: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor, block_size: int,
               absmax_dtype: str = "fp16", importance: torch.Tensor | None = None,
               keep_max: bool = False) -> torch.Tensor:
    """Per-block least-squared-error scales: the clipping/widening grid, then least-squares steps.

    Candidates are ranked by E(s) = sum w^2 - 2 s <w, c> + s^2 <c, c> (float64, from the two float32
    sums of a grid-table pass); the winner's error is then summed directly from its codes and
    compared with the exact absmax error, so no block's error grows."""
    n, k = w.shape
    nb = absmax.shape[1]
    cb = codebook.float().to(w.device)
    table = dtypes.nearest_table(cb)
    grid_table = _grid_table(cb.cpu().numpy().tobytes()).to(w.device)
    v = column_weights(importance, k, block_size)
    if v is not None:
        v = v.to(w.device)
    out = torch.empty_like(absmax)
    rows = max(1, CHUNK * torch.get_num_threads() // max(nb * block_size, 1))
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        wb = w[r0:r1].float()
        if nb * block_size != k:
            wb = torch.nn.functional.pad(wb, (0, nb * block_size - k))
        wb = wb.reshape(r1 - r0, nb, block_size)
        a = absmax[r0:r1]
        s_abs = round_scale(a, absmax_dtype)
        e_abs, best_wc, best_cc = _exact(wb, s_abs, cb, table, v)
        ww = (wb.square() if v is None else wb.square() * v).sum(-1).double()
        best_s, best_e = s_abs, e_abs.double()

        def consider(s: torch.Tensor) -> None:
            nonlocal best_s, best_e, best_wc, best_cc
            if keep_max:
                s = torch.maximum(s, s_abs)
            c = _grid_codes(wb, s, grid_table)
            if v is not None:
                c2 = c * v
                wc, cc = (c2 * wb).sum(-1), c2.mul_(c).sum(-1)
            else:
                wc, cc = (c * wb).sum(-1), c.square_().sum(-1)
            sd = s.double()
            e = ww - 2 * sd * wc + sd * sd * cc
            better = e < best_e
            best_s = torch.where(better, s, best_s)
            best_e = torch.where(better, e, best_e)
            best_wc = torch.where(better, wc, best_wc)
            best_cc = torch.where(better, cc, best_cc)

        for alpha in GRID_ALPHAS:
            if keep_max and alpha < 1:
                continue
            consider(round_scale(a * alpha, absmax_dtype))
        for _ in range(LS_STEPS):  # the least-squares scale of the best codes so far
            ls = best_wc / torch.where(best_cc > 0, best_cc, torch.ones_like(best_cc))
            ok = (best_cc > 0) & (ls > 0) & torch.isfinite(ls)
            consider(round_scale(torch.where(ok, ls, best_s), absmax_dtype))
        # the winner's own error, summed directly (an upper bound of its exact nearest error)
        e, _, _ = _sums(wb, _grid_codes(wb, best_s, grid_table), best_s, v)
        out[r0:r1] = torch.where(e < e_abs * (1 - MARGIN), best_s, s_abs)
    return out
