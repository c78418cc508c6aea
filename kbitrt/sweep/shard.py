"""Slurm-style splitting of a sweep: `--shard I/N` picks one of N disjoint slices of the grid,
`--merge OUT part*.jsonl` joins the slices' results files into one.

A shard is a contiguous slice of the grid in its (model-major) order, sizes differing by at most
one cell: each array task then loads as few models as possible. The slice depends only on the grid
options, so every task of a job array, given the same options, computes the same partition.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from kbitrt.errors import KbitFormatError
from kbitrt.sweep.grid import Cell
from kbitrt.sweep.results import read_results

# fields that differ between two honest runs of the same cell (timing, where it ran, attempts);
# every other field must be equal for two lines of one cell to be "the same result"
VOLATILE = frozenset({"seconds", "worker", "attempt", "shard", "grid_cells"})


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` with 0 <= I < N (Slurm: `--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m:
        raise KbitFormatError(f"--shard {text!r}: give I/N, e.g. 0/4 for the first of 4 slices")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or i >= n:
        raise KbitFormatError(f"--shard {text!r}: need N >= 1 and 0 <= I < N (I counts from 0)")
    return i, n


def shard_cells(cells: list[Cell], index: int, count: int) -> list[Cell]:
    """The index-th of `count` contiguous, disjoint slices; together they are exactly `cells`."""
    if count < 1 or not 0 <= index < count:
        raise KbitFormatError(f"shard {index}/{count}: need 0 <= I < N")
    cells = list(dict.fromkeys(cells))  # a model given twice in --models is one set of cells
    lo, hi = len(cells) * index // count, len(cells) * (index + 1) // count
    return cells[lo:hi]


def _stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in VOLATILE}


def missing_parts(rows: list[dict], expected: list[Cell] | None = None) -> list[str]:
    """What a merge lacks, one line each: slices of a sharded grid none of whose rows are there
    (rows record `shard` I/N and the grid's size), the grid's cells missing, and, given the grid
    (`expected`), the missing cells by name."""
    out = []
    groups: dict[tuple[int, int], set[int]] = {}
    for r in rows:
        m = re.fullmatch(r"(\d+)/(\d+)", str(r.get("shard", "")))
        if m and isinstance(r.get("grid_cells"), int):
            groups.setdefault((int(m.group(2)), r["grid_cells"]), set()).add(int(m.group(1)))
    for (n, total), seen in sorted(groups.items()):
        lost = [i for i in range(n) if i not in seen and total * i // n < total * (i + 1) // n]
        if lost:
            out.append(f"shard(s) {', '.join(f'{i}/{n}' for i in lost)} missing: no row from them")
        have = sum(1 for r in rows if str(r.get("shard", "")).endswith(f"/{n}")
                   and r.get("grid_cells") == total)
        if have < total:
            out.append(f"{total - have} of the {total} cells of the {n}-shard grid missing")
    if expected is not None:
        keys = {r["cell"] for r in rows}
        absent = [c.label + f" ({c.model})" for c in expected if c.key not in keys]
        if absent:
            out.append(f"{len(absent)} cell(s) of the grid missing: {', '.join(absent[:8])}"
                       + (f" and {len(absent) - 8} more" if len(absent) > 8 else ""))
    return out


def merge_results(output: Path, parts: list[Path], expected: list[Cell] | None = None) -> dict:
    """Write the union of `parts` (and of `output` when it exists) to `output`, atomically.

    A cell found twice is kept once when both lines agree on everything but timing
    (`VOLATILE`); otherwise the merge is refused and nothing is written. A line that is not a
    results row is skipped and named (`skipped`); the shards and cells missing are named
    (`missing`, see missing_parts). Returns counts and those notes.
    """
    if not parts:
        raise KbitFormatError("--merge OUT: give the part files to merge, e.g. part*.jsonl")
    sources = ([output] if output.exists() else []) + [Path(p) for p in parts]
    rows: dict[str, dict] = {}
    origin: dict[str, Path] = {}
    duplicates, skipped = 0, []
    absent = [str(p) for p in sources if not p.exists()]
    if absent:
        raise KbitFormatError(f"--merge: no such results file {', '.join(absent)}; nothing written")
    for path in sources:
        for row in read_results(path, skipped):
            key = row["cell"]
            if key in rows:
                if _stable(rows[key]) != _stable(row):
                    diff = sorted(k for k in set(_stable(row)) | set(_stable(rows[key]))
                                  if row.get(k) != rows[key].get(k))
                    raise KbitFormatError(
                        f"cell {key} is in {origin[key]} and {path} with different results "
                        f"({', '.join(diff[:4])}); merge refused, nothing written")
                duplicates += 1
                continue
            rows[key], origin[key] = row, path
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    try:
        with os.fdopen(fd, "w") as f:
            for row in rows.values():
                f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"cells": len(rows), "duplicates": duplicates, "parts": len(parts), "output": str(output),
            "skipped": skipped, "missing": missing_parts(list(rows.values()), expected)}
