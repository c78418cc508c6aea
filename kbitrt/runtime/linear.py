"""KbitLinear: an nn.Linear whose weight stays packed k-bit codes + block absmax + codebook.

On CUDA every forward runs the fused-dequant kernels (kbitrt::kbit_linear): W is never
materialised in GPU memory. On the CPU there are two modes:

- `packed` (the default for 3..6-bit models where the fused CPU kernels run vectorized,
  kernels/cpu.py and loader.cpu_weights_for; `--low-memory`): only
  the packed k-bit codes stay resident. The fused kernel reads them directly for up to
  cpu.FUSED_MAX_ROWS tokens (decoding); above, the layer is dequantized into a temporary and
  multiplied by torch. Without the kernels each call dequantizes in torch (slow: ~10-35 ms per
  million weights on 2 cores).
- `dense`: W is dequantized once, on the first forward, into a 16-bit copy (fp16 by default: on
  our Xeon torch's fp16 GEMV is as fast as bf16 or faster, and fp16 keeps 3 more mantissa bits;
  benchmarks/cpu_matmul.py), multiplied with the fp32 activations as they are (dense_linear:
  products and sums in fp32, so only the weights are rounded).
  `release_packed()` then drops the packed buffers, so only the 16-bit copy stays resident: at
  most 16 bits per weight (the default otherwise).
  `cpu_dtype=torch.float32` keeps an exact fp32 copy instead (tests, reference numbers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kbitrt.format import packing
from kbitrt.format.blockwise import QuantizedWeight
from kbitrt.runtime.devices import cpu_path
from kbitrt.runtime.kernels.ops import dense_linear, half_linear, kbit_linear
from kbitrt.runtime.kernels.reference import dequantize_packed, pad_codebook

_FIXED_DTYPE_BUFFERS = ("codebook", "absmax")  # model.half() must not round these
CPU_MODES = ("dense", "packed")
DEFAULT_CPU_DTYPE = torch.float16  # the dense CPU copy (see the module docstring)


class KbitLinear(nn.Module):
    """y = x W^T + b with W (out_features, in_features) stored as k-bit codes.

    Buffers (so .to(device) and state_dict carry them): qweight uint8 (N, Kp*bits/8), absmax
    fp16/fp32 (N, n_blocks), codebook fp32 (2^bits,) padded, outlier_idx int64 (n_out,),
    outlier_weight (N, n_out), bias (N,) or None.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, block_size: int,
                 bias: bool = False, n_outliers: int = 0, absmax_dtype: torch.dtype = torch.float16,
                 compute_dtype: torch.dtype = torch.float16, data_type: str | None = None,
                 device: torch.device | str | None = None, cpu_cache: bool = True,
                 cpu_dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.block_size = bits, block_size
        self.data_type = data_type
        self.cpu_mode = "dense" if cpu_cache else "packed"
        self.cpu_dtype = cpu_dtype or DEFAULT_CPU_DTYPE
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
        # the dense copy once the packed buffers are released (moves with .to(device))
        self.register_buffer("dense_weight", None, persistent=False)
        self._w_cache: tuple | None = None  # (key, dequantized W) for the CPU path

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                       compute_dtype: torch.dtype = torch.float16, data_type: str | None = None,
                       cpu_cache: bool = True, cpu_dtype: torch.dtype | None = None) -> KbitLinear:
        n, k = qw.shape
        absmax = qw.kernel_absmax()  # dq8 is decoded once, here: the kernels read plain scales
        n_out = qw.outlier_idx.numel() if qw.outlier_idx is not None else 0
        mod = cls(k, n, qw.bits, qw.block_size, bias=bias is not None, n_outliers=n_out,
                  absmax_dtype=absmax.dtype, compute_dtype=compute_dtype, data_type=data_type,
                  device=qw.qweight.device, cpu_cache=cpu_cache, cpu_dtype=cpu_dtype)
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
        dense = self._buffers["dense_weight"]
        super()._apply(fn, recurse)
        for name, t in keep.items():
            self._buffers[name] = t.to(self._buffers[name].device)
        if dense is not None:  # keeps its 16-bit dtype too
            self._buffers["dense_weight"] = dense.to(self._buffers["dense_weight"].device)
        return self

    @property
    def packed_released(self) -> bool:
        return self.dense_weight is not None

    def release_packed(self, dtype: torch.dtype | None = None) -> KbitLinear:
        """Keep only a dense copy of W (dtype: cpu_dtype) and free the packed buffers, so a CPU
        model holds 16 bits per weight rather than 16 + k. Irreversible for this module."""
        if self.dense_weight is None:
            w = self.dequantize(dtype or self.cpu_dtype)
            for name in ("qweight", "absmax", "codebook", "outlier_weight"):
                t = self._buffers[name]
                self._buffers[name] = t.new_empty((0,) * t.dim())
            self._buffers["outlier_idx"] = self.outlier_idx.new_empty(0)
            self.dense_weight = w
            self._w_cache = None
        return self

    def held_bytes(self) -> int:
        """Bytes this module keeps resident for W (packed buffers, dense copies, bias)."""
        n = sum(t.numel() * t.element_size() for t in self.buffers(recurse=False))
        if self._w_cache is not None:
            n += self._w_cache[1].numel() * self._w_cache[1].element_size()
        return n

    def outliers(self) -> tuple[Tensor | None, Tensor | None]:
        """(outlier column indices, their 16-bit weights), or (None, None) when there are none."""
        if self.outlier_idx.numel():
            return self.outlier_idx, self.outlier_weight
        return None, None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full (N, K) weight, outlier columns included (tests, CPU cache, export)."""
        if self.dense_weight is not None:
            return self.dense_weight.to(dtype)
        w = self._dequantize_bytes()
        if w is None:
            w = dequantize_packed(self.qweight, self.absmax, self.codebook, self.bits,
                                  self.block_size, self.in_features)
        idx, ow = self.outliers()
        if idx is not None:
            w[:, idx] = ow.float()
        return w.to(dtype)

    def _dequantize_bytes(self) -> torch.Tensor | None:
        """fp32 W for the one-slice layouts (4, 8 bits) with whole blocks: each packed byte looks up
        its 2 (or 1) values in a 256-row table, as an embedding lookup, which measured ~3x faster on
        the CPU than the generic reference (2.4 vs 7.2 ms for 1536 x 576, one core). None: use
        the reference."""
        n, k, kp = self.out_features, self.in_features, packing.padded_len(self.in_features)
        if self.bits not in (4, 8) or k != kp or self.absmax.shape[1] * self.block_size != k \
                or self.qweight.device.type != "cpu":
            return None
        cb = self.codebook.float()
        b = torch.arange(256, device=cb.device)
        table = cb[b][:, None] if self.bits == 8 else torch.stack([cb[b & 15], cb[b >> 4]], 1)
        vals = F.embedding(self.qweight.int(), table).view(n, -1, self.block_size)
        return (vals * self.absmax.float().unsqueeze(-1)).view(n, k)

    def dense_cpu_weight(self) -> torch.Tensor:
        """The 16-bit (cpu_dtype) W the dense CPU mode multiplies by: the released copy, else the
        cache it fills on first use."""
        if self.dense_weight is not None:
            return self.dense_weight
        return self._cached_weight(self.cpu_dtype)

    def _cached_weight(self, dtype: torch.dtype) -> torch.Tensor:
        key = (dtype, self.qweight.data_ptr(), self.qweight._version, self.absmax._version)
        if self._w_cache is None or self._w_cache[0] != key:
            self._w_cache = (key, self.dequantize(dtype))
        return self._w_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features) in x.dtype."""
        if self.dense_weight is not None:
            return dense_linear(x, self.dense_weight, self.bias)
        if cpu_path(x.device) and self.cpu_mode == "dense":
            return dense_linear(x, self._cached_weight(self.cpu_dtype), self.bias)
        # the op: Triton on the GPU path, the fused C++ kernels on the CPU (the torch twin, a
        # temporary fp32 W one layer at a time, where they are missing)
        idx, ow = self.outliers()
        return kbit_linear(x, self.qweight, self.absmax, self.codebook, self.bias, idx, ow,
                           self.bits, self.block_size, self.in_features)

    def extra_repr(self) -> str:
        dtype = f"{self.data_type}{self.bits}" if self.data_type else f"{self.bits}-bit"
        absmax = str(self.absmax.dtype).replace("torch.", "")
        extra = f", outliers={self.outlier_idx.numel()}" if self.outlier_idx.numel() else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, {dtype}, "
                f"block={self.block_size}, absmax={absmax}{extra}, bias={self.bias is not None}")


