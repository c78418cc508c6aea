"""A kbit folder against the model its config.json describes: every tensor's name and shape.

transformers builds the architecture on the meta device (no memory), which gives the state-dict
names and shapes the model has; a folder whose tensors do not fit it (a relabelled shape, a layer
too many or too few, a `transposed_modules` entry that is not GPT-2's Conv1D) is refused here,
before a runtime would index out of range or compute something else. Remote-code architectures
(config.json with an `auto_map`) are not checked here; the runtime refuses them itself. A
model_type the installed transformers does not know, without an auto_map, is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import torch

from kbitrt.errors import KbitFormatError
from kbitrt.format.experts import expert_params

STRUCTURAL_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                   "intermediate_size", "vocab_size", "max_position_embeddings", "n_embd", "n_layer",
                   "n_head", "n_positions", "n_inner", "ffn_dim", "word_embed_proj_dim", "head_dim",
                   "n_ctx")
BOOLS = ("tie_word_embeddings", "use_parallel_residual", "do_layer_norm_before")


@dataclass(frozen=True)
class ModelShapes:
    params: dict[str, tuple[int, ...]]  # parameters the model needs (tied ones once)
    state: dict[str, tuple[int, ...]]  # everything its state dict may hold
    linears: dict[str, tuple[int, int, bool]]  # module -> (out, in, stored transposed)
    tied_head: str | None  # state-dict name of a head tied to the embedding


def check_config_types(where, config: dict) -> None:
    for key in STRUCTURAL_INTS:
        v = config.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise KbitFormatError(f"{where}: {key} is {v!r}: it must be a positive integer: "
                                  "restore config.json from the conversion")
    for key in BOOLS:
        v = config.get(key)
        if v is not None and not isinstance(v, bool):
            raise KbitFormatError(f"{where}: {key} is {v!r}: it must be true or false: "
                                  "restore config.json from the conversion")


@lru_cache(maxsize=16)
def _shapes(config_json: str) -> ModelShapes | None:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.pytorch_utils import Conv1D

    d = json.loads(config_json)
    model_type = d.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        if "auto_map" in d:  # remote code: the runtime checks what it builds
            return None
        raise KbitFormatError(f"model_type {model_type!r} is not an architecture the installed "
                              "transformers knows (and config.json has no auto_map for remote "
                              "code): restore config.json from the conversion or upgrade "
                              "transformers")
    d.pop("model_type")
    config = AutoConfig.for_model(model_type, **d)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    linears, head_name = {}, None
    for name, m in model.named_modules():
        if m is head:
            head_name = name
        if m is emb:  # stored like a linear when quantized (--embedding-bits)
            linears[name] = (m.num_embeddings, m.embedding_dim, False)
        elif isinstance(m, Conv1D):
            linears[name] = (m.weight.shape[1], m.weight.shape[0], True)
        elif isinstance(m, torch.nn.Linear):
            linears[name] = (m.out_features, m.in_features, False)
    tied = head_name if getattr(config, "tie_word_embeddings", False) and head_name is not None else None
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    state = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    for p in expert_params(model).values():  # a linear per expert (format/experts.py)
        for m in p.linears():
            linears[m] = (p.out_features, p.in_features, False)
            params[f"{m}.weight"] = state[f"{m}.weight"] = (p.out_features, p.in_features)
        del params[p.name], state[p.name]
    return ModelShapes(
        params=params, state=state,
        linears=linears, tied_head=f"{tied}.weight" if tied else None)


def model_shapes(where, config: dict) -> ModelShapes | None:
    check_config_types(where, config)
    plain = {k: v for k, v in config.items() if k not in ("quantization_config", "dtype", "torch_dtype")}
    try:
        return _shapes(json.dumps(plain, sort_keys=True))
    except KbitFormatError as e:
        raise KbitFormatError(f"{where}: {e}") from None
    except Exception as e:  # noqa: BLE001 -- transformers refuses a config in many ways
        first = str(e).splitlines()[0][:120] if str(e) else ""
        raise KbitFormatError(f"{where}: transformers cannot build this model from it "
                              f"({type(e).__name__}: {first}): restore config.json from the "
                              "conversion") from None


def check_checkpoint_shapes(folder, config: dict, keys: dict[str, str], shape_of) -> None:
    """A source checkpoint's tensors (model name -> checkpoint key; `shape_of(key)` its shape)
    against the shapes transformers builds from its config.json, before a byte is converted: a
    norm of 64 values for hidden size 128, or one whose header claims 2^28 values, is refused."""
    shapes = model_shapes(f"{folder}/config.json", config)
    if shapes is None:
        return
    for name, key in sorted(keys.items()):
        want, got = shapes.state.get(name), tuple(shape_of(key))
        if want is not None and got != want:
            raise KbitFormatError(f"{folder}: checkpoint tensor {key} has shape {list(got)}, but "
                                  f"config.json makes {name} {list(want)}: the checkpoint does "
                                  "not fit its config; nothing was written")


def check_against_model(km) -> None:
    """Every tensor of the folder `km` (a KbitModel) has its place and shape in the model."""
    where = km.path / "config.json"
    shapes = model_shapes(where, km.config)
    if shapes is None:
        return
    for module, e in km.modules.items():
        lin = shapes.linears.get(module)
        if lin is None:
            raise KbitFormatError(f"{km.path}: {module} is quantized but is no linear layer of a "
                                  f"{km.config.get('model_type')!r} model: convert the model again")
        if (lin[0], lin[1]) != (e.out_features, e.in_features):
            raise KbitFormatError(f"{km.path}: {module} is stored as ({e.out_features}, "
                                  f"{e.in_features}) but config.json makes it {lin[:2]}: "
                                  "restore config.json or convert again")
        if lin[2] != (module in km.transposed):
            raise KbitFormatError(f"{where}: quantization_config.transposed_modules "
                                  f"{'lacks' if lin[2] else 'wrongly names'} {module}: restore "
                                  "config.json from the conversion")
    stored = {f"{m}.weight" for m in km.modules}
    for name in km.plain_names:
        want = shapes.state.get(name)
        if want is None:
            raise KbitFormatError(f"{km.file_path(name)}: tensor {name} is not part of a "
                                  f"{km.config.get('model_type')!r} model as config.json describes "
                                  "it: convert the model again")
        if tuple(km.info(name).shape) != want:
            raise KbitFormatError(f"{km.file_path(name)}: tensor {name} has shape "
                                  f"{list(km.info(name).shape)}, config.json makes it {list(want)}: "
                                  "convert the model again")
        stored.add(name)
    missing = sorted(p for p in shapes.params if p not in stored and p != shapes.tied_head)
    if missing:
        raise KbitFormatError(f"{km.path}: lacks {len(missing)} tensors the model needs (e.g. "
                              f"{missing[0]}): convert the model again")
