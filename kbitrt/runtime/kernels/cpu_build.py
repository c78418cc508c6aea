"""The fused CPU kernels' builds per instruction set: which variants exist, which one this CPU
runs, and the prebuilt libraries shipped in the package (docs/cpu.md, "Builds").

A variant is one compile of cpu_kernels.cpp with one set of -march flags (the table below). The
package build (setup.py) and scripts/setup.sh compile every variant of the machine's
architecture ahead of time into `_prebuilt/<variant>/kbitrt_cpu.so` with a `manifest.json` that
records the sources' hash and torch's version; at run time kernels/cpu.py loads the best variant
whose CPU flags this CPU has, without a compiler. A manifest that does not match (the sources
changed in a checkout, another torch) is never loaded: the kernels are then built on first use
(the JIT fallback).
The build step: `python -m kbitrt.runtime.kernels.build_prebuilt` (kernels/build_prebuilt.py).

KBIT_CPU_ISA picks the variant: `auto` (default: the best prebuilt one, else a build with
-march=native), `native` (always the build for this CPU), or a variant's name (forced: the
prebuilt one, else built; an error where this CPU lacks its instructions).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path
from typing import NamedTuple, Sequence

from kbitrt.errors import RunError

LIBRARY = "kbitrt_cpu.so"  # each variant's library; its ops register as torch.ops.kbitrt_cpu
MANIFEST = "manifest.json"
ISA_CHOICES = ("auto", "native")  # and the variants' names


class Variant(NamedTuple):
    cflags: tuple[str, ...]  # the compiler's -march flags
    needs: frozenset[str]  # the /proc/cpuinfo flags a CPU must have to run it


_X86_V3 = frozenset({"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm"})
_X86_V4 = _X86_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
# per architecture, best first: the first variant whose flags a CPU has is the one it runs
VARIANTS: dict[str, dict[str, Variant]] = {
    "x86_64": {
        # cpu_int8.h's 512-bit path needs VBMI (vpermb) and VNNI (vpdpbusd)
        "avx512_vnni": Variant(("-march=x86-64-v4", "-mavx512vnni", "-mavx512vbmi"),
                               _X86_V4 | {"avx512_vnni", "avx512vbmi"}),
        "avx512": Variant(("-march=x86-64-v4",), _X86_V4),
        "avx2": Variant(("-march=haswell",), _X86_V3),  # AVX2 + FMA + F16C (x86-64-v3)
        "portable": Variant(("-march=x86-64", "-mno-avx"), frozenset()),  # the fallback loops
    },
    # every aarch64 CPU has NEON (ARMv8-A); the kernels' NEON block is tested under qemu
    # (tests/test_neon_qemu.py): this build runs the portable loops
    "aarch64": {"portable": Variant(("-march=armv8-a",), frozenset())},
}


def machine() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def variants() -> dict[str, Variant]:
    """This architecture's variants, best first (none on an unknown one)."""
    return VARIANTS.get(machine(), {})


def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def runnable(flags: frozenset[str] | None = None) -> list[str]:
    """The variants this CPU runs, best first."""
    flags = cpu_flags() if flags is None else flags
    return [name for name, v in variants().items() if v.needs <= flags]


def requested_isa() -> str:
    """KBIT_CPU_ISA, checked: `auto`, `native` or a variant this CPU runs (RunError otherwise)."""
    isa = os.environ.get("KBIT_CPU_ISA", "auto").strip().lower() or "auto"
    known = (*ISA_CHOICES, *variants())
    if isa not in known:
        raise RunError(f"KBIT_CPU_ISA={isa!r} is not one of {', '.join(known)} on "
                       f"{machine()}")
    if isa not in ISA_CHOICES and isa not in runnable():
        missing = sorted(variants()[isa].needs - cpu_flags())
        raise RunError(f"KBIT_CPU_ISA={isa}: this CPU lacks {' '.join(missing)}; "
                       f"it runs {', '.join(runnable()) or 'none of the variants'}")
    return isa


def source_hash(sources: Sequence[Path]) -> str:
    """The kernels' sources as one key: a prebuilt library of other sources is never loaded."""
    return hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]


def prebuilt_dir() -> Path:
    """Where the prebuilt libraries are (KBIT_PREBUILT_DIR overrides it, for tests)."""
    return Path(os.environ.get("KBIT_PREBUILT_DIR") or Path(__file__).with_name("_prebuilt"))


