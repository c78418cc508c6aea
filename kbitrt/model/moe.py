"""The native decoder's Mixture-of-Experts feed-forward (Mixtral, Qwen2/3-MoE): a 16-bit router,
softmax over the experts, the top k per token (renormalised when the family says so), each
selected expert's SwiGLU MLP through its own linears (KbitLinear when quantized), and Qwen2-MoE's
gated shared expert.

Tokens are grouped by expert (expert_groups, also used by
runtime/experts.py's KbitExperts), so every selected expert runs once per step on
its tokens: M = 1 per selected expert when decoding one sequence, its token count at prefill and
batch > 1, through the same kernels as every other linear. Matches transformers' MixtralExperts /
Qwen3MoeExperts on the same weights.
"""

from __future__ import annotations

import torch
from torch import nn

from kbitrt.model.families import ModelArgs


class MoE(nn.Module):
    # what loader.merge_projections looks for on a dense MLP: a MoE layer's gate and up are stored
    # stacked per expert already (gate_up)
    gate = None

    def __init__(self, args: ModelArgs, shared: nn.Module | None = None):
        super().__init__()
        if shared is not None:  # Qwen2-MoE: a shared expert on every token, behind a sigmoid gate
            self.shared, self.shared_gate = shared, nn.Linear(args.dim, 1, bias=False)
        from transformers.activations import ACT2FN

        self.act = ACT2FN[args.act]
        self.top_k, self.norm_topk = args.top_k, args.norm_topk
        hidden = args.moe_hidden_dim or args.hidden_dim
        self.router = nn.Linear(args.dim, args.n_experts, bias=False)
        self.gate_up = nn.ModuleList(nn.Linear(args.dim, 2 * hidden, bias=False)
                                     for _ in range(args.n_experts))
        self.down = nn.ModuleList(nn.Linear(hidden, args.dim, bias=False)
                                  for _ in range(args.n_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, D) -> (weights (N, k) in x's dtype, expert ids (N, k))."""
        probs = torch.softmax(self.router(x).float(), dim=-1)  # (N, E)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        weights, ids = self.route(x)
        out = torch.zeros_like(x)
        weights = weights.reshape(-1)
        for e, slots, tokens in expert_groups(ids, len(self.down)):
            g, u = self.gate_up[e](x[tokens]).chunk(2, dim=-1)
            y = self.down[e](self.act(g) * u) * weights[slots, None]
            out.index_add_(0, tokens, y)
        if hasattr(self, "shared"):
            out = out + torch.sigmoid(self.shared_gate(x)) * self.shared(x)
        return out.reshape(shape)


def expert_groups(top_k_index: torch.Tensor, num_experts: int):
    """The (token, slot) pairs of a routing grouped by expert, one stable sort: yields (expert,
    slots (n,) into top_k_index.reshape(-1), their tokens (n,)) for every expert with tokens;
    ids >= num_experts (expert-parallel sentinels) are not ours and skipped."""
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)  # (T * k,): slot s is token s // k
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        slots = order[start: start + count]
        start += count
        if e < num_experts:
            yield e, slots, slots // k
