"""Build a runnable model from a kbit folder: the native decoder, or transformers with its linears
swapped for KbitLinear when the native decoder lacks the family.

Both are built on the meta device and their tensors assigned (gpt-fast style), so loading never
materialises a randomly initialised model. Both expose the same small protocol to generate.py:
`forward(input_ids, input_pos, pad, last_only)`, `setup_caches(batch, max_len)`, `drop_caches()`.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kbitrt.errors import KbitFormatError, RunError
from kbitrt.format.config import QuantConfig
from kbitrt.runtime.devices import cpu_path, default_dtype, gpu_path, resolve_device
from kbitrt.runtime.experts import install_kbit_experts
from kbitrt.runtime.kernels import cpu as cpu_kernels
from kbitrt.runtime.linear import HalfLinear, KbitLinear, stack_rows
from kbitrt.runtime.models.decoder import Decoder, default_positions
from kbitrt.runtime.models.families import (checkpoint_names, family_for, model_args, rope_frequencies,
                                why_not_native)

BACKENDS = ("auto", "native", "transformers")
# What a CPU KbitLinear holds: only the packed codes ("packed", --low-memory), read by the fused
# CPU kernels (kernels/cpu.py), or a dense copy in fp16 / bf16 / fp32 with the packed buffers freed.
# "auto": packed where the fused kernels run vectorized, else fp16 (cpu_weights_for)
CPU_WEIGHTS = {"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16,
               "fp32": torch.float32, "packed": None}
# what the KV cache holds (auto: the activations' dtype); a 16-bit cache under the CPU's fp32
# activations halves it, at fp16's rounding of keys and values (llama.cpp's default cache type).
# "low-memory" (what --low-memory asks for): fp16 under fp32 activations, else the activations'
KV_CACHES = {"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
             "low-memory": None}
# checkpoint tensors that are not weights (transformers' buffers some old checkpoints carry)
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq", ".masked_bias")
# modules stored (in, out) by GPT-2's Conv1D when kept unquantized (quantized ones are (out, in))
_CONV1D = {"gpt2": ("attn.wqkv", "attn.wo", "mlp.up", "mlp.down")}


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


# ------------------------------------------------------------------------------------- devices

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


# ------------------------------------------------------------------------------------- linears

def kbit_module(qw, bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device,
                cpu_weights: str = "auto") -> nn.Module:
    """The KbitLinear module of a QuantizedWeight (the op it runs is kernels.kbit_linear) on
    `device`; on the CPU holding what `cpu_weights` says (CPU_WEIGHTS)."""
    if getattr(qw, "planes", None) is not None:  # any-precision, widths chosen per call
        from kbitrt.runtime.any_precision import multi_width_linear
        return multi_width_linear(qw, bias, dtype, device)
    packed = cpu_weights == "packed"
    layer = KbitLinear.from_quantized(qw, bias, compute_dtype=dtype, cpu_cache=not packed,
                                      cpu_dtype=CPU_WEIGHTS[cpu_weights])
    layer = layer.to(device)
    if cpu_path(device) and not packed:
        layer.release_packed()
    return layer


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def limit_heap_growth(threshold_kib: int = 128) -> None:
    """glibc: serve allocations >= 128 KiB from mmap and give them back when freed. Loading
    dequantizes layer after layer into temporaries of many sizes; with glibc's default adaptive
    threshold they fragment the heap and the peak RSS measured ~600 MB above what the model holds
    (SmolLM2, 2 cores). Building a model lowers it further (`threshold_kib`), so the small packed
    k and v projections that merging q, k and v frees leave no holes in the heap (SmolLM2
    --low-memory: 0.6 MB less resident); decoding steps keep 128 KiB, as their buffers are reused.
    Harmless elsewhere (no glibc: nothing is done)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, threshold_kib * 1024)  # M_MMAP_THRESHOLD (fixed: disables the adaptive one)


