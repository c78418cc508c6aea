"""GPU-only checks (skipped on the CPU): compiled kernels inside a CUDA graph, and a kbit model's
greedy decode on CUDA against the CPU reference path."""

from __future__ import annotations

import pytest
import torch

from kbitrt.format.quantizer import quantize_weight
from kbitrt.format.config import QuantConfig
from kbitrt.runtime.linear import KbitLinear

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("bits", [3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("m", [1, 7, 16, 200])
def test_kbit_linear_cuda_graph_matches_reference(bits, m):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(1536, 576, generator=g)
    qw = quantize_weight(w, QuantConfig(bits=bits, block_size=64, dtype="nf"))
    lin = KbitLinear.from_quantized(qw, None, compute_dtype=torch.float16).cuda()
    x = torch.randn(m, 576, generator=torch.Generator().manual_seed(bits)).half().cuda()
    ref = x.float().cpu() @ qw.dequantize().t()
    lin(x)  # compile / autotune outside the graph
    graph, out = torch.cuda.CUDAGraph(), None
    with torch.cuda.graph(graph):
        out = lin(x)
    graph.replay()
    torch.cuda.synchronize()
    err = (out.float().cpu() - ref).abs().max() / ref.abs().max()
    assert err < 5e-3 and torch.isfinite(out).all()


@pytest.mark.parametrize("m", [1, 5, 40])
def test_kbit_linear_called_twice_on_cuda(m):
    """The second call of a layer (same codebook tensor) once raised in words.decode_choice."""
    qw = quantize_weight(torch.randn(512, 256), QuantConfig(bits=5, block_size=64, dtype="nf"))
    lin = KbitLinear.from_quantized(qw, None, compute_dtype=torch.float16).cuda()
    x = torch.randn(m, 256).half().cuda()
    ref = x.float().cpu() @ qw.dequantize().t()
    for _ in range(3):
        out = lin(x).float().cpu()
        assert (out - ref).abs().max() / ref.abs().max() < 5e-3


def test_smollm2_greedy_on_cuda_matches_cpu(smollm2_dir, tmp_path):
    from kbitrt.convert.converter import convert
    from kbitrt.runtime.generate import SamplingConfig, generate
    from kbitrt.runtime.loader import load_model

    convert(smollm2_dir, tmp_path / "q", QuantConfig(bits=4, block_size=64, dtype="nf"))
    texts = []
    for device in ("cpu", "cuda"):
        lm = load_model(tmp_path / "q", device=device, dtype=torch.float32 if device == "cpu" else torch.float16)
        texts.append(generate(lm, ["The capital of France is"], max_new_tokens=8,
                              sampling=SamplingConfig(temperature=0.0)).texts[0])
    assert "Paris" in texts[1] and texts[0].split()[:3] == texts[1].split()[:3]
