"""A long CPU step (a prefill) outside the kernels: attention in query chunks over the slots up to
each chunk's last (model/decoder.py attention), the rotary embedding without a rotated copy, the
heap kept for the step's temporaries (runtime/memory.py heap_for_layers), and what cpu_layers
says when the Python layers ran it."""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from kbitrt.model.decoder import QUERY_CHUNK, apply_rotary, attention
from kbitrt.runtime.memory import heap_for_layers


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def test_rotary_is_transformers_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 7, 64, generator=g)
    for rd in (64, 32):  # whole heads, and a partial rotary dimension
        cos, sin = torch.randn(2, 1, 7, rd, generator=g), torch.randn(2, 1, 7, rd, generator=g)
        rot = x[..., :rd] * cos + rotate_half(x[..., :rd]) * sin
        want = torch.cat((rot, x[..., rd:]), dim=-1)
        assert torch.equal(apply_rotary(x, cos, sin), want)


def test_chunked_attention_equals_one_call():
    """Queries at slots 40..339 (a prompt after 40 cached tokens) over a 400-slot cache, GQA 8/2,
    causal: the chunks see exactly the keys one call leaves open."""
    g = torch.Generator().manual_seed(1)
    T, S, start = 3 * QUERY_CHUNK - 84, 400, 40
    q = torch.randn(1, 8, T, 32, generator=g)
    k, v = torch.randn(1, 2, S, 32, generator=g), torch.randn(1, 2, S, 32, generator=g)
    slots = torch.arange(start, start + T)
    hidden = torch.arange(S)[None, :] > slots[:, None]
    mask = torch.zeros(1, 1, T, S).masked_fill(hidden, float("-inf"))
    args = SimpleNamespace(n_kv_heads=2, n_heads=8, attn_scale=None)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = attention(q, k, v, mask, slots, args)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(attention(q, k, v, mask, None, args), want)  # no slots: one call


def test_heap_kept_only_for_long_cpu_steps():
    assert isinstance(heap_for_layers(torch.empty(1, 32, 8)), nullcontext)
    assert isinstance(heap_for_layers(torch.empty(1, 1, 8)), nullcontext)
    long_step = heap_for_layers(torch.empty(1, 33, 8))
    assert not isinstance(long_step, nullcontext)
    with long_step:
        big = torch.ones(1 << 22)  # 16 MB: from the heap while the step runs
    del big


def test_cpu_layers_says_which_steps_the_python_layers_ran(smollm2_nf4):
    from kbitrt.runtime.loader import load_model

    model = load_model(smollm2_nf4, device="cpu").model
    with torch.no_grad():
        model.setup_caches(1, 64)
        ids = torch.randint(0, 1000, (1, 41))
        model(ids[:, :40], torch.arange(40), last_only=True)
        model(ids[:, 40:], torch.tensor([40]), last_only=True)
    assert model.cpu_layers == "stack (python: 1 of 2 steps, of 40 tokens)"
    with torch.no_grad():
        model.setup_caches(1, 64)
        model(ids[:, :1], torch.tensor([0]), last_only=True)
    assert model.cpu_layers == "stack"