def release_free_heap() -> None:
    """glibc: hand the heap's free pages back (malloc_trim). Loading a tokenizer parses its JSON
    into ~40 MB of temporaries (SmolLM2's: RSS +55 MB, +17 MB after the trim) that would otherwise
    stay resident under the model loaded next; building the model frees the parts of merged
    projections and the warm-up token's temporaries (SmolLM2 nf4 --low-memory: 6 MB resident).
    benchmarks/cpu_memory_breakdown.py measures both."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def check_cpu_weights(cpu_weights: str) -> str:
    if cpu_weights not in CPU_WEIGHTS:
        raise RunError(f"cpu weights {cpu_weights!r}: use one of {', '.join(CPU_WEIGHTS)}")
    return cpu_weights


def check_kv_cache(kv_cache: str) -> str:
    if kv_cache not in KV_CACHES:
        raise RunError(f"kv cache {kv_cache!r}: use one of {', '.join(KV_CACHES)}")
    return kv_cache


def kv_cache_for(kv_cache: str, dtype: torch.dtype) -> str:
    """The KV cache setting that takes effect under activations of `dtype` ("low-memory": fp16
    under fp32 activations, the CPU's; on CUDA the activations are 16-bit already)."""
    if kv_cache == "low-memory":
        return "fp16" if dtype == torch.float32 else "auto"
    return kv_cache


def warm_up(model: nn.Module, device: torch.device, cached: bool) -> None:
    """One token through, so one-time work (CPU dequant caches, kernel autotuning) is not counted
    as prompt time later. `cached` (the native decoder on the CPU): through a one-slot KV cache,
    the path decoding runs (the layer stack), so a load does not page in code only the Python
    layers use (SmolLM2 --low-memory: 1.3 MB less resident)."""
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    if not cached:
        model(ids)
        return
    model.setup_caches(1, 1)
    try:
        model(ids)
    finally:
        model.drop_caches()


# widths the fused CPU kernels serve faster than fp16 copies (benchmarks/cpu_matmul.py, AVX-512
# Xeon, 2 threads, SmolLM2's linears per token: k=3..6 within -8%..+64% of fp16, while k=7 and 8,
# whose codebook lookup is a gather, take 1.3x and 1.8x as long); wider ones default to fp16 copies
PACKED_DEFAULT_MAX_BITS = 6


def cpu_weights_for(cpu_weights: str, device: torch.device, bits: int | None = None) -> str:
    """"auto" on the CPU: the packed codes where the fused CPU kernels run vectorized (4x smaller
    than an fp16 copy at 4 bits, and faster) for widths up to PACKED_DEFAULT_MAX_BITS, else fp16
    copies. Other values as given."""
    if cpu_weights != "auto":
        return cpu_weights
    if not cpu_path(device):  # what the GPU kernels read (CPU-offloaded layers included)
        return "packed"
    if bits is not None and bits > PACKED_DEFAULT_MAX_BITS:
        return "fp16"
    return "packed" if cpu_kernels.vectorized() else "fp16"


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    with torch.device("meta"):
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


class _Tensors:
    """Reads a source's tensors to the target device/dtype and remembers which were used."""

    def __init__(self, source, device: torch.device, dtype: torch.dtype, cpu_weights: str = "auto"):
        self.source, self.device, self.dtype = source, device, dtype
        self.cpu_weights = cpu_weights
        self.quantized = set(source.quantized_modules)
        self.plain = set(source.plain_names)
        self.used: set[str] = set()

    def pick(self, names: str) -> str:
        """The first of `a|b|...` the source holds (as a quantized module or a plain weight)."""
        options = names.split("|")
        for name in options:
            if name in self.quantized or f"{name}.weight" in self.plain:
                return name
        return options[0]

    def has(self, name: str) -> bool:
        return name in self.plain

    def get(self, name: str, shape: tuple[int, ...] | None = None, transpose: bool = False,
            keep_dtype: bool = False):
        """The tensor on the device, in the model's dtype (`keep_dtype`: in the one it is stored in)."""
        if name not in self.plain:
            raise KbitFormatError(f"{_where(self.source)} lacks the tensor {name!r}")
        t = self.source.tensor(name)
        if transpose:
            t = t.t()
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise KbitFormatError(f"{_where(self.source)}: {name} has shape {tuple(t.shape)}, "
                                  f"the config says {tuple(shape)}")
        self.used.add(name)
        return t.to(self.device, t.dtype if keep_dtype else self.dtype).contiguous()

    def linear(self, name: str, out_f: int, in_f: int, bias: bool, transpose: bool = False):
        """KbitLinear when `name` is quantized, else a plain nn.Linear."""
        b = self.get(f"{name}.bias", (out_f,)) if bias else None
        if name in self.quantized:
            qw = self.source.quantized(name)
            if tuple(qw.shape) != (out_f, in_f):
                raise KbitFormatError(f"{_where(self.source)}: {name} is {tuple(qw.shape)}, "
                                      f"the config says {(out_f, in_f)}")
            self.used.add(name)
            return kbit_module(qw, b, self.dtype, self.device, self.cpu_weights)
        return plain_linear(self.get(f"{name}.weight", (out_f, in_f), transpose), b)

    def half_linear(self, name: str, out_f: int, in_f: int, bias: bool) -> HalfLinear:
        """An unquantized linear in the file's dtype, for the fused CPU kernels (HalfLinear)."""
        w = self.get(f"{name}.weight", (out_f, in_f), keep_dtype=True)
        b = self.get(f"{name}.bias", (out_f,)) if bias else None
        return HalfLinear(nn.Parameter(w, requires_grad=False),
                          None if b is None else nn.Parameter(b, requires_grad=False))

    def check_all_used(self) -> None:
        left = sorted(n for n in (self.plain | self.quantized) - self.used
                      if not n.endswith(_IGNORED_SUFFIXES))
        if left:
            more = f" and {len(left) - 5} more" if len(left) > 5 else ""
            raise KbitFormatError(f"{_where(self.source)} holds tensors the model does not use: "
                                  f"{', '.join(left[:5])}{more}")


def _where(source) -> str:
    return str(getattr(source, "path", None) or "the model")


# -------------------------------------------------------------------------------------- native

def build_native(source, config, device: torch.device, dtype: torch.dtype,
                 cpu_weights: str = "auto") -> Decoder:
    """The generic decoder with every tensor of `source` (a KbitModel or the like) assigned."""
    args, spec = model_args(config), family_for(config)
    with torch.device("meta"):
        model = Decoder(args)
    names = checkpoint_names(spec, args.n_layers, args.n_experts)
    tensors = _Tensors(source, device, dtype, cpu_weights)
    conv1d = _CONV1D.get(spec.name, ())
    # on the CPU a quantized model holds packed codes or 16-bit copies (cpu_weights), so the
    # embedding stays in the file's 16 bits too (a gather: exact), activations fp32. An output head
    # (tied to it or not) stays 16-bit only with the fused CPU kernels, which sum its logits in
    # fp32 in one order for any number of tokens: torch's 16-bit CPU matmuls round one token's
    # logits differently from several tokens', which breaks greedy ties between decoding and
    # verifying steps (speculative decoding)
    head = tensors.pick(names["lm_head"])
    tied = head not in tensors.quantized and not tensors.has(f"{head}.weight")
    cpu32 = cpu_path(device) and dtype == torch.float32
    fused = cpu32 and cpu_weights == "packed" and cpu_kernels.available()
    hold16 = cpu32 and cpu_weights != "fp32" and (fused or not tied)
    for ours, module in list(model.named_modules()):
        if ours not in names:
            continue
        theirs = tensors.pick(names[ours])
        if isinstance(module, nn.Linear):
            plain_head = ours == "lm_head" and theirs not in tensors.quantized
            if plain_head and not tensors.has(f"{theirs}.weight"):
                if not args.tie_embeddings:
                    raise KbitFormatError(f"{_where(source)} lacks the tensor {theirs + '.weight'!r}")
                if fused:
                    model.lm_head = HalfLinear(model.tok_emb.weight)  # one tensor, two uses
                else:
                    model.lm_head.weight = model.tok_emb.weight  # tied: one tensor, two uses
                continue
            if plain_head and fused:
                model.lm_head = tensors.half_linear(theirs, module.out_features,
                                                    module.in_features, module.bias is not None)
                continue
            new = tensors.linear(theirs, module.out_features, module.in_features,
                                 module.bias is not None, transpose=ours.endswith(conv1d))
            model.set_submodule(ours, new)
        else:  # embeddings and norms
            for pname, p in list(module.named_parameters(recurse=False)):
                t = tensors.get(f"{theirs}.{pname}", tuple(p.shape), keep_dtype=hold16 and ours == "tok_emb")
                setattr(module, pname, nn.Parameter(t, requires_grad=False))
    if model.tok_emb.weight.dtype != dtype:
        model.act_dtype = dtype
    tensors.check_all_used()
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise KbitFormatError(f"{_where(source)}: no tensor for {', '.join(meta[:5])}")
    if args.positions == "rotary":
        max_len = args.max_positions or 0
        inv_freq, scaling = rope_frequencies(config, args, seq_len=max_len, device=device)
        model.setup_positions(inv_freq, scaling)
    else:
        model.setup_positions(None)
    return model.eval()


# -------------------------------------------------------------------------------- transformers

@contextlib.contextmanager
def _params_on_meta():
    """Parameters on the meta device, buffers (rotary tables, masks) real: they are not stored."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


class TransformersLM(nn.Module):
    """A transformers causal LM behind the decoder protocol (its own dynamic KV cache)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.takes_position_ids = "position_ids" in inspect.signature(model.forward).parameters
        self.past = None
        self.use_cache = False

    def setup_caches(self, batch: int, max_len: int) -> None:
        self.past, self.use_cache = None, True

    def drop_caches(self) -> None:
        self.past, self.use_cache = None, False

    def forward(self, input_ids, input_pos=None, pad=None, last_only=False):
        device = input_ids.device
        input_pos, pad = default_positions(input_ids, input_pos, pad)
        seen = torch.arange(int(input_pos[-1]) + 1, device=device)
        attention_mask = (seen[None, :] >= pad[:, None]).long()  # (B, tokens so far)
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask,
                      use_cache=self.use_cache, past_key_values=self.past)
        if self.takes_position_ids:
            kwargs["position_ids"] = (input_pos[None, :] - pad[:, None]).clamp(min=0)
        if last_only:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        if self.use_cache:
            self.past = out.past_key_values
        return out.logits


