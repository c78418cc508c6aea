"""The int8-activation CPU decode path (kernels/cpu_int8.h) against its torch twin
(kernels/int8_reference.py): the native (AVX-512 VBMI + VNNI here), AVX2 and portable builds, every
width and codebook, ragged K, zero blocks, M = 1..32, and its routing through cpu.kbit_linear."""

import pytest
import torch
from conftest import packed_with_zeros

from kbitrt.runtime.kernels import cpu
from kbitrt.runtime.kernels.int8_reference import kbit_linear_int8_torch, quantize_x
from kbitrt.runtime.kernels.reference import kbit_linear_torch


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpu.available(), f"fused CPU kernels did not build: {cpu.unavailable_reason()}"


_packed = packed_with_zeros


def _x(m, k, seed):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    x[:, 32:64] = 0.0  # a zero activation group
    return x


def _check(ops, bits, dtype, shapes, ms, bias=False):
    for i, (n, k, block) in enumerate(shapes):
        q, a, c = _packed(n, k, bits, block, dtype, seed=bits * 10 + i)
        x = _x(max(ms), k, seed=i)
        b = torch.randn(n) if bias else None
        want = kbit_linear_int8_torch(x, q, a, c, b, bits, block, k)
        # the integer sums are exact: the rest differs from the float64 twin by fp32 rounding
        tol = 1e-5 * float(want.abs().max()) + 1e-6
        for m in ms:
            got = ops.kbit_linear_int8(x[:m], q, a, c, b, bits, block, k)
            torch.testing.assert_close(got, want[:m], rtol=1e-5, atol=tol)


# ragged K (not a multiple of 8, 32 or 64), one whole 64, K under one group
SHAPES = [(37, 203, 32), (21, 320, 64), (19, 1000, 128), (8, 24, 32)]


@pytest.mark.parametrize("bits", range(3, 9))
@pytest.mark.parametrize("dtype", ["nf", "int", "fp"])
def test_native_matches_twin(bits, dtype):
    _check(torch.ops.kbitrt_cpu, bits, dtype, SHAPES, ms=(1, 3, 4, 9), bias=dtype == "nf")


@pytest.mark.parametrize("variant", ["avx2", "portable"])
def test_other_builds_match_twin(variant):
    ops = cpu.load_variant(variant)
    assert ops.int8_width() == (256 if variant == "avx2" else 0)
    for bits in range(3, 9):
        _check(ops, bits, "nf", SHAPES[:2], ms=(1, 5))
    _check(ops, 8, "int", SHAPES[:2], ms=(1, 5))  # AVX2: the linear 8-bit codebook, no lookups


@pytest.mark.parametrize("build", ["native", "avx2"])
def test_rows_do_not_depend_on_m(build):
    """A token alone and in a batch of up to FUSED_MAX_ROWS tokens gets identical outputs (the
    AVX2 build's decoding rows run in pairs, a batch's one at a time; 45 rows: a lone last one)."""
    ops = torch.ops.kbitrt_cpu if build == "native" else cpu.load_variant(build)
    for bits in (4, 7):
        q, a, c = _packed(45, 576, bits, 64, "nf", seed=bits)
        x = _x(cpu.FUSED_MAX_ROWS, 576, seed=1)
        full = ops.kbit_linear_int8(x, q, a, c, None, bits, 64, 576)
        for m in (1, 2, 5, cpu.FUSED_MAX_ROWS):
            part = ops.kbit_linear_int8(x[:m], q, a, c, None, bits, 64, 576)
            assert torch.equal(part, full[:m])
        for r in (0, 17):
            one = ops.kbit_linear_int8(x[r:r + 1], q, a, c, None, bits, 64, 576)
            assert torch.equal(one, full[r:r + 1])


def test_quantize_x_rounds_per_group():
    x = _x(2, 100, seed=3)
    xq, d = quantize_x(x, cfac=1.0)
    assert xq.abs().max() == 127 and torch.all(d[:, 1] == 0)
    torch.testing.assert_close(xq.float().view(2, -1)[:, :96].view(2, 3, 32) * d[:, :3, None],
                               x[:, :96].view(2, 3, 32), atol=float(d.max()) / 2 + 1e-7, rtol=0)


def test_kbit_linear_routes_by_mode(int8_mode):
    """cpu.kbit_linear (and the layer stack's linears, the same C++ function) take the int8 path
    under set_activations("int8") and the exact fp32 one under "fp32"; the int8 result stays
    within its rounding of the exact one."""
    bits, k = 4, 576
    q, a, c = _packed(64, k, bits, 64, "nf", seed=0)
    x = _x(3, k, seed=0)
    int8_mode("int8")
    got8 = cpu.kbit_linear(x, q, a, c, None, bits, 64, k)
    assert torch.equal(got8, torch.ops.kbitrt_cpu.kbit_linear_int8(x, q, a, c, None, bits, 64, k))
    int8_mode("fp32")
    got32 = cpu.kbit_linear(x, q, a, c, None, bits, 64, k)
    exact = kbit_linear_torch(x, q, a, c, None, None, None, bits, 64, k)
    torch.testing.assert_close(got32, exact, rtol=1e-5, atol=1e-4)
    assert float((got8 - exact).norm() / exact.norm()) < 0.03
    int8_mode("auto")  # the default: int8, except 4-bit weights under the portable loops
    four = got8 if torch.ops.kbitrt_cpu.int8_width() else got32
    assert torch.equal(cpu.kbit_linear(x, q, a, c, None, bits, 64, k), four)
    q5, a5, c5 = _packed(64, k, 5, 64, "nf", seed=1)
    assert torch.equal(cpu.kbit_linear(x, q5, a5, c5, None, 5, 64, k),
                       torch.ops.kbitrt_cpu.kbit_linear_int8(x, q5, a5, c5, None, 5, 64, k))
    with pytest.raises(ValueError):
        cpu.set_activations("int4")


