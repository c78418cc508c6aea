"""Zero-shot input-channel importance (`--importance norm`): which norm's output a linear reads.

A linear right after a norm (q/k/v after the attention norm, gate/up after the MLP norm) sees its
inputs scaled per channel by that norm's gain g, so an error in its input column j reaches the output
in proportion to g_j: the mse scale search and the Lloyd fit (format/scales.py, format/lloyd.py)
weight column j's squared error by g_j^2. Linears whose inputs come from elsewhere (the attention
output, the MLP's hidden activation) get no weights (uniform). The rule lives here, beside the native
decoder's family specs (the one place that knows which norm feeds which linear); the converter gets
the resulting checkpoint-name map and reads the gains itself (layers: format <- model <- convert).
"""

from __future__ import annotations

import json
from pathlib import Path

from kbitrt.model.families import checkpoint_names, family_for, hf_config, model_args

# decoder norm (per layer) -> the decoder linears that read its output
NORM_READERS = {
    "attn_norm": ("attn.wq", "attn.wk", "attn.wv", "attn.wqkv"),
    "mlp_norm": ("mlp.gate", "mlp.up"),
}


def norm_inputs(config) -> dict[str, str]:
    """Checkpoint linear module name -> checkpoint norm module name whose output the linear reads,
    for a transformers config of a native family ({} for others, and for post-norm models, whose
    linears read the previous layer's output norm). Alternative names ("a|b") stay as in the spec."""
    spec = family_for(config)
    if spec is None:
        return {}
    args = model_args(config)
    if args.post_norm or args.norm == "gemma":  # Gemma's norms scale by 1 + weight, not weight
        return {}
    names = checkpoint_names(spec, args.n_layers)
    out = {}
    for layer in range(args.n_layers):
        for norm, readers in NORM_READERS.items():
            norm_name = names.get(f"layers.{layer}.{norm}")
            if norm_name is None:
                continue
            for ours in readers:
                theirs = names.get(f"layers.{layer}.{ours}")
                if theirs is not None:
                    out[theirs] = norm_name
    return out


def norm_inputs_of_folder(folder: str | Path) -> dict[str, str]:
    """norm_inputs of an HF model folder's config.json."""
    raw = json.loads((Path(folder) / "config.json").read_text())
    return norm_inputs(hf_config(raw))
