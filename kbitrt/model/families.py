"""One small spec per model family: which config keys give the shapes, which switches it sets, and
where each of the native decoder's tensors lives in a checkpoint (`{layer}` is the layer index).

The decoder (decoder.py) names its own modules `tok_emb`, `layers.3.attn.wq`, ...; a spec maps
those names to the checkpoint's (the transformers state-dict names, which kbit folders keep).
Families the native decoder lacks run through the transformers backend instead (loader.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from kbitrt.errors import KbitFormatError

_MISSING = object()


@dataclass(frozen=True)
class FamilySpec:
    name: str
    model_types: tuple[str, ...]
    # ModelArgs field -> config attributes, the first one present wins
    keys: dict[str, tuple[str, ...]]
    # decoder module -> checkpoint module, `{layer}` for the layer index; `a|b`: a, else b
    weights: dict[str, str]
    # variant switches, fixed per family (ModelArgs fields)
    switches: dict[str, Any] = field(default_factory=dict)
    # config -> more ModelArgs fields, for switches a config turns on or off
    derive: Callable[[Any], dict] | None = None
    # config -> why the native decoder cannot run it (None: it can)
    unsupported: Callable[[Any], str | None] | None = None


@dataclass
class ModelArgs:
    """Everything the generic decoder needs; built from a transformers config by `model_args`."""

    family: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    hidden_dim: int
    max_positions: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None
    norm_eps: float = 1e-5
    act: str = "gelu"  # a transformers ACT2FN name, so activations match its forward exactly
    norm: str = "layernorm"  # layernorm | rmsnorm | gemma (RMSNorm scaled by 1 + weight)
    positions: str = "learned"  # learned | rotary | alibi
    pos_offset: int = 0  # OPT's learned positions start at 2
    qkv: str = "separate"  # separate (wq, wk, wv) | fused (q|k|v rows) | interleaved (per head q,k,v)
    mlp: str = "plain"  # plain: down(act(up x)) | gated: down(act(gate x) * up x)
    # | gated_fused: gated, gate and up stored as one linear, gate rows first (Phi-3)
    parallel_residual: bool = False  # x + attn(ln1 x) + mlp(ln2 x)  (NeoX)
    post_norm: bool = False  # norm after the residual add (OPT-350m)
    residual_from_norm: bool = False  # the residual is the normed input (BLOOM option)
    emb_norm: bool = False  # a norm right after the embedding (BLOOM)
    final_norm: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    project_dim: int | None = None  # OPT-350m: embeddings narrower than the model (project_in/out)
    rotary_fraction: float = 1.0  # NeoX: rotary on the first part of each head only
    sliding_windows: tuple[int | None, ...] | None = None  # per layer, None = full attention
    # RMSNorm of q and k before rotary: "head" over each head (Qwen3), "full" over all heads (OLMo 2)
    qk_norm: str = ""
    rope_layers: tuple[bool, ...] | None = None  # per layer, False: no rotary (SmolLM3's NoPE)
    pre_norm: bool = True  # attn_norm / mlp_norm on each branch's input
    branch_norm: bool = False  # attn_out_norm / mlp_out_norm on each branch's output (OLMo 2)
    emb_scale: float = 1.0  # embeddings times this (Granite's embedding_multiplier)
    residual_scale: float = 1.0  # branch outputs times this before the residual add (Granite)
    attn_scale: float | None = None  # softmax scale (None: 1/sqrt(head_dim); Granite's multiplier)
    logits_scale: float = 1.0  # logits divided by this (Granite's logits_scaling)
    attn_softcap: float | None = None  # attention scores c * tanh(s / c) (Gemma 2)
    rope_types: tuple[str, ...] | None = None  # per layer, its rotary table's key (Gemma 3)
    logits_softcap: float | None = None  # logits c * tanh(l / c) (Gemma 2)
    # Mixture of Experts (moe.py): experts per MoE layer, experts per token, an expert's hidden
    # width, top-k weights renormalised to sum 1, and which layers are MoE (None: all when n_experts)
    n_experts: int = 0
    top_k: int = 0
    moe_hidden_dim: int | None = None
    norm_topk: bool = True
    moe_layers: tuple[bool, ...] | None = None
    shared_hidden_dim: int | None = None  # a gated shared expert of this width (Qwen2-MoE)

    def __post_init__(self) -> None:
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.dim // self.n_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_fraction)


def _get(config, names: tuple[str, ...], default=_MISSING):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    if default is _MISSING:
        raise KeyError(names[0])
    return default


def _rope(config) -> dict:
    return dict(getattr(config, "rope_parameters", None) or {})


# the config attribute names most transformers families use (GPT-2 and BLOOM predate them)
CONFIG_KEYS = dict(vocab_size=("vocab_size",), dim=("hidden_size",), n_layers=("num_hidden_layers",),
                   n_heads=("num_attention_heads",), max_positions=("max_position_embeddings",))


def per_layer(prefix: str, names: dict[str, str]) -> dict[str, str]:
    """Our per-layer weight names -> a checkpoint's, whose layers are `prefix`.{layer}."""
    return {f"layers.{{layer}}.{ours}": f"{prefix}.{{layer}}.{theirs}" for ours, theirs in names.items()}


