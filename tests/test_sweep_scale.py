"""Beyond one process: `kbit sweep --shard/--merge` and the Ray executor give the cells of the
one-process sweep."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kbitrt.cli.main import cli
from kbitrt.errors import KbitFormatError
from kbitrt.sweep.grid import parse_grid
from kbitrt.sweep.runner import SweepOptions, read_results, run_sweep
from kbitrt.sweep.shard import VOLATILE, merge_results, parse_shard, shard_cells

from kbitrt.eval.data import HERE as DATA  # the shipped samples
GRID = dict(bits="3,4", blocks="32", dtypes="int,nf", outliers="none")  # 2 x 2 cells


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    p = tmp_path_factory.mktemp("scaletext") / "wiki.txt"
    p.write_text(open(f"{DATA}/wiki_en_dev.txt", encoding="utf-8").read()[:3000])
    return str(p)


def opts(text) -> SweepOptions:
    return SweepOptions(ppl=[text], tasks=[f"{DATA}/mc/cause_and_effect_dev.jsonl"], seqlen=64,
                        limit=12, batch_size=4)


def grid_args(model: str, text: str) -> list[str]:
    return ["--models", model, "--bits", GRID["bits"], "--block", GRID["blocks"], "--dtype",
            GRID["dtypes"], "--outliers", GRID["outliers"], "--ppl", text, "--tasks",
            f"{DATA}/mc/cause_and_effect_dev.jsonl", "--seqlen", "64", "--limit", "12",
            "--batch-size", "4"]


@pytest.fixture(scope="module")
def whole(tiny_llama_with_tokenizer, text, tmp_path_factory) -> dict[str, dict]:
    """The one-process sweep of the 2x2 grid: the reference every other path must equal."""
    model = str(tiny_llama_with_tokenizer)
    cells = parse_grid([model], **GRID)
    path = tmp_path_factory.mktemp("whole") / "whole.jsonl"
    report = run_sweep(cells, opts(text), path)
    assert report.done == 4
    return {r["cell"]: r for r in read_results(path)}


def stable(rows) -> dict[str, dict]:
    return {r["cell"]: {k: v for k, v in r.items() if k not in VOLATILE} for r in rows}


def test_shards_are_disjoint_and_cover_the_grid():
    cells = parse_grid(["a", "b"], "3,4,16", "32,64", "int,nf", "none")
    for n in (1, 2, 3, 7, len(cells), len(cells) + 3):
        parts = [shard_cells(cells, i, n) for i in range(n)]
        assert [c for p in parts for c in p] == cells  # disjoint, ordered, complete
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert shard_cells(cells + cells, 0, 1) == cells
    assert parse_shard("3/8") == (3, 8)
    for bad in ("2/2", "1", "-1/2", "0/0", "a/b"):
        with pytest.raises(KbitFormatError, match="--shard"):
            parse_shard(bad)


def test_shard_0_and_1_merged_equal_the_whole_sweep(tiny_llama_with_tokenizer, text, whole, tmp_path):
    model = str(tiny_llama_with_tokenizer)
    runner = CliRunner()
    for i in (0, 1):
        r = runner.invoke(cli, ["sweep", *grid_args(model, text), "--shard", f"{i}/2",
                                "-o", str(tmp_path / f"part{i}.jsonl")])
        assert r.exit_code == 0, r.output
    part0, part1 = (read_results(tmp_path / f"part{i}.jsonl") for i in (0, 1))
    assert len(part0) == len(part1) == 2
    assert not {r["cell"] for r in part0} & {r["cell"] for r in part1}
    out = tmp_path / "merged.jsonl"
    r = runner.invoke(cli, ["sweep", "--merge", str(out), str(tmp_path / "part0.jsonl"),
                            str(tmp_path / "part1.jsonl"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["cells"] == 4
    merged = read_results(out)
    assert stable(merged) == stable(whole.values())
    assert [r["cell"] for r in merged] == list(whole)  # grid order kept
    # merging again (a part listed twice, OUT already holding them) changes nothing
    merge_results(out, [tmp_path / "part1.jsonl", tmp_path / "part0.jsonl"])
    assert stable(read_results(out)) == stable(merged)


def test_merge_refuses_conflicting_duplicates(tmp_path, whole):
    rows = list(whole.values())
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    same = dict(rows[1], seconds=rows[1]["seconds"] + 5)  # only the timing differs: identical
    b.write_text(json.dumps(same) + "\n" + json.dumps(rows[2]) + "\n")
    report = merge_results(tmp_path / "ok.jsonl", [a, b])
    assert report["cells"] == 3 and report["duplicates"] == 1
    changed = dict(rows[1], mean_rel_weight_error=rows[1]["mean_rel_weight_error"] * 1.01)
    b.write_text(json.dumps(changed) + "\n")
    out = tmp_path / "bad.jsonl"
    r = CliRunner().invoke(cli, ["sweep", "--merge", str(out), str(a), str(b)])
    assert r.exit_code == 2 and "different results" in r.stderr and "mean_rel_weight_error" in r.stderr
    assert not out.exists()
    r = CliRunner().invoke(cli, ["sweep", "--merge", str(out)])
    assert r.exit_code == 2 and "give the part files" in r.stderr


# ------------------------------------------------------------------------------------------ ray

@pytest.fixture(scope="module")
def ray_cluster():
    """One local 2-CPU Ray cluster for the module (starting Ray takes ~10 s)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=100 * 2**20)
    yield ray
    ray.shutdown()


