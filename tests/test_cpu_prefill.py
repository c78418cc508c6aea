"""The prefill GEMM (kernels/cpu_gemm.h): kbit_linear above FUSED_MAX_ROWS rows of x decodes W a
few rows at a time into cache and multiplies them in register tiles. Checked against the torch
twin (dequantize + matmul) over widths, codebooks, blocks and ragged shapes, in the native, AVX2
and portable builds; its memory (no layer-sized temporary); and SmolLM2's prefill logits against
the old path (the whole layer dequantized, torch's matmul)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kbitrt.format.config import QuantConfig
from kbitrt.format.quantizer import quantize_weight
from kbitrt.runtime.kernels import cpu
from kbitrt.runtime.kernels.reference import kbit_linear_torch, pad_codebook


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpu.available(), f"fused CPU kernels did not build: {cpu.unavailable_reason()}"


def packed(n, k, bits, block, dtype="nf", seed=0, zero_blocks=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if zero_blocks:
        w[:, :block] = 0.0
        w[n // 2] = 0.0
    qw = quantize_weight(w, QuantConfig(bits=bits, block_size=block, dtype=dtype))
    return qw.qweight, qw.kernel_absmax(), pad_codebook(qw.codebook, bits)


def assert_matches_twin(ops, x, q, a, c, bias, bits, block, k):
    got = ops.kbit_linear(x, q, a, c, bias, bits, block, k)
    want = kbit_linear_torch(x, q, a, c, bias, None, None, bits, block, k)
    # one fp32 chain per output over K against torch's blocked sums: scale the tolerance by the
    # size of the terms, not of their (cancelling) sum
    scale = (x.abs() @ kbit_linear_torch(torch.eye(k), q, a, c, None, None, None, bits, block,
                                         k).abs()).max().item()
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6 * scale)


# (M, N, K): none a multiple of the micro tile (32 or 16 tokens x 12 or 6 rows) or of a block,
# one K under one 16-lane group, and a panel of several kKc passes (K > 256)
SHAPES = [(33, 37, 203), (70, 25, 576), (47, 13, 1000), (40, 29, 24)]


@pytest.mark.parametrize("bits", range(3, 9))
def test_gemm_matches_twin(bits):
    for dtype in ("nf", "int", "fp"):
        for block in (32, 64, 128):
            for i, (m, n, k) in enumerate(SHAPES):
                q, a, c = packed(n, k, bits, block, dtype, seed=i, zero_blocks=i == 1)
                x = torch.randn(m, k)
                bias = torch.randn(n) if i % 2 else None
                assert_matches_twin(torch.ops.kbitrt_cpu, x, q, a, c, bias, bits, block, k)


def test_wrapper_takes_the_gemm_above_the_row_limit():
    """cpu.kbit_linear (what KbitLinear calls) at FUSED_MAX_ROWS + 1 rows: the GEMM, whose sums
    differ from the fused rows' in the last bits, and agree with the twin."""
    q, a, c = packed(40, 300, 4, 64)
    x = torch.randn(cpu.FUSED_MAX_ROWS + 1, 300)
    assert_matches_twin(cpu, x, q, a, c, torch.randn(40), 4, 64, 300)


@pytest.mark.parametrize("variant", ["avx2", "portable"])
def test_other_builds_match_twin(variant):
    ops = cpu.load_variant(variant)
    for bits, block in ((3, 32), (4, 64), (5, 128), (8, 64)):
        for i, (m, n, k) in enumerate(SHAPES[:3]):
            q, a, c = packed(n, k, bits, block, seed=i)
            assert_matches_twin(ops, torch.randn(m, k), q, a, c, torch.randn(n), bits, block, k)


PEAK_GROWTH = """
import sys, torch
def hwm():  # peak RSS of this process image in KiB (ru_maxrss would carry the parent's across exec)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
from kbitrt.runtime.kernels import cpu
from kbitrt.runtime.kernels.reference import pad_codebook
assert cpu.available()
N, K = 8192, 4096  # 4-bit: 16 MiB of codes; dequantized in fp32 it would be 128 MiB
q = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
a = torch.rand(N, K // 64).half()
c = pad_codebook(torch.linspace(-1, 1, 16), 4)
x = torch.randn(64, K)
cpu.kbit_linear(x[:, :256], q[:64, :128].contiguous(), a[:64, :4].contiguous(), c, None, 4, 64, 256)
before = hwm()
y = cpu.kbit_linear(x, q, a, c, None, 4, 64, K)
print((hwm() - before) // 1024)
"""


def test_no_layer_sized_temporary():
    """The peak RSS of one 64-token call on an 8192 x 4096 layer grows by well under the 128 MiB
    an fp32 copy of the layer would take (the panels are a few hundred KiB per thread)."""
    out = subprocess.run([sys.executable, "-c", PEAK_GROWTH], capture_output=True, text=True,
                         check=True)
    assert int(out.stdout.split()[-1]) < 24, out.stdout  # MiB


def old_path(x, qweight, absmax, codebook, bias, bits, block_size, in_features):
    """kbit_linear before the GEMM: above the row limit, the layer dequantized + torch's matmul."""
    x = x.float().contiguous()
    if x.shape[0] <= cpu.FUSED_MAX_ROWS:
        return torch.ops.kbitrt_cpu.kbit_linear(x, qweight, absmax, codebook, bias, bits,
                                                block_size, in_features)
    w = torch.ops.kbitrt_cpu.kbit_dequantize(qweight, absmax, codebook, bits, block_size,
                                             in_features)
    return torch.nn.functional.linear(x, w, bias)


def test_smollm2_prefill_logits_match_the_old_path(smollm2_nf4, monkeypatch):
    """A 48-token prefill of SmolLM2 nf4 through the layer stack (the GEMM) against the Python
    layers with the old dequantize + matmul: equal to fp32 reassociation, same next token."""
    from kbitrt.runtime.loader import load_model

    model = load_model(smollm2_nf4, device="cpu").model
    ids = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(1))

    def prefill(stack: bool) -> torch.Tensor:
        model.use_layer_stack = stack
        model.setup_caches(1, 50)
        assert (model.layer_stack is not None) == stack
        try:
            with torch.no_grad():
                return model(ids, torch.arange(48), torch.tensor([0]))
        finally:
            model.drop_caches()

    new = prefill(True)
    monkeypatch.setattr(cpu, "kbit_linear", old_path)
    old = prefill(False)
    assert not torch.equal(new, old)  # the GEMM ran: its sums are not torch's
    torch.testing.assert_close(new, old, rtol=0, atol=2e-3 * old.abs().max().item())
    assert torch.equal(new[0, -1].argmax(), old[0, -1].argmax())
