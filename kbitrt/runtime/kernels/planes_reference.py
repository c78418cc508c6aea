"""Pure-torch twin of the bit-plane kernels (kernels/planes.py, cpu_planes.h): y = x W^T (+ bias)
read from the planes of an any-precision model as stored (`bitplane-v1`, docs/format.md), with
the number of planes K an argument of each call.

    planes    uint8 (P, N, ceil(in_features/8)), P >= k_planes, most significant plane first; the
              bit of code i of a row sits in bit (i mod 8) of byte i div 8 of the row of a plane
    codebook  fp32 (2^k_planes,) (pad_codebook): width k_planes's codebook
    absmax    float (N, n_blocks): the block scales, shared by every width

The code of width K is the top K bits of the parent code: the first K planes, plane 0 its
highest bit. Same signature as `planes.kbit_linear_planes_triton`, so tests compare the two
argument for argument; also the reference the C++ plane kernel is checked against.
"""

from __future__ import annotations

import torch

from kbitrt.format.bitplane import unpack_planes
from kbitrt.runtime.kernels.reference import add_outliers_and_bias


def dequantize_planes(planes: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor,
                      k_planes: int, block_size: int, in_features: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, K) weight of width k_planes in `dtype` (outlier columns excluded: they are 0 here)."""
    if not 1 <= k_planes <= planes.shape[0]:
        raise ValueError(f"k_planes={k_planes}: the tensor holds {planes.shape[0]} planes")
    codes = unpack_planes(planes[:k_planes], in_features).long()
    n, k = codes.shape
    vals = codebook.float()[codes]
    nb = absmax.shape[1]
    if k != nb * block_size:  # ragged: align the values to whole blocks
        vals = torch.nn.functional.pad(vals, (0, nb * block_size - k))
    w = vals.view(n, nb, block_size) * absmax.float().unsqueeze(-1)
    return w.view(n, nb * block_size)[:, :k].to(dtype)


def kbit_linear_planes_torch(x: torch.Tensor, planes: torch.Tensor, absmax: torch.Tensor,
                             codebook: torch.Tensor, bias: torch.Tensor | None,
                             outlier_idx: torch.Tensor | None,
                             outlier_weight: torch.Tensor | None, k_planes: int, block_size: int,
                             in_features: int) -> torch.Tensor:
    """x (M, K) -> (M, N) in x.dtype, computed in fp32 (the reference every plane kernel matches):
    x W^T, then the outlier columns, then the bias."""
    w = dequantize_planes(planes, absmax, codebook, k_planes, block_size, in_features)
    xf = x.float()
    return add_outliers_and_bias(xf @ w.t(), xf, bias, outlier_idx, outlier_weight).to(x.dtype)
