"""The public op `kbitrt::kbit_linear`: Triton on the GPU path (devices.gpu_path), the torch twin
elsewhere.

A torch.library custom op with a fake (meta) implementation, so decode steps that call it can be
torch.compiled and CUDA-graphed. Triton is imported on the first CUDA call only: importing kbitrt
needs neither a GPU nor a Triton compile.
"""

from typing import Optional

import torch

from kbitrt.runtime.devices import gpu_path
from kbitrt.runtime.kernels.reference import kbit_linear_torch, pad_codebook

__all__ = ["kbit_linear", "kbit_linear_2d", "pad_codebook"]


@torch.library.custom_op("kbitrt::kbit_linear", mutates_args=())
def kbit_linear_2d(x: torch.Tensor, qweight: torch.Tensor, absmax: torch.Tensor,
                   codebook: torch.Tensor, bias: Optional[torch.Tensor],
                   outlier_idx: Optional[torch.Tensor], outlier_weight: Optional[torch.Tensor],
                   bits: int, block_size: int, in_features: int) -> torch.Tensor:
    """x (M, K) -> (M, N) in x.dtype; see triton_kbit.kbit_linear_triton for the arguments."""
    if gpu_path(x.device):  # CUDA, or the CPU under the CUDA twin (Triton interpreted)
        from kbitrt.runtime.kernels.triton_kbit import kbit_linear_triton
        return kbit_linear_triton(x, qweight, absmax, codebook, bias, outlier_idx, outlier_weight,
                                  bits, block_size, in_features)
    return kbit_linear_torch(x, qweight, absmax, codebook, bias, outlier_idx, outlier_weight,
                             bits, block_size, in_features)


@kbit_linear_2d.register_fake
def _(x, qweight, absmax, codebook, bias, outlier_idx, outlier_weight, bits, block_size,
      in_features):
    torch._check(x.dim() == 2 and x.shape[1] == in_features)
    return x.new_empty((x.shape[0], qweight.shape[0]))


def kbit_linear(x: torch.Tensor, qweight: torch.Tensor, absmax: torch.Tensor,
                codebook: torch.Tensor, bias: Optional[torch.Tensor],
                outlier_idx: Optional[torch.Tensor], outlier_weight: Optional[torch.Tensor],
                bits: int, block_size: int, in_features: int) -> torch.Tensor:
    """x (..., K) -> (..., N): flattens the leading dims into M and calls the op."""
    lead = x.shape[:-1]
    y = torch.ops.kbitrt.kbit_linear(x.reshape(-1, x.shape[-1]), qweight, absmax, codebook, bias,
                                     outlier_idx, outlier_weight, bits, block_size, in_features)
    return y.reshape(*lead, qweight.shape[0])