def build_transformers(source, config, device: torch.device, dtype: torch.dtype,
                       cpu_weights: str = "auto") -> TransformersLM:
    from transformers import AutoModelForCausalLM

    with _params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    install_kbit_experts(model)  # MoE: a slot per expert for its KbitLinear (runtime/experts.py)
    tensors = _Tensors(source, device, dtype, cpu_weights)
    for name in source.quantized_modules:
        module = model.get_submodule(name)
        qw = source.quantized(name)
        bias = getattr(module, "bias", None)
        b = tensors.get(f"{name}.bias", tuple(bias.shape)) if bias is not None else None
        tensors.used.add(name)
        model.set_submodule(name, kbit_module(qw, b, dtype, device, cpu_weights))
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    for name in sorted(tensors.plain - tensors.used):
        if name in params:
            t = tensors.get(name, tuple(params[name].shape))
            module_name, _, pname = name.rpartition(".")
            setattr(model.get_submodule(module_name), pname, nn.Parameter(t, requires_grad=False))
        elif name in buffers:  # a persistent buffer (DeepSeek-V3's e_score_correction_bias)
            module_name, _, bname = name.rpartition(".")
            model.get_submodule(module_name)._buffers[bname] = tensors.get(
                name, tuple(buffers[name].shape)).to(buffers[name].dtype)
    if getattr(config, "tie_word_embeddings", False):
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if isinstance(out, nn.Linear) and out.weight.is_meta:
            out.weight = inp.weight
    tensors.check_all_used()
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise KbitFormatError(f"{_where(source)} lacks the tensor(s) {', '.join(meta[:5])}")
    model.to(device)
    return TransformersLM(model.eval())


