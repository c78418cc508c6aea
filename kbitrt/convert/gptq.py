"""GPTQ (Frantar et al. 2023) for one linear, into this format: codes, block scales, codebook.

Given W (N, K) and H = 2/n * X^T X of the layer's calibration inputs X (n, K), the columns are
quantized one at a time and each one's rounding error is spread over the columns not yet quantized
(through the Cholesky factor of H^-1), in lazy batches of LAZY columns (GPTQ's blocked update).

Any code, scale and codebook of the format: the codebook is the data type's (fixed, or fitted to W
for quantile and lloyd, as round-to-nearest would fit it); a block's scale is computed from the
block itself when its first column comes up, from the weights as GPTQ has updated them so far
(GPTQ's group quantization, the group being the format's block), with --scales absmax or mse. With
--act-order (columns in order of decreasing H diagonal) or dq8 scales, every block's scale is fixed
up front from the original W instead (GPTQ's "static groups"), since a block's columns are then not
processed together. With --importance hessian (and --scales mse) the scale search weights each
input column's squared error by H's diagonal (the column's input second moment), so a block's scale
minimises its expected output error rather than its weight error; the Lloyd fit (--dtype lloyd)
likewise. Outlier columns (proxy quantization) are not rounded: they are stored in 16 bit
as GPTQ has updated them (the code of 0 in the packed codes, as the format requires).
"""

from __future__ import annotations

import torch

from kbitrt.format import blockwise, dtypes, packing, scales, quantizer
from kbitrt.format.config import KbitFormatError, QuantConfig, replace

LAZY = 128  # columns per lazy batch (at least one block)


class Hessian:
    """Running H = 2/n sum x x^T over calibration rows (float32, as GPTQ)."""

    def __init__(self, k: int):
        self.h = torch.zeros(k, k, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor, xtx: torch.Tensor | None = None) -> torch.Tensor:
        """Add rows x (..., K); `xtx` = x^T x when already computed (linears sharing an input)."""
        x = x.reshape(-1, x.shape[-1]).float()
        if xtx is None:
            xtx = x.t() @ x
        self.h += xtx
        self.n += x.shape[0]
        return xtx

    def matrix(self) -> torch.Tensor:
        if not self.n:
            raise KbitFormatError("GPTQ got no calibration rows for a layer")
        return self.h.double() * (2.0 / self.n)


def outlier_columns(w: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """The converter's choice of 16-bit columns (float64 column std over all rows)."""
    if config.outliers is None:
        return torch.zeros(0, dtype=torch.int64)
    wd = w.double()
    std = (wd.square().mean(0) - wd.mean(0).square()).clamp(min=0).sqrt()
    return blockwise.outliers_from_std(std, config.outliers)


def _static_scales(w: torch.Tensor, config: QuantConfig, codebook: torch.Tensor, name: str,
                   importance: torch.Tensor | None = None):
    raw = scales.block_scales(w, config.block_size, config.scales, codebook, config.absmax_dtype,
                              importance)
    return blockwise.quantize_absmax(raw, config.absmax_dtype, name)


def _inverse_hessian_factor(w: torch.Tensor, h: torch.Tensor, damp: float, act_order: bool,
                            name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ's set-up of H: dead inputs zeroed (in `w` too), columns permuted (--act-order),
    dampened; returns (w permuted, the upper Cholesky factor of H^-1 in float32, the permutation)."""
    k = w.shape[1]
    h = h.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order \
        else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.diagonal(h).mean() * torch.eye(k, dtype=torch.float64)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError:
        raise KbitFormatError(f"{name}: the calibration Hessian is not positive definite; "
                              "raise --damp or give more calibration samples") from None
    return w, hinv.float(), perm


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, config: QuantConfig, *, damp: float = 0.01,
                  act_order: bool = False, name: str = "tensor",
                  dtype16: torch.dtype = torch.float16) -> blockwise.QuantizedWeight:
    """GPTQ-quantize W (N, K) with Hessian H (K, K) into a QuantizedWeight of `config`."""
    n, k = w.shape
    bsz = config.block_size
    blockwise.check_finite(w, name)
    w = w.float().clone()
    idx = outlier_columns(w, config)
    is_out = torch.zeros(k, dtype=torch.bool)
    is_out[idx] = True
    w0 = w.clone()
    w0[:, idx] = 0.0
    diag = torch.diagonal(h).float().clamp(min=0)
    imp = diag if config.importance == "hessian" else None  # weights of the scale search / fit
    # the codebook round-to-nearest would use (fitted on the original weights for quantile/lloyd)
    codebook = quantizer.quantize_weight(w0, replace(config, outliers=None), name,
                                         importance=imp).codebook
    zero_code = int(dtypes.nearest_index(torch.zeros(1), codebook)[0])
    static = act_order or config.absmax_dtype == "dq8"
    nb = -(-k // bsz)
    stored_scale = stored_offset = None
    if static:
        stored, stored_scale, stored_offset, sc = _static_scales(w0, config, codebook, name, imp)
    else:
        sc = torch.zeros(n, nb, dtype=torch.float32)

    w, hinv, perm = _inverse_hessian_factor(w, h, damp, act_order, name)
    codes = torch.zeros(n, k, dtype=torch.uint8)
    out_w = torch.zeros(n, idx.numel(), dtype=torch.float32)
    out_pos = {int(c): i for i, c in enumerate(idx.tolist())}
    lazy = max(LAZY, bsz)
    cb = codebook.float()
    thresholds = dtypes.thresholds(cb)  # exact nearest: x gets #{t : x >= t} (dtypes.nearest_index)
    for i1 in range(0, k, lazy):
        i2 = min(k, i1 + lazy)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            d = hinv[i1 + i, i1 + i]
            wcol = w1[:, i]
            if is_out[col]:
                q = wcol.to(dtype16).float()
                out_w[:, out_pos[col]] = q
                codes[:, col] = zero_code
            else:
                if not static and col % bsz == 0:  # the block starts: its scale, from the block
                    blk = w1[:, i: i + bsz].clone()
                    blk[:, is_out[col: col + blk.shape[1]]] = 0.0
                    raw = scales.block_scales(blk, bsz, config.scales, codebook, config.absmax_dtype,
                                              None if imp is None else imp[col: col + blk.shape[1]])
                    sc[:, col // bsz] = scales.round_scale(raw, config.absmax_dtype)[:, 0]
                s = sc[:, col // bsz]
                safe = torch.where(s > 0, s, torch.ones_like(s))
                c = torch.bucketize((wcol / safe).clamp(-1.0, 1.0), thresholds, right=True)
                codes[:, col] = c.to(torch.uint8)
                q = cb[c] * s
            e = (wcol - q) / d
            w1[:, i:] -= e[:, None] * hinv[i1 + i, i1 + i: i2][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if not static:
        stored, stored_scale, stored_offset, _ = blockwise.quantize_absmax(sc, config.absmax_dtype,
                                                                           name)
    return blockwise.QuantizedWeight(
        qweight=packing.pack(codes, config.bits), absmax=stored, codebook=codebook,
        shape=(n, k), bits=config.bits, block_size=bsz, absmax_scale=stored_scale,
        absmax_offset=stored_offset, outlier_idx=idx if idx.numel() else None,
        outlier_weight=out_w.to(dtype16) if idx.numel() else None)
