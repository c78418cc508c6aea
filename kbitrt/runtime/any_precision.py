"""Running an any-precision model (packing bitplane-v1) at a chosen width.

`--bits K`: the reader reads only the first K bit planes of every linear (K bits per weight, plus
the shared scales and the width-K codebook) and repacks them once, at load, into the plain
bitslice-v1 layout, so every kernel and the CPU path serve width K unchanged: resident memory and
bytes read per token are those of a K-bit model.

`--bits LO-HI`: each linear (MultiWidthLinear) holds the HI planes as stored, one set of block
scales and the codebooks of every width, and nothing else: no repacked or dense copy. A call at
width K runs the plane kernels (kernels/planes.py on CUDA, cpu_planes.h on the CPU, twin
planes_reference.py), which read the first K planes directly; K is an argument of each call, so
`generate(lm, ..., bits=K)` / `set_width(lm, K)` only swaps the codebook (2^K values) and
copies no weight.

`hold_widths(lm, (3, 8))` (self-speculative decoding, runtime/speculative.py) marks those widths
ready (the CPU layer stack keeps one stack per width); with `keep_planes=False` the planes above
the widest listed width are dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from kbitrt.errors import KbitFormatError
from kbitrt.format.bitplane import BitplaneModel, codebook_offset, parse_range
from kbitrt.format.blockwise import QuantizedWeight
from kbitrt.format.config import (ABSMAX, ABSMAX_OFFSET, ABSMAX_SCALE, OUTLIER_IDX,
                                  OUTLIER_WEIGHT)
from kbitrt.runtime.devices import is_cuda
from kbitrt.runtime.kernels.cpu_schema import NONE, LinearKind, StackLinear
from kbitrt.runtime.kernels.ops import kbit_linear_planes
from kbitrt.runtime.kernels.planes_reference import dequantize_planes
from kbitrt.runtime.kernels.reference import pad_codebook
from kbitrt.runtime.linear import KbitLinear


def is_any_precision(source) -> bool:
    return isinstance(source, (BitplaneModel, MultiWidthSource))


def select_width(source, bits: int | str | None):
    """The source to build a model from: `bits` None keeps it; K picks width K of an
    any-precision model; LO-HI keeps widths LO..HI resident. A plain model only takes its own K."""
    if bits is None:
        return source
    lo, hi = parse_range(str(bits))
    if not isinstance(source, BitplaneModel):
        if lo == hi == source.quant.bits:
            return source
        where = getattr(source, "path", None) or "this model"
        raise KbitFormatError(f"--bits {bits}: {where} is a plain {source.quant.label} model; --bits "
                              "picks widths of an any-precision model (kbit convert --any-precision)")
    spec = source.spec
    if not spec.min_bits <= lo <= hi <= spec.max_bits:
        raise KbitFormatError(f"--bits {bits}: {source.path} serves {spec.min_bits}..{spec.max_bits} "
                              "bits")
    if lo == hi:
        return source.at_bits(lo)
    return MultiWidthSource(source.at_bits(hi), lo, hi)


@dataclass
class MultiWidthWeight(QuantizedWeight):
    """A QuantizedWeight of an any-precision linear: the planes of widths up to max_bits and every
    width's codebook; `qweight` is empty (nothing is repacked)."""

    planes: torch.Tensor | None = None  # uint8 (max_bits, N, ceil(K/8))
    codebooks: torch.Tensor | None = None  # the stored codebook tensor (all widths)
    min_bits: int = 0
    file_min_bits: int = 0  # lowest width of the file (codebook offsets count from it)


class MultiWidthSource:
    """The KbitModel interface over a BitplaneModel, serving MultiWidthWeights (widths lo..hi)."""

    def __init__(self, top: BitplaneModel, lo: int, hi: int):
        self.top, self.min_bits, self.max_bits = top, lo, hi
        self.quant = top.quant

    def __getattr__(self, name):
        return getattr(self.top, name)

    def quantized(self, module: str) -> MultiWidthWeight:
        top, e = self.top, self.top.modules[module]
        has = top.suffixes(module)

        def opt(suffix):
            return top.read(f"{module}.{suffix}") if suffix in has else None

        return MultiWidthWeight(
            qweight=torch.empty(e.out_features, 0, dtype=torch.uint8),
            absmax=top.read(f"{module}.{ABSMAX}"), codebook=top.codebook(module, self.max_bits),
            shape=(e.out_features, e.in_features), bits=self.max_bits,
            block_size=top.spec.block_size, absmax_scale=opt(ABSMAX_SCALE),
            absmax_offset=opt(ABSMAX_OFFSET), outlier_idx=opt(OUTLIER_IDX),
            outlier_weight=opt(OUTLIER_WEIGHT), planes=top.planes(module, self.max_bits),
            codebooks=top.tensor_codebooks(module), min_bits=self.min_bits,
            file_min_bits=top.spec.min_bits)


