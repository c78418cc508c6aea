"""The int8-activation prefill GEMM (kernels/cpu_gemm_int8.h): kbit_linear above FUSED_MAX_ROWS
rows under int8 activations. Against the torch twin (kernels/int8_reference.py) over every width,
blocks of 32/64/128, ragged K and N, zero blocks and rows, M = 33 and 100; against the decode
path's rows (the same arithmetic, sums in another order); rows independent of M; the routing by
mode; and the AVX2 build's GEMM and the portable build (the decode path's rows at any M)."""

import pytest
import torch
from conftest import packed_with_zeros

from kbitrt.runtime.kernels import cpu
from kbitrt.runtime.kernels.int8_reference import kbit_linear_int8_torch
from kbitrt.runtime.kernels.reference import kbit_linear_torch


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpu.available(), f"fused CPU kernels did not build: {cpu.unavailable_reason()}"


packed = packed_with_zeros


def x_of(m, k, seed=0):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    x[:, 32:64] = 0.0  # a zero activation group
    x[m // 3] = 0.0  # and a zero row
    return x


def assert_near(got, want):
    """The integer sums are exact: the rest differs from the float64 twin by fp32 rounding."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()) + 1e-6)


# (N, K): N not a multiple of the 4-row tile, K ragged (not a multiple of 8, 32, 64 or of the
# 512-value superblock), several superblocks, one whole superblock, K under one group, a last
# superblock of more than 8 groups (800: 25; 203 and 1100 end in at most 8: the half-width path)
SHAPES = [(37, 203), (13, 1000), (9, 1536), (6, 24), (11, 800)]


@pytest.mark.parametrize("bits", range(3, 9))
def test_gemm_matches_twin(bits, int8_mode):
    int8_mode("int8")
    for block in (32, 64, 128):
        for i, (n, k) in enumerate(SHAPES):
            dtype = ("nf", "int", "fp")[(bits + i) % 3]
            q, a, c = packed(n, k, bits, block, dtype, seed=bits * 10 + i)
            x, b = x_of(100, k, seed=i), torch.randn(n) if i % 2 else None
            want = kbit_linear_int8_torch(x, q, a, c, b, bits, block, k)
            for m in (33, 100):
                assert_near(cpu.kbit_linear(x[:m], q, a, c, b, bits, block, k), want[:m])


def test_rows_match_the_decode_path_and_do_not_depend_on_m(int8_mode):
    """A prefill row is the decode path's row to fp32 rounding (same int8 x, codebook, integer
    sums and scales), and the same bits whether the batch has 33, 70 or 100 rows."""
    int8_mode("int8")
    for bits, block in ((3, 32), (6, 128), (8, 64)):
        q, a, c = packed(45, 1100, bits, block, seed=bits)
        x = x_of(100, 1100, seed=1)
        full = cpu.kbit_linear(x, q, a, c, None, bits, block, 1100)
        rows = torch.cat([torch.ops.kbitrt_cpu.kbit_linear_int8(x[i:i + 25], q, a, c, None, bits,
                                                                block, 1100)
                          for i in range(0, 100, 25)])
        assert_near(full, rows)
        for m in (33, 70):
            assert torch.equal(cpu.kbit_linear(x[:m], q, a, c, None, bits, block, 1100), full[:m])
        assert torch.equal(cpu.kbit_linear(x[60:], q, a, c, None, bits, block, 1100), full[60:])


def test_routing_by_mode(int8_mode):
    """Above FUSED_MAX_ROWS: int8 takes this GEMM, fp32 the exact fp32 GEMM, auto this one (the
    fp32 one for 4-bit weights where the AVX-512 VNNI path does not run)."""
    k, m = 600, cpu.FUSED_MAX_ROWS + 8
    x = x_of(m, k)
    q4, a4, c4 = packed(30, k, 4, 64)
    q5, a5, c5 = packed(30, k, 5, 64)
    exact4 = kbit_linear_torch(x, q4, a4, c4, None, None, None, 4, 64, k)
    int8_mode("int8")
    int8_4 = cpu.kbit_linear(x, q4, a4, c4, None, 4, 64, k)
    int8_5 = cpu.kbit_linear(x, q5, a5, c5, None, 5, 64, k)
    assert_near(int8_4, kbit_linear_int8_torch(x, q4, a4, c4, None, 4, 64, k))
    assert float((int8_4 - exact4).norm() / exact4.norm()) < 0.03
    int8_mode("fp32")
    fp32_4 = cpu.kbit_linear(x, q4, a4, c4, None, 4, 64, k)
    torch.testing.assert_close(fp32_4, exact4, rtol=1e-5, atol=1e-4)
    assert not torch.equal(fp32_4, int8_4)
    int8_mode("auto")  # int8, except 4-bit weights under the portable loops
    four = int8_4 if torch.ops.kbitrt_cpu.int8_width() else fp32_4
    assert torch.equal(cpu.kbit_linear(x, q4, a4, c4, None, 4, 64, k), four)
    assert torch.equal(cpu.kbit_linear(x, q5, a5, c5, None, 5, 64, k), int8_5)


@pytest.mark.parametrize("variant", ["avx2", "portable"])
def test_other_builds_match_twin(variant):
    """The AVX2 build's own GEMM (8 groups a superblock, then groups in order) and the portable
    rows: 4 bits, int at 8 (its codes are the int8 values), K of whole superblocks and of a
    ragged rest, tokens not a multiple of the 4-token tile; rows independent of M."""
    ops = cpu.load_variant(variant)
    ops.set_int8_activations(1)
    try:
        for i, (bits, block, dtype) in enumerate(((3, 32, "nf"), (4, 64, "nf"), (5, 64, "fp"),
                                                  (8, 128, "int"), (8, 64, "nf"))):
            n, k = SHAPES[i % 3 + 1]
            q, a, c = packed(n, k, bits, block, dtype, seed=bits)
            x, b = x_of(42, k), torch.randn(n)
            full = ops.kbit_linear(x, q, a, c, b, bits, block, k)
            assert_near(full, kbit_linear_int8_torch(x, q, a, c, b, bits, block, k))
            assert torch.equal(ops.kbit_linear(x[:33], q, a, c, b, bits, block, k), full[:33])
    finally:
        ops.set_int8_activations(0)
