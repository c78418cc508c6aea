"""kbit eval: perplexity protocols against transformers' loss, multiple-choice scoring against
lm-eval's conventions, batching, the JSON record, the CLI and its one-line errors."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from kbitrt.cli.main import cli
from kbitrt.eval import perplexity as ppl
from kbitrt.eval import zeroshot
from kbitrt.eval.model_open import open_model, wrap_hf
from kbitrt.eval.scoring import score
from kbitrt.errors import KbitFormatError

from kbitrt.eval.data import HERE as DATA  # the samples shipped in the package
MC = f"{DATA}/mc/cause_and_effect_dev.jsonl"


@pytest.fixture(scope="module")
def folders(tmp_path_factory, smollm2_dir):
    """A tiny random Llama with SmolLM2's tokenizer: plain HF folder and its nf4 conversion."""
    from kbitrt.convert.converter import convert
    from kbitrt.format.config import QuantConfig

    from conftest import make_tiny_llama

    root = tmp_path_factory.mktemp("evalmodels")
    make_tiny_llama(root / "hf", smollm2_dir, max_positions=128)
    convert(root / "hf", root / "k4", QuantConfig(bits=4, block_size=64))
    text = root / "wiki.txt"
    text.write_text(open(f"{DATA}/wiki_en_dev.txt", encoding="utf-8").read()[:4000])
    return {"hf": root / "hf", "k4": root / "k4", "text": text}


@pytest.fixture(scope="module")
def hf_lm(folders):
    return open_model(str(folders["hf"]), device="cpu")


def _hf_loss_ppl(hf, tokens, wins):
    """Reference: transformers' own loss with -100 labels, weighted by scored tokens."""
    nll = n = 0.0
    for b, e, s in wins:
        ids = torch.tensor([tokens[b:e]])
        labels = ids.clone()
        labels[:, :-s] = -100
        with torch.no_grad():
            loss = hf(input_ids=ids, labels=labels).loss.item()
        nll, n = nll + loss * s, n + s
    return math.exp(nll / n)


@pytest.mark.parametrize("protocol,stride", [("gptq", None), ("sliding", 24)])
def test_perplexity_equals_transformers_loss(folders, hf_lm, protocol, stride):
    label, text = ppl.load_text(str(folders["text"]))
    tokens = ppl.tokenize(hf_lm, text)[:300]
    got = ppl.perplexity(hf_lm, tokens, protocol, seqlen=64, stride=stride, batch_size=2)
    wins = ppl.windows(len(tokens), protocol, 64, stride)
    ref = _hf_loss_ppl(hf_lm.model.model, tokens, wins)
    assert got.perplexity == pytest.approx(ref, rel=1e-5)
    assert got.tokens == 300 and got.seqlen == 64 and got.protocol == protocol
    if protocol == "gptq":
        assert got.windows == 4 and got.scored_tokens == 4 * 63  # tail of 44 tokens dropped
    else:
        assert got.scored_tokens == 299  # every token but the first, exactly once


def test_sliding_windows_cover_each_token_once():
    for n, seqlen, stride in [(100, 32, 8), (64, 64, 64), (65, 16, 5), (10, 32, 8)]:
        wins = ppl.windows(n, "sliding", seqlen, stride)
        scored = [i for b, e, s in wins for i in range(e - s, e)]
        assert scored == list(range(1, n))
        assert all(e - b <= seqlen for b, e, _ in wins)


def test_kbit_matches_dequantized_transformers(folders):
    """The kbit model's perplexity is what transformers gives on its dequantized weights."""
    from kbitrt.format.reader import KbitModel

    lm = open_model(str(folders["k4"]), device="cpu", cpu_weights="fp32")  # exact: vs fp32
    hf = AutoModelForCausalLM.from_pretrained(folders["hf"], dtype=torch.float32)
    src = KbitModel.open(folders["k4"])
    sd = {f"{n}.weight": src.quantized(n).dequantize() for n in src.quantized_modules}
    hf.load_state_dict(sd, strict=False)
    ref = wrap_hf(hf, lm.tokenizer)
    tokens = ppl.tokenize(lm, ppl.load_text(str(folders["text"]))[1])[:200]
    a, b = (ppl.perplexity(m, tokens, "gptq", 64).perplexity for m in (lm, ref))
    assert a == pytest.approx(b, rel=1e-4)


