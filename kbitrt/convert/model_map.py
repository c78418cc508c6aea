"""Which tensors of a checkpoint are linear weights: read off the model built on the meta device.

Building the architecture on the meta device costs no memory (a 176B model included) and tells,
for any causal LM transformers knows, which modules are nn.Linear or GPT-2's Conv1D, which one is
the output head, and which checkpoint names belong to the model at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kbitrt.errors import KbitFormatError


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

    def canonical(self, key: str) -> str | None:
        """The model's state-dict name of a checkpoint key, None when the model has no such tensor."""
        return next((name for name in prefix_variants(key, self.prefix) if name in self.state_keys),
                    None)


def prefix_variants(name: str, prefix: str) -> list[str]:
    """`name` as it is, with the model's base_model_prefix, and without it: checkpoints are saved
    both with and without the prefix."""
    if not prefix:
        return [name]
    return [name, f"{prefix}.{name}", name.removeprefix(prefix + ".")]


def build_model_map(folder: Path, trust_remote_code: bool = False) -> ModelMap:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    raw = json.loads((folder / "config.json").read_text())
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise KbitFormatError(
            f"{folder}: architecture {raw.get('model_type')!r} is not known to the installed "
            f"transformers ({e.__class__.__name__}); upgrade transformers or pass "
            "--trust-remote-code for models that ship their own code") from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise KbitFormatError(f"{folder}: {raw.get('model_type')!r} is not a causal LM that "
                              f"transformers can build: {str(e).splitlines()[0]}") from None
    head_module = model.get_output_embeddings()
    in_emb = model.get_input_embeddings()
    linears, head, embedding_key = {}, None, None
    for name, module in model.named_modules():
        if module is head_module:
            head = name
        if module is in_emb:
            embedding_key = f"{name}.weight"
        if isinstance(module, Conv1D):
            linears[name] = True
        elif isinstance(module, torch.nn.Linear):
            linears[name] = False
    tied = bool(getattr(config, "tie_word_embeddings", False)) and head is not None
    return ModelMap(linears=linears, head=head, state_keys=set(model.state_dict().keys()),
                    prefix=getattr(model, "base_model_prefix", "") or "", tied=tied,
                    embedding_key=embedding_key, model_type=raw.get("model_type", ""))