# -------------------------------------------------------------------------------------- families

GPT2 = FamilySpec(
    name="gpt2", model_types=("gpt2",),
    keys=dict(vocab_size=("vocab_size",), dim=("n_embd", "hidden_size"), n_layers=("n_layer",),
              n_heads=("n_head",), hidden_dim=("n_inner",), max_positions=("n_positions",),
              norm_eps=("layer_norm_epsilon",), act=("activation_function",)),
    weights={
        "tok_emb": "transformer.wte", "pos_emb": "transformer.wpe",
        **per_layer("transformer.h", {
            "attn_norm": "ln_1",
            "attn.wqkv": "attn.c_attn",
            "attn.wo": "attn.c_proj",
            "mlp_norm": "ln_2",
            "mlp.up": "mlp.c_fc",
            "mlp.down": "mlp.c_proj"}),
        "norm": "transformer.ln_f", "lm_head": "lm_head"},
    switches=dict(positions="learned", qkv="fused", qkv_bias=True, o_bias=True, mlp_bias=True),
    derive=lambda c: dict(hidden_dim=c.n_inner or 4 * c.n_embd,
                          tie_embeddings=bool(getattr(c, "tie_word_embeddings", True))),
    unsupported=lambda c: ("scale_attn_by_inverse_layer_idx" if getattr(
        c, "scale_attn_by_inverse_layer_idx", False) else None),
)

