"""The bit-plane kernels (issue 24): the torch twin, the Triton kernels (interpreted here: conftest
sets TRITON_INTERPRET=1) and the CPU C++ kernel read an any-precision linear's planes as stored,
K planes per call, and agree with today's path (the first K planes repacked into bitslice-v1 and
run by the plain kernels)."""

from __future__ import annotations

import pytest
import torch

from kbitrt.convert.any_precision import quantize_any_precision
from kbitrt.format.bitplane import AnyPrecisionConfig, pack_planes, to_bitslice
from kbitrt.runtime.kernels import cpu
from kbitrt.runtime.kernels.planes_reference import dequantize_planes, kbit_linear_planes_torch
from kbitrt.runtime.kernels.reference import kbit_linear_torch, pad_codebook

LO, HI = 3, 8


def ap_weight(n: int, k: int, block: int, dtype: str = "nf", zero_rows: int = 0, seed: int = 0):
    """(planes, absmax fp16, {width: padded codebook}) of a quantized random (n, k) matrix, with
    the first `zero_rows` rows' first block all zero."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[:zero_rows, :block] = 0
    cfg = AnyPrecisionConfig(bits=HI, block_size=block, dtype=dtype, min_bits=LO, max_bits=HI,
                             exponent_bits=2 if dtype == "fp" else None)
    q = quantize_any_precision(w, cfg)
    cbs = {b: pad_codebook(q.tree.codebooks[b], b) for b in range(LO, HI + 1)}
    return q.planes, q.absmax.half(), cbs


def repacked(x, planes, absmax, cb, bias, bits, block, k):
    """Today's path: the first `bits` planes repacked into bitslice-v1, the plain twin."""
    return kbit_linear_torch(x, to_bitslice(planes[:bits], k), absmax, cb, bias, None, None,
                             bits, block, k)


@pytest.mark.parametrize("dtype", ["nf", "int", "fp"])
@pytest.mark.parametrize("n,k,block", [(24, 256, 64), (13, 200, 32), (9, 1100, 1024)])
def test_twin_equals_the_repacked_path(dtype, n, k, block):
    planes, absmax, cbs = ap_weight(n, k, block, dtype, zero_rows=2)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(n)
    for bits in range(LO, HI + 1):
        want = repacked(x, planes, absmax, cbs[bits], bias, bits, block, k)
        got = kbit_linear_planes_torch(x, planes, absmax, cbs[bits], bias, None, None, bits,
                                       block, k)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    w3 = dequantize_planes(planes, absmax, cbs[3], 3, block, k)
    assert torch.all(w3[:2, :block] == 0)  # a zero block decodes to zero at every width


def test_twin_reads_only_the_first_k_planes():
    planes, absmax, cbs = ap_weight(8, 128, 64)
    x = torch.randn(2, 128)
    a = kbit_linear_planes_torch(x, planes, absmax, cbs[4], None, None, None, 4, 64, 128)
    b = kbit_linear_planes_torch(x, planes[:4].clone(), absmax, cbs[4], None, None, None, 4, 64,
                                 128)
    garbage = planes.clone()
    garbage[4:] = 0xA5
    c = kbit_linear_planes_torch(x, garbage, absmax, cbs[4], None, None, None, 4, 64, 128)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_outliers_then_bias_as_the_plain_twin():
    planes, absmax, cbs = ap_weight(10, 96, 32)
    idx = torch.tensor([3, 50])
    ow = torch.randn(10, 2).half()
    x, bias = torch.randn(2, 96), torch.randn(10)
    got = kbit_linear_planes_torch(x, planes, absmax, cbs[5], bias, idx, ow, 5, 32, 96)
    want = kbit_linear_torch(x, to_bitslice(planes[:5], 96), absmax, cbs[5], bias, idx, ow, 5,
                             32, 96)
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------------ Triton

# (n, k, block, m): the word GEMV (whole 64-bit plane words, blocks 32 and 64k), its ragged-K
# masking (K % 64 != 0 with whole words), and the tl.dot path (M > 1, or plane rows that are not
# whole words); (128, 512) fills whole row tiles and trips (EVEN_NG: no masks, as the 7B shapes)
TRITON_CASES = [(20, 128, 64, 1), (19, 192, 32, 1), (9, 60, 32, 1), (17, 1024, 1024, 1),
                (18, 100, 32, 1), (128, 512, 64, 1), (21, 128, 64, 3), (7, 1000, 1024, 17)]


