"""kbitrt's ops, one per function, each with a kernel registered per device:

    torch.ops.kbitrt.kbit_linear(x, qweight, absmax, codebook, bias, outlier_idx, outlier_weight,
                                 bits, block_size, in_features)        y = x W^T (+ b), W packed
    torch.ops.kbitrt.kbit_linear_planes(x, planes, absmax, codebook, bias, outlier_idx,
                                        outlier_weight, k_planes, block_size, in_features)
                                                  the same from the top k_planes bit planes
    torch.ops.kbitrt.kbit_dequantize(qweight, absmax, codebook, bits, block_size, in_features)
    torch.ops.kbitrt.half_linear(x, weight16, bias)                   y = x W^T, W fp16 or bf16

- CUDA: the Triton kernels (triton_kbit.kbit_linear_triton), imported on the first call only, so
  importing kbitrt needs neither a GPU nor a Triton compile.
- CPU: the fused C++ kernels (kernels/cpu.py), or, under the CUDA twin (runtime/devices.py), the
  Triton kernels interpreted, exactly as on CUDA.
- Anything else, and the CPU without a C++ compiler: the torch twins (kernels/reference.py), which
  are also the reference every kernel is tested against.

Each op has one fake (meta) implementation, so decode steps that call it can be torch.compiled
and CUDA-graphed.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from kbitrt.runtime.devices import cpu_path, twin_enabled
from kbitrt.runtime.kernels import cpu as cpu_kernels
from kbitrt.runtime.kernels.planes_reference import kbit_linear_planes_torch
from kbitrt.runtime.kernels.reference import (add_outliers_and_bias, dequantize_packed,
                                              kbit_linear_torch, pad_codebook)

__all__ = ["kbit_linear", "kbit_linear_2d", "kbit_linear_planes", "kbit_linear_planes_2d",
           "kbit_dequantize", "half_linear", "half_linear_2d", "dense_linear", "pad_codebook"]


# ------------------------------------------------------------------------------- kbit_linear

@torch.library.custom_op("kbitrt::kbit_linear", mutates_args=())
def kbit_linear_2d(x: torch.Tensor, qweight: torch.Tensor, absmax: torch.Tensor,
                   codebook: torch.Tensor, bias: Optional[torch.Tensor],
                   outlier_idx: Optional[torch.Tensor], outlier_weight: Optional[torch.Tensor],
                   bits: int, block_size: int, in_features: int) -> torch.Tensor:
    """x (M, K) -> (M, N) in x.dtype; see triton_kbit.kbit_linear_triton for the arguments.
    This body is the kernel of devices without one of their own: the torch twin."""
    return kbit_linear_torch(x, qweight, absmax, codebook, bias, outlier_idx, outlier_weight,
                             bits, block_size, in_features)


@kbit_linear_2d.register_kernel("cuda")
def kbit_linear_cuda(x, qweight, absmax, codebook, bias, outlier_idx, outlier_weight, bits,
                     block_size, in_features):
    from kbitrt.runtime.kernels.triton_kbit import kbit_linear_triton

    return kbit_linear_triton(x, qweight, absmax, codebook, bias, outlier_idx, outlier_weight,
                              bits, block_size, in_features)


@kbit_linear_2d.register_kernel("cpu")
def kbit_linear_cpu(x, qweight, absmax, codebook, bias, outlier_idx, outlier_weight, bits,
                    block_size, in_features):
    if twin_enabled():  # the CUDA path, Triton interpreted
        return kbit_linear_cuda(x, qweight, absmax, codebook, bias, outlier_idx, outlier_weight,
                                bits, block_size, in_features)
    if not cpu_kernels.available():
        return kbit_linear_torch(x, qweight, absmax, codebook, bias, outlier_idx, outlier_weight,
                                 bits, block_size, in_features)
    has_outliers = outlier_idx is not None and outlier_idx.numel() > 0
    y = cpu_kernels.kbit_linear(x, qweight, absmax, codebook, None if has_outliers else bias,
                                bits, block_size, in_features)
    if has_outliers:  # the twin's order: outlier columns, then the bias
        y = add_outliers_and_bias(y, x, bias, outlier_idx, outlier_weight)
    return y.to(x.dtype)


@kbit_linear_2d.register_fake
def _(x, qweight, absmax, codebook, bias, outlier_idx, outlier_weight, bits, block_size,
      in_features):
    torch._check(x.dim() == 2 and x.shape[1] == in_features)
    return x.new_empty((x.shape[0], qweight.shape[0]))


def kbit_linear(x: torch.Tensor, qweight: torch.Tensor, absmax: torch.Tensor,
                codebook: torch.Tensor, bias: Optional[torch.Tensor],
                outlier_idx: Optional[torch.Tensor], outlier_weight: Optional[torch.Tensor],
                bits: int, block_size: int, in_features: int) -> torch.Tensor:
    """x (..., K) -> (..., N): flattens the leading dims into M and calls the op. On the CPU path
    the op's CPU kernel is called directly: the custom op's Python dispatch imports torch._dynamo
    on its first call (~170 MB resident), which an eager CPU run never needs otherwise."""
    return call_2d(torch.ops.kbitrt.kbit_linear, kbit_linear_cpu, x, qweight.shape[0],
                   qweight, absmax, codebook, bias, outlier_idx, outlier_weight, bits,
                   block_size, in_features)


def call_2d(op, cpu_kernel, x: torch.Tensor, n_out: int, *args) -> torch.Tensor:
    """An op over x (..., K) -> (..., n_out) with its leading dims flattened. On the CPU path the
    op's CPU kernel is called directly: the custom op's Python dispatch imports torch._dynamo on
    its first call (~170 MB resident), which an eager CPU run never needs otherwise."""
    x2 = x.reshape(-1, x.shape[-1])
    y = cpu_kernel(x2, *args) if cpu_path(x.device) and not torch.compiler.is_compiling() \
        else op(x2, *args)
    return y.reshape(*x.shape[:-1], n_out)


# ------------------------------------------------------------------------ kbit_linear_planes

@torch.library.custom_op("kbitrt::kbit_linear_planes", mutates_args=())
def kbit_linear_planes_2d(x: torch.Tensor, planes: torch.Tensor, absmax: torch.Tensor,
                          codebook: torch.Tensor, bias: Optional[torch.Tensor],
                          outlier_idx: Optional[torch.Tensor],
                          outlier_weight: Optional[torch.Tensor], k_planes: int, block_size: int,
                          in_features: int) -> torch.Tensor:
    """x (M, K) -> (M, N) in x.dtype from the first k_planes bit planes of an any-precision
    linear, as stored (planes_reference.kbit_linear_planes_torch: the twin and the default)."""
    return kbit_linear_planes_torch(x, planes, absmax, codebook, bias, outlier_idx,
                                    outlier_weight, k_planes, block_size, in_features)


@kbit_linear_planes_2d.register_kernel("cuda")
def kbit_linear_planes_cuda(x, planes, absmax, codebook, bias, outlier_idx, outlier_weight,
                            k_planes, block_size, in_features):
    from kbitrt.runtime.kernels.planes import kbit_linear_planes_triton

    return kbit_linear_planes_triton(x, planes, absmax, codebook, bias, outlier_idx,
                                     outlier_weight, k_planes, block_size, in_features)


@kbit_linear_planes_2d.register_kernel("cpu")
def kbit_linear_planes_cpu(x, planes, absmax, codebook, bias, outlier_idx, outlier_weight,
                           k_planes, block_size, in_features):
    if twin_enabled():  # the CUDA path, Triton interpreted
        return kbit_linear_planes_cuda(x, planes, absmax, codebook, bias, outlier_idx,
                                       outlier_weight, k_planes, block_size, in_features)
    if not cpu_kernels.available():
        return kbit_linear_planes_torch(x.float(), planes, absmax, codebook, bias, outlier_idx,
                                        outlier_weight, k_planes, block_size,
                                        in_features).to(x.dtype)
    has_outliers = outlier_idx is not None and outlier_idx.numel() > 0
    y = cpu_kernels.kbit_linear_planes(x, planes, absmax, codebook,
                                       None if has_outliers else bias, k_planes, block_size,
                                       in_features)
    if has_outliers:
        y = add_outliers_and_bias(y, x, bias, outlier_idx, outlier_weight)
    return y.to(x.dtype)


@kbit_linear_planes_2d.register_fake
def _(x, planes, absmax, codebook, bias, outlier_idx, outlier_weight, k_planes, block_size,
      in_features):
    torch._check(x.dim() == 2 and x.shape[1] == in_features)
    return x.new_empty((x.shape[0], planes.shape[1]))


def kbit_linear_planes(x: torch.Tensor, planes: torch.Tensor, absmax: torch.Tensor,
                       codebook: torch.Tensor, bias: Optional[torch.Tensor],
                       outlier_idx: Optional[torch.Tensor], outlier_weight: Optional[torch.Tensor],
                       k_planes: int, block_size: int, in_features: int) -> torch.Tensor:
    """x (..., K) -> (..., N) at width k_planes; the CPU path calls the CPU kernel directly (see
    kbit_linear)."""
    return call_2d(torch.ops.kbitrt.kbit_linear_planes, kbit_linear_planes_cpu, x,
                   planes.shape[1], planes, absmax, codebook, bias, outlier_idx, outlier_weight,
                   k_planes, block_size, in_features)


# --------------------------------------------------------------------------- kbit_dequantize

@torch.library.custom_op("kbitrt::kbit_dequantize", mutates_args=())
def kbit_dequantize(qweight: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor,
                    bits: int, block_size: int, in_features: int) -> torch.Tensor:
    """The fp32 (N, in_features) weight of packed codes (without outlier columns)."""
    return dequantize_packed(qweight, absmax, codebook, bits, block_size, in_features)


@kbit_dequantize.register_kernel("cpu")
def kbit_dequantize_cpu(qweight, absmax, codebook, bits, block_size, in_features):
    if twin_enabled() or not cpu_kernels.available():
        return dequantize_packed(qweight, absmax, codebook, bits, block_size, in_features)
    return cpu_kernels.kbit_dequantize(qweight, absmax, codebook, bits, block_size, in_features)


@kbit_dequantize.register_fake
def _(qweight, absmax, codebook, bits, block_size, in_features):
    return absmax.new_empty((qweight.shape[0], in_features), dtype=torch.float32)


# ------------------------------------------------------------------------------- half_linear

@torch.library.custom_op("kbitrt::half_linear", mutates_args=())
def half_linear_2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
                   ) -> torch.Tensor:
    """x (M, K) -> (M, N) in x.dtype for a 16-bit weight (N, K) kept in its own dtype."""
    return dense_linear(x, weight, bias)


@half_linear_2d.register_kernel("cpu")
def half_linear_cpu(x, weight, bias):
    return dense_linear(x, weight, bias)  # the fused kernel for fp32 x on the CPU path


@half_linear_2d.register_fake
def _(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


def half_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
    """x (..., K) -> (..., N) for a 16-bit weight; the CPU path calls the CPU kernel directly
    (see kbit_linear)."""
    return call_2d(torch.ops.kbitrt.half_linear, half_linear_cpu, x, weight.shape[0], weight,
                   bias)


def dense_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear with W in its own dtype. A 16-bit W under the CPU path's fp32 activations
    multiplies them as they are (products and sums in fp32, in one order for any number of rows:
    the fused kernels' half_linear, else an fp32 copy of W), so only the weights are rounded;
    other mixes cast x to W's dtype and the result back."""
    if x.dtype == w.dtype:
        return F.linear(x, w, bias.to(w.dtype) if bias is not None else None)
    if x.dtype == torch.float32 and w.dtype in cpu_kernels.HALF_DTYPES and cpu_path(x.device):
        x2 = x.reshape(-1, w.shape[1])
        y = cpu_kernels.half_linear(x2, w.contiguous(), bias) if cpu_kernels.available() else \
            F.linear(x2, w.float(), None if bias is None else bias.float())
        return y.reshape(*x.shape[:-1], w.shape[0])
    y = F.linear(x.to(w.dtype), w).to(x.dtype)
    return y + bias.to(x.dtype) if bias is not None else y