class MultiWidthLinear(KbitLinear):
    """A KbitLinear whose width is chosen per call: it holds the planes of widths up to max_bits
    (`planes`), the block scales and every width's codebook (`codebooks`); `set_bits(K)` swaps the
    active codebook and forward reads the first K planes through the plane kernels."""

    @classmethod
    def from_weight(cls, qw: MultiWidthWeight, bias: torch.Tensor | None = None,
                    compute_dtype: torch.dtype = torch.float16) -> MultiWidthLinear:
        n, k = qw.shape
        absmax = qw.kernel_absmax()
        n_out = qw.outlier_idx.numel() if qw.outlier_idx is not None else 0
        mod = cls(k, n, qw.bits, qw.block_size, bias=bias is not None, n_outliers=n_out,
                  absmax_dtype=absmax.dtype, compute_dtype=compute_dtype, cpu_cache=False,
                  device=absmax.device)
        mod._buffers["qweight"] = torch.empty(n, 0, dtype=torch.uint8, device=absmax.device)
        mod.absmax.copy_(absmax)
        if n_out:
            mod.outlier_idx.copy_(qw.outlier_idx)
            mod.outlier_weight.copy_(qw.outlier_weight)
        if bias is not None:
            mod.bias.copy_(bias)
        mod.register_buffer("planes", qw.planes.contiguous().clone())
        mod.register_buffer("codebooks", qw.codebooks.float().clone())
        mod.min_bits, mod.max_bits, mod.file_min_bits = qw.min_bits, qw.bits, qw.file_min_bits
        mod.width_codebooks = {}
        mod.bits = 0
        mod.set_bits(qw.bits)
        return mod

    def _apply(self, fn, recurse=True):
        codebooks = self._buffers.get("codebooks")
        super()._apply(fn, recurse)
        if codebooks is not None:  # fp32 under model.half(), like the codebook
            self._buffers["codebooks"] = codebooks.to(self._buffers["codebooks"].device)
        self.width_codebooks = {self.bits: self._buffers["codebook"]}
        return self

    def width_codebook(self, bits: int) -> torch.Tensor:
        """Width `bits`'s codebook, padded (one tensor per width, kept: stacks hold it)."""
        if bits not in self.width_codebooks:
            off = codebook_offset(bits, self.file_min_bits)
            self.width_codebooks[bits] = pad_codebook(self.codebooks[off: off + 2**bits], bits)
        return self.width_codebooks[bits]

    def set_bits(self, bits: int) -> None:
        if not self.min_bits <= bits <= self.max_bits:
            raise KbitFormatError(f"bits={bits}: this model holds widths {self.min_bits}.."
                                  f"{self.max_bits}")
        self._buffers["codebook"] = self.width_codebook(bits)
        self.bits = bits
        self._w_cache = None

    def hold(self, widths, keep_planes: bool = True) -> None:
        """Mark `widths` ready (no copy is built); keep_planes=False drops the planes above the
        widest of them. The active width afterwards is the last one listed."""
        for bits in widths:
            self.set_bits(bits)  # the one clear error
        top = max(widths)
        if not keep_planes and top < self.planes.shape[0]:
            self._buffers["planes"] = self.planes[:top].clone()
            self.max_bits = top
        self.held = {**(getattr(self, "held", None) or {}), **{b: {} for b in widths}}
        self.set_bits(widths[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features) in x.dtype, at width self.bits."""
        idx, ow = self.outliers()  # the op: Triton on the GPU path, the C++ kernels on the CPU
        return kbit_linear_planes(x, self.planes, self.absmax, self.codebook, self.bias, idx, ow,
                                  self.bits, self.block_size, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full (N, K) weight at the active width, outlier columns included."""
        w = dequantize_planes(self.planes, self.absmax, self.codebook, self.bits, self.block_size,
                              self.in_features)
        idx, ow = self.outliers()
        if idx is not None:
            w[:, idx] = ow.float()
        return w.to(dtype)

    def stack_linear(self) -> StackLinear:
        """This layer as the CPU layer stack's loops read it (kernels/cpu_schema.py): the planes,
        scales and codebook read at the current width; ValueError where they cannot run it."""
        if self.outlier_idx.numel():
            raise ValueError("outlier columns")
        bias = NONE if self.bias is None else self.bias.detach().float().contiguous()
        return StackLinear(LinearKind.planes, self.bits, self.block_size, self.in_features,
                           w0=self.planes, w1=self.absmax, w2=self.codebook, bias=bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", widths={self.min_bits}..{self.max_bits} (planes)"


def multi_width_linear(qw: MultiWidthWeight, bias, dtype: torch.dtype,
                       device: torch.device) -> MultiWidthLinear:
    return MultiWidthLinear.from_weight(qw, bias, compute_dtype=dtype).to(device)


def widths_of(model: torch.nn.Module) -> tuple[int, int] | None:
    """(min, max) width a loaded model can switch between, or None (one width only)."""
    mods = [m for m in model.modules() if isinstance(m, MultiWidthLinear)]
    if not mods:
        return None
    return max(m.min_bits for m in mods), min(m.max_bits for m in mods)


def hold_widths(lm, widths, keep_planes: bool = True) -> None:
    """Mark `widths` ready in every MultiWidthLinear (nothing is copied: every width reads the same
    planes); the last width listed is active afterwards. keep_planes=False drops the planes above
    the widest listed width (wider widths are then refused)."""
    model = getattr(lm, "model", lm)
    span = widths_of(model)
    for bits in widths:
        if span is None or not span[0] <= bits <= span[1]:
            set_width(lm, bits)  # the one clear error
    for m in model.modules():
        if isinstance(m, MultiWidthLinear):
            m.hold(widths, keep_planes)
    if hasattr(model, "refresh_layer_stack"):  # the CPU layer stack holds the planes it reads
        model.refresh_layer_stack()
    relabel(lm, widths[-1])
    if hasattr(lm, "weight_bytes"):  # what the model holds now: every tensor once, held copies too
        seen = {t.data_ptr(): t.numel() * t.element_size()
                for t in list(model.parameters()) + list(model.buffers())}
        for m in model.modules():
            for bits, copy in (getattr(m, "held", None) or {}).items():
                if bits != m.bits:
                    seen.update({t.data_ptr(): t.numel() * t.element_size() for t in copy.values()})
        lm.weight_bytes = sum(seen.values())


def relabel(lm, bits: int) -> None:
    if isinstance(getattr(lm, "quant_label", None), str):  # e.g. nf8-b64-ap3-8 -> nf5-b64-ap3-8
        lm.quant_label = re.sub(r"^([a-z]+)[0-9]-", rf"\g<1>{bits}-", lm.quant_label)


def set_width(lm, bits: int, reset_compiled: bool = True) -> None:
    """Switch every MultiWidthLinear of a LoadedModel to width `bits` (a no-op when already there).
    reset_compiled: on CUDA, drop torch.compile's graphs, which captured the previous width."""
    model = getattr(lm, "model", lm)
    span = widths_of(model)
    if span is None:
        raise KbitFormatError(f"bits={bits}: this model was loaded at one width; load it with "
                              "bits='LO-HI' (kbit run --bits 3-8) to choose the width per call")
    if not span[0] <= bits <= span[1]:
        raise KbitFormatError(f"bits={bits}: this model holds widths {span[0]}..{span[1]}")
    changed = False
    for m in model.modules():
        if isinstance(m, MultiWidthLinear) and m.bits != bits:
            m.set_bits(bits)
            changed = True
    if changed and hasattr(model, "refresh_layer_stack"):  # the CPU layer stack's tensors
        model.refresh_layer_stack()
    if changed and reset_compiled and is_cuda(next(model.buffers()).device):
        torch._dynamo.reset()  # compiled graphs captured the previous width's buffers
    relabel(lm, bits)
