"""Load a runnable model from a kbit folder (`load_model`) or any KbitModel-like source
(`build_model`): the native decoder, or transformers with its linears swapped for KbitLinear when
the native decoder lacks the family. The pieces live by concern: devices.py, build.py (model
building), weights_policy.py (what a model holds), tokenizer.py, memory.py, in_memory.py.

Both are built on the meta device and their tensors assigned (gpt-fast style), so loading never
materialises a randomly initialised model. Both expose the same small protocol to generate.py:
`forward(input_ids, input_pos, pad, last_only)`, `setup_caches(batch, max_len)`, `drop_caches()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kbitrt.errors import KbitFormatError
from kbitrt.runtime.devices import cpu_path, default_dtype, gpu_path, resolve_device
from kbitrt.runtime.kernels import cpu as cpu_kernels
from kbitrt.model.decoder import Decoder
from kbitrt.model.families import hf_config
from kbitrt.runtime.build import (TransformersLM, build_native, build_transformers,
                                  choose_backend, merge_projections, warm_up)
from kbitrt.runtime.memory import limit_heap_growth, release_free_heap
from kbitrt.runtime.tokenizer import load_tokenizer
from kbitrt.runtime.weights_policy import KV_CACHES, check_cpu_weights, check_kv_cache, cpu_weights_for, kv_cache_for



@dataclass
class LoadedModel:
    model: nn.Module  # Decoder or TransformersLM, both with the protocol above
    tokenizer: Any
    backend: str  # native | transformers
    device: torch.device
    dtype: torch.dtype
    config: dict  # config.json
    max_positions: int | None
    weight_bytes: int  # bytes of all weights as held in memory (for bandwidth figures)
    quant_label: str
    path: Path | None = None
    note: str | None = None  # why this backend, when it was chosen automatically
    cpu_weights: str | None = None  # what CPU KbitLinears hold (CPU_WEIGHTS); None on CUDA
    kv_cache: str = "auto"  # what the native decoder's KV cache holds (KV_CACHES)


def build_model(source, device: str | torch.device = "auto", backend: str = "auto",
                dtype: torch.dtype | None = None, tokenizer: Any = None,
                cpu_weights: str = "auto", device_map: str | dict | None = None,
                max_memory: str | dict | None = None, kv_cache: str = "auto") -> LoadedModel:
    """A runnable model from a source with the KbitModel interface (on disk or in memory).

    cpu_weights (CPU only): "packed" codes or fp16 / bf16 / fp32 dense copies, "auto" (default):
    packed where the fused CPU kernels run vectorized (cpu_weights_for);
    `device_map`/`max_memory` split it over devices (runtime/placement.py);
    `kv_cache`: the native decoder's KV cache dtype (KV_CACHES; auto: the activations')."""
    check_cpu_weights(cpu_weights)
    check_kv_cache(kv_cache)
    config = hf_config(source.config)
    backend, note = choose_backend(config, backend)
    build = build_native if backend == "native" else build_transformers
    placed = None
    if device_map is not None:  # placement hook (issue 14)
        from kbitrt.runtime.placement import build_placed

        cpu_weights = cpu_weights_for(cpu_weights, device if isinstance(device, torch.device)
                                      else resolve_device(device), _bits(source))
        placed, dtype = build_placed(source, config, backend, build, device, dtype, device_map,
                                     max_memory, default_dtype, cpu_weights)
        model = placed.model if backend == "native" else TransformersLM(placed.model)
        device, note = placed.device, "; ".join(filter(None, (note, placed.note)))
    else:
        device = device if isinstance(device, torch.device) else resolve_device(device)
        dtype = dtype or default_dtype(device, source.config)
    cpu_weights = cpu_weights_for(cpu_weights, device, _bits(source))
    if device.type == "cpu":
        limit_heap_growth(32)
    with torch.no_grad():
        try:
            if placed is None:
                model = build(source, config, device, dtype, cpu_weights)
                if backend == "native" and (gpu_path(device) or (
                        cpu_weights == "packed" and cpu_kernels.available())):
                    merge_projections(model)  # fewer launches per step on either path
        finally:
            if device.type == "cpu":
                limit_heap_growth()
        kv_cache = kv_cache_for(kv_cache, dtype)
        if kv_cache != "auto" and backend != "native":
            note = "; ".join(filter(None, (note, f"a KV cache in {kv_cache} needs the native "
                                           "decoder: this one keeps the activations' dtype")))
            kv_cache = "auto"
        if isinstance(model, Decoder):
            model.kv_dtype = KV_CACHES[kv_cache]
        warm_up(model, device, cached=isinstance(model, Decoder) and placed is None
                and cpu_path(device))
    if device.type == "cpu":
        release_free_heap()
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return LoadedModel(
        model=model, tokenizer=tokenizer, backend=backend, device=device, dtype=dtype,
        config=source.config, max_positions=_max_positions(config),
        weight_bytes=placed.weight_bytes if placed else sum(seen.values()),
        quant_label=source.quant.label, path=getattr(source, "path", None), note=note,
        cpu_weights=cpu_weights if cpu_path(device) else None, kv_cache=kv_cache)


def _bits(source) -> int | None:
    """The width a source's quantized linears hold (None when it does not say)."""
    return getattr(getattr(source, "quant", None), "bits", None)


def _max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(config, key, None)
        if value:
            return int(value)
    return None


def load_model(name: str | Path, device: str = "auto", backend: str = "auto",
               dtype: torch.dtype | None = None, cpu_weights: str = "auto",
               bits: int | str | None = None, device_map: str | dict | None = None,
               max_memory: str | dict | None = None, kv_cache: str = "auto") -> LoadedModel:
    """Open a kbit folder (or Hub repo id), validate it, and build a runnable model.

    `cpu_weights`: what a quantized linear holds on the CPU (CPU_WEIGHTS); `bits`: the width of an
    any-precision model (K, or LO-HI to choose per call; runtime/any_precision.py);
    `device_map`/`max_memory`: placement over devices (runtime/placement.py); `kv_cache`: what
    the KV cache holds (KV_CACHES)."""
    from kbitrt.convert.source import resolve_model
    from kbitrt.format.model_check import check_against_model
    from kbitrt.format.reader import KbitModel

    device_obj = resolve_device(device)  # fail on a bad device before reading anything
    check_cpu_weights(cpu_weights)
    check_kv_cache(kv_cache)
    path = resolve_model(name)
    if not (Path(path) / "config.json").exists():
        raise KbitFormatError(f"{path} is not a kbit model: it has no config.json")
    # the native decoder checks every name and shape itself; transformers' meta-device model (and
    # the ~200 MB of modules it imports) is only built to check a folder transformers will run
    source = KbitModel.open(path, check_model=False)
    if choose_backend(hf_config(source.config), backend)[0] != "native":
        check_against_model(source)
    if bits is not None:
        from kbitrt.runtime.any_precision import select_width
        source = select_width(source, bits)
    if device_obj.type == "cpu":
        limit_heap_growth()
    tokenizer = load_tokenizer(path)
    if device_obj.type == "cpu":
        release_free_heap()
    return build_model(source, device if device_map is not None else device_obj, backend, dtype,
                       tokenizer, cpu_weights, device_map, max_memory, kv_cache)

