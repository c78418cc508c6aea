"""`kbit convert / inspect / dequantize` as a user runs them (click's runner, real files)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from kbitrt.cli.main import cli
from kbitrt.format.reader import KbitModel


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_convert_inspect_dequantize_json(tiny_models, tmp_path):
    src = tiny_models["llama"]
    r = run("convert", src, "-b", 5, "--dtype", "fp", "--exponent-bits", 3, "--absmax-dtype", "fp32",
            "-o", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    # the default: the output head and the input embedding at 8 bits of the int grid (a tied
    # pair: stored once), whatever the linears' type and its options (fp's exponent bits)
    assert s["label"] == "fp5(E3M1)-b64-headint8-embint8" and s["linears_quantized"] == 15
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert (qc["head_bits"], qc["embedding_bits"], qc["head_dtype"]) == (8, 8, "int")
    assert qc["module_bits"] == {"model.embed_tokens": 8}
    assert qc["module_dtypes"] == {"model.embed_tokens": "int"}
    emb = KbitModel.open(tmp_path / "out").quantized("model.embed_tokens")
    assert emb.bits == 8 and emb.codebook.numel() == 255  # int8: -127..127
    r = run("inspect", tmp_path / "out", "--json")
    i = json.loads(r.stdout)
    assert i["bits_per_param_quantized"] == s["bits_per_param_quantized"]
    assert i["quantization"]["absmax_dtype"] == "fp32"
    r = run("inspect", tmp_path / "out", "--modules")
    assert r.exit_code == 0 and "model.layers.1.mlp.down_proj" in r.stdout
    r = run("dequantize", tmp_path / "out", "-o", tmp_path / "dq", "--dtype", "bf16")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "dq" / "config.json").read_text())["dtype"] == "bfloat16"
    r = run("convert", src, "-o", tmp_path / "h16", "--head-bits", 16, "--embedding-bits", 16, "--json")
    s = json.loads(r.stdout)
    assert s["label"] == "nf4-b64" and s["linears_quantized"] == 14
    r = run("convert", src, "-o", tmp_path / "nf8", "--head-dtype", "nf", "--json")
    assert json.loads(r.stdout)["label"] == "nf4-b64-head8-emb8"  # the linears' type: no suffix
    assert KbitModel.open(tmp_path / "nf8").quantized("model.embed_tokens").codebook.numel() == 256
    r = run("convert", src, "-o", tmp_path / "qh", "--quantize-head", "--embedding-bits", 16, "--json")
    assert json.loads(r.stdout)["label"] == "nf4-b64" and \
        "lm_head" in KbitModel.open(tmp_path / "qh").modules  # the head at --bits, as before


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
    one_line_error(run("convert", src, "-b", 9, "-o", tmp_path / "o"), "'--bits': 9 is not in the range 3<=x<=8")
    one_line_error(run("convert", src, "--block", 100, "-o", tmp_path / "o"), "power of two")
    one_line_error(run("convert", src, "--outliers", "lots", "-o", tmp_path / "o"), "--outliers")
    one_line_error(run("inspect", src), "not a kbit model")
    (tmp_path / "o").mkdir()
    one_line_error(run("convert", src, "-o", tmp_path / "o"), "--force")


def test_expected_failures_are_one_line_without_traceback(tiny_models, tmp_path):
    """Every expected failure: one `error:` line on stderr, exit 2; the traceback only with --debug."""
    src = tiny_models["llama"]
    q = tmp_path / "q"
    assert run("convert", src, "-o", q).exit_code == 0
    (tmp_path / "file").write_text("x")
    bad_header = tmp_path / "badheader"
    bad_header.mkdir()
    for f in q.iterdir():
        (bad_header / f.name).write_bytes(f.read_bytes())
    raw = bytearray((bad_header / "model.safetensors").read_bytes())
    raw[12] = 0xFF
    (bad_header / "model.safetensors").write_bytes(bytes(raw))
    not_utf8 = tmp_path / "notutf8"
    not_utf8.mkdir()
    (not_utf8 / "config.json").write_bytes(b'{"model_type": "\xff"}')
    yarnish = tmp_path / "rope"
    yarnish.mkdir()
    for f in src.iterdir():
        (yarnish / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((yarnish / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "no-such-rope", "rope_theta": 10000.0}
    (yarnish / "config.json").write_text(json.dumps(cfg))
    cases = [
        (("inspect", tmp_path / "missing"), "no such folder"),
        (("inspect", tmp_path / "file"), "is a file"),
        (("inspect", bad_header), "corrupt header"),
        (("convert", not_utf8, "-o", tmp_path / "o1"), "not valid UTF-8 JSON"),
        (("convert", yarnish, "-o", tmp_path / "o2"), "transformers cannot build"),
        (("convert", src, "-o", tmp_path / "file" / "sub"), "File exists"),
        (("convert", "someone/surely-not-cached-model", "-o", tmp_path / "o3"), "cannot download"),
        (("convert", src, "-o", tmp_path / "o4", "--outliers", "top:.%"), "'--outliers'"),
        (("convert", src, "-o", tmp_path / "o4", "--max-shard-size", "infGB"), "'--max-shard-size'"),
        (("convert", src, "-o", tmp_path / "o4", "--max-shard-size", "0"), "at least one byte"),
        (("convert", src, "-o", tmp_path / "o4", "--no-such-option"), "No such option"),
        (("dequantize", q, "-o", q), "is the source folder"),
        (("eval", q, "--ppl", tmp_path / "file", "--seqlen", 0), "'--seqlen': 0 is not in the range"),
        (("eval", q, "--tasks", tmp_path / "file", "--limit", 0), "'--limit': 0 is not in the range"),
        (("run", q, "-p", "x", "-n", 0), "'--max-new-tokens'"),
    ]
    for args, says in cases:
        r = run(*args)
        assert "Traceback" not in r.output, (args, r.output)
        assert not (r.exception and not isinstance(r.exception, SystemExit)), (args, r.exception)
        one_line_error(r, says)
    r = run("--debug", "inspect", tmp_path / "missing")  # --debug: the exception, with traceback
    assert r.exit_code != 0 and type(r.exception).__name__ == "KbitFormatError"


def test_permission_error_is_one_line(tiny_models, tmp_path):
    import os

    import pytest

    if os.geteuid() == 0:  # root reads anything: make the error another way
        pytest.skip("running as root")
    q = tmp_path / "q"
    assert run("convert", tiny_models["llama"], "-o", q).exit_code == 0
    (q / "model.safetensors").chmod(0)
    one_line_error(run("inspect", q), "permission denied")


def test_drop_unused_in_summary(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from conftest import make_tiny_model

    src = make_tiny_model("llama", tmp_path / "src")
    sd = load_file(src / "model.safetensors")
    sd["model.extra.weight"] = torch.ones(3)
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    one_line_error(run("convert", src, "-o", tmp_path / "o"), "model.extra.weight")
    r = run("convert", src, "-o", tmp_path / "o", "--drop-unused")
    assert r.exit_code == 0 and "--drop-unused" in r.stdout and "model.extra.weight" in r.stdout


def test_non_utf8_inputs_are_one_line(tiny_llama_with_tokenizer, tmp_path):
    q = tmp_path / "q"
    assert run("convert", tiny_llama_with_tokenizer, "-o", q).exit_code == 0
    bad = tmp_path / "tasks.jsonl"
    bad.write_bytes(b'{"query": "caf\xe9", "choices": ["a", "b"], "gold": 0}\n')
    r = run("eval", q, "--tasks", bad, "--limit", 1)
    assert "Traceback" not in r.output
    one_line_error(r, "not valid utf-8 text")
