"""The CPU kernel build cannot wedge (issue 28): a build killed at any stage leaves nothing later
commands wait on, a build lock held too long gives up with one line, and a built library that does
not load is rebuilt once. Each case runs `cpu.available()` in a fresh process on its own cache."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kbitrt.runtime.kernels import cpu

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the CPU kernels do not build here")
PROBE = "from kbitrt.runtime.kernels import cpu; print('LOADED', cpu.available(), flush=True)"


def _env(cache: Path, **extra) -> dict:  # the build on first use, not the prebuilt kernels
    return dict(os.environ, KBIT_CACHE=str(cache), KBIT_CPU_ISA="native", **extra,
                PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                            os.environ.get("PYTHONPATH", "")]))


def _probe(cache: Path, timeout: float = 600, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE], env=_env(cache, **extra), text=True,
                          capture_output=True, timeout=timeout)


@pytest.fixture
def cache(tmp_path) -> Path:
    """A copy of this machine's built kernels in a cache of the test's own (no rebuild needed)."""
    name = cpu.build_name()
    built = cpu._cache_dir() / name  # noqa: SLF001 -- the folder conftest's build filled
    if not built.is_dir():  # conftest loaded the prebuilt kernels: build them here once
        assert "LOADED True" in _probe(built.parents[1]).stdout
    dst = tmp_path / "cache" / "cpu-kernels" / name
    shutil.copytree(built, dst, ignore=shutil.ignore_patterns("lock"))
    return tmp_path / "cache"


def test_a_stale_torch_lock_no_longer_hangs(cache):
    """kill -9 / SIGTERM / SIGHUP mid-build leave torch's `lock` file; torch waits on it for ever."""
    (cache / "cpu-kernels" / cpu.build_name() / "lock").write_text("")
    r = _probe(cache, timeout=300)  # the old code hangs here
    assert "LOADED True" in r.stdout, r.stderr
    assert not (cache / "cpu-kernels" / cpu.build_name() / "lock").exists()


def test_a_held_build_lock_times_out_with_one_line(cache):
    build_dir = cache / "cpu-kernels" / cpu.build_name()
    fd = os.open(build_dir.parent / f"{build_dir.name}.flock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a live builder in another process
        r = _probe(cache, KBIT_BUILD_TIMEOUT="1")
    finally:
        os.close(fd)
    assert "LOADED False" in r.stdout
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "held the build lock" in lines[0] and "KBIT_BUILD_TIMEOUT" in lines[0]


def _wait_for_orphans(build_dir: Path, timeout: float = 300) -> None:
    """Wait until no process names `build_dir`: ninja runs each compiler in a process group of its
    own, so a killed build's compiler may still be writing an object file (CI once saw a late
    write land after the corrupt library below and "mend" it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and str(build_dir).encode() in (proc / "cmdline").read_bytes():
                    live.append(proc.name)
            except OSError:  # it exited while we looked
                continue
        if not live:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes still building in {build_dir}: {live}")


def test_a_build_killed_midway_then_a_corrupt_library_are_rebuilt(tmp_path):
    cache = tmp_path / "cache"
    build_dir = cache / "cpu-kernels" / cpu.build_name()
    p = subprocess.Popen([sys.executable, "-c", PROBE], env=_env(cache), text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (build_dir / "lock").exists():  # torch's baton: the compiler is running
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()
            time.sleep(0.05)
        os.killpg(p.pid, signal.SIGKILL)  # python and ninja: no late link can follow
        p.wait(timeout=60)
    finally:
        p.kill()
    _wait_for_orphans(build_dir)
    assert (build_dir / "lock").exists()  # what the dead build left
    r = _probe(cache)
    assert "LOADED True" in r.stdout, r.stderr
    so = build_dir / f"{cpu.build_name()}.so"
    so.write_bytes(b"not a shared library")  # newer than its sources: ninja would not rebuild it
    r = _probe(cache)
    assert "LOADED True" in r.stdout, r.stderr
    assert "do not load" in r.stderr and "rebuilding them once" in r.stderr
    assert so.read_bytes()[:4] == b"\x7fELF"
