"""Pure-torch twin of the Triton kernels: y = x W^T (+ bias) from packed codes, absmax, codebook.

Same signature as `triton_kbit.kbit_linear_triton`, so tests compare the two argument for argument.
It is also the CPU path, so the dequantization is written to be fast rather than literal: the 4- and
8-bit layouts (one slice) go through a byte -> values lookup table (one gather per byte), the others
unpack each slice with precomputed shifts and gather the codebook once.
"""

from __future__ import annotations

import torch

from kbitrt.format import packing


def pad_codebook(codebook: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 (2^bits,): the codebook padded so that any k-bit code is an index.

    An equally spaced codebook (int) is extended along its progression, so the padded table stays
    affine and the kernels may decode it arithmetically; any other repeats its last entry. Codes
    past the codebook never occur in a quantized weight, so the padding changes no result.
    """
    cb = codebook.detach().float().reshape(-1)
    n = 1 << bits
    if cb.numel() > n:
        raise ValueError(f"a {bits}-bit codebook holds at most {n} entries, got {cb.numel()}")
    if cb.numel() < n:
        c64 = cb.double()
        step = (c64[-1] - c64[0]) / max(cb.numel() - 1, 1)
        ideal = c64[0] + step * torch.arange(cb.numel(), dtype=torch.float64, device=cb.device)
        if cb.numel() > 1 and step > 0 and (c64 - ideal).abs().max() <= 1e-6:
            extra = c64[0] + step * torch.arange(cb.numel(), n, dtype=torch.float64,
                                                 device=cb.device)
            cb = torch.cat([cb, extra.float()])
        else:
            cb = torch.cat([cb, cb[-1:].expand(n - cb.numel())])
    return cb.contiguous()


def _byte_table(codebook: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 (256, 8/bits) for one-slice layouts (4, 8 bits): the values a packed byte holds."""
    b = torch.arange(256, device=codebook.device)
    if bits == 8:
        return codebook[b].unsqueeze(1)
    return torch.stack([codebook[b & 15], codebook[b >> 4]], dim=1)


def dequantize_packed(qweight: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor,
                      bits: int, block_size: int, in_features: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, K) weight in `dtype` (outlier columns excluded: they are 0 here).

    codebook: fp32 padded to 2^bits (`pad_codebook`); absmax: float (N, n_blocks).
    """
    n, k, kp = qweight.shape[0], in_features, packing.padded_len(in_features)
    cb = codebook.float()
    if bits in (4, 8):
        vals = _byte_table(cb, bits)[qweight.long()].view(n, kp)
    else:
        vals = cb[packing.unpack(qweight, k, bits, keep_padding=True).long()]
    nb = absmax.shape[1]
    if kp != nb * block_size:  # ragged: align the values to whole blocks
        vals = torch.nn.functional.pad(vals[:, :k], (0, nb * block_size - k))
    w = vals.view(n, nb, block_size) * absmax.float().unsqueeze(-1)
    return w.view(n, nb * block_size)[:, :k].to(dtype)


def kbit_linear_torch(x: torch.Tensor, qweight: torch.Tensor, absmax: torch.Tensor,
                      codebook: torch.Tensor, bias: torch.Tensor | None,
                      outlier_idx: torch.Tensor | None, outlier_weight: torch.Tensor | None,
                      bits: int, block_size: int, in_features: int) -> torch.Tensor:
    """x (M, K) -> (M, N) in x.dtype, computed in fp32 (the reference every kernel must match)."""
    w = dequantize_packed(qweight, absmax, codebook, bits, block_size, in_features)
    xf = x.float()
    return add_outliers_and_bias(xf @ w.t(), xf, bias, outlier_idx, outlier_weight).to(x.dtype)


def add_outliers_and_bias(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None,
                          outlier_idx: torch.Tensor | None,
                          outlier_weight: torch.Tensor | None) -> torch.Tensor:
    """fp32 y (M, N) of the quantized columns, plus the outlier columns' products, then the bias:
    the order every twin and CPU kernel path adds them in."""
    if outlier_idx is not None and outlier_idx.numel():
        y = y + x.float().index_select(1, outlier_idx) @ outlier_weight.float().t()
    return y + bias.float() if bias is not None else y
