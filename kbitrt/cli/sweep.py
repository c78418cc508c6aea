"""`kbit sweep` (the bit-level scaling study) and `kbit plot`."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.progress import MofNCompleteColumn
from rich.table import Table

err = Console(stderr=True)
out = Console()


@click.command("sweep")
@click.option("--models", default="", help="comma-separated model folders or Hub ids")
@click.option("--bits", default="3,4,5,6,8,16", show_default=True, help="16 = the unquantized model")
@click.option("--block", default="64,256,1024", show_default=True)
@click.option("--dtype", "dtypes", default="int,fp,quantile,dynamic,nf", show_default=True)
@click.option("--outliers", default="none", show_default=True, help="e.g. none,top:2%,zscore:4")
@click.option("--scales", default="absmax", show_default=True, help="block scales: absmax,mse")
@click.option("--method", "methods", default="rtn", show_default=True, help="rtn,gptq")
@click.option("--calib", default=None, help="gptq cells: calibration text file (or dataset name)")
@click.option("--calib-samples", default=128, show_default=True, type=int)
@click.option("--calib-seqlen", default=2048, show_default=True, type=int)
@click.option("--ppl", multiple=True, help="text file (or dataset name when online); repeatable")
@click.option("--tasks", default="", help="comma-separated local JSONL multiple-choice files")
@click.option("--seqlen", default=512, show_default=True, type=click.IntRange(min=2))
@click.option("--max-tokens", default=32768, show_default=True, type=int, help="tokens per text (0: all)")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="rows per task")
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("-o", "--output", default="results.jsonl", show_default=True, type=click.Path())
@click.option("--summary", "summary_file", default=None, type=click.Path(),
              help="only summarise an existing results file")
@click.option("--metric", default="auto", show_default=True, type=click.Choice(["auto", "nll", "acc_norm"]),
              help="what decides 'best' in --summary (auto: NLL when perplexity was measured)")
@click.option("--shard", default=None, metavar="I/N",
              help="run only the I-th (from 0) of N disjoint slices of the grid (Slurm job arrays)")
@click.option("--merge", "merge_out", default=None, type=click.Path(), metavar="OUT",
              help="merge the PARTS results files into OUT (a cell found twice must agree) and exit; "
              "missing shards are named (exit 1), and with --models and the grid options the "
              "missing cells too")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (cells run in fp32)")
@click.option("--executor", default="local", show_default=True, type=click.Choice(["local", "ray"]),
              help="local: one process, one cell after another; ray: each cell a Ray task")
@click.option("--address", default=None, help="Ray cluster to join (HEAD:6379, or 'auto'); "
              "default: start a local one")
@click.option("--retries", default=1, show_default=True, type=int,
              help="ray: extra attempts of a cell that failed or whose worker died")
@click.option("--cpus-per-cell", default=1, show_default=True, type=int,
              help="ray, CPU cells: cores (torch threads) each cell takes")
@click.option("--json", "as_json", is_flag=True)
@click.argument("parts", nargs=-1, type=click.Path())
def sweep_cmd(models, bits, block, dtypes, outliers, scales, methods, calib, calib_samples,
              calib_seqlen, ppl, tasks, seqlen, max_tokens, limit, batch_size, output, summary_file,
              metric, shard, merge_out, device, executor, address, retries, cpus_per_cell, as_json,
              parts):
    """Quantize every cell of the grid in memory, evaluate it, append one JSON line per cell.

    Rerunning skips the cells already in the results file.

    \b
    On a Slurm array: kbit sweep ... --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT -o part$SLURM_ARRAY_TASK_ID.jsonl
    then:             kbit sweep --merge results.jsonl part*.jsonl
    """
    from kbitrt.sweep.runner import SweepOptions, run_sweep
    from kbitrt.sweep.shard import merge_results, parse_shard, shard_cells

    model_list = [m.strip() for m in models.split(",") if m.strip()]
    if merge_out:  # given --models, the grid options name the cells the merge must hold
        expected = _grid(model_list, bits, block, dtypes, outliers, scales, methods) \
            if model_list else None
        merged = merge_results(Path(merge_out), [Path(p) for p in parts], expected)
        _notes(merged["skipped"])
        if as_json:
            click.echo(json.dumps(merged))
        else:
            err.print(f"{merged['cells']} cells from {merged['parts']} part(s) in {merge_out} "
                      f"({merged['duplicates']} identical duplicate(s) dropped)")
        for line in merged["missing"]:
            err.print(f"[red]incomplete:[/] {line}")
        if merged["missing"]:
            raise click.exceptions.Exit(1)
        return
    if parts:
        raise click.UsageError(f"unexpected argument(s) {' '.join(parts)}: files are only taken by --merge OUT")
    if summary_file:
        return show_summary(_existing_rows(Path(summary_file)), as_json, metric)
    cells = _grid(model_list, bits, block, dtypes, outliers, scales, methods)
    if any(c.method == "gptq" for c in cells) and not calib:
        raise click.UsageError("--method gptq needs --calib FILE (or a dataset name)")
    grid_cells = len(list(dict.fromkeys(cells)))
    if shard:
        cells = shard_cells(cells, *parse_shard(shard))
    opts = SweepOptions(ppl=list(ppl), tasks=[t for t in tasks.split(",") if t.strip()], seqlen=seqlen,
                        max_tokens=max_tokens or None, limit=limit, batch_size=batch_size,
                        device=device, calib=calib, calib_samples=calib_samples,
                        calib_seqlen=calib_seqlen,
                        shard="/".join(map(str, parse_shard(shard))) if shard else None,
                        grid_cells=grid_cells if shard else None)
    if executor == "ray":
        return _sweep_ray(cells, opts, Path(output), address, retries, cpus_per_cell, as_json)
    if address:
        raise click.UsageError("--address is for --executor ray")
    from kbitrt.eval.progress import new_bar

    bar = new_bar(MofNCompleteColumn(), transient=False, console=err)
    with bar:
        task = bar.add_task("sweep", total=None, what="loading")

        def on_cell(done, total, cell, seconds, error):
            bar.update(task, completed=done, total=total, what=cell.label)
            if error:
                err.print(f"[red]skipped[/] {cell.model} {cell.label}: {error}")

        report = run_sweep(cells, opts, Path(output), on_cell)
    _notes(report.notes)
    err.print(f"{report.done} cells measured, {report.skipped} already in {output}, "
              f"{report.seconds / 60:.1f} min")
    for model, why in report.failed_models.items():
        err.print(f"[red]model failed:[/] {model}: {why}")
    if as_json:
        click.echo(json.dumps({"done": report.done, "skipped": report.skipped,
                               "failed_models": report.failed_models, "results": output}))
    if report.failed_models and not report.done and not report.skipped:
        raise click.exceptions.Exit(1)


def _sweep_ray(cells, opts, output: Path, address, retries, cpus, as_json) -> None:
    from kbitrt.sweep.executors import RayOptions, failures_path, run_ray

    from rich.progress import TextColumn

    from kbitrt.eval.progress import new_bar

    bar = new_bar(MofNCompleteColumn(),
                  TextColumn("[green]{task.fields[done]} done[/] [red]{task.fields[failed]} failed[/] "
                             "[yellow]{task.fields[running]} running[/]"), transient=False, console=err)
    with bar:
        task = bar.add_task("sweep (ray)", total=None, what="starting ray", done=0, failed=0, running=0)

        def on_progress(counts, cell, event):
            bar.update(task, completed=counts.done + counts.failed, total=counts.total,
                       done=counts.done, failed=counts.failed, running=counts.running,
                       what=cell.label if cell else "")
            if event in ("retry", "failed"):
                why = counts.failed_cells.get(cell.key, "see " + str(failures_path(output)))
                err.print(f"[red]{'retrying' if event == 'retry' else 'failed'}[/] {cell.model} "
                          f"{cell.label}" + (f": {why}" if event == "failed" else ""))

        report = run_ray(cells, opts, output, RayOptions(address=address, retries=retries, cpus=cpus),
                         on_progress)
    _notes(report.notes)
    err.print(f"{report.done} cells measured, {report.skipped} already in {output}, "
              f"{len(report.failed_cells)} failed, {report.seconds / 60:.1f} min")
    if report.failed_cells:
        err.print(f"errors of every attempt: {failures_path(output)}; rerun to retry the failed cells")
    if as_json:
        click.echo(json.dumps({"done": report.done, "skipped": report.skipped,
                               "failed_cells": report.failed_cells, "results": str(output)}))
    if report.failed_cells and not report.done and not report.skipped:
        raise click.exceptions.Exit(1)


def _grid(models, bits, block, dtypes, outliers, scales, methods):
    """The cells of the grid options, adapted for any-precision models (as the sweep runs them)."""
    from kbitrt.sweep.any_precision import adapt_cells
    from kbitrt.sweep.grid import parse_grid

    return adapt_cells(parse_grid(models, bits, block, dtypes, outliers, scales, methods))


def _notes(lines: list[str]) -> None:
    for line in lines:
        err.print(f"[yellow]note:[/] {line}", highlight=False)


def _existing_rows(path: Path) -> list[dict]:
    """The rows of a results file that must exist (--summary); bad lines are named and skipped."""
    from kbitrt.errors import KbitFormatError
    from kbitrt.sweep.results import read_results

    if not path.is_file():
        raise KbitFormatError(f"{path}: no such results file")
    bad: list[str] = []
    rows = read_results(path, bad)
    _notes(bad)
    if not rows:
        raise KbitFormatError(f"{path}: no results rows in it")
    return rows


def show_summary(rows: list[dict], as_json: bool, metric: str = "auto") -> None:
    from kbitrt.sweep.summary import summarize

    report = summarize(rows, metric)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for model, s in report.items():
        out.rule(f"{model}: {s['metric']}")
        t = Table("precision", "best cell", "total bits", "metric +/- stderr", title="Best cell per precision")
        for r in s["best_per_precision"]:
            t.add_row(f"{r['bits']}", r["label"], f"{r['total_bits']:.3e}", f"{r['metric']:.4f} +/- {r['stderr']:.4f}")
        out.print(t)
        t = Table("cell", "total bits", "bits/param", "metric", title="Bit-level frontier (no cell with fewer bits is better)")
        for r in s["frontier"]:
            t.add_row(r["label"], f"{r['total_bits']:.3e}", f"{r['bits_per_param']:.3f}",
                      f"{r['metric']:.4f} +/- {r['stderr']:.4f}")
        out.print(t)
        for title, key in (("Lower precision vs the next higher (paired)", "precision_steps"),
                           ("4-bit: smallest vs largest block (paired)", "block_size_at_4bit"),
                           ("4-bit: best data type vs the others (paired)", "dtype_at_4bit"),
                           ("3-bit: proxy (outlier) quantization vs none (paired)", "outliers_at_3bit")):
            t = Table("a", "b", "diff (a - b)", "stderr", "verdict", title=title)
            for c in s[key]:
                better = (c["diff"] < 0) if c["metric"] == "nll" else (c["diff"] > 0)
                verdict = "within noise" if c["within_noise"] else ("a better" if better else "b better")
                t.add_row(c["a"], c["b"], f"{c['diff']:+.4f} {c['metric']}", f"{c['stderr']:.4f}", verdict)
            out.print(t if s[key] else f"[dim]{title}: not in this grid[/]")


@click.command("plot")
@click.argument("results", type=click.Path())
@click.option("-o", "--output", default="scaling.png", show_default=True, type=click.Path(),
              help="PNG path; an SVG is written beside it")
def plot_cmd(results, output):
    """Plot a sweep: metric vs total model bits per precision, block-size and data-type panels."""
    from kbitrt.sweep.plot import plot

    for p in plot(_existing_rows(Path(results)), Path(output)):
        err.print(f"wrote {p}")