OPT = FamilySpec(
    name="opt", model_types=("opt",),
    keys=dict(**CONFIG_KEYS, hidden_dim=("ffn_dim",), act=("activation_function",)),
    weights={
        "tok_emb": "model.decoder.embed_tokens", "pos_emb": "model.decoder.embed_positions",
        "project_in": "model.decoder.project_in", "project_out": "model.decoder.project_out",
        **per_layer("model.decoder.layers", {
            "attn_norm": "self_attn_layer_norm",
            "attn.wq": "self_attn.q_proj",
            "attn.wk": "self_attn.k_proj",
            "attn.wv": "self_attn.v_proj",
            "attn.wo": "self_attn.out_proj",
            "mlp_norm": "final_layer_norm",
            "mlp.up": "fc1",
            "mlp.down": "fc2"}),
        "norm": "model.decoder.final_layer_norm", "lm_head": "lm_head"},
    switches=dict(positions="learned", pos_offset=2, qkv="separate"),
    derive=lambda c: dict(
        qkv_bias=c.enable_bias, o_bias=c.enable_bias, mlp_bias=c.enable_bias,
        post_norm=not c.do_layer_norm_before,
        final_norm=c.do_layer_norm_before and not getattr(c, "_remove_final_layer_norm", False),
        project_dim=c.word_embed_proj_dim if c.word_embed_proj_dim != c.hidden_size else None,
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", True))),
    unsupported=lambda c: (None if getattr(c, "layer_norm_elementwise_affine", True)
                           else "layer_norm_elementwise_affine=False"),
)

BLOOM = FamilySpec(
    name="bloom", model_types=("bloom",),
    keys=dict(vocab_size=("vocab_size",), dim=("hidden_size", "n_embed"), n_layers=("n_layer",),
              n_heads=("n_head",), norm_eps=("layer_norm_epsilon",)),
    weights={
        "tok_emb": "transformer.word_embeddings",
        "emb_norm": "transformer.word_embeddings_layernorm",
        **per_layer("transformer.h", {
            "attn_norm": "input_layernorm",
            "attn.wqkv": "self_attention.query_key_value",
            "attn.wo": "self_attention.dense",
            "mlp_norm": "post_attention_layernorm",
            "mlp.up": "mlp.dense_h_to_4h",
            "mlp.down": "mlp.dense_4h_to_h"}),
        "norm": "transformer.ln_f", "lm_head": "lm_head"},
    switches=dict(positions="alibi", qkv="interleaved", emb_norm=True, act="gelu_pytorch_tanh",
                  qkv_bias=True, o_bias=True, mlp_bias=True),
    derive=lambda c: dict(hidden_dim=4 * c.hidden_size,
                          residual_from_norm=c.apply_residual_connection_post_layernorm,
                          tie_embeddings=bool(getattr(c, "tie_word_embeddings", True))),
)

GPT_NEOX = FamilySpec(
    name="gpt_neox", model_types=("gpt_neox",),
    keys=dict(**CONFIG_KEYS, hidden_dim=("intermediate_size",), norm_eps=("layer_norm_eps",),
              act=("hidden_act",)),
    weights={
        "tok_emb": "gpt_neox.embed_in",
        **per_layer("gpt_neox.layers", {
            "attn_norm": "input_layernorm",
            "attn.wqkv": "attention.query_key_value",
            "attn.wo": "attention.dense",
            "mlp_norm": "post_attention_layernorm",
            "mlp.up": "mlp.dense_h_to_4h",
            "mlp.down": "mlp.dense_4h_to_h"}),
        "norm": "gpt_neox.final_layer_norm",
        "lm_head": "lm_head|embed_out"},  # transformers 5 renamed embed_out
    switches=dict(positions="rotary", qkv="interleaved", mlp_bias=True),
    derive=lambda c: dict(
        parallel_residual=c.use_parallel_residual, qkv_bias=c.attention_bias,
        o_bias=c.attention_bias,
        rotary_fraction=_rope(c).get("partial_rotary_factor", getattr(c, "rotary_pct", 1.0)),
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False))),
)


def _llama_windows(c) -> tuple[int | None, ...] | None:
    layer_types = getattr(c, "layer_types", None)
    window = getattr(c, "sliding_window", None)
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if window and c.model_type in ("mistral", "mixtral"):
        return (window,) * c.num_hidden_layers
    return None


LLAMA_LAYER = {
    "attn_norm": "input_layernorm",
    "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
    "attn.wo": "self_attn.o_proj",
    "mlp_norm": "post_attention_layernorm",
    "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj", "mlp.down": "mlp.down_proj"}

LLAMA = FamilySpec(
    name="llama", model_types=("llama", "mistral", "qwen2", "smollm", "smollm2"),
    keys=dict(**CONFIG_KEYS, n_kv_heads=("num_key_value_heads",), head_dim=("head_dim",),
              hidden_dim=("intermediate_size",), norm_eps=("rms_norm_eps",), act=("hidden_act",)),
    weights={"tok_emb": "model.embed_tokens", **per_layer("model.layers", LLAMA_LAYER),
             "norm": "model.norm", "lm_head": "lm_head"},
    switches=dict(positions="rotary", norm="rmsnorm", mlp="gated"),
    derive=lambda c: dict(
        # Qwen2 always has q/k/v biases; Llama has `attention_bias` for all four projections
        qkv_bias=True if c.model_type == "qwen2" else bool(getattr(c, "attention_bias", False)),
        o_bias=False if c.model_type == "qwen2" else bool(getattr(c, "attention_bias", False)),
        mlp_bias=bool(getattr(c, "mlp_bias", False)),
        rotary_fraction=_rope(c).get("partial_rotary_factor", 1.0),
        sliding_windows=_llama_windows(c),
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False))),
    unsupported=lambda c: (
        f"rope_type {_rope(c).get('rope_type')!r}"
        if _rope(c).get("rope_type", "default") not in ("default", "linear", "dynamic", "llama3", "yarn",
                                                        "longrope")
        else None),
)

