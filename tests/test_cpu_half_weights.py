"""16-bit CPU copies under fp32 activations (linear.dense_linear, cpu_layers.h's dense linears):
only the weights are rounded, the activations are multiplied as they are and summed in fp32: a
model held in fp16 copies computes what the same copies widened to fp32 do (to 1e-5 of the
logits), on the native decoder (C++ layer stack and Python layers) and the transformers backend.
What remains against fp32 copies is the weights' rounding (benchmarks/cpu_half_weights.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kbitrt.runtime.kernels.ops import dense_linear
from kbitrt.runtime.linear import KbitLinear
from kbitrt.runtime.in_memory import InMemoryKbit
from kbitrt.runtime.loader import build_model
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
    err, err_rounded = float((got - want).abs().max()), float((rounded - want).abs().max())
    assert err < 1e-6 * float(want.abs().max()) * 96 and err < err_rounded / 100


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("backend", ["native", "transformers"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_fp16_copies_compute_in_fp32(name, backend):
    """A model in fp16 copies against the same model with those copies widened to fp32: the only
    difference left is the order of fp32 sums (the weights' own rounding is the same in both)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(TINY[name](), dtype=torch.float32).eval()
    for p in hf.parameters():
        p.data.normal_(0, 0.2)
    src = InMemoryKbit(hf, QUANT)
    half = build_model(src, "cpu", backend=backend, cpu_weights="fp16").model
    ref = build_model(src, "cpu", backend=backend, cpu_weights="fp16").model
    widened = 0
    for m in ref.modules():
        if isinstance(m, KbitLinear) and m.dense_weight is not None:
            m.dense_weight, widened = m.dense_weight.float(), widened + 1
    assert widened and any(isinstance(m, KbitLinear) and m.dense_weight.dtype == torch.float16
                           for m in half.modules())
    ids, _, pad = batch()
    with torch.no_grad():
        assert relative(half(ids), ref(ids)) < 1e-5
    if backend == "native":  # decoding steps: the C++ layer stack's dense linears where it builds
        assert relative(cached_steps(half, ids, pad, 6), cached_steps(ref, ids, pad, 6)) < 1e-5
