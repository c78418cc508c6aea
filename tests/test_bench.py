"""kbit bench: the table, JSON/CSV output and the kernel table on a tiny converted model."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kbitrt.cli.main import cli


@pytest.fixture(scope="module")
def k4(tmp_path_factory, smollm2_dir):
    from conftest import make_tiny_llama

    from kbitrt.convert.converter import convert
    from kbitrt.format.config import QuantConfig

    root = tmp_path_factory.mktemp("benchmodels")
    make_tiny_llama(root / "hf", smollm2_dir, max_positions=64)
    convert(root / "hf", root / "k4", QuantConfig(bits=4, block_size=64))
    return root / "k4"


def test_bench_json(k4, tmp_path):
    out = tmp_path / "b.json"
    res = CliRunner().invoke(cli, ["bench", str(k4), "-b", "1,2", "-p", "16", "-n", "4",
                                   "-r", "2", "--json", "-o", str(out)])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert [(r["test"], r["batch"]) for r in rec["results"]] == \
        [("pp16", 1), ("tg4", 1), ("pp16", 2), ("tg4", 2)]
    assert all(r["tokens_per_s"] > 0 and len(r["reps"]) == 2 for r in rec["results"])
    assert rec["params"] > 0 and rec["bits_per_param"] > 0 and rec["model"]["quant_label"]
    assert json.loads(out.read_text())["results"] == rec["results"]


def test_bench_csv_and_kernels(k4, tmp_path):
    res = CliRunner().invoke(cli, ["bench", str(k4), "-p", "8", "-n", "2", "-r", "1", "--csv",
                                   "-o", str(tmp_path / "c.json")])
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("model,size,params,bits/param") and len(lines) == 3
    res = CliRunner().invoke(cli, ["bench", str(k4), "--kernels", "--json",
                                   "-o", str(tmp_path / "k.json")])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert rec["copy_gbps"] > 0 and rec["kernels"]
    assert {"us", "gbps", "pct_copy_bw", "speedup_vs_dense"} <= set(rec["kernels"][0])


def test_bench_too_long_is_one_line(k4):
    res = CliRunner().invoke(cli, ["bench", str(k4), "-p", "512"])
    assert res.exit_code == 2
    assert res.stderr.strip() == "error: -p 512: the model holds at most 64 positions"


@pytest.mark.parametrize("flags,max_bits,mode,kv", [
    ([], 6.0, "packed", "auto"), (["--cpu-weights", "fp16"], 16.01, "fp16", "auto"),
    (["--low-memory"], 6.0, "packed", "fp16"),
    (["--low-memory", "--kv-cache", "fp32"], 6.0, "packed", "fp32")])
def test_bench_reports_memory_held(k4, tmp_path, flags, max_bits, mode, kv):
    """Resident memory: bits per quantized weight held (the packed codes by default, where the
    fused CPU kernels build, and with --low-memory; or a 16-bit copy), the KV cache's dtype (fp16
    with --low-memory unless --kv-cache says otherwise), peak RSS and model memory (peak minus the
    RSS after imports)."""
    res = CliRunner().invoke(cli, ["bench", str(k4), "-p", "4", "-n", "2", "-r", "1", "--json",
                                   "-o", str(tmp_path / "m.json"), *flags])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    held, mem = rec["held"], rec["memory"]
    assert 3.9 < held["bits_per_quantized_weight_held"] <= max_bits
    assert rec["options"]["cpu_weights"] == mode and rec["options"]["kv_cache"] == kv
    from kbitrt.runtime.kernels import cpu

    assert rec["options"]["cpu_kernels"] == (cpu.describe() if mode == "packed" else None)
    assert cpu.describe() in ("avx512", "avx2")  # the vector path runs here
    assert rec["options"]["cpu_layers"] == "stack"  # the layers ran from C++ (layer_stack.py)
    assert mem["peak_rss_mb"] >= mem["rss_after_imports_mb"] > 0
    assert mem["model_memory_mb"] == pytest.approx(mem["peak_rss_mb"] - mem["rss_after_imports_mb"])


def test_bench_contradictory_memory_flags(k4):
    res = CliRunner().invoke(cli, ["bench", str(k4), "--low-memory", "--cpu-weights", "fp32"])
    assert res.exit_code == 2 and "contradict" in res.stderr


def test_cpu_model_holds_16_bit_embedding_unless_it_is_the_head(k4, smollm2_dir, tmp_path):
    """On the CPU the packed and fp16 modes hold an embedding in the file's 16 bits, not an fp32
    copy, with fp32 activations and logits equal to the exact fp32 reference (issue 13). An output
    head (tied or not) stays 16-bit only in packed mode, where the fused kernel sums its logits in
    fp32; with fp16 copies a tied head stays fp32 (torch's 16-bit logits would round differently
    for one and for several tokens, see loader.build_native)."""
    import torch
    from conftest import make_tiny_llama

    from kbitrt.convert.converter import convert
    from kbitrt.format.config import QuantConfig
    from kbitrt.runtime.loader import load_model

    make_tiny_llama(tmp_path / "hf", smollm2_dir, max_positions=64, tie_word_embeddings=False)
    convert(tmp_path / "hf", tmp_path / "untied", QuantConfig(bits=4, block_size=64))
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    for folder, emb16 in ((tmp_path / "untied", True), (k4, False)):
        ref = load_model(folder, device="cpu", cpu_weights="fp32")
        assert ref.model.tok_emb.weight.dtype == torch.float32
        with torch.no_grad():
            want = ref.model(ids)
        for cpu_weights in ("fp16", "packed"):
            lm = load_model(folder, device="cpu", cpu_weights=cpu_weights)
            packed = cpu_weights == "packed"
            assert lm.model.tok_emb.weight.dtype == (torch.float16 if emb16 or packed
                                                     else torch.float32)
            assert lm.model.lm_head.weight.dtype == (torch.float16 if packed else torch.float32)
            if packed and not emb16:  # tied: one 16-bit tensor, two uses
                assert lm.model.lm_head.weight is lm.model.tok_emb.weight
            with torch.no_grad():
                got = lm.model(ids)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * float(want.abs().max()))


def test_loading_imports_no_compiler_stack(k4):
    """Loading a native model imports neither torch._dynamo (torch's random init on the meta device
    pulls it in: ~170 MB of RSS) nor transformers' modeling code for the model check."""
    import subprocess
    import sys

    code = ("import sys; from kbitrt.runtime.loader import load_model; "
            f"load_model({str(k4)!r}, device='cpu'); "
            "print(sorted(m for m in ('torch._dynamo', 'transformers.models.llama.modeling_llama') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_bench_counts_the_loads_code_as_imports(k4):
    """Before its RSS baseline, `kbit bench` imports the model's config class and loads the fused
    kernels' library (as benchmarks/cpu_decode.py does): code is not model memory. Run in a fresh interpreter, where neither is loaded yet."""
    import subprocess
    import sys

    probe = ("import sys, torch\n"
             "from kbitrt.eval.latency import import_run_code\n"
             f"import_run_code({str(k4)!r}, 'cpu')\n"
             "print('transformers.models.llama.configuration_llama' in sys.modules,\n"
             "      hasattr(torch.ops.kbitrt_cpu, 'simd_width'))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True"], out.stdout
