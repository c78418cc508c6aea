"""The fused CPU kernels prebuilt per instruction set (issue 29): the build step writes every
variant with its manifest, each CPU runs its best variant, KBIT_CPU_ISA is checked, a prebuilt
library loads with no compiler at all (CXX=/bin/false, torch's builder patched to raise), and a
stale or broken prebuilt set is never loaded (the build on first use takes over, or one line)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kbitrt.errors import RunError
from kbitrt.runtime.kernels import cpu, cpu_build

ROOT = Path(__file__).parents[1]
X86 = cpu_build.VARIANTS["x86_64"]
# a fresh process that cannot compile: torch's extension builder raises if it is called
PROBE = """
from torch.utils import cpp_extension
def no_compiler(*a, **k):
    raise RuntimeError("the compiler was called")
cpp_extension.load = no_compiler
import torch
from kbitrt.format.packing import pack
from kbitrt.runtime.kernels import cpu
from kbitrt.runtime.kernels.reference import dequantize_packed
print("LOADED", cpu.available(), cpu.loaded_variant(), flush=True)
if cpu.available():
    torch.manual_seed(0)
    bits, block, k = 5, 64, 200
    q = pack(torch.randint(0, 2 ** bits, (9, k), dtype=torch.uint8), bits)
    a, c = torch.rand(9, 4).half(), torch.randn(2 ** bits)
    same = torch.equal(torch.ops.kbitrt_cpu.kbit_dequantize(q, a, c, bits, block, k),
                       dequantize_packed(q, a, c, bits, block, k))
    print("TWIN", same)
    # the default activations (auto: int8 at 5 bits; KBIT_CPU_ACTIVATIONS unset) reach a
    # prebuilt library too
    x, c5 = torch.randn(1, 256), torch.randn(32)
    q5, a5 = pack(torch.randint(0, 32, (8, 256), dtype=torch.uint8), 5), torch.rand(8, 4)
    print("INT8", torch.equal(cpu.kbit_linear(x, q5, a5, c5, None, 5, 64, 256),
                              torch.ops.kbitrt_cpu.kbit_linear_int8(x, q5, a5, c5, None, 5, 64, 256)))
