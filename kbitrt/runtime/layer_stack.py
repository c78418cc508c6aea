"""Every layer of a CPU decoding step in one call: the decoder's layers handed to the fused CPU
kernels' library once per KV cache, then run from C++ (kernels/cpu_layers.h, cpu_rows.h).

A small model's CPU decoding step is dispatch-bound: layer by layer from Python it is ~1,600 torch
calls around the 121 kernel calls that do the work (benchmarks/results/cpu_step_profile-*.json).
From C++ a step's work between the linears runs as loops over rows, agreeing with the Python
layers to rounding and the same for any number of tokens per step (tests/test_layer_stack.py).
That is the stack's one path: a step it does not serve (more tokens than the loops take, i.e. a
long prefill) runs the Python layers (model/decoder.py), on the same KV caches.

The stack is described from the model's own spec (ModelArgs) and modules through one named schema
(kernels/cpu_schema.py, from which cpu_schema.h is generated). A model whose features the loops
lack keeps the Python layers, and `build` names the feature ("no loops for: q/k norms ...").
The runtime gives `build` to the decoder when it builds one (runtime/build.py). A switch of an
any-precision model's width changes the linears' tensors: the decoder then rebuilds its stack
(Decoder.refresh_layer_stack).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from kbitrt.model.decoder import RMSNorm
from kbitrt.model.families import ModelArgs
from kbitrt.model.kv_cache import KVCache
from kbitrt.runtime.devices import cpu_path
from kbitrt.runtime.kernels import cpu as cpu_kernels
from kbitrt.runtime.kernels.cpu_schema import (NONE, Act, LinearKind, Mlp, Norm, Qkv, Slot,
                                               StackConfig, StackLayer, StackLinear, wire)
from kbitrt.runtime.linear import KbitLinear


class Unserved(ValueError):
    """A feature of the model the loops lack (the message names it)."""


def lacking(a: ModelArgs) -> str | None:
    """The first of a decoder's layer features (its spec, ModelArgs `a`) the loops lack, else
    None."""
    for lacks, what in ((a.qk_norm, "q/k norms (Qwen3, OLMo 2)"),
                        (a.n_experts, "Mixture-of-Experts layers"),
                        (a.rope_layers and not all(a.rope_layers), "layers without rotary (NoPE)"),
                        (a.branch_norm or not a.pre_norm, "norms on the branch outputs (OLMo 2, Gemma 2)"),
                        (a.residual_scale != 1.0, "a residual multiplier (Granite)"),
                        (a.attn_scale is not None, "an attention multiplier (Granite)"),
                        (a.attn_softcap, "attention softcapping (Gemma 2)"),
                        (a.rope_types, "rotary tables per layer type (Gemma 3)"),
                        (a.norm not in Norm.__members__, f"{a.norm} norms")):
        if lacks:
            return what
    return None


def _activation(act: nn.Module) -> Act:
    """The schema's code of an activation module (transformers' ACT2FN)."""
    from transformers.activations import (GELUActivation, GELUTanh, NewGELUActivation,
                                          SiLUActivation)

    kind = type(act)
    if kind in (SiLUActivation, nn.SiLU):
        return Act.silu
    if kind is GELUActivation and act.act is torch.nn.functional.gelu:
        return Act.gelu
    if kind is GELUTanh and getattr(act.act, "keywords", None) == {"approximate": "tanh"}:
        return Act.gelu_tanh
    if kind is nn.ReLU:
        return Act.relu
    if kind is NewGELUActivation:  # cpu_layers.h repeats its formula op by op
        return Act.gelu_new
    raise Unserved(f"activation {kind.__name__}")


def _bias(b: torch.Tensor | None) -> torch.Tensor:
    return NONE if b is None else b.detach()


def _linear(m: nn.Module | None, act_dtype: torch.dtype) -> StackLinear:
    """One linear as the loops run it; Unserved when they cannot run it as its forward does."""
    if m is None:
        return StackLinear()
    if type(m) is nn.Linear:
        if m.weight.dtype != act_dtype:
            raise Unserved(f"an nn.Linear in {m.weight.dtype} under {act_dtype} activations")
        return StackLinear(LinearKind.dense, in_features=m.in_features, w0=m.weight,
                           bias=_bias(m.bias))
    if hasattr(m, "stack_linear"):  # bit planes read per call (runtime/any_precision.py)
        try:
            return m.stack_linear()
        except ValueError as e:
            raise Unserved(str(e)) from None
    if not isinstance(m, KbitLinear) or type(m).forward is not KbitLinear.forward:
        raise Unserved(f"a {type(m).__name__}")
    if m.outlier_idx.numel():
        raise Unserved("outlier columns")
    if m.packed_released or m.cpu_mode == "dense":
        return StackLinear(LinearKind.dense, in_features=m.in_features, w0=m.dense_cpu_weight(),
                           bias=_bias(m.bias))
    bias = None if m.bias is None else m.bias.float().contiguous()
    return StackLinear(LinearKind.packed, m.bits, m.block_size, m.in_features, w0=m.qweight,
                       w1=m.absmax, w2=m.codebook, bias=_bias(bias))


def _norm(m: nn.Module, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a layer's norm, contiguous fp32 as the loops read them."""
    if norm == "rmsnorm":
        if type(m) is not RMSNorm or m.weight.dtype != torch.float32:
            raise Unserved("an RMSNorm not in fp32")
        w, b = m.weight.detach(), NONE
    elif type(m) is not nn.LayerNorm or m.weight is None:
        raise Unserved("a LayerNorm without its affine weights")
    else:
        w, b = m.weight.detach(), _bias(m.bias)
    if any(t.numel() and (t.dtype != torch.float32 or not t.is_contiguous()) for t in (w, b)):
        raise Unserved("norm weights not contiguous fp32")
    return w, b


