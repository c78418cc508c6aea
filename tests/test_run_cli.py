"""`kbit run` through click's CliRunner on a tiny converted model (SmolLM2's tokenizer)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from kbitrt.cli.main import cli
from kbitrt.format.config import QuantConfig


@pytest.fixture(scope="module")
def folders(smollm2_dir, tmp_path_factory):
    """(plain HF folder, kbit folder) of a tiny Llama with 32 positions."""
    from kbitrt.convert.converter import convert

    from conftest import make_tiny_llama

    root = tmp_path_factory.mktemp("run")
    make_tiny_llama(root / "hf", smollm2_dir, max_positions=32, bos_token_id=1)
    convert(root / "hf", root / "kbit", QuantConfig(bits=4, block_size=64, dtype="nf"))
    return root / "hf", root / "kbit"


def run(*args, input=None):
    return CliRunner().invoke(cli, ["run", *map(str, args)], input=input)


def one_error_line(result, *needles):
    assert result.exit_code != 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_prompt(folders):
    r = run(folders[1], "-p", "The capital of France is", "--max-new-tokens", 5)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("The capital of France is")
    assert "generation" in r.stderr and "tok/s" in r.stderr


def test_batch_json(folders):
    r = run(folders[1], "-p", "a", "-p", "b", "-p", "c", "--greedy", "-n", 4, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [x["prompt"] for x in doc["results"]] == ["a", "b", "c"]
    assert doc["backend"] == "native" and doc["stats"]["batch"] == 3
    assert doc["stats"]["device"].startswith("cpu")


def test_stdin_sampling(folders):
    args = (folders[1], "--temperature", 0.8, "--top-p", 0.95, "--seed", 0, "-n", 6, "--json")
    a, b = run(*args, input="Once upon a time\n"), run(*args, input="Once upon a time\n")
    assert a.exit_code == 0, a.output
    assert json.loads(a.stdout)["results"] == json.loads(b.stdout)["results"]
    assert json.loads(a.stdout)["results"][0]["prompt"] == "Once upon a time"


def test_transformers_backend_same_greedy_text(folders):
    base = (folders[1], "-p", "Hello there", "-n", 6, "--json")
    native = json.loads(run(*base).stdout)
    r = run(*base, "--backend", "transformers")
    assert r.exit_code == 0, r.output
    hf = json.loads(r.stdout)
    assert hf["backend"] == "transformers"
    assert hf["results"][0]["text"] == native["results"][0]["text"]


def test_chat_one_turn_and_interactive(folders):
    r = run(folders[1], "--chat", "-p", "Hi", "-n", 3)
    assert r.exit_code == 0, r.output
    r = run(folders[1], "--chat", "-n", 3, input="Hello\n/reset\nAgain\n\n")
    assert r.exit_code == 0, r.output
    assert "generation" in r.stderr


def test_not_a_kbit_model(folders):
    one_error_line(run(folders[0], "-p", "x"), "not a kbit model")


def test_not_a_folder(tmp_path):
    one_error_line(run(tmp_path / "nowhere", "-p", "x"))


def test_unknown_format_version(folders, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(folders[1], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (bad / "config.json").write_text(json.dumps(cfg))
    one_error_line(run(bad, "-p", "x"), "format_version", "99")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu(folders):
    one_error_line(run(folders[1], "-p", "x", "--device", "cuda"), "no CUDA GPU")


def test_prompt_too_long(folders):
    one_error_line(run(folders[1], "-p", "word " * 40), "at most 32 positions")


def test_no_prompt(folders):
    one_error_line(run(folders[1], input=""), "no prompt")
