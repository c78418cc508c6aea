"""Atomic output folders: everything is written into a hidden sibling and renamed into place at the
end, so an interrupted or failed run leaves nothing that looks like a model (and the old folder,
when one is replaced, stays whole until the new one is complete).

One writer per output: the writer holds an exclusive OS lock (flock, released by the kernel when
its process dies, however it dies) on `.<name>.kbit-lock` beside the staging folder; a second
writer is refused with one line. Holding the lock, a `.<name>.kbit-partial-*` left by a writer
that was killed (kill -9 skips every cleanup) is stale and removed. The final rename replaces an
existing folder only when the caller allows it: a folder that appeared meanwhile is not replaced.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import os
import shutil
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from kbitrt.errors import KbitFormatError


def resolve_output(output) -> Path:
    """The absolute -o path; one line for one that cannot be resolved (a symlink loop)."""
    try:
        return Path(output).expanduser().resolve()
    except (RuntimeError, OSError) as e:  # RuntimeError: "Symlink loop from ..." (Python < 3.13)
        raise KbitFormatError(f"-o {output}: cannot resolve the path ({e}): remove the symlink "
                              "loop or choose another -o") from None


def check_output(source: Path, out: Path, force: bool) -> None:
    """Refuse, before any work, an output that would overwrite or delete the source."""
    src, dst = Path(source).resolve(), Path(out).resolve()
    if dst == src:
        raise KbitFormatError(f"the output folder {dst} is the source folder: choose another -o")
    if dst in src.parents:
        raise KbitFormatError(f"the output folder {dst} contains the source {src}: replacing it would "
                        "delete the source; choose another -o")
    if src in dst.parents:
        raise KbitFormatError(f"the output folder {dst} lies inside the source {src}: choose an -o "
                        "outside it")
    if dst.exists() and not force:
        raise KbitFormatError(f"{dst} already exists: choose another -o or pass --force to replace it")


@contextmanager
def output_lock(out: Path) -> Iterator[Path]:
    """Hold the exclusive lock on writing `out` (refused with one line while another process holds
    it); yields the lock file, removed on exit. The lock dies with its process."""
    lock = out.parent / f".{out.name}.kbit-lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise KbitFormatError(f"another kbit process (pid {holder}) is writing {out}: wait for "
                                  "it to finish or choose another -o") from None
        try:  # the previous holder may have removed the file between our open and flock
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)  # still holding it: the next writer opens a fresh file
        os.close(fd)


@contextmanager
def waiting_lock(lock: Path) -> Iterator[None]:
    """Hold an exclusive flock on `lock`, waiting for another holder: for caches that several
    processes may fill at once (the first builds, the others then find it built)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def remove_stale_partials(out: Path, keep: Path | None = None) -> list[Path]:
    """Staging folders of `out` left by dead writers (call while holding output_lock)."""
    gone = []
    for p in sorted(out.parent.glob(f".{out.name}.kbit-partial-*")):
        if p != keep and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
            print(f"kbit: removed {p.name}, left by an earlier run that did not finish",
                  file=sys.stderr)
    return gone


@contextmanager
def staged_folder(out: Path, force: bool | None = None) -> Iterator[Path]:
    """Yield a fresh hidden folder beside `out`; on success it replaces `out`, on any error (or
    KeyboardInterrupt) it is removed and `out` is left as it was. The output is locked meanwhile
    (one writer). `force`: whether an existing `out` may be replaced; None: only the folder that
    was there when staging began (the caller checked it), never one that appeared meanwhile."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        replace = out.exists() if force is None else force
        tmp = out.parent / f".{out.name}.kbit-partial-{os.getpid()}"
        remove_stale_partials(out)
        yield from _staged(tmp, out, replace)


def _staged(tmp: Path, out: Path, replace: bool) -> Iterator[Path]:
    if out.exists() and not replace:
        raise KbitFormatError(f"{out} already exists: choose another -o or pass --force to replace it")
    tmp.mkdir()
    try:
        with terminate_as_exit():
            yield tmp
        with _signals_blocked():  # the two renames are not interrupted halfway
            if (out.exists() or out.is_symlink()) and not replace:
                raise KbitFormatError(f"{out} appeared while this run was writing it: kept it; "
                                      "choose another -o or pass --force to replace it")
            swap_into_place(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise KbitFormatError(f"disk full while writing {out}: nothing was written there; "
                            "free space or choose another -o") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def terminate_as_exit() -> Iterator[None]:
    """SIGTERM (and SIGHUP) raise SystemExit(128 + signal) while a folder is staged, so the cleanup
    above runs as it does for SIGINT's KeyboardInterrupt; the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            previous[sig] = signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def _signals_blocked() -> Iterator[None]:
    sigs = {signal.SIGINT, signal.SIGTERM} | ({signal.SIGHUP} if hasattr(signal, "SIGHUP") else set())
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`, replacing an existing `out` only once `tmp` is complete."""
    if out.exists():
        old = out.parent / f".{out.name}.kbit-old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        tmp.rename(out)


# ------------------------------------------------------------------------------ temporary folders

_TEMP: set[Path] = set()  # folders temp_folder made that their owner has not released yet


def temp_folder(prefix: str) -> Path:
    """A fresh folder in the system's temp dir that does not outlive the process: its owner
    releases it (release_temp_folder); failing that it is removed at exit and when SIGTERM or
    SIGHUP end the process (GPTQ's results, a disk-offloaded model's weights: gigabytes)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if not _TEMP:
        atexit.unregister(remove_temp_folders)
        atexit.register(remove_temp_folders)
    _TEMP.add(path)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None and signal.getsignal(sig) is signal.SIG_DFL:
                signal.signal(sig, _remove_and_die)
    return path


def release_temp_folder(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    _TEMP.discard(Path(path))


def remove_temp_folders() -> None:
    for path in list(_TEMP):
        release_temp_folder(path)


def _remove_and_die(signum, frame) -> None:
    """A fatal signal's default action, after removing the temporary folders."""
    remove_temp_folders()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
