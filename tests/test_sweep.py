"""`kbit sweep` / `kbit plot`: grid checks, exact bits, resume, failures, summary and plots."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kbitrt.cli.main import cli
from kbitrt.convert.converter import convert
from kbitrt.errors import KbitFormatError
from kbitrt.sweep import runner
from kbitrt.sweep.grid import SCHEMA, parse_grid
from kbitrt.sweep.runner import SweepOptions, read_results, run_sweep
from kbitrt.sweep.summary import summarize

from kbitrt.eval.data import HERE as DATA  # the samples shipped in the package


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    p = tmp_path_factory.mktemp("sweeptext") / "wiki.txt"
    p.write_text(open(f"{DATA}/wiki_en_dev.txt", encoding="utf-8").read()[:3000])
    return str(p)


def opts(text):
    return SweepOptions(ppl=[text], tasks=[f"{DATA}/mc/cause_and_effect_dev.jsonl"], seqlen=64,
                        limit=12, batch_size=4)


def test_grid_is_checked_before_any_work():
    with pytest.raises(KbitFormatError, match="--dtype 'nf5'"):
        parse_grid(["m"], "4", "64", "nf5", "none")
    with pytest.raises(KbitFormatError, match="--bits 2"):
        parse_grid(["m"], "2,4", "64", "nf", "none")
    with pytest.raises(KbitFormatError, match="--block 100"):
        parse_grid(["m"], "4", "100", "nf", "none")
    with pytest.raises(KbitFormatError, match="--outliers"):
        parse_grid(["m"], "4", "64", "nf", "top")
    cells = parse_grid(["m"], "3,16", "32,64", "int,nf", "none,top:2%")
    assert len(cells) == 1 + 2 * 2 * 2 and sum(c.bits == 16 for c in cells) == 1


def test_sweep_bits_resume_summary_and_plot(tiny_llama_with_tokenizer, text, tmp_path, monkeypatch):
    model = str(tiny_llama_with_tokenizer)
    cells = parse_grid([model], "3,4,16", "32,64", "int,nf", "none,top:5%")
    results = tmp_path / "r.jsonl"
    # a crash in the 3rd cell loses that cell only
    calls = {"n": 0}
    original = runner._evaluate

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(runner, "_evaluate", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cells, opts(text), results)
    assert len(read_results(results)) == 2
    monkeypatch.setattr(runner, "_evaluate", original)
    report = run_sweep(cells, opts(text), results)
    assert report.skipped == 2 and report.done == len(cells) - 2
    rows = read_results(results)
    assert sorted(r["cell"] for r in rows) == sorted(c.key for c in cells)

    by = {r["label"]: r for r in rows}
    full = by["16-bit"]
    assert full["total_bits"] == 16 * full["params"]
    # total bits equal what the converter stores for the same settings, byte for byte
    conv = convert(model, tmp_path / "nf4", parse_grid([model], "4", "32", "nf", "none")[0].config())
    linear_bits = by["nf4-b32"]["total_bits"] - 16 * (full["params"] - conv.params_quantized)
    assert linear_bits == 8 * conv.bytes_quantized
    for r in rows:
        assert r["schema"] == SCHEMA and 0 <= r["mean_acc"] <= 1
        assert len(r["tasks"]["cause_and_effect_dev"]["correct"]) == 12
        assert r["ppl"]["wiki.txt"]["perplexity"] > 1
    assert by["int3-b32+top:5%"]["bits_per_param"] > by["int3-b32"]["bits_per_param"]

    s = summarize(rows)[model]
    assert [r["bits"] for r in s["best_per_precision"]] == [3, 4, 16]
    assert s["frontier"][0]["total_bits"] == min(r["total_bits"] for r in rows)
    assert len(s["block_size_at_4bit"]) == 2 * 2 and len(s["outliers_at_3bit"]) == 4 * 2  # nll + acc_norm each
    assert {c["metric"] for c in s["block_size_at_4bit"]} == {"nll", "acc_norm"}
    r = CliRunner().invoke(cli, ["sweep", "--summary", str(results)])
    assert r.exit_code == 0 and "frontier" in r.stdout and "within noise" in r.stdout
    r = CliRunner().invoke(cli, ["plot", str(results), "-o", str(tmp_path / "fig.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "fig.png").stat().st_size > 10_000 and (tmp_path / "fig.svg").exists()


def test_failing_model_is_reported_and_others_continue(tiny_llama_with_tokenizer, text, tmp_path):
    cells = parse_grid([str(tmp_path / "missing"), str(tiny_llama_with_tokenizer)], "16", "64", "nf", "none")
    report = run_sweep(cells, opts(text), tmp_path / "r.jsonl")
    assert report.done == 1 and list(report.failed_models) == [str(tmp_path / "missing")]


def test_results_from_another_schema_are_refused(tmp_path):
    p = tmp_path / "old.jsonl"
    p.write_text(json.dumps({"schema": "kbit-sweep/0", "cell": "x"}) + "\n")
    with pytest.raises(KbitFormatError, match="start a new results file"):
        read_results(p)
    r = CliRunner().invoke(cli, ["sweep", "--models", "x", "--bits", "4", "--block", "64",
                                 "--dtype", "nf", "--ppl", "t.txt", "-o", str(p)])
    assert r.exit_code == 2 and "kbit-sweep/0" in r.stderr
