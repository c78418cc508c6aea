"""KbitExperts: a transformers experts module whose experts are quantized linears.

transformers' MoE blocks (Mixtral, Qwen2/3-MoE, DeepSeek-V3, gpt-oss, ...) route with their own
code and then call `experts(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k))`.
`install_kbit_experts` swaps every such experts module for a KbitExperts before the weights are
assigned: one slot per expert and fused parameter, `<experts>.<param>.<e>` (kbitrt/format/experts.py),
which the loaders fill with KbitLinear like any other quantized linear, so each family's router,
shared experts and normalisation still run as transformers wrote them.

The forward groups the (token, slot) pairs by expert (one stable sort) and runs each selected
expert's projections once on its tokens through its KbitLinear, so the kernels are the ones every
linear uses: M = 1 per selected expert at decode, M = its token count at prefill and batch > 1.
The family's gate (`_apply_gate`: SwiGLU on concatenated or interleaved halves, gpt-oss's clamped
activation), its biases and its optional post-expert norm are taken from the original module.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from kbitrt.format.experts import ExpertParam, expert_params
from kbitrt.model.moe import expert_groups


class KbitExperts(nn.Module):
    """The experts of one MoE layer: `<param>[e]` is expert e's (out, in) linear."""

    def __init__(self, original: nn.Module, params: list[ExpertParam]):
        super().__init__()
        for key, value in vars(original).items():  # the family's settings (alpha, limit, has_gate)
            if not key.startswith("_") and key != "training":
                setattr(self, key, value)
        for name, child in original.named_children():  # act_fn, post_expert_norm
            self.add_module(name, child)
        fused = {p.name.rpartition(".")[2] for p in params}
        for pname, p in original.named_parameters(recurse=False):
            if pname not in fused:  # biases: plain tensors, loaded as they are
                self.register_parameter(pname, nn.Parameter(p.to("meta"), requires_grad=False))
        for p in params:  # a meta slot per expert: a missing expert stays meta and is refused
            self.add_module(p.name.rpartition(".")[2], nn.ModuleList(
                nn.Linear(p.in_features, p.out_features, bias=False, device="meta")
                for _ in range(p.num_experts)))
        self.num_experts = params[0].num_experts
        self.gated = bool(getattr(original, "has_gate", True))
        self.biased = bool(getattr(original, "has_bias", False))
        self.post_norm = bool(getattr(original, "has_post_expert_norm", False))
        apply_gate = getattr(type(original), "_apply_gate", None)
        self.apply_gate = types.MethodType(apply_gate, self) if apply_gate is not None else \
            self.default_gate

    def default_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its tokens x (M, H) -> (M, H)."""
        if self.gated:
            h = self.gate_up_proj[e](x)
            if self.biased:
                h = h + self.gate_up_proj_bias[e]
            h = self.apply_gate(h)
        else:
            h = self.up_proj[e](x)
            if self.biased:
                h = h + self.up_proj_bias[e]
            h = self.act_fn(h)
        y = self.down_proj[e](h)
        if self.biased:
            y = y + self.down_proj_bias[e]
        return self.post_expert_norm(y) if self.post_norm else y

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)  # (T, H)
        weights = top_k_weights.reshape(-1)
        for e, slots, tokens in expert_groups(top_k_index, self.num_experts):
            y = self.expert(e, hidden_states[tokens]) * weights[slots, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out


def install_kbit_experts(model: nn.Module) -> list[str]:
    """Swap every fused experts module of `model` for a KbitExperts with empty slots; returns the
    names of the per-expert linears the loader must fill."""
    by_module: dict[str, list[ExpertParam]] = {}
    for p in expert_params(model).values():
        by_module.setdefault(p.name.rpartition(".")[0], []).append(p)
    slots = []
    for module, params in by_module.items():
        model.set_submodule(module, KbitExperts(model.get_submodule(module), params))
        slots += [m for p in params for m in p.linears()]
    return slots
