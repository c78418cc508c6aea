"""The CPU layer stack (models/layer_stack.py, kernels/cpu_layers.h) runs a decoder's layers from
C++ with the very ops of decoder.py: its logits must equal the Python layers' bit for bit, for
every family it covers, packed and dense weights, prefill above and below the fused kernel's row
limit, decoding steps and left padding. What it does not cover keeps the Python layers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from kbitrt.format.config import OutlierSpec, QuantConfig
from kbitrt.runtime.kernels import cpu as cpu_kernels
from kbitrt.runtime.loader import InMemoryKbit, build_model
from test_models import TINY, V

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no fused CPU kernels")

COVERED = sorted(set(TINY) - {"gpt2"})  # GPT-2's gelu_new is a Python formula: not covered


def tiny(name: str, cpu_weights: str, quant: QuantConfig = QuantConfig(bits=4, block_size=32)):
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(TINY[name](), dtype=torch.float32).eval()
    for p in hf.parameters():
        p.data.normal_(0, 0.2)
    return build_model(InMemoryKbit(hf, quant), "cpu", cpu_weights=cpu_weights).model


def decode(model, ids: torch.Tensor, pad: torch.Tensor, T0: int, stack: bool) -> torch.Tensor:
    """Prefill T0 tokens, then one token at a time: every step's logits, concatenated."""
    model.use_layer_stack = stack
    B, T = ids.shape
    model.setup_caches(B, T + 2)
    assert (model.layer_stack is not None) == stack, model.layer_stack_off
    try:
        with torch.no_grad():
            steps = [model(ids[:, :T0], torch.arange(T0), pad)]
            for t in range(T0, T):
                steps.append(model(ids[:, t:t + 1], torch.tensor([t]), pad))
    finally:
        model.drop_caches()
    return torch.cat(steps, 1)


def tokens(B: int, T: int, pads) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, V, (B, T), generator=g), torch.tensor(pads)


@pytest.mark.parametrize("cpu_weights", ["packed", "fp16", "fp32"])
@pytest.mark.parametrize("name", COVERED)
def test_stack_equals_python_layers(name, cpu_weights):
    model = tiny(name, cpu_weights)
    # batch 2 with left padding; a prefill under the fused kernel's row limit, then steps
    ids, pad = tokens(2, 12, (3, 0))
    assert torch.equal(decode(model, ids, pad, 5, True), decode(model, ids, pad, 5, False))
    # a prefill above it (the layer dequantized, then torch's matmul)
    T0 = cpu_kernels.FUSED_MAX_ROWS + 3
    ids, pad = tokens(1, T0 + 2, (0,))
    assert torch.equal(decode(model, ids, pad, T0, True), decode(model, ids, pad, T0, False))


@pytest.mark.parametrize("bits", [3, 5, 8])
def test_stack_other_widths(bits):
    model = tiny("llama", "packed", QuantConfig(bits=bits, block_size=64))
    ids, pad = tokens(1, 9, (0,))
    assert torch.equal(decode(model, ids, pad, 4, True), decode(model, ids, pad, 4, False))


def test_smollm2_stack_equals_python_layers(smollm2_nf4):
    """The real model, as `kbit run` loads it (packed, q/k/v and gate/up stacked, fp16 tied head)."""
    from kbitrt.runtime.loader import load_model

    model = load_model(smollm2_nf4, device="cpu").model
    ids, pad = tokens(1, 10, (0,))
    ids = ids + 100
    assert torch.equal(decode(model, ids, pad, 6, True), decode(model, ids, pad, 6, False))


def test_uncovered_models_keep_python_layers():
    gpt2 = tiny("gpt2", "packed")
    gpt2.setup_caches(1, 8)
    assert gpt2.layer_stack is None and "NewGELUActivation" in gpt2.layer_stack_off
    gpt2.drop_caches()

    outliers = tiny("llama", "packed", QuantConfig(bits=4, block_size=32,
                                                outliers=OutlierSpec.parse("top:5%")))
    outliers.setup_caches(1, 8)
    assert outliers.layer_stack is None and outliers.layer_stack_off == "outlier columns"
    outliers.drop_caches()

    hooked = tiny("llama", "packed")
    handle = hooked.layers[1].mlp.register_forward_hook(lambda *args: None)
    hooked.setup_caches(1, 8)
    assert hooked.layer_stack is None and hooked.layer_stack_off == "forward hooks"
    hooked.drop_caches()
    handle.remove()


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
                                                 torch.empty(0), [torch.zeros(1, 1, 1, 8)])