def test_auto_keeps_every_width_packed_under_int8(int8_mode):
    from kbitrt.runtime.weights_policy import PACKED_DEFAULT_MAX_BITS, cpu_weights_for

    dev = torch.device("cpu")
    for mode in ("int8", "auto"):
        int8_mode(mode)
        assert [cpu_weights_for("auto", dev, k) for k in range(3, 9)] == ["packed"] * 6
    int8_mode("fp32")
    assert cpu_weights_for("auto", dev, PACKED_DEFAULT_MAX_BITS + 1) == "fp16"


def test_smollm2_logits_and_greedy_under_int8(smollm2_nf4, int8_mode):
    """The real model, a 32-token step (FUSED_MAX_ROWS: the decode kernels): the int8 path's logits
    within a few % of the fp32 path's, the same top-1 at nearly every position, the same greedy
    start."""
    from kbitrt.runtime.generate import SamplingConfig, generate
    from kbitrt.runtime.loader import load_model

    text = ("The history of the city begins in the Roman period, when a small fort was built on "
            "the river. Over the following centuries the settlement grew into a market town")
    out = {}
    for mode in ("fp32", "int8"):
        int8_mode(mode)
        lm = load_model(smollm2_nf4, device="cpu", cpu_weights="packed")
        ids = torch.tensor([lm.tokenizer(text)["input_ids"][:cpu.FUSED_MAX_ROWS]])
        with torch.no_grad():
            out[mode] = lm.model(ids)[0].float()
        out[mode, "greedy"] = generate(lm, ["The history of the city begins"], max_new_tokens=6,
                                       sampling=SamplingConfig(temperature=0.0)).token_ids[0]
    ref, got = out["fp32"], out["int8"]
    assert float((got - ref).norm() / ref.norm()) < 0.08
    assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.85
    assert out["int8", "greedy"][:4] == out["fp32", "greedy"][:4]


def test_cli_option_sets_the_mode(int8_mode, tmp_path):
    """`--cpu-activations` (kbit run / bench / eval) sets the mode while parsing."""
    from click.testing import CliRunner

    from kbitrt.cli.main import cli

    for mode in ("fp32", "int8", "auto"):
        CliRunner().invoke(cli, ["run", str(tmp_path / "missing"), "--cpu-activations", mode])
        assert cpu.activations() == mode


def test_a_bad_env_mode_is_refused():
    """KBIT_CPU_ACTIVATIONS that names no mode is refused (RunError: one line in the CLI), not
    silently replaced by the default; case and spaces do not matter."""
    import os
    import subprocess
    import sys

    code = ("from kbitrt.errors import RunError\nfrom kbitrt.runtime.kernels import cpu\n"
            "try:\n    print(cpu.activations())\nexcept RunError as e:\n    print('RunError', e)")
    out = {}
    for value in ("int4", " FP32 "):
        env = {**os.environ, "KBIT_CPU_ACTIVATIONS": value}
        out[value] = subprocess.run([sys.executable, "-c", code], env=env, text=True,
                                    capture_output=True, timeout=120).stdout.strip()
    assert out["int4"] == "RunError KBIT_CPU_ACTIVATIONS='int4' is not one of auto, int8, fp32"
    assert out[" FP32 "] == "fp32"


@pytest.mark.parametrize("march, simd, width", [
    ("icelake-server", 512, "512"),  # AVX-512 with VBMI + VNNI: the VNNI kernels
    ("x86-64-v4", 512, "256"),  # AVX-512 without them: the AVX2 loops, not the scalar ones
    ("haswell", 256, "256"),
    ("x86-64", 128, None),  # the NEON block's KBIT_SIMD: no x86 intrinsics
    ("x86-64", 0, None),
])
def test_int8_width_per_build(march, simd, width):
    """Which int8 path each build compiles (cpu_int8.h's KBIT_INT8), by the preprocessor alone."""
    import shutil
    import subprocess

    from pathlib import Path

    if shutil.which("g++") is None:
        pytest.skip("no g++")
    header = Path(cpu.__file__).with_name("cpu_int8.h")
    flags = [f"-march={march}"] + ([f"-DKBIT_SIMD={simd}"] if simd else [])
    macros = subprocess.run(["g++", *flags, "-dM", "-E", "-x", "c++", str(header)],
                            capture_output=True, text=True, check=True).stdout
    defined = [line.split()[2] for line in macros.splitlines()
               if line.startswith("#define KBIT_INT8 ")]
    assert defined == ([width] if width else [])
