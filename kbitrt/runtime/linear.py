"""KbitLinear: an nn.Linear whose weight stays packed k-bit codes + block absmax + codebook.

On CUDA every forward runs the fused-dequant kernels (kbitrt::kbit_linear): W is never
materialised in GPU memory. On the CPU the same op would dequantize the whole weight on every call,
which measured 10-35 ms per million weights on 2 cores (~1-3 s per token for SmolLM2-135M), so by
default a CPU KbitLinear dequantizes once, on its first forward, and keeps W in the activation
dtype (`cpu_cache=False` turns this off: slow, but only the packed bytes stay in memory).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kbitrt.format import packing
from kbitrt.format.blockwise import QuantizedWeight
from kbitrt.runtime.kernels import kbit_linear
from kbitrt.runtime.kernels.reference import dequantize_packed, pad_codebook

_FIXED_DTYPE_BUFFERS = ("codebook", "absmax")  # model.half() must not round these


class KbitLinear(nn.Module):
    """y = x W^T + b with W (out_features, in_features) stored as k-bit codes.

    Buffers (so .to(device) and state_dict carry them): qweight uint8 (N, Kp*bits/8), absmax
    fp16/fp32 (N, n_blocks), codebook fp32 (2^bits,) padded, outlier_idx int64 (n_out,),
    outlier_weight (N, n_out), bias (N,) or None.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, block_size: int,
                 bias: bool = False, n_outliers: int = 0, absmax_dtype: torch.dtype = torch.float16,
                 compute_dtype: torch.dtype = torch.float16, data_type: str | None = None,
                 device: torch.device | str | None = None, cpu_cache: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.block_size = bits, block_size
        self.data_type = data_type
        self.cpu_cache = cpu_cache
        n_blocks = -(-in_features // block_size)
        kw = dict(device=device)
        self.register_buffer("qweight", torch.zeros(
            out_features, packing.packed_row_bytes(in_features, bits), dtype=torch.uint8, **kw))
        self.register_buffer("absmax",
                             torch.zeros(out_features, n_blocks, dtype=absmax_dtype, **kw))
        self.register_buffer("codebook", torch.zeros(1 << bits, dtype=torch.float32, **kw))
        self.register_buffer("outlier_idx", torch.zeros(n_outliers, dtype=torch.int64, **kw))
        self.register_buffer("outlier_weight",
                             torch.zeros(out_features, n_outliers, dtype=compute_dtype, **kw))
        self.register_buffer("bias", torch.zeros(out_features, dtype=compute_dtype, **kw)
                             if bias else None)
        self._w_cache: tuple | None = None  # (key, dequantized W) for the CPU path

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                       compute_dtype: torch.dtype = torch.float16, data_type: str | None = None,
                       cpu_cache: bool = True) -> KbitLinear:
        n, k = qw.shape
        absmax = qw.kernel_absmax()  # dq8 is decoded once, here: the kernels read plain scales
        n_out = qw.outlier_idx.numel() if qw.outlier_idx is not None else 0
        mod = cls(k, n, qw.bits, qw.block_size, bias=bias is not None, n_outliers=n_out,
                  absmax_dtype=absmax.dtype, compute_dtype=compute_dtype, data_type=data_type,
                  device=qw.qweight.device, cpu_cache=cpu_cache)
        mod.qweight.copy_(qw.qweight)
        mod.absmax.copy_(absmax)
        mod.codebook.copy_(pad_codebook(qw.codebook, qw.bits))
        if n_out:
            mod.outlier_idx.copy_(qw.outlier_idx)
            mod.outlier_weight.copy_(qw.outlier_weight)
        if bias is not None:
            mod.bias.copy_(bias)
        return mod

    def _apply(self, fn, recurse=True):
        # codebook and absmax keep their dtype under model.half()/.to(dtype); they follow devices
        self._w_cache = None
        keep = {name: self._buffers[name] for name in _FIXED_DTYPE_BUFFERS}
        super()._apply(fn, recurse)
        for name, t in keep.items():
            self._buffers[name] = t.to(self._buffers[name].device)
        return self

    def outliers(self) -> tuple[Tensor | None, Tensor | None]:
        """(outlier column indices, their 16-bit weights), or (None, None) when there are none."""
        if self.outlier_idx.numel():
            return self.outlier_idx, self.outlier_weight
        return None, None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full (N, K) weight, outlier columns included (tests, CPU cache, export)."""
        w = dequantize_packed(self.qweight, self.absmax, self.codebook, self.bits,
                              self.block_size, self.in_features)
        idx, ow = self.outliers()
        if idx is not None:
            w[:, idx] = ow.float()
        return w.to(dtype)

    def _cached_weight(self, dtype: torch.dtype) -> torch.Tensor:
        key = (dtype, self.qweight.data_ptr(), self.qweight._version, self.absmax._version)
        if self._w_cache is None or self._w_cache[0] != key:
            self._w_cache = (key, self.dequantize(dtype))
        return self._w_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features) in x.dtype."""
        if x.device.type == "cpu" and self.cpu_cache:
            bias = self.bias.to(x.dtype) if self.bias is not None else None
            return F.linear(x, self._cached_weight(x.dtype), bias)
        idx, ow = self.outliers()
        return kbit_linear(x, self.qweight, self.absmax, self.codebook, self.bias, idx, ow,
                           self.bits, self.block_size, self.in_features)

    def extra_repr(self) -> str:
        dtype = f"{self.data_type}{self.bits}" if self.data_type else f"{self.bits}-bit"
        absmax = str(self.absmax.dtype).replace("torch.", "")
        extra = f", outliers={self.outlier_idx.numel()}" if self.outlier_idx.numel() else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, {dtype}, "
                f"block={self.block_size}, absmax={absmax}{extra}, bias={self.bias is not None}")


def replace_linears(model: nn.Module,
                    quantized: dict[str, QuantizedWeight | tuple[QuantizedWeight, Tensor | None]],
                    compute_dtype: torch.dtype = torch.float16, data_type: str | None = None,
                    cpu_cache: bool = True) -> list[str]:
    """Swap the nn.Linear modules named in `quantized` for KbitLinears; returns the names swapped.

    A value is a QuantizedWeight (the bias is taken from the module being replaced) or a
    (QuantizedWeight, bias) pair. Shapes are checked against the module's weight.
    """
    done = []
    for name, value in quantized.items():
        qw, bias = value if isinstance(value, tuple) else (value, None)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        if not isinstance(old, nn.Linear):
            raise TypeError(f"{name} is a {type(old).__name__}, not an nn.Linear")
        if tuple(old.weight.shape) != tuple(qw.shape):
            raise ValueError(f"{name}: the quantized weight is {tuple(qw.shape)}, "
                             f"the linear's is {tuple(old.weight.shape)}")
        if not isinstance(value, tuple) and old.bias is not None and old.bias.device.type != "meta":
            bias = old.bias.detach()
        new = KbitLinear.from_quantized(qw, bias, compute_dtype, data_type, cpu_cache)
        setattr(parent, child, new)
        done.append(name)
    return done
