"""The public op `kbitrt::kbit_linear_planes`: y = x W^T (+ bias) from the first k_planes bit
planes of an any-precision linear, as stored. Triton on CUDA (kernels/planes.py), the torch twin
elsewhere (planes_reference.py; the CPU module path calls the C++ kernel, kernels/cpu.py).

A torch.library custom op with a fake, so decode steps that call it can be torch.compiled and
CUDA-graphed; k_planes is an int argument, so a graph captured per width stays valid for that
width. Triton is imported on the first CUDA call only.
"""

from typing import Optional

import torch

from kbitrt.runtime.kernels.planes_reference import kbit_linear_planes_torch

__all__ = ["kbit_linear_planes", "kbit_linear_planes_2d"]


@torch.library.custom_op("kbitrt::kbit_linear_planes", mutates_args=())
def kbit_linear_planes_2d(x: torch.Tensor, planes: torch.Tensor, absmax: torch.Tensor,
                          codebook: torch.Tensor, bias: Optional[torch.Tensor],
                          outlier_idx: Optional[torch.Tensor],
                          outlier_weight: Optional[torch.Tensor], k_planes: int, block_size: int,
                          in_features: int) -> torch.Tensor:
    """x (M, K) -> (M, N) in x.dtype; see planes_reference.kbit_linear_planes_torch."""
    if x.is_cuda:
        from kbitrt.runtime.kernels.planes import kbit_linear_planes_triton
        return kbit_linear_planes_triton(x, planes, absmax, codebook, bias, outlier_idx,
                                         outlier_weight, k_planes, block_size, in_features)
    return kbit_linear_planes_torch(x, planes, absmax, codebook, bias, outlier_idx,
                                    outlier_weight, k_planes, block_size, in_features)


@kbit_linear_planes_2d.register_fake
def _(x, planes, absmax, codebook, bias, outlier_idx, outlier_weight, k_planes, block_size,
      in_features):
    torch._check(x.dim() == 2 and x.shape[1] == in_features)
    return x.new_empty((x.shape[0], planes.shape[1]))


def kbit_linear_planes(x: torch.Tensor, planes: torch.Tensor, absmax: torch.Tensor,
                       codebook: torch.Tensor, bias: Optional[torch.Tensor],
                       outlier_idx: Optional[torch.Tensor], outlier_weight: Optional[torch.Tensor],
                       k_planes: int, block_size: int, in_features: int) -> torch.Tensor:
    """x (..., K) -> (..., N): flattens the leading dims into M and calls the op."""
    lead = x.shape[:-1]
    y = torch.ops.kbitrt.kbit_linear_planes(x.reshape(-1, x.shape[-1]), planes, absmax, codebook,
                                            bias, outlier_idx, outlier_weight, k_planes,
                                            block_size, in_features)
    return y.reshape(*lead, planes.shape[1])
