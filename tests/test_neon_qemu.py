"""The NEON block of kernels/cpu_simd.h (aarch64) against the portable loops, bit for bit, under
emulation: tests/neon_parity.cpp cross-compiled with Debian's aarch64-linux-gnu-g++ and run by
qemu-aarch64 (scripts/setup.sh installs both where apt is available). Skips, saying which tool is
missing, elsewhere. Speed on ARM is not measured here (docs/cpu.md)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent
CXX, QEMU, SYSROOT = "aarch64-linux-gnu-g++", "qemu-aarch64", Path("/usr/aarch64-linux-gnu")


def _tools() -> str | None:
    missing = [t for t in (CXX, QEMU) if shutil.which(t) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (apt-get install g++-aarch64-linux-gnu qemu-user)"
    return None if SYSROOT.is_dir() else f"no aarch64 sysroot at {SYSROOT}"


@pytest.mark.skipif(_tools() is not None, reason=str(_tools()))
@pytest.mark.parametrize("march", ["armv8-a", "armv8.2-a+fp16"])
def test_neon_block_matches_the_portable_loops_under_qemu(tmp_path, march):
    exe = tmp_path / "neon_parity"
    build = subprocess.run([CXX, "-O2", "-std=c++17", f"-march={march}", "-Wall", "-Werror",
                            "-o", str(exe), str(HERE / "neon_parity.cpp")],
                           capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr[-2000:]
    run = subprocess.run([QEMU, "-L", str(SYSROOT), str(exe)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("OK "), run.stdout[-2000:] + run.stderr
    assert int(run.stdout.split()[1]) > 20000  # k = 3..8 decodes and dots, fp16 and bf16 loads


def test_the_parity_programs_reference_is_the_kernels_portable_dot():
    """neon_parity.cpp carries a copy of cpu_kernels.cpp's portable dot (it builds without torch):
    the copy must stay the kernels' own summation order, line for line."""
    def body(text: str, signature: str) -> list[str]:  # the last definition: the portable one
        start = text.rindex(signature)
        block = text[text.index("{", start) + 1:text.index("\n}\n", start)]
        return [ln.strip() for ln in block.splitlines() if ln.strip()]

    kernels = (HERE.parent / "kbitrt/runtime/kernels/cpu_kernels.cpp").read_text()
    parity = (HERE / "neon_parity.cpp").read_text()
    assert body(parity, "float dot_portable(") == body(kernels, "inline float dot(const float* a")