QK_NORMS = {"attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm"}
# a MoE layer (moe.py): its router and each expert's stored linears (kbitrt/format/experts.py)
EXPERTS = {"mlp.router": "mlp.gate", "mlp.gate_up.{expert}": "mlp.experts.gate_up_proj.{expert}",
           "mlp.down.{expert}": "mlp.experts.down_proj.{expert}"}


def _llama_like(name: str, model_types: tuple[str, ...], layer: dict[str, str],
                switches: dict | None = None, derive=None) -> FamilySpec:
    """A family that is Llama with more per-layer tensors, switches and derived fields."""
    base = LLAMA.derive
    return FamilySpec(
        name=name, model_types=model_types, keys=LLAMA.keys,
        weights={"tok_emb": "model.embed_tokens", **per_layer("model.layers", layer),
                 "norm": "model.norm", "lm_head": "lm_head"},
        switches={**LLAMA.switches, **(switches or {})},
        derive=(lambda c: {**base(c), **derive(c)}) if derive else base,
        unsupported=LLAMA.unsupported)


def _moe_layers(c) -> tuple[bool, ...]:
    """Which layers are MoE: Qwen's decoder_sparse_step and mlp_only_layers (all by default)."""
    step = getattr(c, "decoder_sparse_step", 1) or 1
    dense = set(getattr(c, "mlp_only_layers", None) or ())
    return tuple(i not in dense and (i + 1) % step == 0 for i in range(c.num_hidden_layers))


QWEN3 = _llama_like("qwen3", ("qwen3",), {**LLAMA_LAYER, **QK_NORMS}, dict(qk_norm="head"))
MIXTRAL = _llama_like(
    "mixtral", ("mixtral",), {**LLAMA_LAYER, **EXPERTS},
    derive=lambda c: dict(n_experts=c.num_local_experts, top_k=c.num_experts_per_tok,
                          moe_hidden_dim=c.intermediate_size, norm_topk=True))
QWEN3_MOE = _llama_like(
    "qwen3_moe", ("qwen3_moe",), {**LLAMA_LAYER, **QK_NORMS, **EXPERTS}, dict(qk_norm="head"),
    derive=lambda c: dict(n_experts=c.num_experts, top_k=c.num_experts_per_tok,
                          moe_hidden_dim=c.moe_intermediate_size,
                          norm_topk=bool(c.norm_topk_prob), moe_layers=_moe_layers(c)))

def _nope_layers(c) -> tuple[bool, ...]:
    """SmolLM3: no_rope_layers[i] is 1 where layer i uses rotary, 0 for a NoPE layer."""
    return tuple(bool(u) for u in c.no_rope_layers)

QWEN2_MOE = _llama_like(
    "qwen2_moe", ("qwen2_moe",),
    {**LLAMA_LAYER, **EXPERTS, "mlp.shared.gate": "mlp.shared_expert.gate_proj",
     "mlp.shared.up": "mlp.shared_expert.up_proj", "mlp.shared.down": "mlp.shared_expert.down_proj",
     "mlp.shared_gate": "mlp.shared_expert_gate"},
    derive=lambda c: dict(qkv_bias=bool(c.qkv_bias), o_bias=False, n_experts=c.num_experts,
                          top_k=c.num_experts_per_tok, moe_hidden_dim=c.moe_intermediate_size,
                          norm_topk=bool(c.norm_topk_prob), moe_layers=_moe_layers(c),
                          shared_hidden_dim=c.shared_expert_intermediate_size or None))

