"""KbitLinear and replace_linears on the CPU (the torch path; the kernels have test_kernels.py)."""

import pytest
import torch
from torch import nn

from kbitrt.format.quantizer import quantize_weight
from kbitrt.format.config import OutlierSpec, QuantConfig
from kbitrt.runtime.linear import KbitLinear, replace_linears


def _qw(n=48, k=100, bits=4, block=32, outliers=None, absmax="fp16", seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    cfg = QuantConfig(bits=bits, block_size=block, absmax_dtype=absmax,
                      outliers=OutlierSpec.parse(outliers) if outliers else None)
    return quantize_weight(w, cfg)


@pytest.mark.parametrize("mode", ["fp32", "packed", "fp16", "fp16-released", "bf16-released"])
@pytest.mark.parametrize("bits,outliers,absmax", [(3, None, "fp16"), (4, "top:5%", "fp32"),
                                                  (5, "top:2%", "dq8"), (8, None, "fp16")])
def test_forward_matches_dequantize(mode, bits, outliers, absmax):
    qw = _qw(bits=bits, outliers=outliers, absmax=absmax)
    bias = torch.randn(48)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(mode.split("-")[0], torch.float16)
    lin = KbitLinear.from_quantized(qw, bias, compute_dtype=torch.float32,
                                    cpu_cache=mode != "packed", cpu_dtype=dtype)
    if mode.endswith("released"):
        lin.release_packed()
        assert lin.qweight.numel() == 0 and lin.dense_weight.dtype == dtype
    x = torch.randn(2, 5, 100)
    want = x @ qw.dequantize().t() + bias
    tol = 2e-2 if absmax == "dq8" else 1e-4  # dq8 is decoded to fp16 scales at load
    if mode.startswith("fp16"):
        tol = max(tol, 3e-3)  # x and W rounded to fp16 (11-bit mantissa)
    if mode.startswith("bf16"):
        tol = max(tol, 3e-2)
    y = lin(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, want, rtol=tol, atol=tol * want.abs().max().item())
    torch.testing.assert_close(lin.dequantize(), qw.dequantize(), rtol=tol, atol=tol)
    assert (lin.in_features, lin.out_features) == (100, 48)


def test_cpu_holds_at_most_16_bits_per_weight():
    """Default: a 16-bit copy, and once released no packed bytes beside it; packed: k bits."""
    qw = _qw(n=256, k=512, bits=4, block=64)
    x = torch.randn(1, 512)
    lin = KbitLinear.from_quantized(qw, None, compute_dtype=torch.float32)
    lin(x)
    assert lin._w_cache[1].dtype == torch.float16  # the lazy copy is 16-bit, never fp32
    lin.release_packed()
    assert lin.held_bytes() * 8 / (256 * 512) <= 16.01
    packed = KbitLinear.from_quantized(qw, None, compute_dtype=torch.float32, cpu_cache=False)
    packed(x)
    assert packed._w_cache is None  # nothing kept between calls
    assert packed.held_bytes() * 8 / (256 * 512) <= 4.3  # 4 bits + fp16 absmax per 64 + codebook


def test_bf16_activations():
    qw = _qw()
    lin = KbitLinear.from_quantized(qw, None, compute_dtype=torch.bfloat16)
    x = torch.randn(3, 100, generator=torch.Generator().manual_seed(2)).bfloat16()
    y = lin(x)
    assert y.dtype == torch.bfloat16
    want = x.float() @ qw.dequantize().t()
    assert (y.float() - want).abs().max() <= 2e-2 * want.abs().max()  # bf16 weights: 8-bit mantissa


def test_state_dict_roundtrip_and_cache_invalidation():
    a = KbitLinear.from_quantized(_qw(outliers="top:5%", seed=1), torch.randn(48))
    x = torch.randn(4, 100)
    _ = a(x)  # fills a's CPU cache
    names = set(a.state_dict())
    assert {"qweight", "absmax", "codebook", "outlier_idx", "outlier_weight", "bias"} <= names
    b = KbitLinear(100, 48, 4, 32, bias=True, n_outliers=a.outlier_idx.numel())
    _ = b(x)  # a cache of the zero weight, which loading must invalidate
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x), a(x))


def test_half_keeps_codebook_and_absmax_dtype():
    lin = KbitLinear.from_quantized(_qw(absmax="fp32"), torch.randn(48)).half()
    assert lin.codebook.dtype == torch.float32 and lin.absmax.dtype == torch.float32
    assert lin.bias.dtype == torch.float16 and lin.qweight.dtype == torch.uint8


def test_extra_repr():
    lin = KbitLinear.from_quantized(_qw(bits=3, block=64, outliers="top:5%"), None, data_type="nf")
    r = repr(lin)
    assert "nf3" in r and "block=64" in r and "outliers=5" in r and "absmax=float16" in r


def test_replace_linears():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 48), nn.ReLU(), nn.Sequential(nn.Linear(48, 20)))
    q0 = quantize_weight(model[0].weight.detach(), QuantConfig(bits=8, block_size=32))
    q2 = quantize_weight(model[2][0].weight.detach(), QuantConfig(bits=8, block_size=32))
    x = torch.randn(3, 100)
    want = model(x)
    done = replace_linears(model, {"0": q0, "2.0": (q2, model[2][0].bias.detach())},
                           compute_dtype=torch.float32)
    assert done == ["0", "2.0"]
    assert isinstance(model[0], KbitLinear) and isinstance(model[2][0], KbitLinear)
    assert model[0].bias is not None  # taken from the replaced nn.Linear
    torch.testing.assert_close(model(x), want, rtol=0.05, atol=0.05)
    with pytest.raises(TypeError):
        replace_linears(model, {"1": q0})
    with pytest.raises(ValueError, match="quantized weight"):
        replace_linears(nn.Sequential(nn.Linear(10, 10)), {"0": q0})


def test_compiles_fullgraph():
    """The op path traces without graph breaks (the fake impl), as CUDA-graphed decode needs."""
    lin = KbitLinear.from_quantized(_qw(bits=5, outliers="top:5%"), torch.randn(48),
                                    compute_dtype=torch.float32, cpu_cache=False)
    x = torch.randn(2, 3, 100)
    f = torch.compile(lin, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(f(x), lin(x))


@pytest.mark.parametrize("bits,outliers", [(4, None), (8, None), (4, "top:2%")])
def test_byte_table_dequantize_matches_reference(bits, outliers):
    """The CPU's fast path (whole blocks, 4 or 8 bits) gives exactly the reference weights."""
    from kbitrt.runtime.kernels.reference import dequantize_packed

    qw = _qw(n=64, k=512, bits=bits, block=64, outliers=outliers)
    lin = KbitLinear.from_quantized(qw, None, compute_dtype=torch.float32, cpu_cache=False)
    fast = lin._dequantize_bytes()
    assert fast is not None
    ref = dequantize_packed(lin.qweight, lin.absmax, lin.codebook, bits, 64, 512)
    assert torch.equal(fast, ref)
    torch.testing.assert_close(lin.dequantize(), qw.dequantize(), rtol=1e-4, atol=1e-4)