# ------------------------------------------------------------------------------------ assembly

def choose_backend(config, backend: str) -> tuple[str, str | None]:
    """(backend, note): `auto` picks native when the family has a spec, and says when it does not."""
    if backend not in BACKENDS:
        raise RunError(f"--backend {backend!r}: use one of {', '.join(BACKENDS)}")
    reason = why_not_native(config)
    if backend == "native" and reason:
        raise RunError(f"--backend native: {reason}; use --backend transformers")
    if backend == "auto":
        return ("transformers", f"{reason}: running through transformers") if reason \
            else ("native", None)
    return backend, None


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


def merge_projections(model: Decoder) -> None:
    """Stack each layer's q, k, v projections into one packed linear, and gate with up, where
    their formats allow (stack_rows): the same numbers in 2 kernel calls instead of 5."""
    for layer in model.layers:
        attn, mlp = layer.attn, layer.mlp
        if attn.qkv_mode == "separate":
            wqkv = stack_rows([attn.wq, attn.wk, attn.wv])
            if wqkv is not None:
                attn.merge_qkv(wqkv)
        if mlp.gate is not None:
            gate_up = stack_rows([mlp.gate, mlp.up])
            if gate_up is not None:
                mlp.merge_gate_up(gate_up)


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


# -------------------------------------------------------------------------------------- memory

