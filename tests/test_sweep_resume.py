"""A sweep's results file survives crashes (issue 28): a cut last line is truncated away on resume
(never glued to), readers skip and name bad lines, --merge names what is missing, --summary of a
missing file is an error. These need no model: the rows are written by append_row itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from kbitrt.cli.main import cli
from kbitrt.errors import KbitFormatError
from kbitrt.sweep import runner
from kbitrt.sweep.grid import SCHEMA, parse_grid
from kbitrt.sweep.results import append_row, read_results, repair_tail
from kbitrt.sweep.shard import merge_results


def row(cell: str, **extra) -> dict:
    return {"schema": SCHEMA, "cell": cell, "model": "m", "label": cell, **extra}


def test_resume_truncates_a_cut_line_instead_of_gluing_to_it(tmp_path):
    p = tmp_path / "r.jsonl"
    append_row(p, row("a"))
    append_row(p, row("b"))
    whole = p.read_bytes()
    p.write_bytes(whole + json.dumps(row("c"))[:25].encode())  # killed mid-row
    notes: list[str] = []
    assert runner.resume_keys(p, notes) == {"a", "b"}
    assert len(notes) == 1 and "r.jsonl:3" in notes[0] and "cut by a crash" in notes[0]
    assert p.read_bytes() == whole  # the cut line is gone, nothing else changed
    append_row(p, row("c"))
    assert [r["cell"] for r in read_results(p)] == ["a", "b", "c"]
    # a whole row that only lost its newline is kept
    p.write_bytes(p.read_bytes() + json.dumps(row("d")).encode())
    assert "lacked its newline" in repair_tail(p)
    append_row(p, row("e"))
    assert [r["cell"] for r in read_results(p)] == ["a", "b", "c", "d", "e"]


def test_append_row_never_glues_even_without_resume(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps(row("a")) + "\n" + '{"schema": "kbit-sw')
    append_row(p, row("b"))
    assert [r["cell"] for r in read_results(p)] == ["a", "b"]


def test_a_sweep_killed_mid_row_resumes_cleanly(tmp_path):
    """A real process killed (SIGKILL) while it writes a row: resume loses only that row."""
    p = tmp_path / "r.jsonl"
    append_row(p, row("a"))
    script = textwrap.dedent(f"""
        import json, os, signal
        big = {{"schema": {SCHEMA!r}, "cell": "b", "window_nll": [0.123456] * 200000}}
        data = (json.dumps(big) + "\\n").encode()
        fd = os.open({str(p)!r}, os.O_WRONLY | os.O_APPEND)
        os.write(fd, data[: len(data) // 2])  # the kernel wrote half the row, then the kill
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", script])
    assert r.returncode == -signal.SIGKILL
    assert not p.read_bytes().endswith(b"\n")
    notes: list[str] = []
    assert runner.resume_keys(p, notes) == {"a"} and "cut by a crash" in notes[0]
    append_row(p, row("b"))
    assert [r["cell"] for r in read_results(p)] == ["a", "b"]


def test_summary_and_merge_skip_and_name_bad_lines(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps(row("a")) + "\n" + '{"schema": "kbit-sweep/1", "cel' + json.dumps(row("b"))
                 + "\n" + json.dumps(row("c")) + "\n")
    bad: list[str] = []
    assert [r["cell"] for r in read_results(p, bad)] == ["a", "c"]
    assert bad == [f"{p}:2: not JSON (a line cut by a crash or edited); skipped"]
    out = tmp_path / "m.jsonl"
    report = merge_results(out, [p])
    assert report["cells"] == 2 and len(report["skipped"]) == 1 and report["missing"] == []
    r = CliRunner().invoke(cli, ["sweep", "--merge", str(out), str(p)])
    assert r.exit_code == 0 and "r.jsonl:2" in r.stderr.replace("\n", "")  # rich wraps long paths


def test_summary_of_a_missing_file_is_an_error(tmp_path):
    r = CliRunner().invoke(cli, ["sweep", "--summary", str(tmp_path / "missing.jsonl")])
    assert r.exit_code == 2 and "no such results file" in r.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = CliRunner().invoke(cli, ["sweep", "--summary", str(empty)])
    assert r.exit_code == 2 and "no results rows" in r.stderr


def test_merge_names_missing_shards_and_cells(tmp_path):
    parts = []
    for i in (0, 2):  # shard 1 of 3 never finished
        part = tmp_path / f"part{i}.jsonl"
        append_row(part, row(f"c{i}", shard=f"{i}/3", grid_cells=3))
        parts.append(part)
    report = merge_results(tmp_path / "all.jsonl", parts)
    assert report["missing"] == ["shard(s) 1/3 missing: no row from them",
                                 "1 of the 3 cells of the 3-shard grid missing"]
    r = CliRunner().invoke(cli, ["sweep", "--merge", str(tmp_path / "all.jsonl"), *map(str, parts)])
    assert r.exit_code == 1 and "1/3 missing" in r.stderr
    with pytest.raises(KbitFormatError, match="no such results file"):
        merge_results(tmp_path / "x.jsonl", [tmp_path / "nope.jsonl"])
    # given the grid, the missing cells are named
    cells = parse_grid(["m"], "3,4", "64", "nf", "none")
    p = tmp_path / "one.jsonl"
    append_row(p, row(cells[0].key))
    report = merge_results(tmp_path / "g.jsonl", [p], cells)
    assert report["missing"] == [f"1 cell(s) of the grid missing: {cells[1].label} (m)"]
