"""The CPU layer stack (runtime/layer_stack.py, kernels/cpu_layers.h, cpu_rows.h) runs a decoder's
steps from C++, as loops over rows: they agree with the Python layers to rounding, and a token's
logits do not depend on how many tokens share its step. A step above the loops' row limit (a long
prefill) runs the Python layers, on the same caches: bit for bit theirs. Checked for every family
it covers, packed and dense weights, and left padding; a model it does not serve keeps the Python
layers and says which feature the loops lack. Python and C++ read one schema (cpu_schema.py,
cpu_schema.h generated from it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from kbitrt.format.config import OutlierSpec, QuantConfig
from kbitrt.runtime.kernels import cpu as cpu_kernels
from kbitrt.runtime.linear import HalfLinear
from kbitrt.runtime.in_memory import InMemoryKbit
from kbitrt.runtime.loader import build_model
from test_models import TINY, V, cached_steps

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no fused CPU kernels")

COVERED = sorted(TINY)
ATOL, RTOL = 2e-4, 1e-4  # the loops' sums are not torch's: rounding apart
# with fp16 weight copies the activations are rounded to fp16 before each matmul, which can turn
# a last-bit difference into one of fp16's (~5e-4 relative)
TOLERANCE = {"fp16": dict(atol=5e-3, rtol=5e-3)}


def tiny(name: str, cpu_weights: str, quant: QuantConfig = QuantConfig(bits=4, block_size=32)):
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(TINY[name](), dtype=torch.float32).eval()
    for p in hf.parameters():
        p.data.normal_(0, 0.2)
    return build_model(InMemoryKbit(hf, quant), "cpu", cpu_weights=cpu_weights).model


class Spy:
    """Wraps a model's stack: whether each call was served by the loops (False: Python layers)."""

    def __init__(self, model):
        self.stack, self.served = model.layer_stack, []
        model.layer_stack = self

    def __call__(self, *args):
        y = self.stack(*args)
        self.served.append(y is not None)
        return y

    @property
    def causal_only(self) -> bool:
        return self.stack.causal_only

    @property
    def final_norm(self):
        return self.stack.final_norm

    def close(self):
        self.stack.close()


def decode(model, ids: torch.Tensor, pad: torch.Tensor, T0: int, stack: bool) -> torch.Tensor:
    """Prefill T0 tokens, then one token at a time, through the stack or the Python layers."""
    model.use_layer_stack = stack
    model.setup_caches(1, 4)
    assert (model.layer_stack is not None) == stack, model.layer_stack_off
    model.drop_caches()
    return cached_steps(model, ids, pad, T0)


def tokens(B: int, T: int, pads) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, V, (B, T), generator=g), torch.tensor(pads)


@pytest.mark.parametrize("cpu_weights", ["packed", "fp16", "fp32"])
@pytest.mark.parametrize("name", COVERED)
def test_stack_matches_python_layers(name, cpu_weights):
    assert_matches_python_layers(tiny(name, cpu_weights),
                                 TOLERANCE.get(cpu_weights, dict(atol=ATOL, rtol=RTOL)))


def assert_matches_python_layers(model, tol: dict) -> None:
    # batch 2 with left padding; a prefill under the fused kernel's row limit, then steps
    ids, pad = tokens(2, 12, (3, 0))
    keep = torch.arange(12)[None, :] >= pad[:, None]
    ours, ref = decode(model, ids, pad, 5, True), decode(model, ids, pad, 5, False)
    torch.testing.assert_close(ours[keep], ref[keep], **tol)
    # a prefill above it (the Python layers, bit for bit), then steps
    T0 = cpu_kernels.FUSED_MAX_ROWS + 3
    ids, pad = tokens(1, T0 + 2, (0,))
    ours, ref = decode(model, ids, pad, T0, True), decode(model, ids, pad, T0, False)
    assert torch.equal(ours[:, :T0], ref[:, :T0])
    torch.testing.assert_close(ours, ref, **tol)


@pytest.mark.parametrize("name", ["llama", "neox", "bloom", "qwen2"])
def test_stack_step_is_token_count_invariant(name):
    """k tokens in one step give the logits of k one-token steps, bit for bit (what speculative
    decoding's verifying step and batched scoring need)."""
    assert_token_count_invariant(tiny(name, "packed"), T=14, T0=6)