class InMemoryKbit:
    """The KbitModel interface over a transformers model quantized in memory (tests, the sweep):
    every linear except the output head (unless `quantize_head`) is quantized with the format's own
    `quantize_weight`, as the converter does. `quantize` quantizes the same original weights again
    at other settings (None: unquantized) and `load_into_model` writes the dequantized weights into
    the model, which then computes exactly what the kbit model computes."""

    def __init__(self, model: nn.Module, quant: QuantConfig | None, path: Path | None = None):
        from transformers.pytorch_utils import Conv1D

        self.model, self.path = model, path
        self.config = json.loads(model.config.to_json_string())
        head = model.get_output_embeddings()
        self.quantize_head = bool(quant and quant.quantize_head)
        # name -> (module, stored (in, out) by Conv1D, original fp32 (out, in) weight)
        self._linears: dict[str, tuple[nn.Module, bool, torch.Tensor]] = {}
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, Conv1D)) and (module is not head or self.quantize_head):
                conv = isinstance(module, Conv1D)
                w = module.weight.detach()
                self._linears[name] = (module, conv, (w.t() if conv else w).to(
                    torch.float32, memory_format=torch.contiguous_format, copy=True))
        linear_weights = {f"{name}.weight" for name in self._linears}
        # the other tensors are the model's own (not copied): only the linears are overwritten
        self._plain = {name: t.detach() for name, t in model.state_dict().items()
                       if name not in linear_weights}
        if getattr(model.config, "tie_word_embeddings", False) and head is not None:
            self._plain.pop(_param_name(model, head), None)  # tied: stored once, as the embedding
        self.quantize(quant)

    def quantize(self, quant: QuantConfig | None, given=None) -> None:
        """Quantize every linear's original weights with `quant` (None: keep them unquantized);
        `given` (name -> QuantizedWeight, e.g. GPTQ's) replaces round-to-nearest where it has one."""
        from kbitrt.format.quantizer import quantize_weight

        if quant is not None and quant.quantize_head != self.quantize_head:
            raise ValueError("quantize_head is fixed when the InMemoryKbit is made")
        self.quant = quant
        given = given if given is not None else {}
        self._quantized = {} if quant is None else {
            name: given[name] if name in given else quantize_weight(w, quant, name)
            for name, (_, _, w) in self._linears.items()}

    @property
    def linear_weights(self) -> dict[str, torch.Tensor]:
        """Original fp32 (out, in) weight of every linear that `quantize` quantizes."""
        return {name: w for name, (_, _, w) in self._linears.items()}

    @property
    def quantized_modules(self) -> list[str]:
        return list(self._quantized)

    @property
    def plain_names(self) -> list[str]:
        return list(self._plain)

    def quantized(self, name: str):
        return self._quantized[name]

    def tensor(self, name: str) -> torch.Tensor:
        return self._plain[name]

    def dequantized_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights transformers should see to compute exactly what the kbit model computes."""
        out = dict(self._plain)
        for name, qw in self._quantized.items():
            w = qw.dequantize()
            out[f"{name}.weight"] = w.t().contiguous() if self._linears[name][1] else w
        return out

    @torch.no_grad()
    def load_into_model(self) -> dict[str, float]:
        """Write the dequantized weights (the originals when unquantized) into the model; returns
        the relative weight error ||W' - W|| / ||W|| of each quantized linear."""
        errors = {}
        for name, (module, conv, w) in self._linears.items():
            qw = self._quantized.get(name)
            deq = w if qw is None else qw.dequantize()
            if qw is not None:
                errors[name] = ((deq - w).norm() / w.norm().clamp(min=1e-30)).item()
            module.weight.copy_(deq.t() if conv else deq)
        return errors


