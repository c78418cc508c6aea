"""Fused-dequant k-bit linear kernels: Triton (CUDA) beside their pure-torch twins (CPU)."""

from kbitrt.runtime.kernels.ops import kbit_linear, kbit_linear_2d, pad_codebook

__all__ = ["kbit_linear", "kbit_linear_2d", "pad_codebook"]
