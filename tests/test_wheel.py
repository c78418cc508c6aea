"""A clean install: the wheel holds the package and its data (not the tests or golden files),
declares the `kbit` console script and the optional extras, and works installed on its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = {"plot", "eval", "ray", "bench", "all"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel offline (no isolation: the running environment's setuptools) from a copy of
    the tracked files, so the build leaves nothing in the checkout."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    # as in a checkout after scripts/setup.sh: its prebuilt kernels, where they match, are copied
    # into the wheel instead of compiled again (test_prebuilt_kernels.py compiles them)
    built = ROOT / "kbitrt" / "runtime" / "kernels" / "_prebuilt"
    if built.is_dir():
        shutil.copytree(built, src / built.relative_to(ROOT))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "--no-index", "-q", "-w", str(tmp / "dist"), str(src)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (whl,) = (tmp / "dist").glob("kbitrt-*.whl")
    return whl


def _metadata(zf: zipfile.ZipFile, name: str) -> str:
    (path,) = [n for n in zf.namelist() if n.endswith(f".dist-info/{name}")]
    return zf.read(path).decode()


def test_wheel_contents(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = _metadata(zf, "METADATA")
        entry_points = _metadata(zf, "entry_points.txt")
    for f in ("kbitrt/__init__.py", "kbitrt/cli/main.py", "kbitrt/runtime/linear.py",
              "kbitrt/runtime/kernels/cpu_kernels.cpp", "kbitrt/runtime/kernels/cpu_simd.h",
              "kbitrt/runtime/kernels/cpu_layers.h", "kbitrt/runtime/kernels/cpu_rows.h",
              "kbitrt/runtime/kernels/cpu_step.h",
              "kbitrt/runtime/kernels/cpu_pair4.h", "kbitrt/runtime/kernels/cpu_schema.h",
              "kbitrt/eval/data/README.md", "kbitrt/eval/data/wiki_en_dev.txt",
              "kbitrt/eval/data/mc/social_iqa_dev.jsonl",
              "kbitrt/eval/data/mc/cause_and_effect_dev.jsonl",
              "kbitrt/eval/data/mc/general_knowledge_dev.jsonl"):
        assert f in names, f
    if (ROOT / "kbitrt" / "runtime" / "kernels" / "_prebuilt" / "manifest.json").is_file():
        assert "kbitrt/runtime/kernels/_prebuilt/manifest.json" in names  # setup.sh ran: built
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"kbitrt"}, top  # nothing generic at the top of site-packages
    assert not [n for n in names if "golden" in n or n.startswith(("tests/", "benchmarks/"))
                or "/tests/" in n]
    assert "kbit = kbitrt.cli.main:cli" in entry_points
    extras = {line.split(":", 1)[1].strip() for line in meta.splitlines()
              if line.startswith("Provides-Extra:")}
    assert EXTRAS <= extras, extras
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines()
                if line.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    core_names = {r.split(">")[0].split("<")[0].split("=")[0].split(";")[0].strip() for r in core}
    assert core_names == {"torch", "safetensors", "huggingface-hub", "transformers", "numpy",
                          "click", "rich", "ninja"}, core_names
    for optional in ("lm-eval", "ray", "llama-cpp-python", "matplotlib"):
        assert any(r.startswith(optional) and "extra ==" in r for r in requires), optional


@pytest.mark.slow
def test_installed_wheel_runs(wheel, tmp_path):
    """Installed (not editable) into a fresh venv, with the dependencies taken from the running
    environment: `kbit` works and finds the shipped samples inside its own install."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    # dependencies from the running environment, appended after the venv's own site-packages
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (site / "deps.pth").write_text("\n".join(deps) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    py = venv / "bin" / "python"
    out = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                          "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    probe = ("import kbitrt, sys; from kbitrt.eval.data import sample_path; "
             "p = sample_path('social_iqa-sample'); assert p.is_file(), p; "
             "from kbitrt.runtime.kernels import cpu; assert cpu.SOURCE.is_file(); "
             "assert all(h.is_file() for h in cpu.HEADERS); "
             "assert cpu.available(), cpu.unavailable_reason(); print(kbitrt.__file__); "
             "print(cpu.loaded_variant())")
    out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith(str(site)), out.stdout  # the installed copy, not the repo
    with zipfile.ZipFile(wheel) as zf:  # kernels in the wheel: loaded, not compiled
        if "kbitrt/runtime/kernels/_prebuilt/manifest.json" in zf.namelist():
            assert out.stdout.split()[-1] != "native" and "prebuilt" in out.stdout, out.stdout
    kbit = venv / "bin" / "kbit"
    assert kbit.exists()
    for args in (["--help"], ["eval", "--help"], ["run", "--help"], ["bench", "--help"]):
        out = subprocess.run([str(kbit), *args], capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=120)
        assert out.returncode == 0, (args, out.stderr[-2000:])
    assert "wiki-sample" in subprocess.run([str(kbit), "eval", "--help"], capture_output=True,
                                           text=True, env=env, cwd=tmp_path).stdout
