"""Running an any-precision model (packing bitplane-v1) at a chosen width.

`--bits K`: the reader reads only the first K bit planes of every linear (K bits per weight, plus
the shared scales and the width-K codebook) and repacks them once, at load, into the plain
bitslice-v1 layout, so every kernel and the CPU path serve width K unchanged: resident memory and
bytes read per token are those of a K-bit model.

`--bits LO-HI`: every plane stays resident (MultiWidthLinear) and the width is picked per call,
`generate(lm, ..., bits=K)` or `set_width(lm, K)`; switching width repacks the top K planes of each
linear (one pass over the weights), and the active width's bitslice copy is held beside the planes.

`hold_widths(lm, (3, 8))` (self-speculative decoding, runtime/speculative.py): a ready copy of each
listed width is built once (bitslice codes + codebook; on the CPU the dense 16-bit weight the CPU
path multiplies with), so switching between them swaps buffers and copies nothing. With
`keep_planes=False` the planes are dropped: the model then holds those widths' copies alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from kbitrt.errors import KbitFormatError
from kbitrt.format.bitplane import BitplaneModel, codebook_offset, parse_range, to_bitslice
from kbitrt.format.blockwise import QuantizedWeight
from kbitrt.runtime.devices import cpu_path, is_cuda
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
    """A QuantizedWeight at its top width plus every plane and codebook of widths min..max."""

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
        qw = self.top.quantized(module, self.max_bits)
        fields = {f: getattr(qw, f) for f in QuantizedWeight.__dataclass_fields__}
        return MultiWidthWeight(**fields, planes=self.top.planes(module, self.max_bits),
                                codebooks=self.top.tensor_codebooks(module),
                                min_bits=self.min_bits, file_min_bits=self.top.spec.min_bits)


class MultiWidthLinear(KbitLinear):
    """A KbitLinear whose width can change: the planes of widths up to max_bits stay resident, and
    `set_bits(K)` repacks the top K of them (bitslice-v1) with width K's codebook."""

    @classmethod
    def from_weight(cls, qw: MultiWidthWeight, bias: torch.Tensor | None = None,
                    compute_dtype: torch.dtype = torch.float16) -> MultiWidthLinear:
        mod = cls.from_quantized(qw, bias, compute_dtype)
        mod.register_buffer("planes", qw.planes.contiguous().clone())
        mod.register_buffer("codebooks", qw.codebooks.float().clone())
        mod.min_bits, mod.max_bits, mod.file_min_bits = qw.min_bits, qw.bits, qw.file_min_bits
        return mod

    def _apply(self, fn, recurse=True):
        codebooks = self._buffers.get("codebooks")
        super()._apply(fn, recurse)
        if codebooks is not None:  # fp32 under model.half(), like the codebook
            self._buffers["codebooks"] = codebooks.to(self._buffers["codebooks"].device)
        device = self._buffers["absmax"].device
        for bits, copy in (getattr(self, "held", None) or {}).items():  # follow devices, keep dtypes
            for name, t in copy.items():
                copy[name] = self._buffers[name] if bits == self.bits else t.to(device)
        return self

    def set_bits(self, bits: int) -> None:
        if not self.min_bits <= bits <= self.max_bits:
            raise KbitFormatError(f"bits={bits}: this model holds widths {self.min_bits}.."
                                  f"{self.max_bits}")
        if bits == self.bits:
            return
        held = getattr(self, "held", None)
        if held and bits in held:  # a ready copy: swap buffers, copy nothing
            self._buffers.update(held[bits])
            self.bits = bits
            self._w_cache = None
            return
        if self.planes.numel() == 0:
            raise KbitFormatError(f"bits={bits}: this model holds widths "
                                  f"{', '.join(map(str, sorted(held or ())))} only (planes dropped)")
        off = codebook_offset(bits, self.file_min_bits)
        self._buffers["qweight"] = to_bitslice(self.planes[:bits], self.in_features)
        self._buffers["codebook"] = pad_codebook(self.codebooks[off: off + 2**bits], bits)
        self.bits = bits
        self._w_cache = None

    def hold(self, widths, keep_planes: bool = True) -> None:
        """Build a ready copy of each width in `widths` (see the module docstring); the active
        width afterwards is the last one listed."""
        if getattr(self, "held", None):
            raise KbitFormatError("this model already holds ready widths "
                                  f"{sorted(self.held)}: load it again to hold others")
        cpu_dense = cpu_path(self.absmax.device) and self.cpu_mode == "dense"
        held = {}
        for bits in widths:
            self.held = {}
            self.set_bits(bits)
            if cpu_dense:  # what the CPU path multiplies with; the packed codes are not needed
                dense = self.dequantize(self.cpu_dtype)
                held[bits] = {"dense_weight": dense}
            else:
                held[bits] = {"qweight": self.qweight, "codebook": self.codebook}
        if cpu_dense:
            for name in ("qweight", "absmax", "codebook", "outlier_weight", "outlier_idx"):
                t = self._buffers[name]
                self._buffers[name] = t.new_empty((0,) * t.dim())
        if not keep_planes:
            self._buffers["planes"] = self.planes.new_empty((0, 0, 0))
            self._buffers["codebooks"] = self.codebooks.new_empty(0)
        self.held = held
        self._buffers.update(held[bits])
        self._w_cache = None

    def held_bytes(self) -> int:
        """Resident bytes for W: the active buffers and every other held width's copy."""
        n = super().held_bytes()
        for bits, copy in (getattr(self, "held", None) or {}).items():
            if bits != self.bits:
                n += sum(t.numel() * t.element_size() for t in copy.values())
        return n

    def extra_repr(self) -> str:
        return super().extra_repr() + f", widths={self.min_bits}..{self.max_bits}"


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
    """Build ready copies of `widths` in every MultiWidthLinear (switching between them then
    copies nothing); the last width listed is active afterwards. keep_planes=False drops the planes
    (other widths are then refused)."""
    model = getattr(lm, "model", lm)
    span = widths_of(model)
    for bits in widths:
        if span is None or not span[0] <= bits <= span[1]:
            set_width(lm, bits)  # the one clear error
    for m in model.modules():
        if isinstance(m, MultiWidthLinear):
            m.hold(widths, keep_planes)
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
