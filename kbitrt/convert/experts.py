"""Mixture-of-Experts checkpoints, streamed: every expert's matrix as a linear of its own.

A checkpoint holds experts in one of two layouts, and `ExpertTensors` shows both to the converter
as the same thing, one 2-D (out, in) weight `<parameter>.<e>.weight` per expert and fused
parameter (kbitrt/format/experts.py names them), so each is quantized blockwise like any linear,
row chunk by row chunk:
- fused 3-D tensors, as transformers holds them (gpt-oss on the Hub; a model saved fused): expert e
  is slice e, transposed when the experts class says `is_transposed` ((E, in, out) in memory);
- the Hub's per-expert tensors (`experts.N.w1/w2/w3`, `experts.N.gate_proj/up_proj/down_proj`),
  which transformers merges at load time through its checkpoint conversion mapping: expert N's
  matrix is the rows of its parts in the converter's order (gate then up, as `Concatenate(dim=1)`
  stacks them). A conversion with other operations is refused with one line.
Reads stay bounded: one expert's slice (or part) at a time, never a layer's whole stack.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from kbitrt.convert.model_map import ModelMap
from kbitrt.errors import KbitFormatError
from kbitrt.format.experts import ExpertParam, expert_params, split_expert_linear

# the operations of transformers' WeightConverter that build a fused (E, out, in) parameter from
# per-expert (out, in) tensors: stack the experts, concatenate the parts along the rows
STACKING_OPERATIONS = {"MergeModulelist": 0, "Concatenate": 1}


@dataclass(frozen=True)
class Part:
    key: str  # checkpoint key
    expert: int | None  # slice of a fused 3-D tensor, None for a per-expert 2-D tensor
    transposed: bool  # the slice is (in, out)
    rows: int


class ExpertTensors:
    """CheckpointTensors with the expert tensors replaced by one virtual (out, in) weight per expert
    and fused parameter; every other tensor passes through unchanged."""

    def __init__(self, tensors, mm: ModelMap):
        self.base = tensors
        self.parts: dict[str, list[tuple[int, Part]]] = {}  # virtual name -> (order, part)
        consumed = set()
        for key in tensors.names():
            if self._add_fused(key, mm) or self._add_per_expert(key, mm):
                consumed.add(key)
        for name, parts in self.parts.items():
            self._check(name, sorted(parts, key=lambda p: p[0]), mm)
        self._names = sorted((set(tensors.names()) - consumed) | set(self.parts))

    def _add_fused(self, key: str, mm: ModelMap) -> bool:
        p = mm.experts.get(mm.renamed(key))
        if p is None:
            return False
        shape = self.base.shape(key)
        want = (p.num_experts, p.in_features, p.out_features) if p.transposed else \
            (p.num_experts, p.out_features, p.in_features)
        if tuple(shape) != want:
            raise KbitFormatError(f"{self.base.ckpt.folder}: {key} has shape {list(shape)}, the "
                                  f"config makes it {list(want)}; nothing was written")
        for e in range(p.num_experts):
            self.parts.setdefault(f"{p.linear(e)}.weight", []).append(
                (0, Part(key, e, p.transposed, p.out_features)))
        return True

    def _add_per_expert(self, key: str, mm: ModelMap) -> bool:
        name = key
        for r in mm.renamings:
            name, _ = r.rename_source_key(name)
        for c in mm.converters:
            target, pattern = c.rename_source_key(name)
            if pattern is None:
                continue
            p = mm.experts.get(mm.renamed(target))
            if p is None:
                return False  # not an expert conversion: the converter refuses it by name
            ops = [type(op).__name__ for op in getattr(c, "operations", [])]
            dims = [getattr(op, "dim", None) for op in getattr(c, "operations", [])]
            if p.transposed or any(STACKING_OPERATIONS.get(o, -1) != d for o, d in zip(ops, dims)):
                raise KbitFormatError(
                    f"{self.base.ckpt.folder}: {key} becomes {p.name} through {', '.join(ops)}, a "
                    "conversion kbitrt does not apply to experts; nothing was written")
            found = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), name)
            if found is None or not found.groups():
                raise KbitFormatError(f"{self.base.ckpt.folder}: {key}: no expert index where "
                                      f"{pattern!r} has one; nothing was written")
            e = int(found.group(1))
            if e >= p.num_experts or len(self.base.shape(key)) != 2:
                raise KbitFormatError(f"{self.base.ckpt.folder}: {key} is no expert weight of a "
                                      f"model with {p.num_experts} experts per layer; nothing was "
                                      "written")
            order = list(c.source_patterns).index(pattern)
            self.parts.setdefault(f"{p.linear(e)}.weight", []).append(
                (order, Part(key, None, False, self.base.shape(key)[0])))
            return True
        return False

    def _check(self, name: str, parts: list[tuple[int, Part]], mm: ModelMap) -> None:
        p: ExpertParam = mm.experts[name.rsplit(".", 2)[0]]
        orders = [o for o, _ in parts]
        rows = sum(part.rows for _, part in parts)
        ks = {self.base.shape(part.key)[-1 if not part.transposed else -2] for _, part in parts}
        if len(set(orders)) != len(orders) or rows != p.out_features or ks != {p.in_features}:
            keys = ", ".join(part.key for _, part in parts)
            raise KbitFormatError(f"{self.base.ckpt.folder}: {name.removesuffix('.weight')} gets "
                                  f"{rows} rows of {sorted(ks)} columns from {keys}, the config "
                                  f"makes it ({p.out_features}, {p.in_features}); nothing was written")
        self.parts[name] = parts

    # ------------------------------------------------ the CheckpointTensors interface

    @property
    def ckpt(self):
        return self.base.ckpt

    def names(self) -> list[str]:
        return self._names

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.parts:
            return self.base.shape(name)
        parts = [part for _, part in self.parts[name]]
        k = self.base.shape(parts[0].key)[-2 if parts[0].transposed else -1]
        return (sum(part.rows for part in parts), k)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(self.parts[name][0][1].key if name in self.parts else name)

    def nbytes(self, name: str) -> int:
        if name not in self.parts:
            return self.base.nbytes(name)
        n, k = self.shape(name)
        return n * k * torch.empty(0, dtype=self.dtype(name)).element_size()

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if name not in self.parts:
            return self.base.read(name, rows)
        r0, r1 = rows if rows is not None else (0, self.shape(name)[0])
        out, start = [], 0
        for _, part in self.parts[name]:
            a, b = max(r0 - start, 0), min(r1 - start, part.rows)
            if a < b:
                out.append(self._read_part(part, a, b))
            start += part.rows
        return out[0] if len(out) == 1 else torch.cat(out)

    def _read_part(self, part: Part, a: int, b: int) -> torch.Tensor:
        if part.expert is None:
            return self.base.read(part.key, (a, b))
        w = self.base.read(part.key, (part.expert, part.expert + 1))[0]  # one expert's slice
        return (w.t() if part.transposed else w)[a:b].contiguous()


@dataclass(frozen=True)
class FusedTarget:
    """A fused expert parameter as `kbit dequantize` writes it back for transformers to load."""

    name: str
    shape: tuple[int, int, int]  # (E, out, in), or (E, in, out) when transposed
    transposed: bool


def fused_targets(km) -> dict[str, FusedTarget]:
    """Fused parameter name -> FusedTarget for the per-expert linears of a kbit folder `km` (empty
    for a dense model: the architecture is only built when some linear is an expert's)."""
    if not any(split_expert_linear(m) for m in km.modules):
        return {}
    from transformers import AutoConfig, AutoModelForCausalLM

    d = {k: v for k, v in km.config.items() if k not in ("quantization_config", "dtype", "torch_dtype")}
    config = AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device("meta"):
        params = expert_params(AutoModelForCausalLM.from_config(config))
    out = {}
    for p in params.values():
        if all(m in km.modules for m in p.linears()):
            shape = (p.num_experts, p.in_features, p.out_features) if p.transposed else \
                (p.num_experts, p.out_features, p.in_features)
            out[p.name] = FusedTarget(p.name, shape, p.transposed)
    return out


def write_fused(writer, km, target: FusedTarget, dtype: torch.dtype) -> None:
    """Dequantize expert after expert into the fused tensor (one expert's matrix in memory)."""
    for e in range(target.shape[0]):
        w = km.quantized(f"{target.name}.{e}").dequantize(dtype)
        w = (w.t() if target.transposed else w).contiguous()
        writer.write(target.name, w, e * w.numel() * w.element_size())