SMOLLM3 = _llama_like("smollm3", ("smollm3",), LLAMA_LAYER,
                      derive=lambda c: dict(rope_layers=_nope_layers(c)))
GRANITE = _llama_like(
    "granite", ("granite",), LLAMA_LAYER,
    derive=lambda c: dict(emb_scale=float(c.embedding_multiplier),
                          residual_scale=float(c.residual_multiplier),
                          attn_scale=float(c.attention_multiplier),
                          logits_scale=float(c.logits_scaling)))
OLMO2 = _llama_like(
    "olmo2", ("olmo2",),
    {k: v for k, v in LLAMA_LAYER.items() if k not in ("attn_norm", "mlp_norm")}
    | QK_NORMS | {"attn_out_norm": "post_attention_layernorm",
                  "mlp_out_norm": "post_feedforward_layernorm"},
    dict(qk_norm="full", pre_norm=False, branch_norm=True))

SANDWICH = {"attn_norm": "input_layernorm", "attn_out_norm": "post_attention_layernorm",
            "mlp_norm": "pre_feedforward_layernorm", "mlp_out_norm": "post_feedforward_layernorm"}
GEMMA2 = FamilySpec(
    name="gemma2", model_types=("gemma2",),
    keys={**LLAMA.keys, "act": ("hidden_activation", "hidden_act")},
    weights={"tok_emb": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head",
             **per_layer("model.layers", {**LLAMA_LAYER, **SANDWICH})},
    switches=dict(positions="rotary", norm="gemma", mlp="gated", branch_norm=True),
    derive=lambda c: {**LLAMA.derive(c), "emb_scale": c.hidden_size ** 0.5,
                      "attn_scale": c.query_pre_attn_scalar ** -0.5,
                      "attn_softcap": c.attn_logit_softcapping,
                      "logits_softcap": c.final_logit_softcapping,
                      "tie_embeddings": bool(getattr(c, "tie_word_embeddings", True))},
    unsupported=LLAMA.unsupported)
PHI3 = _llama_like(
    "phi3", ("phi3",),
    {k: v for k, v in LLAMA_LAYER.items() if k not in ("attn.wq", "attn.wk", "attn.wv", "mlp.gate",
                                                        "mlp.up")}
    | {"attn.wqkv": "self_attn.qkv_proj", "mlp.gate_up": "mlp.gate_up_proj"},
    dict(qkv="fused", mlp="gated_fused"),
    derive=lambda c: dict(qkv_bias=False, o_bias=False, mlp_bias=False))
GEMMA3 = FamilySpec(
    name="gemma3", model_types=("gemma3_text",), keys=GEMMA2.keys,
    weights={"tok_emb": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head",
             **per_layer("model.layers", {**LLAMA_LAYER, **SANDWICH, **QK_NORMS})},
    switches={**GEMMA2.switches, "qk_norm": "head"},
    derive=lambda c: {**GEMMA2.derive(c), "rope_types": tuple(c.layer_types)},
    unsupported=lambda c: next((f"rope_type {p.get('rope_type')!r}" for p in c.rope_parameters.values()
                                if p.get("rope_type", "default") not in ("default", "linear")), None))

FAMILIES = (GPT2, OPT, BLOOM, GPT_NEOX, LLAMA, QWEN3, MIXTRAL, QWEN3_MOE, QWEN2_MOE, SMOLLM3,
            GRANITE, OLMO2, GEMMA2, PHI3, GEMMA3)
_BY_MODEL_TYPE = {t: spec for spec in FAMILIES for t in spec.model_types}


def hf_config(config: dict):
    """A transformers config object from a config.json dict (the kbit quantization_config left out,
    transformers does not know it)."""
    from transformers import CONFIG_MAPPING

    d = {k: v for k, v in config.items() if k != "quantization_config"}
    model_type = d.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise KbitFormatError(f"model_type {model_type!r} is not known to the installed transformers;"
                              " upgrade transformers")
    return CONFIG_MAPPING[model_type].from_dict(d)


def family_for(config) -> FamilySpec | None:
    """The spec of a transformers config's family, None when the native decoder lacks it."""
    return _BY_MODEL_TYPE.get(getattr(config, "model_type", None))


