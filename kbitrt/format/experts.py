"""Mixture-of-Experts weights in a kbit folder: one quantized linear per expert and projection.

transformers keeps a layer's experts fused in 3-D parameters, e.g. Mixtral's
`model.layers.0.mlp.experts.gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I), or gpt-oss's
transposed (E, H, 2I) / (E, I, H) (its experts class says `is_transposed`). A kbit folder stores
expert e of such a parameter as an ordinary quantized linear named `<parameter>.<e>`
(`model.layers.0.mlp.experts.gate_up_proj.3`), always in the (out, in) orientation of every other
linear, with its own qweight / absmax / codebook / weight_shape: each expert's matrix is quantized
blockwise at k bits exactly as a linear is. Biases (gpt-oss's `gate_up_proj_bias`), routers and
norms stay 16-bit tensors under their transformers names. docs/format.md ("Mixture of Experts").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

EXPERT_LINEAR = re.compile(r"^(?P<param>.+\.experts\.[A-Za-z_]+)\.(?P<expert>\d+)$")


@dataclass(frozen=True)
class ExpertParam:
    """A fused 3-D expert parameter of the model transformers builds."""

    name: str  # full parameter name, e.g. model.layers.0.mlp.experts.gate_up_proj
    num_experts: int
    out_features: int
    in_features: int
    transposed: bool  # held (E, in, out) in memory (gpt-oss)

    def linear(self, expert: int) -> str:
        """The module name of expert `expert`'s quantized linear."""
        return f"{self.name}.{expert}"

    def linears(self) -> list[str]:
        return [self.linear(e) for e in range(self.num_experts)]


def expert_params(model: torch.nn.Module) -> dict[str, ExpertParam]:
    """Every fused expert weight of `model` (built on the meta device is enough), by name:
    3-D parameters of a module named `experts` (biases, 2-D, are plain tensors)."""
    out = {}
    for mname, module in model.named_modules():
        if mname.rpartition(".")[2] != "experts":
            continue
        transposed = bool(getattr(module, "is_transposed", False))
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() != 3:
                continue
            e, a, b = p.shape
            out_f, in_f = (b, a) if transposed else (a, b)
            name = f"{mname}.{pname}"
            out[name] = ExpertParam(name, e, out_f, in_f, transposed)
    return out


def split_expert_linear(module: str) -> tuple[str, int] | None:
    """(fused parameter name, expert index) of a per-expert linear's module name, else None."""
    m = EXPERT_LINEAR.match(module)
    return (m.group("param"), int(m.group("expert"))) if m else None


def expert_summary(modules) -> dict[str, dict]:
    """Per fused parameter of a folder's quantized linears: its expert count and (out, in) shape,
    for `kbit inspect`."""
    out: dict[str, dict] = {}
    for module, (n, k) in modules.items():
        split = split_expert_linear(module)
        if split is None:
            continue
        entry = out.setdefault(split[0], {"experts": 0, "shape": (n, k)})
        entry["experts"] += 1
    return out
