"""`kbit convert / inspect / dequantize` as a user runs them (click's runner, real files)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from kbitrt.cli.main import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_convert_inspect_dequantize_json(tiny_models, tmp_path):
    src = tiny_models["llama"]
    r = run("convert", src, "-b", 5, "--dtype", "fp", "--exponent-bits", 3, "--absmax-dtype", "fp32",
            "-o", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["label"] == "fp5(E3M1)-b64" and s["linears_quantized"] == 14
    r = run("inspect", tmp_path / "out", "--json")
    i = json.loads(r.stdout)
    assert i["bits_per_param_quantized"] == s["bits_per_param_quantized"]
    assert i["quantization"]["absmax_dtype"] == "fp32"
    r = run("inspect", tmp_path / "out", "--modules")
    assert r.exit_code == 0 and "model.layers.1.mlp.down_proj" in r.stdout
    r = run("dequantize", tmp_path / "out", "-o", tmp_path / "dq", "--dtype", "bf16")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "dq" / "config.json").read_text())["dtype"] == "bfloat16"


def test_summary_table(tiny_models, tmp_path):
    r = run("convert", tiny_models["gpt2"], "-o", tmp_path / "o", "--outliers", "top:2%")
    assert r.exit_code == 0, r.output
    for word in ("bits/param", "M params/s", "mean rel. weight error (nf)", "outlier columns"):
        assert word in r.stdout


def one_line_error(r, text):
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and text in lines[0], r.stderr


def test_bad_input_one_clear_line(tiny_models, tmp_path):
    src = tiny_models["llama"]
    one_line_error(run("convert", tmp_path / "nope", "-o", tmp_path / "o"), "no such folder")
    one_line_error(run("convert", src, "-b", 9, "-o", tmp_path / "o"), "--bits 9")
    one_line_error(run("convert", src, "--block", 100, "-o", tmp_path / "o"), "power of two")
    one_line_error(run("convert", src, "--outliers", "lots", "-o", tmp_path / "o"), "--outliers")
    one_line_error(run("inspect", src), "not a kbit model")
    (tmp_path / "o").mkdir()
    one_line_error(run("convert", src, "-o", tmp_path / "o"), "--force")
