"""One writer per convert output (issue 28): a second convert to the same -o is refused with one
line while the first runs, a folder that appeared meanwhile is never replaced without --force, and
a staging folder left by a killed writer is removed by the next convert to that target."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kbitrt.convert.converter import convert
from kbitrt.convert.staging import output_lock, staged_folder
from kbitrt.format.config import KbitFormatError, QuantConfig
from kbitrt.format.reader import KbitModel

# a convert that pauses inside the staged folder until told to go on (a line on stdin)
PAUSED_CONVERT = """
import sys
from kbitrt.convert import converter
from kbitrt.format.config import QuantConfig
orig = converter.Converter.write
def paused(self, *a, **k):
    print("writing", flush=True)
    sys.stdin.readline()
    return orig(self, *a, **k)
converter.Converter.write = paused
try:
    converter.convert(sys.argv[1], sys.argv[2], QuantConfig(bits=int(sys.argv[3])))
except Exception as e:
    print("ERROR", type(e).__name__, e, flush=True)
    sys.exit(2)
print("DONE", flush=True)
"""


def _start(src: Path, out: Path, bits: int = 4) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    p = subprocess.Popen([sys.executable, "-c", PAUSED_CONVERT, str(src), str(out), str(bits)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=env, text=True)
    assert p.stdout.readline().strip() == "writing", p.stderr.read()
    return p


def test_second_writer_is_refused_while_the_first_runs(tiny_models, tmp_path):
    out = tmp_path / "out"
    first = _start(tiny_models["llama"], out, bits=4)
    try:
        with pytest.raises(KbitFormatError, match=rf"another kbit process \(pid {first.pid}\) is writing"):
            convert(tiny_models["llama"], out, QuantConfig(bits=3))
        first.stdin.write("go\n")
        first.stdin.flush()
        assert first.stdout.readline().strip() == "DONE"
        first.wait(timeout=60)
    finally:
        first.kill()
    assert KbitModel.open(out).quant.bits == 4  # the first result, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock, no partial left
    with pytest.raises(KbitFormatError, match="already exists"):  # after it: the usual refusal
        convert(tiny_models["llama"], out, QuantConfig(bits=3))


def test_a_folder_that_appeared_meanwhile_is_not_replaced(tiny_models, tmp_path):
    out = tmp_path / "out"
    first = _start(tiny_models["llama"], out)
    try:
        out.mkdir()
        (out / "mine.txt").write_text("someone else's")
        first.stdin.write("go\n")
        first.stdin.flush()
        line = first.stdout.readline()
        first.wait(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 2 and "appeared while this run was writing it" in line
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # with --force the run replaces it
    convert(tiny_models["llama"], out, QuantConfig(), force=True)
    assert not (out / "mine.txt").exists()


def test_staged_folder_refuses_a_folder_created_before_the_rename(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(KbitFormatError, match="appeared while"):
        with staged_folder(out) as tmp:
            (tmp / "x").write_text("new")
            out.mkdir()
    assert list(out.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    with staged_folder(out, force=True) as tmp:
        (tmp / "x").write_text("new")
    assert (out / "x").read_text() == "new"


def test_a_killed_writer_leaves_nothing_the_next_convert_keeps(tiny_models, tmp_path, capfd):
    out = tmp_path / "out"
    first = _start(tiny_models["llama"], out)
    first.send_signal(signal.SIGKILL)  # no cleanup runs
    first.wait(timeout=60)
    left = [p.name for p in tmp_path.iterdir()]
    assert any("kbit-partial" in n for n in left), left
    convert(tiny_models["llama"], out, QuantConfig())  # the lock died with its process
    assert "left by an earlier run that did not finish" in capfd.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_lock_is_exclusive_and_released(tmp_path):
    out = tmp_path / "o"
    with output_lock(out) as lock:
        assert lock.read_text().strip() == str(os.getpid())
        with pytest.raises(KbitFormatError, match="is writing"):
            with output_lock(out):
                pass
    assert not lock.exists()
    with output_lock(out):
        pass


def test_plain_tensor_shapes_are_checked_against_the_config(tmp_path):
    """Issue 28: a norm of the wrong size used to convert (the reader refused it only later)."""
    import json
    import struct

    import torch
    from safetensors.torch import load_file, save_file

    from conftest import make_tiny_model

    src = make_tiny_model("llama", tmp_path / "src")
    sd = load_file(src / "model.safetensors")
    hidden = sd["model.norm.weight"].shape[0]
    sd["model.norm.weight"] = torch.ones(hidden // 2)
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KbitFormatError, match=rf"model\.norm\.weight has shape \[{hidden // 2}\]"):
        convert(src, tmp_path / "out", QuantConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    # a header that claims more bytes than the file holds (2^28 floats) is refused too
    raw = (src / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    b, _ = header["model.norm.weight"]["data_offsets"]
    header["model.norm.weight"].update(shape=[2**28], data_offsets=[b, b + 4 * 2**28])
    blob = json.dumps(header).encode()
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    with pytest.raises(KbitFormatError, match="truncated|overlaps|tile"):
        convert(src, tmp_path / "out", QuantConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_shared_cache_is_filled_by_one_process_while_the_others_wait(tmp_path):
    """ensure_smollm2 and the tests' SmolLM2 conversion (pytest -n 2 on a fresh machine): a second
    process waits on waiting_lock, then finds the cache built, instead of writing it meanwhile."""
    import time

    from kbitrt.convert.staging import waiting_lock

    lock = tmp_path / ".cache.lock"
    code = ("from pathlib import Path\nfrom kbitrt.convert.staging import waiting_lock\n"
            f"with waiting_lock(Path({str(lock)!r})):\n    print('held', flush=True)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                                      os.environ.get("PYTHONPATH", "")]))
    with waiting_lock(lock):
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env=env)
        time.sleep(2)
        assert p.poll() is None  # waiting, not failed and not through
    assert p.communicate(timeout=120)[0] == "held\n" and p.returncode == 0
