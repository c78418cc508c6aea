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

import torch

from kbitrt.formats import codebooks, packing
from kbitrt.formats.spec import DOUBLE_QUANT_BLOCK, KbitFormatError, QuantConfig

FP16_MAX = 65504.0


@dataclass
class QuantizedWeight:
    """One quantized (N, K) matrix, as stored (see spec.LinearLayout for the on-disk tensors)."""

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


def _blocks(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """(N, K) -> (N, n_blocks, B), the ragged tail zero-padded (zeros never raise an absmax)."""
    n, k = w.shape
    nb = -(-k // block_size)
    if nb * block_size != k:
        w = torch.nn.functional.pad(w, (0, nb * block_size - k))
    return w.view(n, nb, block_size)


def block_absmax(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """float32 (N, n_blocks) absmax of each block of a float (N, K) tensor."""
    return _blocks(w, block_size).abs().amax(dim=-1).float()


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
    cb = codebooks.dynamic_codebook(8)
    nb2 = -(-flat.numel() // DOUBLE_QUANT_BLOCK)
    padded = torch.nn.functional.pad(centered, (0, nb2 * DOUBLE_QUANT_BLOCK - flat.numel()))
    scale = padded.view(nb2, DOUBLE_QUANT_BLOCK).abs().amax(dim=-1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    normed = (padded.view(nb2, DOUBLE_QUANT_BLOCK) / safe[:, None]).reshape(-1)[: flat.numel()]
    codes = codebooks.nearest_index(normed, cb).view(absmax.shape)
    as_float = dequantize_absmax(codes, scale, offset)
    return codes, scale, offset, as_float


def dequantize_absmax(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    cb = codebooks.dynamic_codebook(8).to(scale.device)
    flat = cb[codes.reshape(-1).long()]
    flat = flat * scale.repeat_interleave(DOUBLE_QUANT_BLOCK)[: flat.numel()] + offset
    # a scale must never go negative (it would flip signs): clamp what the 8-bit code undershot
    return flat.clamp(min=0).view(codes.shape)


def quantize_codes(w: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor,
                   block_size: int) -> torch.Tensor:
    """uint8 (N, K) codebook indices of w (N, K) given the stored per-block absmax (N, n_blocks)."""
    n, k = w.shape
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normed = (_blocks(w.float(), block_size) / safe[..., None]).view(n, -1)[:, :k]
    return codebooks.nearest_index(normed.clamp(-1, 1), codebook)


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor,
                         block_size: int, outlier_idx: torch.Tensor | None = None,
                         outlier_weight: torch.Tensor | None = None) -> torch.Tensor:
    """float32 (N, K) from codes (N, K), float absmax (N, n_blocks) and the codebook."""
    n, k = codes.shape
    vals = codebook.float()[codes.long()]
    w = (_blocks(vals, block_size) * absmax.float()[..., None]).view(n, -1)[:, :k]
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


def quantize_weight(w: torch.Tensor, config: QuantConfig, name: str = "tensor",
                    codebook: torch.Tensor | None = None, dtype16: torch.dtype = torch.float16,
                    ) -> QuantizedWeight:
    """Quantize a whole (N, K) matrix in memory (the converter does the same chunk by chunk)."""
    check_finite(w, name)
    w = w.float()
    outlier_idx = outlier_weight = None
    if config.outliers is not None:
        outlier_idx = select_outliers(w, config.outliers)
        outlier_weight = w[:, outlier_idx].to(dtype16)
        w = w.clone()
        w[:, outlier_idx] = 0.0
    stored, scale, offset, absmax = quantize_absmax(block_absmax(w, config.block_size),
                                                    config.absmax_dtype, name)
    if codebook is None:
        codebook = codebooks.fixed_codebook(config)
    if codebook is None:  # quantile: estimated from this tensor's normalised values
        safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        normed = (_blocks(w, config.block_size) / safe[..., None]).view(w.shape[0], -1)[:, : w.shape[1]]
        codebook = codebooks.quantile_codebook(config.bits, normed)
    codes = quantize_codes(w, absmax, codebook, config.block_size)
    return QuantizedWeight(
        qweight=packing.pack(codes, config.bits), absmax=stored, codebook=codebook,
        shape=tuple(w.shape), bits=config.bits, block_size=config.block_size,
        absmax_scale=scale, absmax_offset=offset, outlier_idx=outlier_idx,
        outlier_weight=outlier_weight)