def assert_token_count_invariant(model, T: int, T0: int) -> None:
    """Batch 2 with padding: tokens T0..T in one step equal them one step at a time."""
    # a 16-bit head, as stored models have (torch's fp32 matmul is not token-count invariant)
    model.lm_head = HalfLinear(nn.Parameter(model.lm_head.weight.detach().half()))
    ids, pad = tokens(2, T, (2, 0))
    one_by_one = decode(model, ids, pad, T0, True)[:, T0:]
    model.setup_caches(2, T + 2)
    try:
        with torch.no_grad():
            model(ids[:, :T0], torch.arange(T0), pad)
            together = model(ids[:, T0:], torch.arange(T0, T), pad)
    finally:
        model.drop_caches()
    assert torch.equal(together, one_by_one)


@pytest.mark.parametrize("kv", ["fp16", "bf16"])
@pytest.mark.parametrize("name", ["llama", "neox", "bloom", "gpt2"])
def test_stack_with_16bit_kv_cache(name, kv):
    """--kv-cache fp16/bf16 (fp16 is --low-memory's): the loops write and read the 16-bit cache
    as KVCache.update does (rounded to nearest even, widened to read). Steps agree with the Python
    layers to the cache's rounding, a prefill above the row limit bit for bit, and a step's logits
    still do not depend on how many tokens share it."""
    from kbitrt.runtime.weights_policy import KV_CACHES

    model = tiny(name, "packed")
    model.kv_dtype = KV_CACHES[kv]
    model.setup_caches(1, 4)
    assert model.layers[0].attn.kv_cache.k.dtype == KV_CACHES[kv]
    assert model.layer_stack is not None, "the 16-bit cache must not push steps off the loops"
    model.drop_caches()
    # the loops' last-bit differences can round a cached value to the 16-bit neighbour
    assert_matches_python_layers(model, dict(atol=2e-2, rtol=2e-2) if kv == "fp16"
                                 else dict(atol=1e-1, rtol=1e-1))
    assert_token_count_invariant(model, T=10, T0=4)


@pytest.mark.parametrize("variant", ["avx2", "portable"])
def test_other_builds_run_the_stack(variant):
    """The AVX2 build (CPUs without AVX-512) and the portable one run the same stack, 16-bit KV
    caches included (their own widening of the cache), to the Python layers' results."""
    from kbitrt.runtime.layer_stack import LayerStack

    ops = cpu_kernels.load_variant(variant)
    model = tiny("llama", "packed")
    ids, pad = tokens(2, 12, (3, 0))
    keep = torch.arange(12)[None, :] >= pad[:, None]
    for kv, tol in ((None, dict(atol=ATOL, rtol=RTOL)), (torch.float16, dict(atol=2e-2, rtol=2e-2)),
                    (torch.bfloat16, dict(atol=1e-1, rtol=1e-1))):
        model.kv_dtype = kv
        ref = decode(model, ids, pad, 5, False)
        model.setup_caches(2, 15)
        model.close_layer_stack()
        model.layer_stack = LayerStack(model, ops)  # this build's library instead of the native
        spy = Spy(model)
        try:
            with torch.no_grad():
                steps = [model(ids[:, :5], torch.arange(5), pad)]
                steps += [model(ids[:, t:t + 1], torch.tensor([t]), pad) for t in range(5, 12)]
        finally:
            model.drop_caches()
        assert spy.served == [True] * 8
        torch.testing.assert_close(torch.cat(steps, 1)[keep], ref[keep], **tol)


def test_low_memory_kv_cache_is_fp16_only_under_fp32_activations():
    """--low-memory's cache: fp16 under the CPU's fp32 activations; on CUDA (16-bit activations)
    the activations' own dtype, never fp16 under bf16. An explicit --kv-cache is taken as given."""
    from kbitrt.cli.options import resolve_kv_cache
    from kbitrt.runtime.weights_policy import kv_cache_for

    assert resolve_kv_cache(True, None) == "low-memory" and resolve_kv_cache(True, "fp32") == "fp32"
    assert resolve_kv_cache(False, None) == "auto"
    assert kv_cache_for("low-memory", torch.float32) == "fp16"
    assert kv_cache_for("low-memory", torch.bfloat16) == "auto"
    assert kv_cache_for("low-memory", torch.float16) == "auto"
    assert kv_cache_for("bf16", torch.float32) == "bf16"
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(TINY["llama"](), dtype=torch.float32).eval()
    lm = build_model(InMemoryKbit(hf, QuantConfig(bits=4, block_size=32)), "cpu",
                     kv_cache="low-memory")
    assert lm.kv_cache == "fp16" and lm.model.kv_dtype == torch.float16


