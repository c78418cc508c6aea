"""One decoding token in one parallel region (kernels/cpu_step.h): the threads meet at barriers
instead of forking per linear. Its logits are the loops' (cpu_layers.h) bit for bit, for every
family it serves, fp32 and 16-bit KV caches, the native and the other builds, at thread counts
that split rows and heads unevenly; the families it does not serve run the loops."""

from __future__ import annotations

import pytest
import torch

from kbitrt.runtime.kernels import cpu as cpu_kernels
from test_layer_stack import COVERED, tiny, tokens

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no fused CPU kernels")

# sequential residuals with pre-norms, an activation torch has an _out op for, the plain causal
# mask (no sliding window, no ALiBi)
SERVED = {"llama", "llama3_rope", "llama_linear_rope", "neox_serial", "opt", "phi3", "qwen2"}


def one_token_steps(model, ops, region: bool, threads: int, kv=None, T0: int = 5, T: int = 11,
                    build: bool = False):
    """A prompt of T0 tokens, then one token a step (no padding: `kbit run`'s steps): the logits
    and how many steps the region served. build: the stack from `ops` (another build's library)
    instead of the native one."""
    model.kv_dtype = kv
    ids, _ = tokens(1, T, (0,))
    before, n = ops.token_region_steps(), torch.get_num_threads()
    ops.set_token_region(region)
    torch.set_num_threads(threads)
    model.setup_caches(1, T + 1)
    if build:
        from kbitrt.runtime.layer_stack import LayerStack

        model.close_layer_stack()
        model.layer_stack = LayerStack(model, ops)
    try:
        with torch.no_grad():
            steps = [model(ids[:, :T0], torch.arange(T0))]
            steps += [model(ids[:, t:t + 1], torch.tensor([t])) for t in range(T0, T)]
    finally:
        model.drop_caches()
        torch.set_num_threads(n)
        ops.set_token_region(True)
    return torch.cat(steps, 1), ops.token_region_steps() - before


@pytest.fixture
def int8_activations():
    cpu_kernels.set_activations("int8")  # the region serves the int8 path's linears
    yield
    cpu_kernels.reset_activations()


@pytest.mark.parametrize("name", COVERED)
def test_region_steps_are_the_loops_bit_for_bit(name, int8_activations):
    model, ops = tiny(name, "packed"), torch.ops.kbitrt_cpu
    loops, none = one_token_steps(model, ops, region=False, threads=3)
    region, served = one_token_steps(model, ops, region=True, threads=3)
    assert none == 0
    assert served == (6 if name in SERVED else 0)
    assert torch.equal(region, loops)


@pytest.mark.parametrize("kv", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_region_with_16bit_kv_caches_and_one_or_two_threads(kv, threads, int8_activations):
    model, ops = tiny("qwen2", "packed"), torch.ops.kbitrt_cpu
    loops, _ = one_token_steps(model, ops, region=False, threads=threads, kv=kv)
    region, served = one_token_steps(model, ops, region=True, threads=threads, kv=kv)
    assert served == 6 and torch.equal(region, loops)


def test_region_serves_only_the_int8_path():
    """Under fp32 activations (the exact path) the loops run: the region has no fp32 rows."""
    model, ops = tiny("llama", "packed"), torch.ops.kbitrt_cpu
    cpu_kernels.set_activations("fp32")
    try:
        _, served = one_token_steps(model, ops, region=True, threads=2)
    finally:
        cpu_kernels.reset_activations()
    assert served == 0


@pytest.mark.parametrize("bits", [3, 5, 8])
def test_region_at_other_widths(bits, int8_activations):
    from kbitrt.format.config import QuantConfig

    model, ops = tiny("llama", "packed", QuantConfig(bits=bits, block_size=64)), torch.ops.kbitrt_cpu
    loops, _ = one_token_steps(model, ops, region=False, threads=2)
    region, served = one_token_steps(model, ops, region=True, threads=2)
    assert served == 6 and torch.equal(region, loops)


@pytest.mark.parametrize("variant", ["avx2", "portable"])
def test_other_builds_run_the_region(variant):
    """The AVX2 and portable builds' regions give their own loops' logits, bit for bit."""
    ops = cpu_kernels.load_variant(variant)
    ops.set_int8_activations(1)
    model = tiny("llama", "packed")
    try:
        loops = one_token_steps(model, ops, region=False, threads=2, build=True)
        region = one_token_steps(model, ops, region=True, threads=2, build=True)
    finally:
        ops.set_int8_activations(0)  # the variants' default (tests of theirs that follow)
    assert loops[1] == 0 and region[1] == 6
    assert torch.equal(region[0], loops[0])
