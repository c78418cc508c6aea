"""Issue 28: no temp folder outlives its command (error, signal, exit), and the tracebacks it
listed are one line each (GPTQ without a tokenizer, a --device-map nested 200k deep, -o a symlink
loop, `kbit run -t nan`); flags any-precision cannot honour are refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, run_cli
from kbitrt.errors import KbitError
from kbitrt.format.config import QuantConfig


@pytest.fixture
def tmpdir_only(tmp_path, monkeypatch) -> Path:
    """The process's temp dir, emptied: what a command leaves there is visible."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def test_gptq_results_are_removed_when_gptq_fails(tiny_models, tmpdir_only):
    from kbitrt.convert.calibrate import gptq_quantize_model

    with pytest.raises(KbitError, match="calibration tokens"):
        gptq_quantize_model(tiny_models["llama"], QuantConfig(method="gptq"),
                            torch.zeros(0, dtype=torch.long))
    assert list(tmpdir_only.iterdir()) == []


def test_gptq_on_a_source_without_tokenizer_is_one_line(tiny_models, tmp_path, tmpdir_only):
    calib = tmp_path / "calib.txt"
    calib.write_text("some calibration text " * 50)
    r = run_cli("convert", tiny_models["llama"], "-o", tmp_path / "out", "--method", "gptq",
                "--calib", calib, "--calib-samples", "2", "--calib-seqlen", "8")
    assert_one_line_error(r, "no usable tokenizer")
    assert list(tmpdir_only.iterdir()) == [] and not (tmp_path / "out").exists()


SIGNALLED = """
import sys, time
from kbitrt.convert.staging import temp_folder
from kbitrt.convert.calibrate import GPTQResults
a = temp_folder("kbit-offload-")
(a / "w.safetensors").write_bytes(b"x" * 1000)
b = GPTQResults()
print(a, b.folder, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT", "exit"])
def test_temp_folders_are_removed_on_signal_and_exit(tmp_path, sig):
    env = dict(os.environ, TMPDIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    code = SIGNALLED.replace("time.sleep(120)", "sys.exit(0)") if sig == "exit" else SIGNALLED
    p = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        folders = [Path(x) for x in p.stdout.readline().split()]
        assert len(folders) == 2 and all(f.is_dir() for f in folders) or sig == "exit"
        if sig != "exit":
            p.send_signal(getattr(signal, sig))
        p.wait(timeout=60)
    finally:
        p.kill()
    if sig in ("SIGTERM", "SIGHUP"):  # the signal's own exit status is kept
        assert p.returncode == -getattr(signal, sig)
    assert list(tmp_path.iterdir()) == []


def test_device_map_nested_deep_is_one_line(tmp_path):
    from kbitrt.runtime.placement import read_device_map

    f = tmp_path / "map.json"
    f.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(KbitError, match="not JSON") as e:
        read_device_map(str(f))
    assert "\n" not in str(e.value)


def test_output_symlink_loop_is_one_line(tiny_models, tmp_path):
    loop = tmp_path / "loop"
    os.symlink(tmp_path / "other", loop)
    os.symlink(loop, tmp_path / "other")
    assert_one_line_error(run_cli("convert", tiny_models["llama"], "-o", loop), "cannot resolve")
    assert_one_line_error(run_cli("dequantize", tiny_models["llama"], "-o", loop / "x"),
                          "cannot resolve")


@pytest.mark.parametrize("flag", [("-t", "nan"), ("-t", "inf"), ("--top-p", "nan"),
                                  ("--repetition-penalty", "nan")])
def test_run_refuses_non_finite_sampling(tmp_path, flag):
    assert_one_line_error(run_cli("run", tmp_path, "-p", "hi", *flag), "must be a finite number")


@pytest.mark.parametrize("extra, says", [(("--scales", "mse"), "drop --scales mse"),
                                         (("--dtype", "lloyd"), "not lloyd")])
def test_any_precision_refuses_flags_it_cannot_honour(tiny_models, tmp_path, extra, says):
    r = run_cli("convert", tiny_models["llama"], "-o", tmp_path / "o", "--any-precision", "3-5", *extra)
    assert r.exit_code == 2 and says in r.stderr and not (tmp_path / "o").exists()