def test_kv_cache_under_transformers_is_a_note():
    """The transformers backend keeps its own cache: --kv-cache is reported, not silently taken."""
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(TINY["llama"](), dtype=torch.float32).eval()
    lm = build_model(InMemoryKbit(hf, QuantConfig(bits=4, block_size=32)), "cpu",
                     backend="transformers", kv_cache="fp16")
    assert lm.kv_cache == "auto" and "KV cache in fp16 needs the native decoder" in lm.note


def test_16bit_kv_cache_halves_the_cache_and_keeps_smollm2_greedy(smollm2_nf4):
    """`--low-memory`'s fp16 cache on the real model: half the bytes, and the first 24 greedy
    tokens those of the fp32 cache (the logits within fp16's rounding of keys and values)."""
    from kbitrt.runtime.generate import SamplingConfig, generate
    from kbitrt.runtime.loader import load_model

    out = {}
    for kv in ("auto", "fp16"):
        lm = load_model(smollm2_nf4, device="cpu", cpu_weights="packed", kv_cache=kv)
        assert lm.kv_cache == kv
        lm.model.setup_caches(1, 64)
        cache = lm.model.layers[0].attn.kv_cache
        out[kv, "bytes"] = cache.k.numel() * cache.k.element_size()
        assert lm.model.layer_stack is not None
        lm.model.drop_caches()
        res = generate(lm, ["The history of the city begins"], max_new_tokens=24,
                       sampling=SamplingConfig(temperature=0.0))
        out[kv] = res.token_ids[0]
    assert out["fp16", "bytes"] * 2 == out["auto", "bytes"]
    assert out["fp16"] == out["auto"]


@pytest.mark.parametrize("bits", [3, 5, 8])
def test_stack_other_widths(bits):
    model = tiny("llama", "packed", QuantConfig(bits=bits, block_size=64))
    ids, pad = tokens(1, 9, (0,))
    torch.testing.assert_close(decode(model, ids, pad, 4, True), decode(model, ids, pad, 4, False),
                               atol=ATOL, rtol=RTOL)


def test_smollm2_stack_matches_python_layers(smollm2_nf4):
    """The real model, as `kbit run` loads it (packed, q/k/v and gate/up stacked, fp16 tied head)."""
    from kbitrt.runtime.loader import load_model

    model = load_model(smollm2_nf4, device="cpu").model
    ids, pad = tokens(1, 10, (0,))
    ids = ids + 100
    torch.testing.assert_close(decode(model, ids, pad, 6, True), decode(model, ids, pad, 6, False),
                               atol=ATOL, rtol=RTOL)


def test_uncovered_models_keep_python_layers():
    tanh = tiny("llama", "packed")
    for layer in tanh.layers:  # an activation the C++ side does not have
        layer.mlp.act = nn.Tanh()
    tanh.setup_caches(1, 8)
    assert tanh.layer_stack is None and tanh.cpu_layers == "python (no loops for: activation Tanh)"
    tanh.drop_caches()

    outliers = tiny("llama", "packed", QuantConfig(bits=4, block_size=32,
                                                outliers=OutlierSpec.parse("top:5%")))
    outliers.setup_caches(1, 8)
    assert outliers.layer_stack is None
    assert outliers.layer_stack_off == "no loops for: outlier columns"
    outliers.drop_caches()

    mixed = tiny("llama", "packed")  # layer 1's q, k, v not stacked (as differing codebooks do)
    attn = mixed.layers[1].attn
    attn.wq, attn.wk, attn.wv = (stacked_rows_split(attn.wqkv, mixed.args))
    attn.qkv_mode = "separate"
    del attn.wqkv
    mixed.setup_caches(1, 8)
    assert mixed.layer_stack is None
    assert mixed.layer_stack_off == "no loops for: layers with different projection layouts"
    mixed.drop_caches()

    hooked = tiny("llama", "packed")
    handle = hooked.layers[1].mlp.register_forward_hook(lambda *args: None)
    hooked.setup_caches(1, 8)
    assert hooked.layer_stack is None and hooked.layer_stack_off == "forward hooks"
    hooked.drop_caches()
    handle.remove()