def test_batched_scoring_equals_one_by_one(hf_lm):
    rows = zeroshot.read_jsonl(f"{DATA}/mc/social_iqa_dev.jsonl", limit=24)
    reqs = [zeroshot.encode_pair(hf_lm.tokenizer, r["query"], " " + c)
            for r in rows for c in r["choices"]]
    t0 = time.perf_counter()
    one = score(hf_lm, reqs, batch_size=1)
    t1 = time.perf_counter()
    many = score(hf_lm, reqs, batch_size=16)
    t2 = time.perf_counter()
    for (a, ga), (b, gb) in zip(one, many):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    # speed is measured by benchmarks/eval_throughput.py, not asserted here (timings flake)
    print(f"scoring {len(reqs)} requests: one at a time {t1 - t0:.2f}s, batched {t2 - t1:.2f}s")


def test_encode_pair_matches_lm_eval(hf_lm):
    from kbitrt.eval.lm_eval_model import KbitLM

    lm_eval_lm = KbitLM(lm=hf_lm, progress=False)
    for ctx, cont in [("The sky is", " blue"), ("Question: x? ", "Answer"), ("a", " b c")]:
        assert zeroshot.encode_pair(hf_lm.tokenizer, ctx, cont) == lm_eval_lm._encode_pair(ctx, cont)
    ctx, cont = zeroshot.encode_pair(hf_lm.tokenizer, "", " Snow fell.")
    assert ctx == [hf_lm.tokenizer.eos_token_id] and cont


def test_mc_metrics_and_stderr():
    rows = [{"choices": ["a", "bbbb"], "gold": 1}, {"choices": ["aa", "b"], "gold": 0},
            {"choices": ["a", "b", "c"], "gold": 2}]
    lls = [-1.0, -2.0, -3.0, -1.0, -5.0, -5.0, -4.0]
    m = zeroshot.mc_metrics(rows, lls)
    # acc: row0 picks 0 (wrong), row1 picks 1 (wrong), row2 picks 2 -> 1/3
    # acc_norm: row0 -1/1 vs -2/4 -> 1 (right); row1 -3/2 vs -1/1 -> 1 (wrong); row2 -> 2 (right)
    assert m["acc"] == pytest.approx(1 / 3) and m["acc_norm"] == pytest.approx(2 / 3)
    assert m["acc_stderr"] == pytest.approx(math.sqrt((1 / 3) * (2 / 3) / 2))


def test_native_and_lm_eval_paths_agree_tiny(folders):
    lm = open_model(str(folders["k4"]), device="cpu")
    native = zeroshot.eval_local(lm, MC, limit=12)
    via = zeroshot.eval_lm_eval(lm, [zeroshot.local_task_config(MC, "mc_check")], limit=12,
                                progress=False)["mc_check"]
    for k in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
        assert native[k] == pytest.approx(via[k])