def test_cell_resources_follow_device_and_model_size(tiny_llama_with_tokenizer):
    from kbitrt.sweep.executors import GiB, RayOptions, cell_memory, cell_resources, model_params

    model = str(tiny_llama_with_tokenizer)
    params = model_params(model)
    per_layer = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128 + 2 * 64  # q, o; k, v (2 kv heads); mlp; norms
    assert params == 49152 * 64 + 2 * per_layer + 64  # tied embedding, 2 layers, final norm
    cpu = cell_resources(model, SweepOptions(), RayOptions(cpus=3))
    assert cpu == {"num_gpus": 0, "num_cpus": 3, "memory": cell_memory(params)}
    assert GiB < cpu["memory"] < 2 * GiB
    gpu = cell_resources(model, SweepOptions(device="cuda"), RayOptions(memory=5 * GiB))
    assert gpu == {"num_gpus": 1, "num_cpus": 1, "memory": 5 * GiB}


def test_ray_sweep_equals_one_process_and_recovers_a_killed_worker(
        ray_cluster, tiny_llama_with_tokenizer, text, whole, tmp_path):
    import os
    import signal
    import threading

    from kbitrt.sweep.executors import RayOptions, failures_path, measure_in_worker, run_ray

    model = str(tiny_llama_with_tokenizer)
    cells = parse_grid([model], **GRID)
    victim, marker = cells[1].key, str(tmp_path / "killed-once")

    def dies_once(cell, o, cpus):
        if cell.key == victim:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return measure_in_worker(cell, o, cpus)
            kill = (os.kill, (os.getpid(), signal.SIGKILL))
            threading.Timer(0.2, kill[0], kill[1]).start()  # mid-cell ...
            measure_in_worker(cell, o, cpus)
            kill[0](*kill[1])  # ... or at the latest before its result is returned
        return measure_in_worker(cell, o, cpus)

    results = tmp_path / "ray.jsonl"
    events = []
    report = run_ray(cells, opts(text), results, RayOptions(retries=1),
                     lambda c, cell, event: events.append((event, c.running)), cell_fn=dies_once)
    assert report.done == 4 and not report.failed_cells
    rows = read_results(results)
    assert stable(rows) == stable(whole.values())  # same cells, same metrics as one process
    assert {r["attempt"] for r in rows if r["cell"] == victim} == {2}
    assert len({r["worker"] for r in rows}) >= 2  # the killed worker was replaced
    failed = [json.loads(x) for x in failures_path(results).read_text().splitlines()]
    assert [(f["cell"], f["attempt"], f["retried"]) for f in failed] == [(victim, 1, True)]
    assert "died" in failed[0]["error"].lower() or "crash" in failed[0]["error"].lower()
    assert ("retry", 1) in events or ("retry", 0) in events
    assert max(running for _, running in events) == 2  # both CPUs busy
    # re-running finds every cell done
    again = run_ray(cells, opts(text), results, RayOptions())
    assert again.skipped == 4 and again.done == 0


def test_ray_failing_cell_is_recorded_retried_and_resumed(
        ray_cluster, tiny_llama_with_tokenizer, text, whole, tmp_path):
    from kbitrt.sweep.executors import RayOptions, failures_path, measure_in_worker, run_ray

    model = str(tiny_llama_with_tokenizer)
    cells = parse_grid([model], **GRID)
    bad = cells[2].key

    def fails(cell, o, cpus):
        if cell.key == bad:
            raise ValueError("cell exploded")
        return measure_in_worker(cell, o, cpus)

    results = tmp_path / "r.jsonl"
    report = run_ray(cells, opts(text), results, RayOptions(retries=2), cell_fn=fails)
    assert report.done == 3 and report.failed_cells == {bad: "ValueError: cell exploded"}
    failed = [json.loads(x) for x in failures_path(results).read_text().splitlines()]
    assert [(f["attempt"], f["retried"]) for f in failed] == [(1, True), (2, True), (3, False)]
    assert bad not in {r["cell"] for r in read_results(results)}
    # the CLI on the same file (and the cluster the test started) runs only the failed cell
    r = CliRunner().invoke(cli, ["sweep", *grid_args(model, text), "--executor", "ray",
                                 "-o", str(results), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {
        "done": 1, "skipped": 3, "failed_cells": {}, "results": str(results)}
    assert stable(read_results(results)) == stable(whole.values())