def stacked_rows_split(wqkv, args):
    """q, k and v as three KbitLinears again, from a stacked q|k|v one."""
    import copy

    sizes = [args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim,
             args.n_kv_heads * args.head_dim]
    out, row = [], 0
    for n in sizes:
        m = copy.deepcopy(wqkv)
        m.out_features = n
        m.qweight, m.absmax = wqkv.qweight[row:row + n].clone(), wqkv.absmax[row:row + n].clone()
        m.outlier_weight = wqkv.outlier_weight[row:row + n].clone()
        out.append(m)
        row += n
    return out


@pytest.mark.parametrize("name", ["llama", "qwen2", "neox"])
def test_unpadded_steps_take_the_causal_mask_from_the_positions(name):
    """No pad given (a single prompt: `kbit run`): the stack gets no masks and hides the cache's
    later slots by input_pos, bit for bit what the built masks give (pad of zeros), for a
    prefill under the loops' row limit and one-token steps; a sliding-window model builds them."""
    model = tiny(name, "packed")
    ids, _ = tokens(1, 9, (0,))
    out, masks = {}, []
    build = model.masks
    model.masks = lambda *a: masks.append(a) or build(*a)
    for pad in (None, torch.zeros(1, dtype=torch.long)):
        model.setup_caches(1, 12)
        spy = Spy(model)
        try:
            with torch.no_grad():
                steps = [model(ids[:, :5], torch.arange(5), pad)]
                steps += [model(ids[:, t:t + 1], torch.tensor([t]), pad) for t in range(5, 9)]
        finally:
            model.drop_caches()
        assert spy.served == [True] * 5 and spy.causal_only
        out[pad is None] = torch.cat(steps, 1)
        assert len(masks) == (0 if pad is None else 5)  # built only where a pad was given
        masks.clear()
    assert torch.equal(out[True], out[False])


def test_stack_is_freed_with_the_caches():
    model = tiny("llama", "packed")
    model.setup_caches(1, 8)
    stack = model.layer_stack
    handle = stack.handle
    model.drop_caches()
    assert model.layer_stack is None and stack.handle == 0
    x = torch.zeros(1, 1, model.args.dim)
    with pytest.raises(RuntimeError, match="no layer stack"):
        torch.ops.kbitrt_cpu.layer_stack_forward(handle, x, torch.tensor([0]), torch.empty(0),
                                                 torch.empty(0), [torch.zeros(1, 1, 1, 8)],
                                                 torch.empty(0), torch.empty(0))


def test_long_steps_run_the_python_layers():
    """One path in the stack: a step of more tokens than the loops take comes back unserved (the
    Python layers run it, on the same caches); the steps after it are the loops' again."""
    model = tiny("llama", "packed")
    T0 = cpu_kernels.FUSED_MAX_ROWS + 1
    ids, pad = tokens(1, T0 + 2, (0,))
    model.setup_caches(1, T0 + 2)
    spy = Spy(model)
    try:
        with torch.no_grad():
            model(ids[:, :T0], torch.arange(T0), pad)
            model(ids[:, T0:T0 + 1], torch.tensor([T0]), pad)
            model(ids[:, :T0 - 1], torch.arange(T0 - 1), pad)  # at the limit: the loops
    finally:
        model.drop_caches()
    assert spy.served == [False, True, True]


def test_schema_header_is_generated_from_the_dataclasses():
    """cpu_schema.h is what cpu_schema.py generates: Python and C++ cannot drift apart."""
    from kbitrt.runtime.kernels import cpu_schema

    assert cpu_schema.HEADER.read_text() == cpu_schema.cpp_header(), \
        "run `python -m kbitrt.runtime.kernels.cpu_schema`"
    assert "enum class Act : int64_t { silu = 0" in cpu_schema.cpp_header()


def test_create_reads_codes_through_the_schema():
    """The C++ side checks every enum code against cpu_schema.h: a bad one is refused."""
    from kbitrt.runtime.kernels import cpu_schema
    from kbitrt.runtime.layer_stack import stack_config, stack_layer

    model = tiny("llama", "packed")
    model.setup_caches(1, 4)
    try:
        config = stack_config(model)
        layers = [stack_layer(layer, "rmsnorm", 0, torch.float32) for layer in model.layers]
        tensors, ints = cpu_schema.wire(config, layers)
        ints[list(cpu_schema.StackConfig.__dataclass_fields__).index("act")] = len(cpu_schema.Act)
        with pytest.raises(RuntimeError, match="act code .* is not in cpu_schema.h"):
            torch.ops.kbitrt_cpu.layer_stack_create(tensors, ints, 1e-5)
    finally:
        model.drop_caches()