"""


def _probe(tmp_path: Path, prebuilt: Path, **extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("KBIT_CPU_ISA", "KBIT_CPU_ACTIVATIONS")}
    env.update(KBIT_PREBUILT_DIR=str(prebuilt), KBIT_CACHE=str(tmp_path / "cache"), CXX="/bin/false",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra)
    return subprocess.run([sys.executable, "-c", PROBE], env=env, text=True, capture_output=True,
                          timeout=300)


def _manifest(folder: Path, **over) -> None:
    m = {"source": cpu_build.source_hash((cpu.SOURCE, *cpu.HEADERS)), "torch": torch.__version__,
         "machine": cpu_build.machine(), "variants": {}}
    m.update(over)
    (folder / cpu_build.MANIFEST).write_text(json.dumps(m))


@pytest.fixture(scope="module")
def real_library(tmp_path_factory) -> Path:
    """A library of the current sources for this CPU: the package's prebuilt one where it
    matches, else the one conftest built on first use (copied; no compile here)."""
    if not cpu.available():
        pytest.skip("the CPU kernels do not build here")
    lib, _, _ = cpu_build.prebuilt_library((cpu.SOURCE, *cpu.HEADERS), "auto", torch.__version__)
    if lib is None:
        lib = cpu._cache_dir() / cpu.build_name() / f"{cpu.build_name()}.so"  # noqa: SLF001
    if not lib.is_file():
        pytest.skip(f"no built library at {lib}")
    copy = tmp_path_factory.mktemp("lib") / cpu_build.LIBRARY
    shutil.copy(lib, copy)
    return copy


def _prebuilt_set(tmp_path: Path, library: Path, **manifest) -> Path:
    folder = tmp_path / "prebuilt"
    best = cpu_build.runnable()[0]
    (folder / best).mkdir(parents=True)
    shutil.copy(library, folder / best / cpu_build.LIBRARY)
    _manifest(folder, variants={best: []}, **manifest)
    return folder


@pytest.mark.parametrize("flags,best", [
    (X86["avx512_vnni"].needs | {"sse4_2"}, "avx512_vnni"),
    (X86["avx512"].needs, "avx512"),
    (X86["avx2"].needs, "avx2"),
    (X86["avx2"].needs - {"f16c"}, "portable"),  # AVX2 without F16C: not the AVX2 build
    (frozenset(), "portable"),
])
def test_each_cpu_runs_its_best_variant(monkeypatch, flags, best):
    monkeypatch.setattr(cpu_build, "machine", lambda: "x86_64")
    assert cpu_build.runnable(frozenset(flags))[0] == best
    assert cpu_build.runnable(frozenset(flags))[-1] == "portable"


def test_kbit_cpu_isa_is_checked(monkeypatch):
    monkeypatch.setattr(cpu_build, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_build, "cpu_flags", lambda: X86["avx2"].needs)
    for isa in ("auto", "native", "avx2", "portable", " AVX2 "):
        monkeypatch.setenv("KBIT_CPU_ISA", isa)
        assert cpu_build.requested_isa() == isa.strip().lower()
    monkeypatch.setenv("KBIT_CPU_ISA", "sse9")
    with pytest.raises(RunError, match="not one of auto, native, avx512_vnni") as e:
        cpu_build.requested_isa()
    assert "\n" not in str(e.value)
    monkeypatch.setenv("KBIT_CPU_ISA", "avx512")
    with pytest.raises(RunError, match="this CPU lacks avx512bw avx512cd avx512dq avx512f "
                                       "avx512vl; it runs avx2, portable"):
        cpu_build.requested_isa()


def _fake_compiler(tmp_path: Path, monkeypatch, writes: str) -> Path:
    """A stand-in CXX that writes `writes` (shell words: '"$@"' for its arguments) into its -o
    file, on an x86_64 machine."""
    fake = tmp_path / "fake-cxx"
    fake.write_text('#!/bin/sh\nout=""; prev=""\nfor a in "$@"; do [ "$prev" = "-o" ] && out="$a";'
                    f' prev="$a"; done\necho {writes} > "$out"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setattr(cpu_build, "machine", lambda: "x86_64")
    return fake


def test_the_build_step_writes_every_variant_and_a_manifest(tmp_path, monkeypatch):
    """With a stand-in compiler that records its flags: each variant's own -march flags, the
    runtime's op namespace, one folder per variant, and a manifest of the sources' hash."""
    _fake_compiler(tmp_path, monkeypatch, '"$@"')
    out = tmp_path / "out"
    (out / "stale").mkdir(parents=True)  # an older set goes whole
    m = cpu_build.build_all(out, cpu.SOURCE, cpu.HEADERS, jobs=2)
    assert sorted(p.name for p in out.iterdir()) == sorted([*X86, cpu_build.MANIFEST])
    assert m.pop("reused") == [] and m == json.loads((out / cpu_build.MANIFEST).read_text())
    assert m["source"] == cpu_build.source_hash((cpu.SOURCE, *cpu.HEADERS))
    assert m["torch"] == torch.__version__ and list(m["variants"]) == list(X86)
    for name, v in X86.items():
        args = (out / name / cpu_build.LIBRARY).read_text().split()
        assert all(f in args for f in v.cflags) and "-DKBIT_NS=kbitrt_cpu" in args
        assert str(cpu.SOURCE) in args and "-shared" in args
    monkeypatch.setenv("CXX", "/bin/false")  # a failing build leaves the previous set in place
    with pytest.raises(RuntimeError, match="avx2"):
        cpu_build.build_all(out, cpu.SOURCE, cpu.HEADERS, ["avx2"])
    assert (out / cpu_build.MANIFEST).read_text() == json.dumps(m, indent=2) + "\n"


def test_a_variant_built_the_same_way_is_copied_not_compiled(tmp_path, monkeypatch):
    """setup.sh run twice, or `pip wheel .` after it (setup.py passes the checkout's _prebuilt/
    as --reuse): same sources, torch, flags and compiler are copied; any difference compiles."""
    fake = _fake_compiler(tmp_path, monkeypatch, "built")
    first = tmp_path / "first"
    assert cpu_build.build_all(first, cpu.SOURCE, cpu.HEADERS, ["avx2", "portable"])["reused"] == []
    fake.write_text("#!/bin/sh\nexit 1\n")  # the same compiler, now unable to compile anything
    m = cpu_build.build_all(first, cpu.SOURCE, cpu.HEADERS, ["avx2", "portable"])
    assert m["reused"] == ["avx2", "portable"]
    wheel = tmp_path / "wheel"
    m = cpu_build.build_all(wheel, cpu.SOURCE, cpu.HEADERS, ["avx2"], reuse=[first])
    assert m["reused"] == ["avx2"] and (wheel / "avx2" / cpu_build.LIBRARY).read_text() == "built\n"
    assert "reused" not in json.loads((wheel / cpu_build.MANIFEST).read_text())
    other_sources = (cpu.HEADERS[0],)  # another key: compiled, and this compiler fails
    with pytest.raises(RuntimeError, match="avx2"):
        cpu_build.build_all(tmp_path / "x", cpu.SOURCE, other_sources, ["avx2"], reuse=[first])
    monkeypatch.setitem(X86, "avx2", X86["avx2"]._replace(cflags=("-march=znver3",)))
    with pytest.raises(RuntimeError, match="avx2"):  # other flags
        cpu_build.build_all(tmp_path / "y", cpu.SOURCE, cpu.HEADERS, ["avx2"], reuse=[first])
    monkeypatch.setenv("CXX", "/bin/true")  # another compiler
    assert cpu_build.build_all(tmp_path / "z", cpu.SOURCE, cpu.HEADERS, ["portable"],
                               reuse=[first])["reused"] == []


def test_a_prebuilt_library_loads_without_a_compiler(tmp_path, real_library):
    folder = _prebuilt_set(tmp_path, real_library)
    r = _probe(tmp_path, folder)
    assert f"LOADED True prebuilt {cpu_build.runnable()[0]}" in r.stdout, r.stderr
    assert "TWIN True" in r.stdout and "INT8 True" in r.stdout
    assert not (tmp_path / "cache").exists() and r.stderr == ""  # nothing built, nothing said


def test_only_a_matching_prebuilt_set_is_chosen(tmp_path, monkeypatch):
    """Another torch, other sources, a missing library or none at all: no prebuilt library;
    KBIT_CPU_ISA=<variant> takes that variant's."""
    monkeypatch.setenv("KBIT_PREBUILT_DIR", str(tmp_path))
    sources, best, last = (cpu.SOURCE, *cpu.HEADERS), cpu_build.runnable()[0], cpu_build.runnable()[-1]

    def choose(isa="auto"):
        return cpu_build.prebuilt_library(sources, isa, torch.__version__)

    assert choose()[0] is None and "no prebuilt kernels in" in choose()[2]
    for name in {best, last}:
        (tmp_path / name).mkdir()
        (tmp_path / name / cpu_build.LIBRARY).write_bytes(b"")
    _manifest(tmp_path, variants={best: [], last: []})
    assert choose() == (tmp_path / best / cpu_build.LIBRARY, best, "")
    assert choose(last) == (tmp_path / last / cpu_build.LIBRARY, last, "")
    _manifest(tmp_path, variants={last: []})  # the best one not built: the next this CPU runs
    assert choose()[1] == last
    _manifest(tmp_path, source="0" * 16, variants={best: []})
    assert choose()[0] is None and "of other sources" in choose()[2]
    _manifest(tmp_path, torch="0.0.1", variants={best: []})
    assert choose()[0] is None and "for torch 0.0.1" in choose()[2]


def test_a_prebuilt_library_that_does_not_load_is_not_used(tmp_path, real_library):
    """The build on first use takes over; where it cannot compile either, one line says both."""
    folder = _prebuilt_set(tmp_path, real_library)
    (folder / cpu_build.runnable()[0] / cpu_build.LIBRARY).write_bytes(b"not a library")
    r = _probe(tmp_path, folder)
    assert "LOADED False None" in r.stdout, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "do not load" in last and "the compiler was called" in last, last
    assert "16-bit dense copies" in last
