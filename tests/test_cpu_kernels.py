"""The fused CPU kernels (kbitrt/runtime/kernels/cpu_kernels.cpp) against their torch twins.

Built once per machine on first use (a C++ compiler is part of this project's setup); where the
build fails, `available()` is False and every test here fails with the reason rather than skip,
so a CI machine that silently lost its fast path is noticed.
"""

import os
import subprocess
import sys

import pytest
import torch

from kbitrt.format.config import OutlierSpec, QuantConfig
from kbitrt.format.quantizer import quantize_weight
from kbitrt.runtime.kernels import cpu
from kbitrt.runtime.kernels.reference import dequantize_packed, kbit_linear_torch, pad_codebook
from kbitrt.runtime.linear import HalfLinear, KbitLinear, stack_rows


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpu.available(), f"fused CPU kernels did not build: {cpu.unavailable_reason()}"


def _quantized(n, k, bits, block, dtype="nf", seed=0, zero_blocks=False, absmax="fp16",
               outliers=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if zero_blocks:
        w[:, :block] = 0.0
        w[n // 2] = 0.0
    cfg = QuantConfig(bits=bits, block_size=block, dtype=dtype, absmax_dtype=absmax,
                      outliers=OutlierSpec.parse(outliers) if outliers else None)
    return quantize_weight(w, cfg)


def _args(qw):
    return qw.qweight, qw.kernel_absmax(), pad_codebook(qw.codebook, qw.bits)


# ragged K (not a multiple of 8, 16, 32 or 64), whole 64s, and K under one group
SHAPES = [(37, 203), (40, 256), (19, 1000), (8, 24), (70, 576)]


@pytest.mark.parametrize("bits", range(3, 9))
@pytest.mark.parametrize("dtype", ["nf", "int", "fp", "quantile"])
def test_dequantize_and_linear_match_twin(bits, dtype):
    for i, (n, k) in enumerate(SHAPES):
        for block in (32, 64, 128):
            qw = _quantized(n, k, bits, block, dtype, seed=i, zero_blocks=i == 1)
            q, a, c = _args(qw)
            want_w = dequantize_packed(q, a, c, bits, block, k)
            assert torch.equal(cpu.kbit_dequantize(q, a, c, bits, block, k), want_w)
            for m in (1, 5, cpu.FUSED_MAX_ROWS + 3):
                x = torch.randn(m, k)
                got = cpu.kbit_linear(x, q, a, c, None, bits, block, k)
                want = kbit_linear_torch(x, q, a, c, None, None, None, bits, block, k)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits", [3, 4, 5, 8])
@pytest.mark.parametrize("block", [32, 64, 256])
def test_one_token_equals_its_row_of_a_batch(bits, block):
    """The decode step (M=1, fused, no buffer) and a verifying step (M>1, decoded rows) add the
    same products in the same order: bit-identical, which speculative greedy decoding needs."""
    qw = _quantized(64, 608, bits, block, seed=bits)
    q, a, c = _args(qw)
    bias = torch.randn(64)
    x = torch.randn(cpu.FUSED_MAX_ROWS, 608)
    batch = cpu.kbit_linear(x, q, a, c, bias, bits, block, 608)
    for i in (0, 3, cpu.FUSED_MAX_ROWS - 1):
        assert torch.equal(cpu.kbit_linear(x[i:i + 1], q, a, c, bias, bits, block, 608)[0],
                           batch[i])


def test_fp32_absmax_bias_and_dq8():
    qw = _quantized(33, 300, 4, 64, absmax="fp32")
    q, a, c = _args(qw)
    assert a.dtype == torch.float32
    x, bias = torch.randn(3, 300), torch.randn(33)
    torch.testing.assert_close(cpu.kbit_linear(x, q, a, c, bias, 4, 64, 300),
                               kbit_linear_torch(x, q, a, c, bias, None, None, 4, 64, 300))
    qw = _quantized(33, 300, 5, 64, absmax="dq8")  # decoded once into plain scales, as at load
    q, a, c = _args(qw)
    torch.testing.assert_close(cpu.kbit_linear(x, q, a, c, None, 5, 64, 300),
                               kbit_linear_torch(x, q, a, c, None, None, None, 5, 64, 300))


@pytest.mark.parametrize("wdtype", [torch.float16, torch.bfloat16])
def test_half_linear(wdtype):
    w = torch.randn(300, 200).to(wdtype)
    bias = torch.randn(300)
    for m in (1, 4, cpu.FUSED_MAX_ROWS + 1):
        x = torch.randn(m, 200)
        torch.testing.assert_close(cpu.half_linear(x, w, bias), x @ w.float().t() + bias,
                                   rtol=1e-5, atol=1e-4)
    x = torch.randn(7, 200)
    assert torch.equal(cpu.half_linear(x[:1], w)[0], cpu.half_linear(x, w)[0])


def test_rejects_bad_arguments():
    qw = _quantized(16, 64, 4, 32)
    q, a, c = _args(qw)
    with pytest.raises(RuntimeError, match="qweight"):
        torch.ops.kbitrt_cpu.kbit_linear(torch.randn(1, 64), q[:, :-1].contiguous(), a, c, None,
                                         4, 32, 64)
    with pytest.raises(RuntimeError, match="x must be"):
        torch.ops.kbitrt_cpu.kbit_linear(torch.randn(1, 63), q, a, c, None, 4, 32, 64)
    with pytest.raises(RuntimeError, match="bits"):
        torch.ops.kbitrt_cpu.kbit_linear(torch.randn(1, 64), q, a, c, None, 9, 32, 64)


def test_kbit_linear_module_packed_uses_the_kernel():
    """KbitLinear in packed mode (the CPU default) gives the twin's output, outliers included."""
    qw = _quantized(24, 150, 4, 32, outliers="top:5%")
    bias = torch.randn(24)
    layer = KbitLinear.from_quantized(qw, bias, cpu_cache=False)
    x = torch.randn(2, 3, 150)
    idx, ow = layer.outliers()
    want = kbit_linear_torch(x.reshape(-1, 150), layer.qweight, layer.absmax, layer.codebook,
                             layer.bias, idx, ow, 4, 32, 150).reshape(2, 3, 24)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-4)
    assert layer.held_bytes() < 24 * 150  # packed: no dense copy appeared


def test_half_linear_module_shares_the_embedding():
    emb = torch.nn.Parameter(torch.randn(50, 16).half(), requires_grad=False)
    head = HalfLinear(emb)
    x = torch.randn(1, 2, 16)
    torch.testing.assert_close(head(x), x @ emb.float().t(), rtol=1e-5, atol=1e-4)
    assert head.weight is emb


def test_without_the_kernels_the_runtime_falls_back(tmp_path):
    """KBIT_CPU_KERNELS=0 (as on a machine without a compiler): one line on stderr, fp16 copies
    by default, and the packed mode still runs (dequantizing in torch)."""
    code = ("import torch\n"
            "from kbitrt.runtime.kernels import cpu\n"
            "from kbitrt.runtime.loader import cpu_weights_for\n"
            "from kbitrt.format.config import QuantConfig\n"
            "from kbitrt.format.quantizer import quantize_weight\n"
            "from kbitrt.runtime.linear import KbitLinear\n"
            "assert not cpu.available()\n"
            "assert cpu_weights_for('auto', torch.device('cpu'), 4) == 'fp16'\n"
            "qw = quantize_weight(torch.randn(8, 64), QuantConfig(bits=4, block_size=32))\n"
            "y = KbitLinear.from_quantized(qw, cpu_cache=False)(torch.ones(1, 64))\n"
            "torch.testing.assert_close(y, torch.ones(1, 64) @ qw.dequantize().t())\n"
            "print('fallback ok')\n")
    env = {**os.environ, "KBIT_CPU_KERNELS": "0"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "fallback ok" in r.stdout
    notes = [line for line in r.stderr.splitlines() if "fused CPU kernels unavailable" in line]
    assert len(notes) == 1 and "KBIT_CPU_KERNELS=0" in notes[0]


def test_build_name_tracks_the_source():
    name = cpu.build_name()
    assert name.startswith("kbitrt_cpu_") and name == cpu.build_name()


@pytest.mark.parametrize("variant,width", [("avx2", 256), ("portable", 0)])
def test_other_cpus_paths_match_the_twin(variant, width):
    """The AVX2 build (-march=haswell) and the portable one (x86-64 without AVX) are what CPUs
    without AVX-512 run: built here beside the native one, they give the twin's results, with one
    token equal to its row of a batch."""
    ops = cpu.load_variant(variant)
    assert ops.simd_width() == width
    for bits in range(3, 9):
        for k, block in ((203, 64), (640, 64), (256, 32)):
            qw = _quantized(21, k, bits, block, seed=bits)
            q, a, c = _args(qw)
            assert torch.equal(ops.kbit_dequantize(q, a, c, bits, block, k),
                               dequantize_packed(q, a, c, bits, block, k))
            x = torch.randn(4, k)
            got = ops.kbit_linear(x, q, a, c, None, bits, block, k)
            torch.testing.assert_close(got, kbit_linear_torch(x, q, a, c, None, None, None, bits,
                                                              block, k), rtol=1e-5, atol=1e-4)
            assert torch.equal(ops.kbit_linear(x[:1], q, a, c, None, bits, block, k)[0], got[0])
    for wdtype in (torch.float16, torch.bfloat16):
        w = torch.randn(30, 70).to(wdtype)
        x = torch.randn(3, 70)
        torch.testing.assert_close(ops.half_linear(x, w, None), x @ w.float().t(), rtol=1e-5,
                                   atol=1e-4)
        assert torch.equal(ops.half_linear(x[:1], w, None)[0], ops.half_linear(x, w, None)[0])


def test_auto_is_packed_up_to_6_bits_here():
    from kbitrt.runtime.weights_policy import PACKED_DEFAULT_MAX_BITS, cpu_weights_for

    cpu_dev = torch.device("cpu")
    assert [cpu_weights_for("auto", cpu_dev, k) for k in range(3, 9)] == \
        ["packed"] * (PACKED_DEFAULT_MAX_BITS - 2) + ["fp16"] * (8 - PACKED_DEFAULT_MAX_BITS)
    assert cpu_weights_for("fp32", cpu_dev, 4) == "fp32"
    assert cpu_weights_for("packed", cpu_dev, 8) == "packed"


def test_vectorized_here():
    """This machine runs a vector path (the packed default depends on it)."""
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    assert cpu.vectorized() == (" avx512bw " in flags or " avx2 " in flags)
    assert torch.ops.kbitrt_cpu.simd_width() == (512 if " avx512bw " in flags else 256)


def test_stacked_rows_give_the_same_numbers():
    """q, k, v (or gate, up) stacked into one packed linear: bit-identical outputs, one call."""
    layers = [KbitLinear.from_quantized(_quantized(n, 160, 4, 32, seed=n), torch.randn(n),
                                        cpu_cache=False) for n in (48, 16, 16)]
    stacked = stack_rows(layers)
    assert stacked is not None and stacked.out_features == 80
    for m in (1, 5, cpu.FUSED_MAX_ROWS + 2):
        x = torch.randn(2, m, 160)
        assert torch.equal(stacked(x), torch.cat([layer(x) for layer in layers], dim=-1))
    quantile = [KbitLinear.from_quantized(_quantized(16, 160, 4, 32, "quantile", seed=s),
                                          cpu_cache=False) for s in (1, 2)]
    assert stack_rows(quantile) is None  # per-tensor codebooks differ
    assert stack_rows([layers[0], KbitLinear.from_quantized(_quantized(16, 160, 5, 32),
                                                            cpu_cache=False)]) is None


def test_packed_load_stacks_projections_with_equal_logits(tmp_path, smollm2_dir):
    """The CPU packed load merges wq/wk/wv and gate/up; logits equal an unmerged build exactly."""
    from conftest import make_tiny_llama

    from kbitrt.convert.converter import convert
    from kbitrt.format.reader import KbitModel
    from kbitrt.model.families import hf_config
    from kbitrt.runtime.build import build_native
    from kbitrt.runtime.loader import load_model

    make_tiny_llama(tmp_path / "hf", smollm2_dir, max_positions=64)
    convert(tmp_path / "hf", tmp_path / "k4", QuantConfig(bits=4, block_size=64))
    lm = load_model(tmp_path / "k4", device="cpu")
    attn, mlp = lm.model.layers[0].attn, lm.model.layers[0].mlp
    assert lm.cpu_weights == "packed" and attn.qkv_mode == "fused" and mlp.gate_up is not None
    assert not hasattr(attn, "wq") and mlp.gate is None
    source = KbitModel.open(tmp_path / "k4")
    plain = build_native(source, hf_config(source.config), torch.device("cpu"), torch.float32,
                         "packed")
    assert plain.layers[0].attn.qkv_mode == "separate"
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(lm.model(ids), plain(ids))
