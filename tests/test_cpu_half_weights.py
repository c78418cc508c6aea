"""16-bit CPU copies under fp32 activations (linear.dense_linear, cpu_layers.h's dense linears):
only the weights are rounded, the activations are multiplied as they are and summed in fp32, so
a model held in fp16 copies gives logits within 1e-4 (relative) of the same model in fp32 copies,
on the native decoder (C++ layer stack and Python layers) and the transformers backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kbitrt.runtime.linear import dense_linear
from kbitrt.runtime.loader import InMemoryKbit, build_model
from test_models import QUANT, TINY, batch, cached_steps


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 40])  # the fused loop (<= 32 rows) and the fp32 copies
def test_dense_linear_keeps_fp32_activations(dtype, rows):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 96, generator=g) * 3
    w = torch.randn(80, 96, generator=g).to(dtype)
    b = torch.randn(80, generator=g).to(dtype)
    want = F.linear(x.double(), w.double(), b.double())
    got = dense_linear(x, w, b)
    assert got.dtype == torch.float32
    rounded = F.linear(x.to(dtype), w).double() + b.double()  # what rounding x as well gives
    err, err_rounded = (got - want).abs().max(), (rounded - want).abs().max()
    assert err < 1e-4 * want.abs().max() and err < err_rounded / 4


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("backend", ["native", "transformers"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_fp16_copies_give_fp32_copies_logits(name, backend):
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_config(TINY[name](), dtype=torch.float32).eval()
    for p in hf.parameters():
        p.data.normal_(0, 0.2)
    src = InMemoryKbit(hf, QUANT)
    ref = build_model(src, "cpu", backend=backend, cpu_weights="fp32").model
    half = build_model(src, "cpu", backend=backend, cpu_weights="fp16").model
    ids, _, pad = batch()
    with torch.no_grad():
        assert relative(half(ids), ref(ids)) < 1e-4
    if backend == "native":  # decoding steps: the C++ layer stack (dense kind) where it builds
        steps_half, steps_ref = cached_steps(half, ids, pad, 6), cached_steps(ref, ids, pad, 6)
        assert relative(steps_half, steps_ref) < 1e-4
