"""The one schema between the CPU layer stack's two sides (runtime/layer_stack.py, cpu_layers.h).

A torch op takes lists, not structs: `layer_stack_create(tensors, ints, eps)`. What each list
position means is written once, here, as dataclasses and enums; `cpu_schema.h` is generated from
them (`python -m kbitrt.runtime.kernels.cpu_schema` rewrites it, tests/test_layer_stack.py checks
the committed header equals the generated one), so neither side writes a bare position or code.

The ints are StackConfig's fields, then per layer StackLayer's int fields and its linears' (one
StackLinear per Slot); the tensors per layer StackLayer's tensor fields and its linears'. An
absent tensor is an empty one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import torch

HEADER = Path(__file__).with_name("cpu_schema.h")
NONE = torch.empty(0)  # an absent tensor slot


class Norm(IntEnum):
    rmsnorm = 0
    layernorm = 1


class Act(IntEnum):
    """transformers' ACT2FN modules the loops have."""
    silu = 0
    gelu = 1
    gelu_tanh = 2
    relu = 3
    gelu_new = 4  # GPT-2's NewGELUActivation, its formula op by op


class Qkv(IntEnum):
    separate = 0
    fused = 1  # one linear, rows all q, then all k, then all v
    interleaved = 2  # one linear, rows per head: its q, k, v


class Mlp(IntEnum):
    plain = 0
    gated = 1
    gated_fused = 2  # gate and up stacked in one linear


class LinearKind(IntEnum):
    absent = 0
    packed = 1  # k-bit codes: w0 qweight, w1 absmax, w2 codebook, bias fp32
    dense = 2  # w0 the weight as the module holds it, bias as held
    planes = 3  # bit planes (cpu_planes.h): w0 planes, the first `bits` read; w1, w2 as packed


class Slot(IntEnum):
    """A layer's linears: q (or the stacked q|k|v), k, v, o, up (or the stacked gate|up), gate,
    down."""
    q = 0
    k = 1
    v = 2
    o = 3
    up = 4
    gate = 5
    down = 6


@dataclass(frozen=True)
class StackConfig:
    """The whole stack's switches: ModelArgs' fields of the same names (model/families.py), plus
    the layers' common activation and projection layouts."""
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    norm: Norm
    act: Act
    qkv: Qkv
    mlp: Mlp
    parallel_residual: bool
    post_norm: bool
    residual_from_norm: bool
    fused_max_rows: int  # kernels/cpu.py FUSED_MAX_ROWS: a step of more tokens runs Python layers

    def ints(self) -> list[int]:
        return [int(getattr(self, f.name)) for f in dataclasses.fields(self)]


@dataclass(frozen=True)
class StackLinear:
    kind: LinearKind = LinearKind.absent
    bits: int = 0
    block: int = 0
    in_features: int = 0
    w0: torch.Tensor = NONE
    w1: torch.Tensor = NONE
    w2: torch.Tensor = NONE
    bias: torch.Tensor = NONE


@dataclass(frozen=True)
class StackLayer:
    mask_index: int  # which of the forward's masks (one per sliding window) the layer reads
    norm1_w: torch.Tensor
    norm1_b: torch.Tensor
    norm2_w: torch.Tensor
    norm2_b: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    linears: tuple[StackLinear, ...]  # one per Slot


def _split(cls) -> tuple[list[str], list[str]]:
    """(int fields, tensor fields) of a schema dataclass, in order (not the nested linears)."""
    ints, tensors = [], []
    for f in dataclasses.fields(cls):
        if f.name != "linears":
            (tensors if f.type in ("torch.Tensor", torch.Tensor) else ints).append(f.name)
    return ints, tensors


def wire(config: StackConfig, layers: list[StackLayer]) -> tuple[list[torch.Tensor], list[int]]:
    """(tensors, ints) of layer_stack_create, in the schema's order."""
    ints, tensors = config.ints(), []
    layer_ints, layer_tensors = _split(StackLayer)
    linear_ints, linear_tensors = _split(StackLinear)
    for layer in layers:
        if len(layer.linears) != len(Slot):
            raise ValueError(f"{len(layer.linears)} linears, not one per Slot")
        ints += [int(getattr(layer, n)) for n in layer_ints]
        tensors += [getattr(layer, n) for n in layer_tensors]
        for lin in layer.linears:
            ints += [int(getattr(lin, n)) for n in linear_ints]
            tensors += [getattr(lin, n) for n in linear_tensors]
    return tensors, ints


def _offsets(name: str, names: list[str], nested: int | None = None) -> list[str]:
    lines = [f"namespace {name} {{", "enum : int64_t {"]
    lines += [f"  {n} = {i}," for i, n in enumerate(names)]
    if nested is not None:  # then one block per Slot
        lines.append(f"  linears = {len(names)},  // then {len(Slot)} linears of {nested} each")
        lines.append(f"  count = {len(names) + len(Slot) * nested}")
    else:
        lines.append(f"  count = {len(names)}")
    return lines + ["};", f"}}  // namespace {name}", ""]


def _enum(cls) -> list[str]:
    body = ", ".join(f"{m.name} = {m.value}" for m in cls)
    return [f"enum class {cls.__name__} : int64_t {{ {body}, count = {len(cls)} }};"]


def cpp_header() -> str:
    """cpu_schema.h's text, from this module's dataclasses and enums."""
    layer_ints, layer_tensors = _split(StackLayer)
    linear_ints, linear_tensors = _split(StackLinear)
    config = [f.name for f in dataclasses.fields(StackConfig)]
    slots = ", ".join(f"{m.name} = {m.value}" for m in Slot)
    lines = ["// GENERATED from kbitrt/runtime/kernels/cpu_schema.py by",
             "// `python -m kbitrt.runtime.kernels.cpu_schema`: do not edit by hand.",
             "// Positions in layer_stack_create's ints and tensors, and the codes of its enums.",
             "#pragma once", "", "namespace schema {", ""]
    for cls in (Norm, Act, Qkv, Mlp, LinearKind):
        lines += _enum(cls)
    lines += ["", f"namespace slot {{ enum : int {{ {slots}, count = {len(Slot)} }}; }}", ""]
    lines += _offsets("config_int", config)
    lines += _offsets("layer_int", layer_ints, len(linear_ints))
    lines += _offsets("layer_tensor", layer_tensors, len(linear_tensors))
    lines += _offsets("linear_int", linear_ints)
    lines += _offsets("linear_tensor", linear_tensors)
    return "\n".join(lines + ["}  // namespace schema", ""])


if __name__ == "__main__":
    HEADER.write_text(cpp_header())
    print(f"wrote {HEADER}")
