"""Atomic output folders: everything is written into a hidden sibling and renamed into place at the
end, so an interrupted or failed run leaves nothing that looks like a model (and the old folder,
when one is replaced, stays whole until the new one is complete)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from kbitrt.errors import KbitFormatError


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
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield a fresh hidden folder beside `out`; on success it replaces `out`, on any error (or
    KeyboardInterrupt) it is removed and `out` is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.kbit-partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with _terminate_as_exit():
            yield tmp
        with _signals_blocked():  # the two renames are not interrupted halfway
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
def _terminate_as_exit() -> Iterator[None]:
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