def _param_name(model: nn.Module, head: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is head:
            return f"{name}.weight"
    return ""


def load_tokenizer(path: str | Path):
    """The folder's tokenizer; a folder without usable tokenizer files is one clear line."""
    from transformers import AutoTokenizer

    try:
        if _generic_tokenizer(Path(path)):
            # the class AutoTokenizer would pick, without its class lookup (which imports ~700
            # modules, ~50 MB of RSS, that a run does not need)
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(path, **tokenizer_shortcut(Path(path)))
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise RunError(f"{path} has no usable tokenizer ({str(e).splitlines()[0][:120]}): copy the "
                       "source model's tokenizer files (tokenizer.json, tokenizer_config.json) into "
                       "it") from None


def tokenizer_shortcut(path: Path) -> dict:
    """Without `added_tokens_decoder` in tokenizer_config.json (and no legacy special_tokens_map.json
    or added_tokens.json), transformers parses the whole tokenizer.json in Python only to list its
    added tokens, which the Rust tokenizer it builds from the same file holds anyway (SmolLM2: 0.2 s
    and 2 MB resident after the parse). Saying there are none to add skips that parse; every token,
    id and special flag still comes from tokenizer.json (tests/test_tokenizer_load.py). Only for
    transformers 5, whose tokenizer takes special tokens from the Rust side (4.x re-adds named
    special tokens from that parse)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return {}
    if (path / "special_tokens_map.json").exists() or (path / "added_tokens.json").exists():
        return {}
    try:
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {} if "added_tokens_decoder" in config else {"added_tokens_decoder": {}}


def _generic_tokenizer(path: Path) -> bool:
    """Whether the folder's tokenizer is transformers' generic fast one (tokenizer.json alone)."""
    cfg = path / "tokenizer_config.json"
    if not (path / "tokenizer.json").is_file() or not cfg.is_file():
        return False
    try:
        name = json.loads(cfg.read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return False
    return name in ("TokenizersBackend", "PreTrainedTokenizerFast")
