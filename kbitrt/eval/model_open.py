"""One opener for both kinds of model an evaluation compares: a kbit folder (through kbitrt's
loader) and a plain Hugging Face model (transformers, fp32 on the CPU) as the baseline. Both come
back as a LoadedModel with the same forward protocol, so every metric runs the same code."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kbitrt.runtime.devices import default_dtype, resolve_device
from kbitrt.runtime.build import TransformersLM
from kbitrt.runtime.loader import LoadedModel, load_model
from kbitrt.runtime.tokenizer import load_tokenizer


def is_kbit(path: Path) -> bool:
    config = json.loads((Path(path) / "config.json").read_text())
    return (config.get("quantization_config") or {}).get("quant_method") == "kbit"


def open_model(name: str, device: str = "auto", backend: str = "auto",
               dtype: torch.dtype | None = None, cpu_weights: str = "auto",
               bits: int | str | None = None, device_map: str | None = None,
               max_memory: str | None = None, kv_cache: str = "auto") -> LoadedModel:
    """A kbit folder or Hub id through load_model (cpu_weights: what its CPU linears hold; bits:
    an any-precision model's width; device_map/max_memory: placement over devices; kv_cache: the
    KV cache's dtype); anything else through transformers."""
    from kbitrt.convert.source import resolve_model

    device_obj = resolve_device(device)
    path = resolve_model(name)
    if is_kbit(path):
        return load_model(path, device=str(device_obj), backend=backend, dtype=dtype,
                          cpu_weights=cpu_weights, bits=bits, device_map=device_map,
                          max_memory=max_memory, kv_cache=kv_cache)
    if device_map is not None:  # placement hook (issue 14): accelerate splits the plain model
        from kbitrt.runtime.placement import load_hf_placed

        return wrap_hf(*load_hf_placed(path, device, dtype, device_map, max_memory, default_dtype), path)
    return load_hf(path, device_obj, dtype)


def load_hf(path: Path, device: torch.device, dtype: torch.dtype | None = None) -> LoadedModel:
    """An unquantized HF checkpoint: fp32 on the CPU (the exact reference), bf16/fp16 on CUDA."""
    from transformers import AutoModelForCausalLM

    config = json.loads((Path(path) / "config.json").read_text())
    dtype = dtype or default_dtype(device, config)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = load_tokenizer(path)
    return wrap_hf(hf, tokenizer, path)


def wrap_hf(hf, tokenizer, path: Path | None = None) -> LoadedModel:
    """A transformers model already in memory behind the LoadedModel interface (also for tests)."""
    p = next(hf.parameters())
    seen = {t.data_ptr(): t.numel() * t.element_size()
            for t in list(hf.parameters()) + list(hf.buffers())}
    config = json.loads(hf.config.to_json_string())
    max_pos = next((int(config[k]) for k in ("max_position_embeddings", "n_positions", "seq_length")
                    if config.get(k)), None)
    return LoadedModel(
        model=TransformersLM(hf.eval()), tokenizer=tokenizer, backend="transformers",
        device=p.device, dtype=p.dtype, config=config, max_positions=max_pos,
        weight_bytes=sum(seen.values()), quant_label=str(p.dtype).replace("torch.", ""),
        path=Path(path) if path else None)


def count_params(model: torch.nn.Module) -> int:
    """Weights as parameters of the unquantized model: a KbitLinear counts in x out (+ bias)."""
    from kbitrt.runtime.linear import KbitLinear

    seen: dict[int, int] = {}
    total = 0
    for module in model.modules():
        if isinstance(module, KbitLinear):
            total += module.in_features * module.out_features
            total += module.bias.numel() if module.bias is not None else 0
        for p in module.parameters(recurse=False):
            seen[p.data_ptr() if not p.is_meta else id(p)] = p.numel()  # tied weights once
    return total + sum(seen.values())
