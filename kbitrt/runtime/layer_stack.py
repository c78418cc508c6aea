"""Every layer of a CPU forward in one call: the decoder's layers handed to the fused CPU kernels'
library once per KV cache, then run from C++ (kernels/cpu_layers.h) at each step.

A small model's CPU decoding step is dispatch-bound: layer by layer from Python it is ~1,600 torch
calls around the 121 kernel calls that do the work (benchmarks/results/cpu_step_profile-*.json).
From C++, a decoding step's work between the linears runs as loops over rows (agreeing with the
Python layers to rounding, and the same for any number of tokens per step), and a longer prefill
runs decoder.py's own torch ops (bit-identical); tests/test_layer_stack.py checks both. Models it
does not cover (other module types, hooks, outlier columns) keep the Python
layers; `build` says why. A switch of an any-precision model's width changes the linears'
tensors: the decoder then rebuilds its stack (Decoder.refresh_layer_stack).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from kbitrt.runtime.devices import cpu_path
from kbitrt.runtime.kernels import cpu as cpu_kernels
from kbitrt.runtime.linear import KbitLinear
from kbitrt.model.decoder import RMSNorm
from kbitrt.model.kv_cache import KVCache

_NORM = {"rmsnorm": 0, "layernorm": 1}
_QKV = {"separate": 0, "fused": 1, "interleaved": 2}
_LINEARS = 7  # per layer: q (or q|k|v), k, v, o, up (or gate|up), gate, down (cpu_layers.h)
_NONE = torch.empty(0)  # an absent tensor slot


def _activation(act: nn.Module) -> int | None:
    """The C++ code of an activation module (transformers' ACT2FN), None when not covered."""
    from transformers.activations import (GELUActivation, GELUTanh, NewGELUActivation,
                                          SiLUActivation)

    kind = type(act)
    if kind in (SiLUActivation, nn.SiLU):
        return 0
    if kind is GELUActivation and act.act is torch.nn.functional.gelu:
        return 1
    if kind is GELUTanh and getattr(act.act, "keywords", None) == {"approximate": "tanh"}:
        return 2
    if kind is nn.ReLU:
        return 3
    if kind is NewGELUActivation:  # cpu_layers.h repeats its formula op by op
        return 4
    return None


def _linear(m: nn.Module | None, act_dtype: torch.dtype) -> tuple[list[int], list[torch.Tensor]]:
    """(kind, bits, block, in_features) and (w0, w1, w2, bias) of one linear (cpu_layers.h
    StackLinear); raises ValueError when the stack cannot run it as its forward does."""
    if m is None:
        return [0, 0, 0, 0], [_NONE] * 4
    if type(m) is nn.Linear:
        if m.weight.dtype != act_dtype:
            raise ValueError(f"an nn.Linear in {m.weight.dtype} under {act_dtype} activations")
        return [2, 0, 0, m.in_features], [m.weight, _NONE, _NONE, _bias(m.bias)]
    if hasattr(m, "stack_linear"):  # bit planes read per call (runtime/any_precision.py)
        return m.stack_linear()
    if not isinstance(m, KbitLinear) or type(m).forward is not KbitLinear.forward:
        raise ValueError(f"a {type(m).__name__}")
    if m.outlier_idx.numel():
        raise ValueError("outlier columns")
    if m.packed_released or m.cpu_mode == "dense":
        return [2, 0, 0, m.in_features], [m.dense_cpu_weight(), _NONE, _NONE, _bias(m.bias)]
    bias = None if m.bias is None else m.bias.float().contiguous()
    return ([1, m.bits, m.block_size, m.in_features],
            [m.qweight, m.absmax, m.codebook, _bias(bias)])


def _bias(b: torch.Tensor | None) -> torch.Tensor:
    return _NONE if b is None else b.detach()


def _norm(m: nn.Module, norm: str) -> list[torch.Tensor]:
    if norm == "rmsnorm":
        if type(m) is not RMSNorm or m.weight.dtype != torch.float32:
            raise ValueError("an RMSNorm not in fp32")
        return [m.weight.detach(), _NONE]
    if type(m) is not nn.LayerNorm or m.weight is None:
        raise ValueError("a LayerNorm without its affine weights")
    return [m.weight.detach(), _bias(m.bias)]


def uncovered(a) -> str | None:
    """The first of a decoder's layer features cpu_layers.h lacks (ModelArgs `a`), else None."""
    for lacks, what in ((a.qk_norm, "q/k norms (Qwen3, OLMo 2)"),
                        (a.n_experts, "Mixture-of-Experts layers"),
                        (a.rope_layers and not all(a.rope_layers), "layers without rotary (NoPE)"),
                        (a.branch_norm or not a.pre_norm, "norms on the branch outputs (OLMo 2, Gemma 2)"),
                        (a.residual_scale != 1.0, "a residual multiplier (Granite)"),
                        (a.attn_scale is not None, "an attention multiplier (Granite)"),
                        (a.attn_softcap, "attention softcapping (Gemma 2)"),
                        (a.rope_types, "rotary tables per layer type (Gemma 3)"),
                        (a.norm not in _NORM, f"{a.norm} norms")):
        if lacks:
            return what
    return None


def _has_hooks(module: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook")
               for m in module.modules())


class LayerStack:
    """A decoder's layers and KV caches registered with the C++ side; call it as the layers.
    `ops`: the kernels' library (tests pass another build's, cpu.load_variant)."""

    def __init__(self, decoder: nn.Module, ops=None):
        self.handle = 0
        self.ops = ops if ops is not None else torch.ops.kbitrt_cpu
        a = decoder.args
        if uncovered(a):
            raise ValueError(uncovered(a))
        layers = list(decoder.layers)
        self.windows = list(dict.fromkeys(layer.attn.window for layer in layers))
        mlp_mode = {"plain": 0, "gated": 1, "gated_fused": 2}[a.mlp]
        ints = [len(layers), a.n_heads, a.n_kv_heads, a.head_dim, _NORM[a.norm], 0, 0, 0,
                int(a.parallel_residual), int(a.post_norm), int(a.residual_from_norm),
                cpu_kernels.FUSED_MAX_ROWS]
        tensors: list[torch.Tensor] = []
        act_dtype = decoder.act_dtype or decoder.tok_emb.weight.dtype  # the cache may be narrower
        acts, modes = set(), set()  # one activation and one projection layout for every layer
        for layer in layers:
            attn, mlp = layer.attn, layer.mlp
            if type(attn.kv_cache) is not KVCache:
                raise ValueError("no static KV cache")
            acts.add(_activation(mlp.act))
            modes.add((attn.qkv_mode, mlp.gate_up is not None))
            qkv = [attn.wqkv, None, None] if attn.qkv_mode != "separate" else [attn.wq, attn.wk,
                                                                                   attn.wv]
            if mlp.gate_up is not None:
                mlp_mode, ups = 2, [mlp.gate_up, None]
            else:
                ups = [mlp.up, mlp.gate]
            ints.append(self.windows.index(attn.window))
            tensors += _norm(layer.attn_norm, a.norm) + _norm(layer.mlp_norm, a.norm)
            tensors += [attn.kv_cache.k, attn.kv_cache.v]
            for m in (*qkv, attn.wo, *ups, mlp.down):
                spec, held = _linear(m, act_dtype)
                ints += spec
                tensors += held
        if len(acts) != 1 or None in acts:
            raise ValueError(f"activation {type(layers[0].mlp.act).__name__}")
        if len(modes) != 1:  # e.g. per-tensor codebooks that let only some layers stack q, k, v
            raise ValueError("layers with different projection layouts")
        ints[5], ints[6], ints[7] = acts.pop(), _QKV[layers[0].attn.qkv_mode], mlp_mode
        if any(t.device.type != "cpu" for t in tensors):
            raise ValueError("tensors off the CPU")
        self.handle = self.ops.layer_stack_create(tensors, ints, float(a.norm_eps))
        # freed with this object, or at exit while torch is still there
        self._free = weakref.finalize(self, self.ops.layer_stack_free, self.handle)

    def __call__(self, x: torch.Tensor, input_pos: torch.Tensor,
                 rope: tuple[torch.Tensor, torch.Tensor] | None,
                 mask: dict[int | None, torch.Tensor]) -> torch.Tensor:
        cos, sin = rope if rope is not None else (_NONE, _NONE)
        return self.ops.layer_stack_forward(self.handle, x, input_pos, cos, sin,
                                            [mask[w] for w in self.windows])

    @property
    def loops(self) -> bool:
        """Whether decoding steps run cpu_rows.h's loops (norms in fp32, caches in fp32 or 16
        bits), not torch's ops, between the linears."""
        return bool(self.ops.layer_stack_loops(self.handle))

    def close(self) -> None:
        if self.handle:
            self._free()
            self.handle = 0


def build(decoder: nn.Module) -> tuple[LayerStack | None, str | None]:
    """(the stack, None) when the C++ side can run this decoder's layers on the CPU, else
    (None, why not)."""
    if not cpu_kernels.available():
        return None, "no fused CPU kernels"
    if not cpu_path(decoder.tok_emb.weight.device):
        return None, "not on the CPU path"
    if _has_hooks(decoder.layers):
        return None, "forward hooks"
    try:
        return LayerStack(decoder), None
    except ValueError as e:
        return None, str(e)
