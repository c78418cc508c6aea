"""Fused-dequant k-bit linear kernels: Triton (CUDA) and C++ (CPU) beside their pure-torch twins,
behind one op per function (ops.py)."""

from kbitrt.runtime.kernels.ops import (half_linear, kbit_dequantize, kbit_linear, kbit_linear_2d,
                                        pad_codebook)

__all__ = ["kbit_linear", "kbit_linear_2d", "kbit_dequantize", "half_linear", "pad_codebook"]
