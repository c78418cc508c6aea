"""`kbit sweep` (the bit-level scaling study) and `kbit plot`."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
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
@click.option("--seqlen", default=512, show_default=True, type=int)
@click.option("--max-tokens", default=32768, show_default=True, type=int, help="tokens per text (0: all)")
@click.option("--limit", default=None, type=int, help="rows per task")
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("-o", "--output", default="results.jsonl", show_default=True, type=click.Path())
@click.option("--summary", "summary_file", default=None, type=click.Path(),
              help="only summarise an existing results file")
@click.option("--metric", default="auto", show_default=True, type=click.Choice(["auto", "nll", "acc_norm"]),
              help="what decides 'best' in --summary (auto: NLL when perplexity was measured)")
@click.option("--json", "as_json", is_flag=True)
def sweep_cmd(models, bits, block, dtypes, outliers, scales, methods, calib, calib_samples,
              calib_seqlen, ppl, tasks, seqlen, max_tokens, limit,
              batch_size, output, summary_file, metric, as_json):
    """Quantize every cell of the grid in memory, evaluate it, append one JSON line per cell.

    Rerunning skips the cells already in the results file.
    """
    from kbitrt.sweep.grid import parse_grid
    from kbitrt.sweep.runner import SweepOptions, read_results, run_sweep

    if summary_file:
        return show_summary(read_results(Path(summary_file)), as_json, metric)
    cells = parse_grid([m.strip() for m in models.split(",") if m.strip()], bits, block, dtypes, outliers,
                       scales, methods)
    if any(c.method == "gptq" for c in cells) and not calib:
        raise click.UsageError("--method gptq needs --calib FILE (or a dataset name)")
    opts = SweepOptions(ppl=list(ppl), tasks=[t for t in tasks.split(",") if t.strip()], seqlen=seqlen,
                        max_tokens=max_tokens or None, limit=limit, batch_size=batch_size,
                        calib=calib, calib_samples=calib_samples, calib_seqlen=calib_seqlen)
    bar = Progress(TextColumn("[cyan]sweep"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   TextColumn("{task.fields[cell]}", style="dim"), console=err)
    with bar:
        task = bar.add_task("sweep", total=None, cell="loading")

        def on_cell(done, total, cell, seconds, error):
            bar.update(task, completed=done, total=total, cell=cell.label)
            if error:
                err.print(f"[red]skipped[/] {cell.model} {cell.label}: {error}")

        report = run_sweep(cells, opts, Path(output), on_cell)
    err.print(f"{report.done} cells measured, {report.skipped} already in {output}, "
              f"{report.seconds / 60:.1f} min")
    for model, why in report.failed_models.items():
        err.print(f"[red]model failed:[/] {model}: {why}")
    if as_json:
        click.echo(json.dumps({"done": report.done, "skipped": report.skipped,
                               "failed_models": report.failed_models, "results": output}))
    if report.failed_models and not report.done and not report.skipped:
        raise click.exceptions.Exit(1)


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
    from kbitrt.sweep.runner import read_results

    path = Path(results)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such results file")
    for p in plot(read_results(path), Path(output)):
        err.print(f"wrote {p}")
