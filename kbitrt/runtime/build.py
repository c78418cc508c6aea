"""Model building: the native decoder (built on the meta device, every tensor assigned, gpt-fast
style) or transformers with its linears swapped for KbitLinear; the backend choice, the warm-up."""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn

from kbitrt.errors import KbitFormatError, RunError
from kbitrt.runtime.devices import cpu_path
from kbitrt.runtime.embedding import quantized_like
from kbitrt.runtime.experts import install_kbit_experts
from kbitrt.runtime import layer_stack
from kbitrt.runtime.kernels import cpu as cpu_kernels
from kbitrt.runtime.linear import HalfLinear, KbitLinear, stack_rows
from kbitrt.runtime.memory import heap_for_layers
from kbitrt.model.decoder import Decoder, default_positions
from kbitrt.model.families import (checkpoint_names, family_for, model_args,
                                  rope_frequencies, why_not_native)
from kbitrt.runtime.weights_policy import CPU_WEIGHTS



BACKENDS = ("auto", "native", "transformers")


# checkpoint tensors that are not weights (transformers' buffers some old checkpoints carry)
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq", ".masked_bias")


# modules stored (in, out) by GPT-2's Conv1D when kept unquantized (quantized ones are (out, in))
_CONV1D = {"gpt2": ("attn.wqkv", "attn.wo", "mlp.up", "mlp.down")}


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


def quantized_embedding(model: nn.Module, tensors: _Tensors, name: str, shared: bool,
                        attr: str = "tok_emb") -> None:
    """A k-bit stored embedding `name` becomes a QuantizedEmbedding (runtime/embedding.py) at
    `attr`, keeping the model's own embedding class (Gemma's scale); `shared` (a tied head stored once): the same KbitLinear becomes model.lm_head."""
    if name not in tensors.quantized:
        return
    emb = model.get_submodule(attr)
    qw = tensors.source.quantized(name)
    if tuple(qw.shape) != (emb.num_embeddings, emb.embedding_dim):
        raise KbitFormatError(f"{_where(tensors.source)}: {name} is {tuple(qw.shape)}, the config "
                              f"says {(emb.num_embeddings, emb.embedding_dim)}")
    tensors.used.add(name)
    # only the looked-up rows are read: packed codes, unless the head multiplies by them too
    table = kbit_module(qw, None, tensors.dtype, tensors.device,
                        tensors.cpu_weights if shared else "packed")
    model.set_submodule(attr, quantized_like(emb, table, tensors.dtype))
    if shared:
        model.lm_head = table


def build_native(source, config, device: torch.device, dtype: torch.dtype,
                 cpu_weights: str = "auto") -> Decoder:
    """The generic decoder with every tensor of `source` (a KbitModel or the like) assigned."""
    args, spec = model_args(config), family_for(config)
    with torch.device("meta"):
        model = Decoder(args)
    model.stack_builder = layer_stack.build  # the CPU layers in C++, set up with the KV caches
    model.layers_scope = heap_for_layers  # a long CPU step's temporaries reuse the heap
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
    quantized_embedding(model, tensors, tensors.pick(names["tok_emb"]), args.tie_embeddings and tied)
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
    tied = getattr(config, "tie_word_embeddings", False)
    for name in source.quantized_modules:
        module = model.get_submodule(name)
        if isinstance(module, nn.Embedding):  # --embedding-bits: a k-bit table
            quantized_embedding(model, tensors, name, False, attr=name)
            if tied and model.get_output_embeddings().weight.is_meta:
                model.set_output_embeddings(model.get_submodule(name).table)
            continue
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
    if tied:
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if isinstance(out, nn.Linear) and out.weight.is_meta:
            out.weight = inp.weight
    tensors.check_all_used()
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise KbitFormatError(f"{_where(source)} lacks the tensor(s) {', '.join(meta[:5])}")
    model.to(device)
    return TransformersLM(model.eval())


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