def stack_rows(layers: list[nn.Module]) -> KbitLinear | None:
    """One KbitLinear whose output rows are those of `layers` in turn, or None when they differ in
    anything but their rows (input size, bits, block, codebook, scale dtype, mode), hold outlier
    columns or dense copies. Rows are independent in the format and every kernel computes a row
    the same way, so the stacked layer gives the very same numbers in one call instead of several
    (a decode step of a small model on the CPU is dispatch-bound)."""
    first = layers[0]
    if any(type(m) is not KbitLinear for m in layers):
        return None
    same = {(m.in_features, m.bits, m.block_size, m.absmax.dtype, m.cpu_mode, m.data_type,
             m.bias is None, m.packed_released, m.outlier_idx.numel()) for m in layers}
    if len(same) != 1 or first.packed_released or first.outlier_idx.numel() \
            or any(not torch.equal(m.codebook, first.codebook) for m in layers[1:]):
        return None
    out = KbitLinear(first.in_features, 0, first.bits, first.block_size, bias=False,
                     absmax_dtype=first.absmax.dtype, compute_dtype=first.outlier_weight.dtype,
                     data_type=first.data_type, device=first.qweight.device,
                     cpu_cache=first.cpu_mode == "dense", cpu_dtype=first.cpu_dtype)
    out.out_features = sum(m.out_features for m in layers)
    out.qweight = torch.cat([m.qweight for m in layers])
    out.absmax = torch.cat([m.absmax for m in layers])
    out.codebook = first.codebook.clone()
    out.outlier_weight = first.outlier_weight.new_zeros(out.out_features, 0)
    out.bias = None if first.bias is None else torch.cat([m.bias for m in layers])
    return out


class HalfLinear(nn.Module):
    """An unquantized linear (the output head, often tied to the embedding) whose weight stays in
    the file's 16 bits on the CPU. With the fused CPU kernels the products and sums are fp32, in
    one order for any number of tokens (a decoding step and a verifying step get equal logits);
    without them F.linear in the weight's dtype."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None = None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return half_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{str(self.weight.dtype).replace('torch.', '')}, bias={self.bias is not None}")


def replace_linears(model: nn.Module,
                    quantized: dict[str, QuantizedWeight | tuple[QuantizedWeight, Tensor | None]],
                    compute_dtype: torch.dtype = torch.float16, data_type: str | None = None,
                    cpu_cache: bool = True, cpu_dtype: torch.dtype | None = None) -> list[str]:
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
        new = KbitLinear.from_quantized(qw, bias, compute_dtype, data_type, cpu_cache, cpu_dtype)
        setattr(parent, child, new)
        done.append(name)
    return done
