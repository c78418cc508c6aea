"""The evaluation samples ship inside the package: short names resolve, nothing reads the sibling
shared data folder, and the README's main job runs from a fresh clone with nothing beside it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kbitrt.eval import perplexity as ppl
from kbitrt.eval import zeroshot
from kbitrt.eval.data import SAMPLES, resolve, sample_path
from kbitrt.eval.runner import EvalOptions

ROOT = Path(__file__).resolve().parents[1]
SHARED = "../" + "shared"  # spelled in two parts so this file does not match its own search


def test_every_sample_ships_with_its_attribution():
    for name, rel in SAMPLES.items():
        path = sample_path(name)
        assert path is not None and path.is_file() and path.stat().st_size > 1000, name
    readme = (sample_path("wiki-sample").parent / "README.md").read_text()
    for needle in ("BIG-bench", "CC BY-SA 3.0", "CC BY 4.0", "Apache-2.0", *SAMPLES):
        assert needle in readme


def test_short_names_and_paths_both_resolve(tmp_path):
    label, text = ppl.load_text("wiki-sample")
    assert label == "wiki_en_dev.txt" and len(text) > 1_000_000
    assert ppl.load_text(str(resolve("wiki-sample")))[1] == text  # by path, the same text
    rows = zeroshot.read_jsonl("social_iqa-sample", limit=5)
    assert len(rows) == 5 and all(len(r["choices"]) == 3 for r in rows)
    assert zeroshot.is_local("social_iqa-sample") and zeroshot.task_name("social_iqa-sample") \
        == "social_iqa_dev"
    assert not zeroshot.is_local("piqa")
    EvalOptions(ppl=["wiki-sample"], tasks=["cause_and_effect-sample"]).check()  # no error
    with pytest.raises(FileNotFoundError, match="wiki-sample"):  # the error lists the short names
        ppl.load_text(str(tmp_path / "nope.txt"))


def _tracked_files() -> list[Path]:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / f for f in out.stdout.split()]


def test_nothing_reads_the_sibling_shared_folder():
    """README commands, tests, CI and benchmarks use the shipped samples, never the sibling data folder."""
    offenders = []
    for f in _tracked_files():
        rel = f.relative_to(ROOT).as_posix()
        if not (rel in ("README.md", ".ci/run") or rel.startswith(("tests/", "benchmarks/",
                                                                  "scripts/"))):
            continue
        if f.suffix == ".json" or not f.is_file():
            continue  # recorded results may name where their data came from
        text = f.read_text(errors="replace")
        if SHARED + "/" in text or "/work/" + "shared" in text:
            offenders.append(rel)
    assert not offenders, offenders


def readme_main_job() -> str:
    """The first bash block of the README: the main job, one line of && commands."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return " ".join(line.rstrip("\\").strip() for line in block.strip().splitlines())


def test_readme_main_job_uses_short_names():
    job = readme_main_job()
    assert "--ppl wiki-sample" in job and "--tasks social_iqa-sample" in job
    assert SHARED not in job


@pytest.mark.slow
def test_readme_main_job_runs_from_a_fresh_clone(tmp_path):
    """git clone into an empty folder (no sibling data folder beside it) and run the README's main job there.

    The setup step (venv + pip) is replaced by this interpreter's environment with the clone first
    on the path: the test must not pip-install into the running venv, and it runs offline."""
    _tracked_files()
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    clone = tmp_path / "kbitrt"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    assert not (tmp_path / "shared").exists()
    steps = [s.strip() for s in readme_main_job().split("&&")]
    assert steps[:2] == ["bash scripts/setup.sh", ". .venv/bin/activate"], steps[:2]
    job = " && ".join(steps[2:])
    bindir = tmp_path / "bin"  # `kbit` and `python` for the job: this interpreter, the clone's code
    bindir.mkdir()
    for name, cmd in (("kbit", f'exec "{sys.executable}" -m kbitrt.cli "$@"'),
                      ("python", f'exec "{sys.executable}" "$@"')):
        (bindir / name).write_text(f"#!/bin/sh\n{cmd}\n")
        (bindir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHONPATH": str(clone),
           "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(["bash", "-c", f"set -eo pipefail; {job}"], cwd=clone, env=env,
                         capture_output=True, text=True, timeout=1800)  # convert + run + eval of two models
    assert out.returncode == 0, out.stderr[-3000:]
    assert (clone / "smol-4bit" / "config.json").exists()
    assert "Paris" in out.stdout  # kbit run's greedy answer
    assert "wiki_en_dev" in out.stderr and "social_iqa_dev" in out.stderr  # eval's table
    record = sorted((clone / "smol-4bit").glob("eval-*.json"))
    assert record, "kbit eval wrote no record"
