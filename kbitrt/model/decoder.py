"""One generic decoder-only transformer for every native family (families.py switches the variants).

Built on the meta device and filled by the runtime (runtime/build.py, gpt-fast style); every linear
is a KbitLinear or a plain nn.Linear. The model layer knows no runtime: a faster engine for the
layers (the CPU layer stack, runtime/layer_stack.py) is given to it by whoever builds it
(`Decoder.stack_builder`), never imported. Sequences in a batch are left-padded: `pad[b]` slots at the start of row b are
padding, cache slots are shared by the batch and a token's model position is `slot - pad[b]`.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kbitrt.model.families import LongRope, ModelArgs
from kbitrt.model.kv_cache import KVCache
from kbitrt.model.moe import MoE


_FUSED_RMS_NORM = hasattr(torch, "rms_norm")  # torch >= 2.4


class RMSNorm(nn.Module):
    """As transformers' Llama: normalise in fp32, scale in the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 == self.weight.dtype and _FUSED_RMS_NORM:
            # one op instead of six: a decode step is dispatch-bound on a small model's CPU run
            return torch.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class GemmaRMSNorm(RMSNorm):
    """Gemma's: normalise and scale by (1 + weight), both in fp32, then cast to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


def default_positions(input_ids: torch.Tensor, input_pos: torch.Tensor | None,
                      pad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache slots 0..T-1 and no left padding, unless given (the forward protocol's defaults)."""
    B, T = input_ids.shape
    if input_pos is None:
        input_pos = torch.arange(T, device=input_ids.device)
    if pad is None:
        pad = torch.zeros(B, dtype=torch.long, device=input_ids.device)
    return input_pos, pad