def why_not_native(config) -> str | None:
    """None when the native decoder runs this config, else a short reason."""
    spec = family_for(config)
    if spec is None:
        return f"the native decoder has no spec for model_type {config.model_type!r}"
    reason = spec.unsupported(config) if spec.unsupported else None
    return f"the native decoder does not support {reason}" if reason else None


def model_args(config) -> ModelArgs:
    """ModelArgs of a transformers config: a spec's keys, then its switches, then derived fields."""
    spec = family_for(config)
    if spec is None:
        raise ValueError(why_not_native(config))
    values: dict[str, Any] = {"family": spec.name}
    for name, keys in spec.keys.items():
        value = _get(config, keys, default=None)
        if value is not None:
            values[name] = value
    values.update(spec.switches)
    if spec.derive:
        values.update(spec.derive(config))
    for name in _REQUIRED:
        if values.get(name) is None:
            keys = spec.keys.get(name, (name,))
            raise KeyError(f"config lacks {keys[0]!r}, which the {spec.name} decoder needs")
    return ModelArgs(**values)


_REQUIRED = ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim")


def checkpoint_names(spec: FamilySpec, n_layers: int, n_experts: int = 0) -> dict[str, str]:
    """decoder module name -> checkpoint module name, for every layer (and expert)."""
    out = {}
    for ours, theirs in spec.weights.items():
        for i in range(n_layers) if "{layer}" in ours else (0,):
            for e in range(n_experts) if "{expert}" in ours else (0,):
                out[ours.format(layer=i, expert=e)] = theirs.format(layer=i, expert=e)
    return out


class _SubRope:
    """A config seen through one layer type's rope_parameters (Gemma 3's per-type tables);
    transformers' init functions take the layer type, the default one is ours."""

    def __init__(self, config, layer_type: str):
        self._config, self._type = config, layer_type
        self.rope_parameters = config.rope_parameters[layer_type]

    def __getattr__(self, name):
        return getattr(self._config, name)


@dataclass(frozen=True)
class LongRope:
    """Phi-3's longrope: `short` inverse frequencies while every position of a forward is below
    `switch` (original_max_position_embeddings), else `long` (transformers' dynamic update)."""

    short: torch.Tensor
    long: torch.Tensor
    switch: int

    def to(self, device) -> LongRope:
        return LongRope(self.short.to(device), self.long.to(device), self.switch)


def rope_frequencies(config, args: ModelArgs, seq_len: int | None = None,
                     device: torch.device | str = "cpu") -> tuple[torch.Tensor | LongRope, float]:
    """(inv_freq (rotary_dim/2,), attention scaling) as transformers computes them (longrope: both
    tables and where transformers switches from one to the other, LongRope).

    RoPE scaling variants (linear, dynamic, llama3, yarn) come from transformers' own
    ROPE_INIT_FUNCTIONS so they match its forward; `dynamic` is evaluated at `seq_len` (the cache
    length), which equals transformers' result for a sequence of that length.
    """
    params = _rope(config)
    if args.rope_types and not isinstance(config, _SubRope):  # Gemma 3: a table per layer type
        return {t: rope_frequencies(_SubRope(config, t), args, seq_len, device)
                for t in sorted(set(args.rope_types))}, 1.0
    rope_type = params.get("rope_type", "default")
    base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    if rope_type == "default":
        dim = args.rotary_dim
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type == "longrope":  # short factors up to original_max_position_embeddings, then long
        short, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device)
        switch = params.get("original_max_position_embeddings") or \
            getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings
        long, _ = ROPE_INIT_FUNCTIONS[rope_type](config, device, seq_len=switch + 1)
        return LongRope(short.float(), long.float(), int(switch)), float(scaling)
    kwargs = {"seq_len": seq_len} if rope_type == "dynamic" and seq_len else {}
    if isinstance(config, _SubRope):
        config, kwargs = config._config, {**kwargs, "layer_type": config._type}
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device, **kwargs)
    return inv_freq.float(), float(scaling)
