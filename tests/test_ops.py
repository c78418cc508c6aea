"""kbitrt's ops (runtime/kernels/ops.py): each op's kernel per device against its torch twin, the
fallbacks where the C++ kernels are missing, and the fakes torch.compile traces."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from kbitrt.format.config import QuantConfig
from kbitrt.format.quantizer import quantize_weight
from kbitrt.runtime.devices import cuda_twin
from kbitrt.runtime.kernels import cpu as cpu_kernels
from kbitrt.runtime.kernels import ops
from kbitrt.runtime.kernels.reference import dequantize_packed, kbit_linear_torch, pad_codebook


@pytest.fixture(scope="module")
def packed():
    qw = quantize_weight(torch.randn(48, 128, generator=torch.Generator().manual_seed(0)),
                         QuantConfig(bits=4, block_size=64, dtype="nf"))
    return qw.qweight, qw.absmax, pad_codebook(qw.codebook, 4)


def test_kbit_linear_kernels_agree_with_the_twin(packed, monkeypatch):
    q, a, c = packed
    x = torch.randn(3, 128)
    idx, ow = torch.tensor([1, 7]), torch.randn(48, 2)
    want = kbit_linear_torch(x, q, a, c, None, idx, ow, 4, 64, 128)
    torch.testing.assert_close(ops.kbit_linear(x, q, a, c, None, idx, ow, 4, 64, 128), want,
                               rtol=1e-5, atol=1e-5)  # the C++ kernel
    torch.testing.assert_close(ops.kbit_linear_2d._init_fn(x, q, a, c, None, idx, ow, 4, 64, 128),
                               want)  # the default kernel (devices without their own): the twin
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    torch.testing.assert_close(ops.kbit_linear(x, q, a, c, None, idx, ow, 4, 64, 128), want)


def test_kbit_dequantize_op(packed, monkeypatch):
    q, a, c = packed
    want = dequantize_packed(q, a, c, 4, 64, 128)
    assert torch.equal(torch.ops.kbitrt.kbit_dequantize(q, a, c, 4, 64, 128), want)
    assert torch.equal(ops.kbit_dequantize._init_fn(q, a, c, 4, 64, 128), want)
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    assert torch.equal(torch.ops.kbitrt.kbit_dequantize(q, a, c, 4, 64, 128), want)
    with FakeTensorMode() as mode:
        out = torch.ops.kbitrt.kbit_dequantize(*(mode.from_tensor(t) for t in (q, a, c)), 4, 64,
                                               128)
    assert tuple(out.shape) == (48, 128) and out.dtype == torch.float32


def test_half_linear_op_on_both_paths():
    w, b = torch.randn(40, 64).half(), torch.randn(40).half()
    x = torch.randn(2, 3, 64)
    want = x @ w.float().t() + b.float()
    torch.testing.assert_close(ops.half_linear(x, w, b), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.ops.kbitrt.half_linear(x.reshape(6, 64), w, b),
                               want.reshape(6, 40), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.half_linear_2d._init_fn(x.reshape(6, 64), w, b),
                               want.reshape(6, 40), rtol=1e-5, atol=1e-5)
    with cuda_twin():  # the GPU path: the op itself, W's dtype
        y = ops.half_linear(x.half(), w, b)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), want, rtol=1e-2, atol=1e-2)
    x0 = x[0].contiguous()
    with FakeTensorMode() as mode:
        out = torch.ops.kbitrt.half_linear(*(mode.from_tensor(t) for t in (x0, w, b)))
    assert tuple(out.shape) == (3, 40)


def test_planes_op_with_outliers_and_without_the_cpu_kernels(monkeypatch):
    from kbitrt.runtime.kernels.planes_reference import kbit_linear_planes_torch
    from test_planes import ap_weight

    planes, absmax, cbs = ap_weight(6, 64, 32)
    x, idx, ow, b = torch.randn(2, 64), torch.tensor([3, 9]), torch.randn(6, 2), torch.randn(6)
    want = kbit_linear_planes_torch(x, planes, absmax, cbs[4], b, idx, ow, 4, 32, 64)
    got = ops.kbit_linear_planes(x, planes, absmax, cbs[4], b, idx, ow, 4, 32, 64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        ops.kbit_linear_planes_2d._init_fn(x, planes, absmax, cbs[4], b, idx, ow, 4, 32, 64), want)
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    torch.testing.assert_close(ops.kbit_linear_planes(x, planes, absmax, cbs[4], b, idx, ow, 4,
                                                      32, 64), want)
