"""Which tensors of a checkpoint are linear weights: read off the model built on the meta device.

Building the architecture on the meta device costs no memory (a 176B model included) and tells,
for any causal LM transformers knows, which modules are nn.Linear or GPT-2's Conv1D, which one is
the output head, and which checkpoint names belong to the model at all.

Checkpoint names are resolved the way transformers resolves them when it loads that architecture:
through its checkpoint conversion mapping (`transformers.conversion_mapping`: renames such as
GPT-NeoX's `embed_out` -> `lm_head`, `LayerNorm.gamma` -> `.weight`) and its base-model-prefix rule
(GPT-2 saved without `transformer.`, OPT with or without `model.`). Fused Mixture-of-Experts
parameters (3-D) become one linear per expert, `<parameter>.<e>` (kbitrt/format/experts.py);
convert/experts.py gathers each expert's matrix from the checkpoint's own layout. Other conversions
that merge or split tensors are recognised and refused with one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kbitrt.convert.source import read_config
from kbitrt.errors import KbitFormatError
from kbitrt.format.experts import ExpertParam, expert_params

# Non-persistent buffers that old transformers versions saved into checkpoints and that every
# current model recomputes: causal masks and rotary frequencies. A checkpoint tensor the model does
# not have is skipped silently only when its name matches one of these; anything else stops the
# conversion (or is dropped on purpose with --drop-unused). docs/format.md lists them.
SKIPPABLE_BUFFERS = (
    (re.compile(r"(^|\.)(attn|attention|self_attention)\.bias$"), "causal-mask buffer (GPT-2, GPT-Neo, GPT-J, GPT-NeoX)"),
    (re.compile(r"(^|\.)(attn|attention|self_attention)\.masked_bias$"), "mask fill value buffer"),
    (re.compile(r"(^|\.)rotary_emb\.(inv_freq|original_inv_freq|cos_cached|sin_cached)$"),
     "rotary-embedding buffer"),
    (re.compile(r"(^|\.)inv_freq$"), "rotary-embedding buffer"),
    (re.compile(r"(^|\.)embed_positions\._float_tensor$"), "sinusoidal-position placeholder"),
)


ROUTERS = ("gate", "router", "shared_expert_gate")


def _n_experts(config) -> int:
    for key in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def skip_reason(key: str) -> str | None:
    """Why a checkpoint tensor the model has no place for may be skipped, or None."""
    for pattern, why in SKIPPABLE_BUFFERS:
        if pattern.search(key):
            return why
    return None


@dataclass
class ModelMap:
    linears: dict[str, bool]  # module name -> stored transposed (Conv1D, (in, out))
    head: str | None  # module name of the output embedding
    state_keys: set[str]
    prefix: str  # base_model_prefix, for checkpoints saved without/with it
    tied: bool
    embedding_key: str | None  # state-dict key of the input embedding weight
    model_type: str = ""
    dropped: list[str] = field(default_factory=list)
    params: set[str] = field(default_factory=set)  # parameter names (tied ones once)
    renamings: list = field(default_factory=list)  # transformers WeightRenaming objects
    converters: list = field(default_factory=list)  # transformers WeightConverter objects
    experts: dict[str, ExpertParam] = field(default_factory=dict)  # fused 3-D expert parameters

    def canonical(self, key: str) -> str | None:
        """The model's state-dict name of a checkpoint key, None when the model has no such tensor."""
        if key in self.state_keys:
            return key
        name = self.renamed(key)
        return name if name in self.state_keys else None

    def renamed(self, key: str) -> str:
        """`key` as transformers renames it at load time (renamings, then the base-model prefix)."""
        name = key
        for r in self.renamings:
            name, _ = r.rename_source_key(name)
        if self.prefix:
            p = self.prefix + "."
            if name.startswith(p) and name[len(p):] in self.state_keys:
                name = name[len(p):]
            elif p + name in self.state_keys:
                name = p + name
        return name

    def needs_conversion(self, key: str) -> str | None:
        """The transformers conversion (merge/split of tensors) a key would need, or None."""
        name = key
        for r in self.renamings:
            name, _ = r.rename_source_key(name)
        for c in self.converters:
            target, pattern = c.rename_source_key(name)
            if pattern is not None:
                return f"{pattern} -> {target.rpartition('.')[2] if '.' in target else target}"
        return None


def _conversions(model) -> tuple[list, list]:
    """transformers' own load-time renamings and tensor conversions for this model."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # transformers < 5: no conversion mapping, names are used as saved
        return [], []
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return renamings, converters


def _first(e: BaseException) -> str:
    return str(e).splitlines()[0][:120] if str(e) else ""


def build_model_map(folder: Path, trust_remote_code: bool = False) -> ModelMap:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    raw = read_config(folder)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise KbitFormatError(
            f"{folder}: architecture {raw.get('model_type')!r} is not known to the installed "
            f"transformers ({e.__class__.__name__}); upgrade transformers or pass "
            "--trust-remote-code for models that ship their own code") from None
    except (KeyError, TypeError, AttributeError) as e:
        raise KbitFormatError(f"{folder}: transformers cannot read this config.json "
                              f"({type(e).__name__}: {_first(e)}): fix the config") from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise KbitFormatError(f"{folder}: {raw.get('model_type')!r} is not a causal LM that "
                              f"transformers can build: {_first(e)}") from None
    except (KeyError, TypeError, AttributeError, NotImplementedError) as e:  # e.g. unknown rope_type
        raise KbitFormatError(f"{folder}: transformers cannot build this {raw.get('model_type')!r} "
                              f"model from its config ({type(e).__name__}: {_first(e)}): it uses a "
                              "feature the installed transformers does not support") from None
    head_module = model.get_output_embeddings()
    in_emb = model.get_input_embeddings()
    linears, head, embedding_key = {}, None, None
    for name, module in model.named_modules():
        if module is head_module:
            head = name
        if module is in_emb:
            embedding_key = f"{name}.weight"
        if name.rpartition(".")[2] in ROUTERS and _n_experts(config):
            continue  # an MoE router stays 16-bit: its scores pick the experts
        if isinstance(module, Conv1D):
            linears[name] = True
        elif isinstance(module, torch.nn.Linear):
            linears[name] = False
    tied = bool(getattr(config, "tie_word_embeddings", False)) and head is not None
    renamings, converters = _conversions(model)
    params = {n for n, _ in model.named_parameters()}
    state_keys = set(model.state_dict().keys())
    experts = expert_params(model)
    for p in experts.values():  # each expert's matrix is a linear of its own
        per_expert = {f"{m}.weight" for m in p.linears()}
        linears.update({m: False for m in p.linears()})
        params = (params - {p.name}) | per_expert
        state_keys = (state_keys - {p.name}) | per_expert
    return ModelMap(linears=linears, head=head, state_keys=state_keys,
                    prefix=getattr(model, "base_model_prefix", "") or "", tied=tied,
                    embedding_key=embedding_key, model_type=raw.get("model_type", ""),
                    params=params, renamings=renamings, converters=converters,
                    experts=experts)


def prefix_variants(name: str, prefix: str) -> list[str]:
    """`name` as it is, with the model's base_model_prefix, and without it: checkpoints are saved
    both with and without the prefix."""
    if not prefix:
        return [name]
    return [name, f"{prefix}.{name}", name.removeprefix(prefix + ".")]