def prebuilt_library(sources: Sequence[Path], isa: str, torch_version: str
                     ) -> tuple[Path | None, str, str]:
    """(library, variant, "") for the prebuilt variant to load, or (None, "", why not)."""
    folder = prebuilt_dir()
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None, "", f"no prebuilt kernels in {folder}"
    if manifest.get("source") != source_hash(sources):
        return None, "", "the prebuilt kernels are of other sources (rebuild: scripts/setup.sh)"
    if manifest.get("torch") != torch_version or manifest.get("machine") != machine():
        return None, "", (f"the prebuilt kernels are for torch {manifest.get('torch')} on "
                          f"{manifest.get('machine')}")
    built = manifest.get("variants", {})
    for name in ([isa] if isa in variants() else runnable()):
        lib = folder / name / LIBRARY
        if name in built and lib.is_file():
            return lib, name, ""
    return None, "", f"no prebuilt variant for this CPU ({isa}) in {folder}"


# ------------------------------------------------------------------------------ the build step

def compile_command(source: Path, out: Path, cflags: Sequence[str]) -> list[str]:
    """One compile-and-link of the kernels into `out`, with torch's include and library paths
    (the flags torch.utils.cpp_extension gives its own builds)."""
    import torch
    from torch.utils import cpp_extension

    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    std = "-std=c++20" if (major, minor) >= (2, 10) else "-std=c++17"
    inc = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    libs = cpp_extension.library_paths()
    return [compiler(), "-shared", "-fPIC", std, "-O3", *cflags, "-fopenmp",
            "-DKBIT_NS=kbitrt_cpu", "-DTORCH_EXTENSION_NAME=kbitrt_cpu",
            "-DTORCH_API_INCLUDE_EXTENSION_H", *(f"-isystem{d}" for d in inc), str(source),
            *(f"-L{d}" for d in libs), "-lc10", "-ltorch_cpu", "-ltorch", "-ltorch_python",
            "-o", str(out)]


def compiler() -> str:
    return os.environ.get("CXX", "c++")


def reusable_library(folder: Path, key: str, name: str) -> Path | None:
    """`folder`'s library of variant `name` where its manifest says it was compiled from the same
    sources (`key`), for this torch and machine, with the same flags and compiler: copied
    instead of compiled again (setup.sh run twice, `pip wheel .` after setup.sh)."""
    import torch

    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    same = (manifest.get("source") == key and manifest.get("torch") == torch.__version__
            and manifest.get("machine") == machine() and manifest.get("cxx") == compiler()
            and manifest.get("variants", {}).get(name) == list(variants()[name].cflags))
    lib = folder / name / LIBRARY
    return lib if same and lib.is_file() else None


def build_all(out: Path, source: Path, headers: Sequence[Path],
              names: Sequence[str] | None = None, jobs: int | None = None,
              reuse: Sequence[Path] = ()) -> dict:
    """Compile `source` (which includes `headers`) for the variants (default: every one of this
    architecture) into `out` with its manifest. The libraries are compiled, never loaded, so an
    x86 machine without AVX-512 builds the AVX-512 ones too. A variant already built the same
    way in `out` or a `reuse` folder is copied (the returned manifest's "reused" lists them)."""
    import torch

    table = variants()
    names = list(table) if names is None else list(names)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise RunError(f"unknown variants {unknown} on {machine()}: {', '.join(table)}")
    key = source_hash((source, *headers))  # before compiling: an edit meanwhile never matches
    tmp = Path(tempfile.mkdtemp(prefix="kbit-prebuilt-", dir=out.parent if out.parent.exists()
                                else None))
    tmp.chmod(0o755)  # readable by every user of an installed package
    try:
        def one(name: str) -> tuple[str, str, bool]:
            (tmp / name).mkdir()
            for folder in (out, *reuse):
                lib = reusable_library(folder, key, name)
                if lib is not None:
                    shutil.copy2(lib, tmp / name / LIBRARY)
                    return name, "", True
            cmd = compile_command(source, tmp / name / LIBRARY, table[name].cflags)
            p = subprocess.run(cmd, capture_output=True, text=True)
            error = "" if p.returncode == 0 else (p.stderr.strip().splitlines() or ["?"])[-1]
            return name, error, False

        with concurrent.futures.ThreadPoolExecutor(jobs or os.cpu_count() or 1) as pool:
            done = list(pool.map(one, names))
        errors = {n: e for n, e, _ in done if e}
        if errors:
            raise RuntimeError("; ".join(f"{n}: {e[:200]}" for n, e in errors.items()))
        manifest = {"source": key, "torch": torch.__version__, "machine": machine(),
                    "cxx": compiler(), "variants": {n: list(table[n].cflags) for n in names}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)  # the old set goes whole: no stale mix
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
        return {**manifest, "reused": [n for n, _, reused in done if reused]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
