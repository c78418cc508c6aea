"""The `lloyd` data type: a per-tensor 2^k codebook fitted to the weights by Lloyd-Max (1-D k-means).

The fit looks at a deterministic sample of whole rows of the (N, K) weight (every `stride`-th row,
at most SAMPLE values), cut into blocks and divided by their scales (absmax, or the `mse` scales of
scales.py), and minimises the tensor's squared error on that sample:

    E(C) = sum_blocks sum_i (w_i - s_b * C[q_i])^2 = sum_i s_b^2 (x_i - C[q_i])^2,   x = w / s

so it is a k-means in 1-D with weights s_b^2 (times the input column's importance v_j when one is
given: the weighted error of scales.py, E = sum v_j (w - s C[q])^2). Each Lloyd step assigns every
x to its exact nearest entry (the float32 thresholds of dtypes.thresholds, the quantizer's own rule)
and moves every entry to the weighted mean of its cell (clamped to [-1, 1]); the entry 0 is pinned,
so all-zero blocks and zero weights stay exact. Neither step can raise E, and the codebook returned is the best one seen,
the starting levels included: the fit never increases the error of its starting levels.
The sample is sorted once; a step costs one binary search per entry on weighted prefix sums.

Starts: the nf levels and the tensor's quantile levels (both tried, the better fit kept). With
`--scales mse` the fit alternates with the scale search: fit C for the current scales, choose the
scales for C, repeat (ROUNDS times), keeping the best (C, scales) pair by the sample's error. (With
an importance and `--scales mse` the quantizer fits the plain codebook instead and weights only the
scale search: format/quantizer.py.)
"""

from __future__ import annotations

import torch

from kbitrt.format import dtypes, scales
from kbitrt.format.blockwise import blocks

SAMPLE = 1 << 22  # values looked at per tensor (whole rows)
ITERS = 60  # Lloyd steps at most (they stop earlier once no entry moves)
ROUNDS = 3  # codebook / mse-scale alternations


def sample_stride(n_rows: int, n_cols: int) -> int:
    """Every stride-th row of an (n_rows, n_cols) weight goes into the sample."""
    return max(1, -(-n_rows * n_cols // SAMPLE))


def sample_rows(w: torch.Tensor) -> torch.Tensor:
    """The rows of an in-memory (N, K) weight the fit looks at, as float32."""
    return w[:: sample_stride(*w.shape)].float()


class _Sorted:
    """x sorted, with float64 prefix sums of v, v*x and v*x^2 (v = weight of each value)."""

    def __init__(self, x: torch.Tensor, v: torch.Tensor):
        keep = v > 0
        x, v = x[keep], v[keep].double()
        order = torch.argsort(x)
        self.x = x[order].contiguous()
        xd, v = self.x.double(), v[order]
        zero = torch.zeros(1, dtype=torch.float64)
        self.p0 = torch.cat([zero, v.cumsum(0)])
        self.p1 = torch.cat([zero, (v * xd).cumsum(0)])
        self.p2 = torch.cat([zero, (v * xd * xd).cumsum(0)])

    def cells(self, cb: torch.Tensor):
        """Per codebook entry: (weight, sum v*x, sum v*x^2) of the values nearest to it."""
        bounds = torch.searchsorted(self.x, dtypes.thresholds(cb))  # first x >= threshold
        edges = torch.cat([torch.zeros(1, dtype=torch.long), bounds,
                           torch.tensor([self.x.numel()])])
        lo, hi = edges[:-1], edges[1:]
        return (self.p0[hi] - self.p0[lo], self.p1[hi] - self.p1[lo], self.p2[hi] - self.p2[lo])

    def error(self, cb: torch.Tensor) -> float:
        w, s1, s2 = self.cells(cb)
        c = cb.double()
        return float((s2 - 2 * c * s1 + c * c * w).clamp(min=0).sum())


def lloyd_max(x: torch.Tensor, v: torch.Tensor, start: torch.Tensor,
              iters: int = ITERS) -> tuple[torch.Tensor, float]:
    """Weighted 1-D k-means from `start` (sorted float32, holding 0); returns (best codebook, error)."""
    data = _Sorted(x.reshape(-1).float(), v.reshape(-1))
    cb = start.float().clone()
    best, best_err = cb.clone(), data.error(cb)
    pinned = cb == 0
    for _ in range(iters):
        w, s1, _ = data.cells(cb)
        mean = torch.where(w > 0, s1 / w.clamp(min=1e-300), cb.double()).clamp(-1.0, 1.0)
        new = torch.where(pinned, cb, mean.float()).sort().values
        if torch.equal(new, cb):
            break
        cb = new
        err = data.error(cb)
        if err < best_err:
            best, best_err = cb.clone(), err
    return best, best_err


def _normalized(w: torch.Tensor, s: torch.Tensor, block_size: int,
                importance: torch.Tensor | None = None):
    """(x, v): w / s per block and the weight s^2 (x the column's importance) of every value (0 for
    padding and zero blocks)."""
    wb = blocks(w, block_size)
    safe = torch.where(s > 0, s, torch.ones_like(s))[..., None]
    x = wb / safe
    v = (s * s)[..., None].expand_as(wb).clone()
    cols = scales.column_weights(importance, w.shape[1], block_size)
    if cols is not None:
        v.mul_(cols)
    k = w.shape[1]
    if wb.shape[1] * block_size != k:  # padding is no data
        v.view(w.shape[0], -1)[:, k:] = 0
    return x, v


def fit_codebook(sample: torch.Tensor, bits: int, block_size: int, scale_method: str = "absmax",
                 absmax_dtype: str = "fp16", importance: torch.Tensor | None = None) -> torch.Tensor:
    """The Lloyd-Max codebook (2^k float32 values, sorted, with 0) for rows `sample` (m, K);
    `importance` (K,) weights each input column's squared error (scales.py)."""
    sample = sample.float()
    absmax = scales.round_scale(scales.block_scales(sample, block_size, "absmax", None), absmax_dtype)
    x, v = _normalized(sample, absmax, block_size, importance)
    starts = [dtypes.get("nf").levels(bits), dtypes.get("quantile").fit(bits, x[v > 0])]
    best, best_err = None, float("inf")
    for start in starts:
        cb, err = lloyd_max(x, v, start)
        if err < best_err:
            best, best_err = cb, err
    if scale_method == "absmax":
        return best
    cb = best
    for start in starts:  # each start under its own scales too: the fit never ends above them
        s = scales.block_scales(sample, block_size, scale_method, start, absmax_dtype, importance)
        x, v = _normalized(sample, s, block_size, importance)
        err_here = _Sorted(x.reshape(-1), v.reshape(-1)).error(start)
        if err_here < best_err:
            best, best_err = start, err_here
    for _ in range(ROUNDS):
        s = scales.block_scales(sample, block_size, scale_method, cb, absmax_dtype, importance)
        x, v = _normalized(sample, s, block_size, importance)
        err_here = _Sorted(x.reshape(-1), v.reshape(-1)).error(cb)
        if err_here < best_err:
            best, best_err = cb, err_here
        cb, err = lloyd_max(x, v, cb)
        if err < best_err:
            best, best_err = cb, err
    return best