def test_cli_eval_json_baseline_and_record(folders, tmp_path):
    out = tmp_path / "r.json"
    res = CliRunner().invoke(cli, ["eval", str(folders["k4"]), "--ppl", str(folders["text"]),
                                   "--seqlen", "64", "--tasks", MC, "--limit", "10",
                                   "--baseline", str(folders["hf"]), "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert json.loads(out.read_text())["perplexity"] == rec["perplexity"]
    p = rec["perplexity"]["wiki.txt"]
    assert p["protocol"] == "gptq" and p["seqlen"] == 64 and p["tokens"] > 64
    assert p["perplexity"] > 1000  # random weights
    t = rec["tasks"]["cause_and_effect_dev"]
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(t) and t["n"] == 10
    assert rec["model"]["quantization"]["bits"] == 4 and rec["versions"]["torch"]
    assert rec["baseline"]["model"]["quant_label"] == "float32"
    assert rec["delta"]["perplexity"]["wiki.txt"]["perplexity"] == pytest.approx(
        p["perplexity"] - rec["baseline"]["perplexity"]["wiki.txt"]["perplexity"])
    assert "device" in rec and "git_commit" in rec


def test_low_memory_eval_holds_packed_weights_and_scores_alike(folders, tmp_path):
    """`kbit eval --low-memory` keeps only the packed codes on the CPU (issue 13) and scores what
    16-bit copies score, up to the dequantized dtype's rounding."""
    recs = {}
    for flags in (["--cpu-weights", "fp16"], ["--low-memory"]):
        res = CliRunner().invoke(cli, ["eval", str(folders["k4"]), "--ppl", str(folders["text"]),
                                       "--seqlen", "64", "--max-tokens", "200", "--json",
                                       "-o", str(tmp_path / f"r{len(flags)}.json"), *flags])
        assert res.exit_code == 0, res.output
        recs[flags[0] == "--low-memory"] = json.loads(res.stdout)
    assert recs[False]["model"]["cpu_weights"] == "fp16" and recs[True]["model"]["cpu_weights"] == "packed"
    assert recs[False]["model"]["kv_cache"] == "auto" and recs[True]["model"]["kv_cache"] == "fp16"
    assert recs[True]["perplexity"]["wiki.txt"]["perplexity"] == pytest.approx(
        recs[False]["perplexity"]["wiki.txt"]["perplexity"], rel=2e-3)
    res = CliRunner().invoke(cli, ["eval", str(folders["k4"]), "--ppl", str(folders["text"]),
                                   "--low-memory", "--cpu-weights", "bf16"])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "contradict" in res.stderr


def test_default_record_in_model_folder(folders):
    res = CliRunner().invoke(cli, ["eval", str(folders["k4"]), "--ppl", str(folders["text"]),
                                   "--seqlen", "64", "--max-tokens", "130"])
    assert res.exit_code == 0, res.output
    assert list(folders["k4"].glob("eval-*.json"))


def test_interrupt_keeps_finished_results(folders, tmp_path, monkeypatch):
    from kbitrt.eval import runner

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(runner.zeroshot, "eval_local", boom)
    out = tmp_path / "r.json"
    opts = runner.EvalOptions(ppl=[str(folders["text"])], tasks=[MC], seqlen=64, progress=False)
    with pytest.raises(KeyboardInterrupt):
        runner.run_eval(str(folders["k4"]), opts, output=out)
    rec = json.loads(out.read_text())
    assert rec["interrupted"] and rec["perplexity"]["wiki.txt"]["perplexity"] > 0


@pytest.mark.parametrize("args,needle", [
    (["--tasks", "no_such_task_xyz"], "unknown task 'no_such_task_xyz'"),
    (["--ppl", "wikitext2"], "dataset 'wikitext2' needs the network"),
    (["--ppl", "EMPTY"], "is empty"),
    (["--ppl", "SHORT", "--seqlen", "128"], "too short for one window of --seqlen 128"),
    (["--tasks", "NOGOLD"], ":2: the row has no 'gold'"),
    (["--ppl", "./nope.txt"], "no such file"),
])
def test_cli_errors_are_one_line(folders, tmp_path, monkeypatch, args, needle):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("Just a few words.")
    (tmp_path / "nogold.jsonl").write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n'
                                           '{"query": "q", "choices": ["a", "b"]}\n')
    files = {"EMPTY": tmp_path / "empty.txt", "SHORT": tmp_path / "short.txt",
             "NOGOLD": tmp_path / "nogold.jsonl"}
    args = [str(files.get(a, a)) for a in args]
    res = CliRunner().invoke(cli, ["eval", str(folders["k4"]), *args])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.stderr


def test_read_jsonl_rejects_bad_gold(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"query": "q", "choices": ["a"], "gold": 3}\n')
    with pytest.raises(KbitFormatError, match="index into the 1 choices"):
        zeroshot.read_jsonl(p)


def test_eval_scores_the_exact_path_unless_a_mode_is_chosen(folders, tmp_path, monkeypatch):
    """kbit eval runs the CPU's exact fp32 activations by default (the weights' quantization
    alone, comparable with docs/fidelity.md), and what --cpu-activations asks for otherwise; the
    record says which. The context leaves no mode behind."""
    from kbitrt.runtime.kernels import cpu

    monkeypatch.delenv("KBIT_CPU_ACTIVATIONS", raising=False)
    cpu.reset_activations()
    recs = {}
    try:
        for flags in ([], ["--cpu-activations", "int8"]):
            res = CliRunner().invoke(cli, ["eval", str(folders["k4"]), "--ppl", str(folders["text"]),
                                           "--seqlen", "64", "--max-tokens", "200", "--json",
                                           "-o", str(tmp_path / f"r{len(flags)}.json"), *flags])
            assert res.exit_code == 0, res.output
            recs[bool(flags)] = json.loads(res.stdout)
            if not flags:
                assert cpu.activations() == cpu.DEFAULT_ACTIVATIONS  # restored after the eval
        cpu.reset_activations()  # forget the int8 the CLI set
        with cpu.exact_unless_chosen() as mode:  # nothing chosen: fp32 inside, the default after
            assert mode == "fp32" and cpu.activations() == "fp32"
        assert cpu.activations() == cpu.DEFAULT_ACTIVATIONS
    finally:  # the suite's mode (KBIT_CPU_ACTIVATIONS) back, in the kernels too
        monkeypatch.undo()
        cpu.reset_activations()
    assert recs[False]["model"]["cpu_activations"] == "fp32"
    assert recs[True]["model"]["cpu_activations"] == "int8"
    exact, int8 = (recs[k]["perplexity"]["wiki.txt"]["perplexity"] for k in (False, True))
    assert exact != int8 and int8 == pytest.approx(exact, rel=0.05)
