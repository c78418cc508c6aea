"""The sweep's results file: one JSON line per measured cell, appended so that a crash loses at most
the cells still running and never damages the lines already there.

A line is written whole: one `write` of the encoded line (newline included) on a file opened for
appending, then flush and fsync. A process killed inside that write can still leave a cut last line
(no newline at the end of the file); `repair_tail` truncates it away before anything is appended,
so the next line is never glued onto it, and says so. Readers skip a line that is not a results
row (a cut line, a hand edit) and name it, instead of refusing the whole file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kbitrt.errors import KbitFormatError
from kbitrt.sweep.grid import SCHEMA

_CHUNK = 1 << 16


def _last_newline(f, size: int) -> int:
    """Offset just past the last b"\\n" of the open binary file (0 when it has none)."""
    pos = size
    while pos > 0:
        start = max(0, pos - _CHUNK)
        f.seek(start)
        block = f.read(pos - start)
        i = block.rfind(b"\n")
        if i >= 0:
            return start + i + 1
        pos = start
    return 0


def repair_tail(path: Path) -> str | None:
    """Make `path` end in a newline: a cut last line (a crash mid-write) is truncated away; a whole
    JSON row that only lost its newline gets it back. Returns a one-line note of what was done."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return None
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return None
        keep = _last_newline(f, size)
        f.seek(keep)
        tail = f.read()
        lineno = 1 + _count_lines(f, keep)
        try:
            whole = isinstance(json.loads(tail), dict)
        except ValueError:
            whole = False
        if whole:
            f.seek(size)
            f.write(b"\n")
        else:
            f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    if whole:
        return f"{path}:{lineno}: the last line lacked its newline; added it"
    return (f"{path}:{lineno}: removed a line cut by a crash ({len(tail)} bytes); its cell runs "
            "again")


def _count_lines(f, end: int) -> int:
    f.seek(0)
    count, pos = 0, 0
    while pos < end:
        block = f.read(min(_CHUNK, end - pos))
        if not block:
            break
        count += block.count(b"\n")
        pos += len(block)
    return count


def read_results(path: Path, bad: list[str] | None = None) -> list[dict]:
    """The rows of a results file. A line that is not a results row (cut by a crash, edited) is
    skipped and named in `bad` (a one-line note each); a row of another schema is refused."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict) or not isinstance(row.get("cell"), str):
                if bad is not None:
                    what = "not JSON" if row is None else "not a results row"
                    bad.append(f"{path}:{lineno}: {what} (a line cut by a crash or edited); skipped")
                continue
            if row.get("schema") != SCHEMA:
                raise KbitFormatError(
                    f"{path}:{lineno} was written by schema {row.get('schema')!r}, this kbitrt "
                    f"writes {SCHEMA!r}: start a new results file (-o) rather than mixing the two")
            rows.append(row)
    return rows


def append_row(results: Path, row: dict) -> None:
    """Append one whole line (one write, then flush and fsync) after making sure the file ends in
    a newline: a crash loses at most the cells still running, never a line already written."""
    data = (json.dumps(row, sort_keys=True) + "\n").encode()
    repair_tail(results)
    fd = os.open(results, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:  # one write on Linux; the loop only guards a short write
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