def _final_norm(decoder: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The decoder's final norm as the loops run it after the last layer (its kind and eps are
    the layers'), or None where the decoder applies its own (none, or one the loops lack)."""
    a = decoder.args
    if not a.final_norm:
        return None
    try:
        return _norm(decoder.norm, a.norm)
    except Unserved:
        return None


def stack_config(decoder: nn.Module) -> StackConfig:
    """The stack's switches: the decoder's spec (ModelArgs), with the activation and projection
    layouts its layers hold (the loader may have stacked q|k|v or gate|up), one for all layers."""
    a, layers = decoder.args, list(decoder.layers)
    why = lacking(a)
    if why:
        raise Unserved(why)
    acts = {_activation(layer.mlp.act) for layer in layers}
    modes = {(layer.attn.qkv_mode, layer.mlp.gate_up is not None) for layer in layers}
    if len(acts) != 1 or len(modes) != 1:  # e.g. per-tensor codebooks that let only some stack
        raise Unserved("layers with different projection layouts")
    (qkv, gate_up), = modes
    return StackConfig(n_layers=len(layers), n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                       head_dim=a.head_dim, norm=Norm[a.norm], act=acts.pop(), qkv=Qkv[qkv],
                       mlp=Mlp.gated_fused if gate_up else Mlp[a.mlp],
                       parallel_residual=a.parallel_residual, post_norm=a.post_norm,
                       residual_from_norm=a.residual_from_norm,
                       fused_max_rows=cpu_kernels.FUSED_MAX_ROWS)


def stack_layer(layer: nn.Module, norm: str, mask_index: int, act_dtype: torch.dtype) -> StackLayer:
    attn, mlp = layer.attn, layer.mlp
    cache = attn.kv_cache
    if type(cache) is not KVCache:
        raise ValueError("no static KV cache")
    if cache.k.dtype not in (torch.float32, torch.float16, torch.bfloat16) \
            or not (cache.k.is_contiguous() and cache.v.is_contiguous()):
        raise Unserved(f"a KV cache not contiguous fp32, fp16 or bf16 ({cache.k.dtype})")
    linears = {Slot.o: attn.wo, Slot.down: mlp.down}
    if attn.qkv_mode == "separate":
        linears.update({Slot.q: attn.wq, Slot.k: attn.wk, Slot.v: attn.wv})
    else:
        linears[Slot.q] = attn.wqkv
    if mlp.gate_up is not None:
        linears[Slot.up] = mlp.gate_up
    else:
        linears.update({Slot.up: mlp.up, Slot.gate: mlp.gate})
    n1, n2 = _norm(layer.attn_norm, norm), _norm(layer.mlp_norm, norm)
    return StackLayer(mask_index=mask_index, norm1_w=n1[0], norm1_b=n1[1], norm2_w=n2[0],
                      norm2_b=n2[1], k_cache=cache.k, v_cache=cache.v,
                      linears=tuple(_linear(linears.get(s), act_dtype) for s in Slot))


def _has_hooks(module: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook")
               for m in module.modules())


class LayerStack:
    """A decoder's layers and KV caches registered with the C++ side; call it as the layers.
    `ops`: the kernels' library (tests pass another build's, cpu.load_variant)."""

    def __init__(self, decoder: nn.Module, ops=None):
        self.handle = 0
        self.ops = ops if ops is not None else torch.ops.kbitrt_cpu
        config = stack_config(decoder)
        self.windows = list(dict.fromkeys(layer.attn.window for layer in decoder.layers))
        # the plain causal mask is every layer's (no sliding window, no ALiBi): a step without
        # left padding then passes no masks (~10 torch calls a step fewer), and the loops take
        # them from the positions
        self.causal_only = self.windows == [None] and decoder.slopes is None
        act_dtype = decoder.act_dtype or decoder.tok_emb.weight.dtype  # the cache may be narrower
        layers = [stack_layer(layer, decoder.args.norm, self.windows.index(layer.attn.window),
                              act_dtype) for layer in decoder.layers]
        tensors, ints = wire(config, layers)
        if any(t.device.type != "cpu" for t in tensors):
            raise ValueError("tensors off the CPU")
        self.handle = self.ops.layer_stack_create(tensors, ints, float(decoder.args.norm_eps))
        self.final_norm = _final_norm(decoder)  # (w, b) applied after the layers, or None
        # freed with this object, or at exit while torch is still there
        self._free = weakref.finalize(self, self.ops.layer_stack_free, self.handle)

    def __call__(self, x: torch.Tensor, input_pos: torch.Tensor,
                 rope: tuple[torch.Tensor, torch.Tensor] | None,
                 mask: dict[int | None, torch.Tensor] | None) -> torch.Tensor | None:
        """Every layer's output for x, or None where the loops do not serve this step (nothing
        was written: the caller runs its Python layers). mask None: causal, no padding."""
        cos, sin = rope if rope is not None else (NONE, NONE)
        masks = [NONE] * len(self.windows) if mask is None else [mask[w] for w in self.windows]
        norm_w, norm_b = self.final_norm or (NONE, NONE)
        y = self.ops.layer_stack_forward(self.handle, x, input_pos, cos, sin, masks, norm_w, norm_b)
        return y if y.numel() else None

    def close(self) -> None:
        if self.handle:
            self._free()
            self.handle = 0


def build(decoder: nn.Module) -> tuple[LayerStack | None, str | None]:
    """(the stack, None) when the C++ side can run this decoder's decoding steps on the CPU, else
    (None, why not): "no loops for: <feature>" for a feature of the model the loops lack."""
    if not cpu_kernels.available():
        return None, "no fused CPU kernels"
    if not cpu_path(decoder.tok_emb.weight.device):
        return None, "not on the CPU path"
    if _has_hooks(decoder.layers):
        return None, "forward hooks"
    try:
        return LayerStack(decoder), None
    except Unserved as e:
        return None, f"no loops for: {e}"
    except ValueError as e:
        return None, str(e)