def make_norm(args: ModelArgs, dim: int | None = None) -> nn.Module:
    dim = dim or args.dim
    if args.norm in ("rmsnorm", "gemma"):
        return (GemmaRMSNorm if args.norm == "gemma" else RMSNorm)(dim, args.norm_eps)
    return nn.LayerNorm(dim, eps=args.norm_eps)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """BLOOM's per-head ALiBi slopes (geometric; extra heads interleaved when n is not 2^m)."""
    closest = 2 ** math.floor(math.log2(n_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** p for p in range(1, closest + 1)]
    if closest != n_heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** p for p in range(1, 2 * min(closest, n_heads - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hd); cos, sin (B, 1, T, rd): rotate the first rd dims of each head, bit for
    bit transformers' x * cos + rotate_half(x) * sin, whose halves are x1 * cos - x2 * sin and
    x2 * cos + x1 * sin: products added in place into x * cos, no negated and concatenated copy
    of x (on a long CPU prefill those were a tenth of the time outside the linears)."""
    rd, half = cos.shape[-1], cos.shape[-1] // 2
    rot = x if rd == x.shape[-1] else x[..., :rd]
    out = rot * cos
    out[..., :half] -= rot[..., half:] * sin[..., :half]  # (-x2) * s == -(x2 * s): exact
    out[..., half:] += rot[..., :half] * sin[..., half:]
    return out if rot is x else torch.cat((out, x[..., rd:]), dim=-1)


def softcapped_attention(q, k, v, mask, a: ModelArgs) -> torch.Tensor:
    """Attention whose scores are capped c * tanh(s / c) before the mask (Gemma 2), as
    transformers' eager attention: q (B, nh, T, hd), k, v (B, nkv, S, hd), mask (B, 1, T, S)."""
    groups = a.n_heads // a.n_kv_heads
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(2, 3) * (a.attn_scale or a.head_dim ** -0.5)  # (B, nh, T, S)
    scores = torch.tanh(scores / a.attn_softcap) * a.attn_softcap + mask
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


# query rows per attention call of a long CPU prefill (`attention`)
QUERY_CHUNK = 128


def attention(q, k, v, mask, slots: torch.Tensor | None, a: ModelArgs) -> torch.Tensor:
    """SDPA of q (B, nh, T, hd) over k, v (B, nkv, S, hd), cache slots 0..S-1, under the additive
    mask (B, 1 or nh, T, S). Given the query rows' cache slots (a long step on the CPU), the rows
    go in chunks of QUERY_CHUNK, each over the slots up to its last query's (the masks are causal:
    later slots are hidden from every row of it): torch's CPU flash attention takes keys in blocks
    of 512 and so skips none of the hidden half of a 512-token prefill, here 3/8 of it are never
    computed. The same softmax over the same open keys: equal to one call to rounding."""
    gqa, scale = a.n_kv_heads != a.n_heads, a.attn_scale
    T = q.shape[2]
    if slots is None or T < 2 * QUERY_CHUNK:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, scale=scale)
    B, nh, _, hd = q.shape
    out = q.new_empty(B, T, nh, v.shape[-1])  # as the flash kernel lays out its own output
    for start in range(0, T, QUERY_CHUNK):
        rows = slice(start, start + QUERY_CHUNK)
        n = int(slots[rows].max()) + 1
        out[:, rows] = F.scaled_dot_product_attention(
            q[:, :, rows], k[:, :, :n], v[:, :, :n], attn_mask=mask[:, :, rows, :n],
            enable_gqa=gqa, scale=scale).transpose(1, 2)
    return out.transpose(1, 2)


def rope_table(pos: torch.Tensor, inv_freq: torch.Tensor, scaling: float,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) (B, 1, T, rd) at model positions pos (B, T), as transformers' rotary embedding."""
    freqs = pos[..., None].float() * inv_freq  # (B, T, rd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, rd)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, window: int | None = None):
        super().__init__()
        self.args, self.window = args, window
        nh, nkv, hd = args.n_heads, args.n_kv_heads, args.head_dim
        if args.qkv == "separate":
            self.wq = nn.Linear(args.dim, nh * hd, bias=args.qkv_bias)
            self.wk = nn.Linear(args.dim, nkv * hd, bias=args.qkv_bias)
            self.wv = nn.Linear(args.dim, nkv * hd, bias=args.qkv_bias)
        else:
            self.wqkv = nn.Linear(args.dim, (nh + 2 * nkv) * hd, bias=args.qkv_bias)
        self.wo = nn.Linear(nh * hd, args.dim, bias=args.o_bias)
        self.kv_cache: KVCache | None = None
        self.qkv_mode = args.qkv  # "fused" once merge_qkv has stacked wq, wk, wv
        if args.qk_norm == "head":  # Qwen3: each head's q and k normalised before rotary
            self.q_norm, self.k_norm = make_norm(args, hd), make_norm(args, hd)
        elif args.qk_norm == "full":  # OLMo 2: all heads' q (and k) as one vector
            self.q_norm, self.k_norm = make_norm(args, nh * hd), make_norm(args, nkv * hd)
        self.use_rope = True  # SmolLM3's NoPE layers: False (Decoder.__init__)

    def merge_qkv(self, wqkv: nn.Module) -> None:
        """Replace wq, wk, wv by one linear whose output rows are theirs in turn (one call)."""
        del self.wq, self.wk, self.wv
        self.wqkv, self.qkv_mode = wqkv, "fused"

    def qkv(self, x: torch.Tensor):
        a = self.args
        B, T, _ = x.shape
        if self.qkv_mode == "separate":
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        elif self.qkv_mode == "fused":  # GPT-2 c_attn: rows are all q, then all k, then all v
            q, k, v = self.wqkv(x).split(
                [a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim], -1)
        else:  # BLOOM / NeoX: rows grouped by head, each head's q, k, v in turn
            q, k, v = self.wqkv(x).view(B, T, a.n_heads, 3, a.head_dim).unbind(3)
        if a.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(B, T, a.n_heads, a.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.reshape(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.reshape(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        return q, k, v

    def forward(self, x, input_pos, rope, mask):
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        if self.args.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None and self.use_rope:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        mask, slots = mask[self.window], None
        if self.kv_cache is not None:  # (B, nkv, S, hd): the slots the mask covers
            k, v = self.kv_cache.update(input_pos, k, v, mask.shape[-1])
            if q.device.type == "cpu" and not torch.compiler.is_compiling():
                slots = input_pos
        if self.args.attn_softcap:
            y = softcapped_attention(q, k, v, mask, self.args)
        else:
            y = attention(q, k, v, mask, slots, self.args)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        from transformers.activations import ACT2FN

        self.act = ACT2FN[args.act]
        fused = args.mlp == "gated_fused"  # Phi-3 stores gate and up stacked
        self.up = None if fused else nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)
        self.down = nn.Linear(args.hidden_dim, args.dim, bias=args.mlp_bias)
        self.gate = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias) \
            if args.mlp == "gated" else None
        # gate and up stacked (stored so, or merge_gate_up)
        self.gate_up: nn.Module | None = nn.Linear(args.dim, 2 * args.hidden_dim, bias=args.mlp_bias) \
            if fused else None

    def merge_gate_up(self, gate_up: nn.Module) -> None:
        """Replace gate and up by one linear whose output rows are gate's, then up's."""
        del self.gate, self.up
        self.gate, self.gate_up = None, gate_up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # act(gate) times up in place: the activation's output is this call's own
        if self.gate_up is not None:
            g, u = self.gate_up(x).chunk(2, dim=-1)
            return self.down(self.act(g).mul_(u))
        if self.gate is not None:
            return self.down(self.act(self.gate(x)).mul_(self.up(x)))
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, window: int | None, moe: bool = False):
        super().__init__()
        self.args = args
        if args.pre_norm:
            self.attn_norm, self.mlp_norm = make_norm(args), make_norm(args)
        if args.branch_norm:
            self.attn_out_norm, self.mlp_out_norm = make_norm(args), make_norm(args)
        shared = MLP(replace(args, hidden_dim=args.shared_hidden_dim, mlp="gated", mlp_bias=False)) \
            if moe and args.shared_hidden_dim else None
        self.attn, self.mlp = Attention(args, window), MoE(args, shared) if moe else MLP(args)

    def forward(self, x, input_pos, rope, mask):
        a = self.args
        if a.branch_norm or not a.pre_norm or a.residual_scale != 1.0:
            return self.scaled_forward(x, input_pos, rope, mask)
        # residual adds into the branch's output, which is this call's own: x + b == b + x
        if a.parallel_residual:  # NeoX: both branches read the block input
            y = self.attn(self.attn_norm(x), input_pos, rope, mask).add_(x)
            return y.add_(self.mlp(self.mlp_norm(x)))
        h = x if a.post_norm else self.attn_norm(x)
        x = self.attn(h, input_pos, rope, mask).add_(h if a.residual_from_norm else x)
        if a.post_norm:  # OPT-350m: norm after the residual add
            x = self.attn_norm(x)
        h = x if a.post_norm else self.mlp_norm(x)
        x = self.mlp(h).add_(h if a.residual_from_norm else x)
        return self.mlp_norm(x) if a.post_norm else x

    def scaled_forward(self, x, input_pos, rope, mask):
        """Pre-norm residual blocks whose branch outputs are normed (OLMo 2) or scaled (Granite)."""
        a = self.args
        h = self.attn(self.attn_norm(x) if a.pre_norm else x, input_pos, rope, mask)
        x = x + (self.attn_out_norm(h) if a.branch_norm else h) * a.residual_scale
        h = self.mlp(self.mlp_norm(x) if a.pre_norm else x)
        return x + (self.mlp_out_norm(h) if a.branch_norm else h) * a.residual_scale


def unset_embedding(n: int, dim: int) -> nn.Embedding:
    """An embedding whose weight the loader assigns: not initialised (on the meta device torch's
    random init imports torch._dynamo, ~170 MB of RSS that running a model never needs)."""
    return nn.Embedding(n, dim, _weight=torch.empty(n, dim))


class LayerEngine(Protocol):
    """Every layer of a forward in one call, over the KV caches it was built with (the CPU layer
    stack): called as the layers are, closed when the caches go; a step it does not serve (a
    long prefill) gets None and runs the Python layers."""

    def __call__(self, x: torch.Tensor, input_pos: torch.Tensor,
                 rope: tuple[torch.Tensor, torch.Tensor] | None,
                 mask: dict[int | None, torch.Tensor]) -> torch.Tensor | None:
        """The layers' output, or None for a step it does not serve (the Python layers run)."""

    def close(self) -> None: ...


# builds an engine over a decoder's current tensors: (engine, None), or (None, why not)
EngineBuilder = Callable[["Decoder"], "tuple[LayerEngine | None, str | None]"]
# the runtime's context around a forward's Python layers, given their input (B, T, dim): on the
# CPU, a long step's heap (runtime/memory.py heap_for_layers)
LayersScope = Callable[[torch.Tensor], AbstractContextManager]


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        emb_dim = args.project_dim or args.dim
        self.tok_emb = unset_embedding(args.vocab_size, emb_dim)
        if args.positions == "learned":
            self.pos_emb = unset_embedding(args.max_positions + args.pos_offset, args.dim)
        if args.project_dim:
            self.project_in = nn.Linear(emb_dim, args.dim, bias=False)
            self.project_out = nn.Linear(args.dim, emb_dim, bias=False)
        if args.emb_norm:
            self.emb_norm = make_norm(args)
        windows = args.sliding_windows or (None,) * args.n_layers
        moe = args.moe_layers or (bool(args.n_experts),) * args.n_layers
        self.layers = nn.ModuleList(Block(args, windows[i], moe[i]) for i in range(args.n_layers))
        for layer, rotary in zip(self.layers, args.rope_layers or ()):
            layer.attn.use_rope = rotary
        if args.final_norm:
            self.norm = make_norm(args)
        self.lm_head = nn.Linear(emb_dim, args.vocab_size, bias=False)
        # activations' dtype when the embedding is held in 16 bits under fp32 activations (the CPU)
        self.act_dtype: torch.dtype | None = None
        # the KV cache's dtype (None: the activations'); a 16-bit cache under fp32 activations
        # halves it (`--kv-cache fp16`, implied by `--low-memory`)
        self.kv_dtype: torch.dtype | None = None
        # position tables, set by `setup_positions` once the model is off the meta device
        self.inv_freq: torch.Tensor | None = None
        self.long_rope: LongRope | None = None
        self.layer_ropes: dict[str, tuple[torch.Tensor, float]] | None = None
        self.rope_scaling = 1.0
        self.rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None  # rope_rows' table
        self.slopes: torch.Tensor | None = None
        # the layers run from C++ on the CPU (runtime/layer_stack.py), set up with the KV caches
        # by `stack_builder`, which the runtime sets when it builds the model (None: the Python
        # layers); use_layer_stack=False keeps the Python layers (tests compare the two)
        self.stack_builder: EngineBuilder | None = None
        self.use_layer_stack = True
        self.layer_stack: LayerEngine | None = None
        self.kept_stacks: dict[int, LayerEngine] = {}  # refresh_layer_stack's keys
        self.layer_stack_off: str | None = "no KV cache yet"  # why the Python layers run
        # cached forwards since setup_caches that the stack served, and those it did not (the
        # Python layers ran them: a long prefill), with their fewest and most tokens
        self.stack_steps, self.unserved_steps, self.unserved_tokens = 0, 0, (0, 0)
        self.layers_scope: LayersScope | None = None  # set by the runtime, as stack_builder

    # ---------------------------------------------------------------------------------- setup

    def setup_positions(self, inv_freq: torch.Tensor | LongRope | None,
                        rope_scaling: float = 1.0) -> None:
        device = self.tok_emb.weight.device
        if isinstance(inv_freq, LongRope):  # Phi-3: the table depends on the forward's positions
            self.long_rope, inv_freq = inv_freq.to(device), inv_freq.short
        if isinstance(inv_freq, dict):  # Gemma 3: a table per layer type (args.rope_types)
            self.layer_ropes = {t: (f.to(device), scale) for t, (f, scale) in inv_freq.items()}
            inv_freq, rope_scaling = next(iter(inv_freq.values()))
        self.inv_freq = None if inv_freq is None else inv_freq.to(device)
        self.rope_scaling = rope_scaling
        self.rope_cache = None
        if self.args.positions == "alibi":
            self.slopes = alibi_slopes(self.args.n_heads).to(device)

    def setup_caches(self, batch: int, max_len: int) -> None:
        """Static KV cache of max_len slots per layer (prompt + new tokens)."""
        a = self.args
        if a.positions == "learned" and max_len > a.max_positions:
            raise ValueError(f"{max_len} tokens exceed the model's {a.max_positions} positions")
        w = self.tok_emb.weight
        dtype = self.kv_dtype or self.act_dtype or w.dtype
        for layer in self.layers:
            layer.attn.kv_cache = KVCache(batch, a.n_kv_heads, max_len, a.head_dim, dtype, w.device)
        self.stack_steps, self.unserved_steps, self.unserved_tokens = 0, 0, (0, 0)
        self.rope_cache = None  # rope_rows' table: one row per slot of these caches
        self.close_layer_stack()
        self.refresh_layer_stack()

    def drop_caches(self) -> None:
        for layer in self.layers:
            layer.attn.kv_cache = None
        self.close_layer_stack()
        self.rope_cache = None

    def rope_rows(self, pos: torch.Tensor, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """rope_table's (cos, sin) for one row of positions `pos` (1, T) inside the KV cache, as
        rows of a table of every slot made once per cache (two lookups a step, not ten ops);
        None where the table depends on more than the position (Phi-3's long factors)."""
        if self.long_rope is not None or self.layer_ropes is not None or self.cache_len is None \
                or pos.device.type != "cpu" or torch.compiler.is_compiling():
            return None
        if self.rope_cache is None or self.rope_cache[0].dtype != dtype:
            slots = torch.arange(self.cache_len, device=pos.device)[None, :]
            self.rope_cache = rope_table(slots, self.inv_freq, self.rope_scaling, dtype)
        cos, sin = self.rope_cache
        row = pos[0]
        return cos[:, :, row], sin[:, :, row]

    def use_cache_rows(self, start: int, stop: int) -> None:
        """Let the next forwards read and write only rows start..stop-1 of the KV caches that
        `setup_caches` made (a server's live rows, or one newcomer's prefill; kbitrt/serve): the
        layers get views of those rows and a layer stack over them, kept for the next call with
        the same rows until drop_caches. use_cache_rows(0, batch) is the whole batch again."""
        for layer in self.layers:
            layer.attn.kv_cache = layer.attn.kv_cache.rows(start, stop)
        self.refresh_layer_stack(key=("rows", start, stop))

    def refresh_layer_stack(self, key: int | None = None) -> None:
        """(Re)build the layer stack over the layers' current tensors, once the caches are set up.
        Called again when they change (an any-precision width switch); `key` names a set of
        tensors that stays valid (a held width), whose stack is kept for the next switch back."""
        if self.cache_len is None:
            return
        if not self.use_layer_stack or self.stack_builder is None:
            self.layer_stack = None
            self.layer_stack_off = "use_layer_stack=False" if not self.use_layer_stack \
                else "no layer stack given by the runtime"
            return
        if key is not None and key in self.kept_stacks:
            self.layer_stack = self.kept_stacks[key]
            return
        if self.layer_stack is not None and self.layer_stack not in self.kept_stacks.values():
            self.layer_stack.close()
        self.layer_stack, self.layer_stack_off = self.stack_builder(self)
        if key is not None and self.layer_stack is not None:
            self.kept_stacks[key] = self.layer_stack

    @property
    def cpu_layers(self) -> str:
        """How the last cached run ran its layers: "stack" (C++), "python (why)", or, when the
        stack left some steps to the Python layers (more tokens than its loops take: a long
        prefill), "stack (python: 1 of 9 steps, of 512 tokens)"."""
        if self.layer_stack_off is not None:
            return f"python ({self.layer_stack_off})"
        if not self.unserved_steps:
            return "stack"
        lo, hi = self.unserved_tokens
        return (f"stack (python: {self.unserved_steps} of {self.unserved_steps + self.stack_steps}"
                f" steps, of {lo if lo == hi else f'{lo}-{hi}'} tokens)")

    def count_step(self, served: bool, tokens: int) -> None:
        """Count a cached forward the stack served, or one it left to the Python layers."""
        if served:
            self.stack_steps += 1
            return
        lo, hi = self.unserved_tokens
        self.unserved_tokens = (min(lo, tokens) if self.unserved_steps else tokens, max(hi, tokens))
        self.unserved_steps += 1

    def close_layer_stack(self) -> None:
        for stack in {id(s): s for s in (self.layer_stack, *self.kept_stacks.values())
                      if s is not None}.values():
            stack.close()
        self.layer_stack, self.kept_stacks = None, {}

    @property
    def cache_len(self) -> int | None:
        cache = self.layers[0].attn.kv_cache
        return None if cache is None else cache.k.shape[2]

    # -------------------------------------------------------------------------------- forward

    def masks(self, input_pos, pad, dtype) -> dict[int | None, torch.Tensor]:
        """Additive attention masks (B, 1 or nh, T, S) per sliding window (None = full)."""
        device = input_pos.device
        S = self.cache_len
        key_slot = torch.arange(S, device=device) if S is not None else input_pos  # (S,)
        q, k = input_pos[None, :, None], key_slot[None, None, :]  # (1, T, 1), (1, 1, S)
        # causal; padding keys hidden, except a (padding) query's own slot so no row is empty
        allowed = (k <= q) & ((k >= pad[:, None, None]) | (k == q))  # (B, T, S)
        out = {}
        for window in {layer.attn.window for layer in self.layers}:
            ok = allowed if window is None else allowed & (k > q - window)
            mask = torch.zeros(ok.shape, dtype=dtype, device=device)
            mask = mask.masked_fill(~ok, float("-inf"))[:, None]  # (B, 1, T, S)
            if self.slopes is not None:  # ALiBi: slope * key position (softmax ignores the rest)
                key_pos = (key_slot[None, :] - pad[:, None]).clamp(min=0).to(dtype)  # (B, S)
                mask = mask + self.slopes.to(dtype)[None, :, None, None] * key_pos[:, None, None, :]
            out[window] = mask
        return out

    def python_layers(self, x: torch.Tensor, input_pos: torch.Tensor, ropes: list,
                      mask: dict[int | None, torch.Tensor]) -> torch.Tensor:
        """The layers run from Python, inside the runtime's `layers_scope`. On the CPU a cached
        step's masks, hence its attention, end at its last slot: the cache's later slots are
        hidden from every query (transformers' dynamic cache holds no more)."""
        eager = not torch.compiler.is_compiling()
        if self.cache_len is not None and input_pos.device.type == "cpu" and eager:
            n = int(input_pos.max()) + 1
            mask = {w: m[..., :n] for w, m in mask.items()}
        with self.layers_scope(x) if self.layers_scope is not None and eager else nullcontext():
            for layer, layer_rope in zip(self.layers, ropes):
                x = layer(x, input_pos, layer_rope, mask)
        return x

    def embed(self, input_ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The forward up to the first layer, for input_ids (B, T) at model positions pos (B, T)."""
        a = self.args
        x = self.tok_emb(input_ids)
        if self.act_dtype is not None:
            x = x.to(self.act_dtype)
        if a.emb_scale != 1.0:
            x = x * a.emb_scale
        if a.project_dim:
            x = self.project_in(x)
        if a.positions == "learned":
            x = x + self.pos_emb(pos + a.pos_offset)
        if a.emb_norm:
            x = self.emb_norm(x)
        return x

    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor | None = None,
                pad: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """input_ids (B, T); input_pos (T,) cache slots; pad (B,) left padding -> logits (B, T, V).

        Without a cache (`setup_caches` not called) this is a plain full forward over input_ids.
        """
        a = self.args
        B, T = input_ids.shape
        unpadded = pad is None
        input_pos, pad = default_positions(input_ids, input_pos, pad)
        # (B, T) model positions; without padding the cache slots themselves (a decoding step
        # on a small CPU model is dispatch-bound: each torch call here costs tens of us)
        pos = input_pos.expand(B, T) if unpadded else (input_pos[None, :] - pad[:, None]).clamp(min=0)
        x = self.embed(input_ids, pos)
        rope = None
        if a.positions == "rotary":
            rope = self.rope_rows(pos, x.dtype) if unpadded and B == 1 else None
            if rope is None:
                inv_freq = self.inv_freq
                if self.long_rope is not None and int(pos.max()) + 1 > self.long_rope.switch:
                    inv_freq = self.long_rope.long
                rope = rope_table(pos, inv_freq, self.rope_scaling, x.dtype)
        ropes = [rope] * a.n_layers
        if self.layer_ropes is not None:
            tables = {t: rope_table(pos, f, scale, x.dtype) for t, (f, scale) in self.layer_ropes.items()}
            ropes = [tables[t] for t in a.rope_types]
        mask, y, normed = None, None, False
        if self.layer_stack is not None and not torch.compiler.is_compiling():
            if x.dtype == torch.float32:
                if not (unpadded and self.layer_stack.causal_only):
                    mask = self.masks(input_pos, pad, x.dtype)
                y = self.layer_stack(x, input_pos, rope, mask)  # None: not a step it serves
                normed = y is not None and self.layer_stack.final_norm is not None
            self.count_step(y is not None, T)
        if y is None:
            if mask is None:
                mask = self.masks(input_pos, pad, x.dtype)
            y = self.python_layers(x, input_pos, ropes, mask)
        x = y
        if last_only:
            x = x[:, -1:]
        if a.final_norm and not normed:  # the stack's loops may have applied it
            x = self.norm(x)
        if a.project_dim:
            x = self.project_out(x)
        logits = self.lm_head(x)
        if a.logits_softcap:
            logits = torch.tanh(logits / a.logits_softcap) * a.logits_softcap
        return logits / a.logits_scale if a.logits_scale != 1.0 else logits
