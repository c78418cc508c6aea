"""Blockwise absmax quantization: the pure-torch reference every kernel is checked against.

A weight W of shape (N, K) (out, in; nn.Linear's layout) is cut into blocks of B consecutive
values along each row: block j of row n is W[n, j*B : (j+1)*B]. When K is not a multiple of B the
last block of every row is shorter (K mod B values) and gets its own absmax; blocks never span rows,
so a row's dot product needs only that row's scales. Each value is divided by its block's absmax
(as stored: fp16/fp32/double-quantized, so dequantization sees exactly what quantization used) and
replaced by the index of the nearest codebook value. An all-zero block stores absmax 0 and codes of
the codebook's 0, so it dequantizes to exact zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from kbitrt.format import dtypes, packing
from kbitrt.format.config import (ABSMAX, ABSMAX_OFFSET, ABSMAX_SCALE, CODEBOOK, DOUBLE_QUANT_BLOCK,
                                  OUTLIER_IDX, OUTLIER_WEIGHT, QWEIGHT, SHAPE, KbitFormatError,
                                  QuantConfig)

FP16_MAX = 65504.0
# Values per row chunk of the quantizer and thread: the float32 and int32 buffers of one thread's
# share (~1.5 MB) stay in its L2.
CHUNK = 1 << 17


@dataclass
class QuantizedWeight:
    """One quantized (N, K) matrix, as stored (see config.LinearLayout for the on-disk tensors)."""

    qweight: torch.Tensor  # uint8 (N, row_bytes), packed codes
    absmax: torch.Tensor  # fp16/fp32 (N, n_blocks); uint8 codes when double-quantized
    codebook: torch.Tensor  # fp32 (<= 2^k,)
    shape: tuple[int, int]
    bits: int
    block_size: int
    absmax_scale: torch.Tensor | None = None  # dq8: fp32 (ceil(N*n_blocks/256),)
    absmax_offset: torch.Tensor | None = None  # dq8: fp32 (1,)
    outlier_idx: torch.Tensor | None = None  # int64 (n_out,)
    outlier_weight: torch.Tensor | None = None  # 16-bit (N, n_out)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], config: QuantConfig,
                     shape: tuple[int, int] | None = None) -> QuantizedWeight:
        """From one linear's stored tensors, keyed by suffix (config.QWEIGHT, ...); the shape is
        read from the SHAPE tensor when not given."""
        if shape is None:
            shape = tuple(int(v) for v in tensors[SHAPE].tolist())
        return cls(qweight=tensors[QWEIGHT], absmax=tensors[ABSMAX], codebook=tensors[CODEBOOK],
                   shape=shape, bits=config.bits, block_size=config.block_size,
                   absmax_scale=tensors.get(ABSMAX_SCALE), absmax_offset=tensors.get(ABSMAX_OFFSET),
                   outlier_idx=tensors.get(OUTLIER_IDX), outlier_weight=tensors.get(OUTLIER_WEIGHT))

    def kernel_absmax(self) -> torch.Tensor:
        """The scales as the kernels read them: as stored, or double quantization decoded once, in
        fp16 (its rounding, 2^-11, is far below the 8-bit code's own error; fp32 if it overflows)."""
        if self.absmax_scale is None:
            return self.absmax
        absmax = self.absmax_float()
        return absmax.half() if absmax.max() <= FP16_MAX else absmax

    def absmax_float(self) -> torch.Tensor:
        """The per-block scales as float32 (N, n_blocks), double quantization undone."""
        if self.absmax_scale is None:
            return self.absmax.float()
        return dequantize_absmax(self.absmax, self.absmax_scale, self.absmax_offset)

    def codes(self) -> torch.Tensor:
        return packing.unpack(self.qweight, self.shape[1], self.bits)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_blockwise(self.codes(), self.absmax_float(), self.codebook,
                                    self.block_size, self.outlier_idx, self.outlier_weight).to(dtype)


def blocks(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """(N, K) -> (N, n_blocks, B), the ragged tail zero-padded (zeros never raise an absmax)."""
    n, k = w.shape
    nb = -(-k // block_size)
    if nb * block_size != k:
        w = torch.nn.functional.pad(w, (0, nb * block_size - k))
    return w.view(n, nb, block_size)


def chunk_rows(k: int) -> int:
    return max(1, CHUNK * torch.get_num_threads() // max(k, 1))


def _row_chunks(n: int, k: int):
    """Row ranges of about CHUNK values per thread: every pass over a chunk then runs in cache."""
    rows = chunk_rows(k)
    for r0 in range(0, n, rows):
        yield r0, min(n, r0 + rows)


_AS_INT = {torch.float16: (torch.int16, 0x7FFF), torch.bfloat16: (torch.int16, 0x7FFF),
           torch.float32: (torch.int32, 0x7FFFFFFF)}


def block_absmax(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """float32 (N, n_blocks) absmax of each block of a float (N, K) tensor (NaN/Inf propagate)."""
    n, k = w.shape
    full, nb = k // block_size, -(-k // block_size)
    out = torch.empty(n, nb, dtype=torch.float32, device=w.device)
    as_int = _AS_INT.get(w.dtype)
    for r0, r1 in _row_chunks(n, k):
        if as_int is not None:
            # |x| by clearing the sign bit: magnitudes order like their bit patterns (NaN > Inf >
            # finite), so the integer max is the float absmax, and NaN/Inf still propagate
            mag = w[r0:r1].contiguous().view(as_int[0]) & as_int[1]
        else:
            mag = w[r0:r1].abs()

        def to_float(m: torch.Tensor) -> torch.Tensor:
            return m.view(w.dtype) if as_int is not None else m

        if full:
            blocks = mag[:, : full * block_size].reshape(r1 - r0, full, block_size)
            out[r0:r1, :full] = to_float(blocks.amax(dim=-1))
        if nb > full:
            out[r0:r1, full] = to_float(mag[:, full * block_size:].amax(dim=-1))
    return out


def quantize_absmax(absmax: torch.Tensor, absmax_dtype: str, name: str = "tensor"):
    """Store the scales; returns (stored, scale, offset, as_float) where as_float is what was stored."""
    if absmax_dtype == "fp16":
        if absmax.max() > FP16_MAX:
            raise KbitFormatError(
                f"{name}: a block absmax of {absmax.max().item():.3g} overflows fp16: "
                "use --absmax-dtype fp32")
        stored = absmax.half()
        return stored, None, None, stored.float()
    if absmax_dtype == "fp32":
        return absmax.float(), None, None, absmax.float()
    # dq8: subtract the mean, quantize blocks of 256 with the 8-bit dynamic type (as QLoRA)
    flat = absmax.reshape(-1).float()
    offset = flat.mean().reshape(1)
    centered = flat - offset
    cb = dtypes.Dynamic.levels(8)
    nb2 = -(-flat.numel() // DOUBLE_QUANT_BLOCK)
    padded = torch.nn.functional.pad(centered, (0, nb2 * DOUBLE_QUANT_BLOCK - flat.numel()))
    scale = padded.view(nb2, DOUBLE_QUANT_BLOCK).abs().amax(dim=-1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    normed = (padded.view(nb2, DOUBLE_QUANT_BLOCK) / safe[:, None]).reshape(-1)[: flat.numel()]
    codes = dtypes.nearest_index(normed, cb).view(absmax.shape)
    as_float = dequantize_absmax(codes, scale, offset)
    return codes, scale, offset, as_float


def dequantize_absmax(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    cb = dtypes.Dynamic.levels(8).to(scale.device)
    flat = cb[codes.reshape(-1).long()]
    flat = flat * scale.repeat_interleave(DOUBLE_QUANT_BLOCK)[: flat.numel()] + offset
    # a scale must never go negative (it would flip signs): clamp what the 8-bit code undershot
    return flat.clamp(min=0).view(codes.shape)


def quantize_codes(w: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor,
                   block_size: int) -> torch.Tensor:
    """uint8 (N, K) codebook indices of w (N, K) given the stored per-block absmax (N, n_blocks)."""
    n, k = w.shape
    out = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    for r0, r1, codes in chunk_codes(w, absmax, codebook, block_size):
        out[r0:r1] = codes
    return out


def chunk_codes(w: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor, block_size: int):
    """Yield (r0, r1, uint8 codes (r1-r0, K)) chunk by chunk; the codes buffer is reused.

    Same arithmetic as the definition: x = float32(w) / absmax (IEEE division, as stored),
    clamped to [-1, 1], exact nearest index (dtypes.NearestTable).
    """
    n, k = w.shape
    full, nb = k // block_size, -(-k // block_size)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax)).float()
    table = dtypes.nearest_table(codebook)
    rows = chunk_rows(k)
    xbuf = torch.empty(rows * k, dtype=torch.float32, device=w.device)
    cbuf = torch.empty(rows * k, dtype=torch.uint8, device=w.device)
    scratch = (torch.empty(rows * k, dtype=torch.int32, device=w.device),
               torch.empty(rows * k, dtype=torch.int32, device=w.device))
    for r0, r1 in _row_chunks(n, k):
        m = r1 - r0
        x = xbuf[: m * k].view(m, k)
        x.copy_(w[r0:r1])
        if full:
            x[:, : full * block_size].view(m, full, block_size).div_(safe[r0:r1, :full, None])
        if nb > full:
            x[:, full * block_size:].div_(safe[r0:r1, full:])
        x.clamp_(-1.0, 1.0)
        yield r0, r1, table.lookup(x, cbuf[: m * k].view(m, k), scratch)


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor,
                         block_size: int, outlier_idx: torch.Tensor | None = None,
                         outlier_weight: torch.Tensor | None = None) -> torch.Tensor:
    """float32 (N, K) from codes (N, K), float absmax (N, n_blocks) and the codebook."""
    n, k = codes.shape
    vals = codebook.float()[codes.long()]
    w = (blocks(vals, block_size) * absmax.float()[..., None]).view(n, -1)[:, :k]
    if outlier_idx is not None and outlier_idx.numel():
        w = w.clone()
        w[:, outlier_idx] = outlier_weight.float()
    return w


def check_finite(w: torch.Tensor, name: str) -> None:
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise KbitFormatError(f"{name} holds {bad} NaN/Inf values: the checkpoint is broken; "
                              "fix or re-export it before converting")


def select_outliers(w: torch.Tensor, spec) -> torch.Tensor:
    """int64 indices (sorted) of the input columns of w (N, K) kept in 16 bit, by weight std."""
    std = w.float().std(dim=0, correction=0)
    return outliers_from_std(std, spec)


def outliers_from_std(std: torch.Tensor, spec) -> torch.Tensor:
    k = std.numel()
    if spec is None or k < 2:
        return torch.zeros(0, dtype=torch.int64)
    if spec.method == "top":
        n_out = max(1, round(spec.value * k))
        idx = torch.topk(std.double(), n_out, sorted=False).indices
    else:
        z = (std.double() - std.double().mean()) / std.double().std().clamp(min=1e-30)
        idx = torch.nonzero(z > spec.value).flatten()
    return idx.sort().values.to(torch.int64)


def sample_index(r0: int, rows: int, n: int, k: int) -> torch.Tensor:
    """Flat indices within rows r0..r0+rows of the strided sample (of at most WEIGHT_SAMPLE values)
    that a fitted data type takes of an (n, K) matrix, relative to row r0."""
    step = max(1, -(-(n * k) // dtypes.WEIGHT_SAMPLE))
    return torch.arange((-r0 * k) % step, rows * k, step)