@pytest.mark.parametrize("n,k,block,m", TRITON_CASES)
def test_triton_equals_twin(n, k, block, m):
    from kbitrt.runtime.kernels.planes import kbit_linear_planes_triton

    g = torch.Generator().manual_seed(n + k)
    codes = torch.randint(0, 2**HI, (n, k), generator=g, dtype=torch.uint8)
    codes[0, :block] = 0  # a zero-code block beside a zero scale below
    planes = pack_planes(codes, HI)
    absmax = (torch.rand(n, -(-k // block), generator=g) + 0.5).half()
    absmax[1, 0] = 0
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g)
    for bits in (LO, 5, HI) if m == 1 else (4, 7):
        cb = torch.sort(torch.randn(2**bits, generator=g)).values
        want = kbit_linear_planes_torch(x, planes, absmax, cb, bias, None, None, bits, block, k)
        got = kbit_linear_planes_triton(x, planes, absmax, cb, bias, None, None, bits, block, k)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_triton_outliers_and_fp16():
    from kbitrt.runtime.kernels.planes import kbit_linear_planes_triton

    planes, absmax, cbs = ap_weight(12, 128, 64)
    idx, ow = torch.tensor([1, 77]), torch.randn(12, 2).half()
    x, bias = torch.randn(1, 128).half(), torch.randn(12).half()
    want = kbit_linear_planes_torch(x, planes, absmax, cbs[6], bias, idx, ow, 6, 64, 128)
    got = kbit_linear_planes_triton(x, planes, absmax, cbs[6], bias, idx, ow, 6, 64, 128)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


def test_custom_op_and_fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kbitrt.runtime.kernels.ops import kbit_linear_planes

    planes, absmax, cbs = ap_weight(6, 64, 32)
    x = torch.randn(2, 3, 64)
    y = kbit_linear_planes(x, planes, absmax, cbs[3], None, None, None, 3, 32, 64)
    want = kbit_linear_planes_torch(x.reshape(6, 64), planes, absmax, cbs[3], None, None, None,
                                    3, 32, 64)
    torch.testing.assert_close(y.reshape(6, 6), want, rtol=1e-5, atol=1e-5)  # the C++ kernel
    x2 = x.reshape(6, 64).contiguous()
    mode = FakeTensorMode()
    fx, fp, fa, fc = (mode.from_tensor(t) for t in (x2, planes, absmax, cbs[3]))
    with mode:
        out = torch.ops.kbitrt.kbit_linear_planes(fx, fp, fa, fc, None, None, None, 3, 32, 64)
    assert tuple(out.shape) == (6, 6)


# ------------------------------------------------------------------------------------- CPU C++

CPU_CASES = [(40, 256, 64), (17, 200, 32), (33, 1000, 1024), (9, 60, 32), (5, 576, 64)]


def _cpu_ops(variant: str):
    if not cpu.available():
        pytest.skip(f"no fused CPU kernels: {cpu.unavailable_reason()}")
    return torch.ops.kbitrt_cpu if variant == "native" else cpu.load_variant(variant)


@pytest.mark.parametrize("variant", ["native", "avx2", "portable"])
def test_cpu_kernel_equals_twin(variant):
    ops = _cpu_ops(variant)
    for n, k, block in CPU_CASES:
        g = torch.Generator().manual_seed(n * k)
        codes = torch.randint(0, 2**HI, (n, k), generator=g, dtype=torch.uint8)
        codes[:, :block] = 0
        planes = pack_planes(codes, HI)
        absmax = (torch.rand(n, -(-k // block), generator=g) + 0.5).half()
        absmax[2, -1] = 0
        x = torch.randn(5, k, generator=g)
        bias = torch.randn(n, generator=g)
        for bits in range(LO, HI + 1):
            cb = torch.sort(torch.randn(2**bits, generator=g)).values
            want = kbit_linear_planes_torch(x, planes, absmax, cb, bias, None, None, bits, block,
                                            k)
            got = ops.kbit_linear_planes(x, planes, absmax, cb, bias, bits, block, k)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            # one token at a time gives the batch's numbers bit for bit (a verify step's logits
            # equal the decoding steps')
            one = torch.cat([ops.kbit_linear_planes(x[i:i + 1].contiguous(), planes, absmax, cb,
                                                    bias, bits, block, k) for i in range(5)])
            assert torch.equal(one, got), (variant, n, k, block, bits)
            w = ops.kbit_dequantize_planes(planes, absmax, cb, bits, block, k)
            torch.testing.assert_close(w, dequantize_planes(planes, absmax, cb, bits, block, k))


def test_cpu_kernel_equals_the_bitslice_kernel():
    """The same products as the bitslice kernel at equal K (summed in another fixed order)."""
    _cpu_ops("native")
    planes, absmax, cbs = ap_weight(48, 576, 64, "nf")
    x = torch.randn(3, 576)
    for bits in range(LO, HI + 1):
        got = cpu.kbit_linear_planes(x, planes, absmax, cbs[bits], None, bits, 64, 576)
        want = cpu.kbit_linear(x, to_bitslice(planes[:bits], 576), absmax, cbs[bits], None, bits,
                               64, 576)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cpu_wrapper_above_the_fused_rows():
    _cpu_ops("native")
    planes, absmax, cbs = ap_weight(16, 128, 64)
    x = torch.randn(cpu.FUSED_MAX_ROWS + 3, 128)
    got = cpu.kbit_linear_planes(x, planes, absmax, cbs[7], None, 7, 64, 128)
    want = kbit_linear_planes_torch(x, planes, absmax, cbs[7], None, None, None, 7, 64, 128)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
