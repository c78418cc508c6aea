"""`kbit eval`: perplexity and zero-shot accuracy of a kbit (or plain HF) model, optionally beside
a baseline. Tables go to stderr; `--json` prints the record on stdout; the record is always also
written to a JSON file (the model folder's eval-<timestamp>.json, or -o FILE)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from kbitrt.cli.options import (cpu_weight_options, placement_options, resolve_cpu_weights,
                                resolve_kv_cache)


def _csv(values: tuple[str, ...]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


@click.command("eval")
@click.argument("model")
@click.option("--ppl", "ppl", multiple=True, help="Perplexity on wikitext2, c4, pile-cc (online), "
              "a local text file, or the shipped sample wiki-sample; repeatable or comma-separated.")
@click.option("--tasks", "tasks", multiple=True, help="Zero-shot tasks: lm-eval names or local "
              ".jsonl multiple-choice files, or shipped samples (social_iqa-sample, "
              "general_knowledge-sample, cause_and_effect-sample); default, with no --ppl: "
              "lambada_openai,piqa,winogrande,hellaswag.")
@click.option("--seqlen", type=click.IntRange(min=2), default=None, help="Perplexity window (default: 2048, or the "
              "model's positions if fewer).")
@click.option("--protocol", type=click.Choice(["gptq", "sliding"]), default="gptq",
              show_default=True, help="gptq: non-overlapping windows, tail dropped; sliding: "
              "windows advance by --stride, only new tokens scored.")
@click.option("--stride", type=click.IntRange(min=1), default=None, help="Sliding stride (default seqlen/2).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Use only the first N tokens of each "
              "text (c4 defaults to 256 windows, as GPTQ).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N rows per task.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Requests per forward for tasks (padded, capped by tokens).")
@click.option("--num-fewshot", type=click.IntRange(min=0), default=0, show_default=True, help="lm-eval tasks only.")
@click.option("--baseline", default=None, help="Also evaluate this model (e.g. the unquantized HF "
              "folder) and print the differences.")
@click.option("--device", default="auto", show_default=True)
@click.option("--backend", type=click.Choice(["auto", "native", "transformers"]), default="auto",
              show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON record file (default: <model>/eval-<timestamp>.json).")
@placement_options
@cpu_weight_options
@click.option("--json", "as_json", is_flag=True, help="Print the JSON record on stdout.")
def eval_cmd(model, ppl, tasks, seqlen, protocol, stride, max_tokens, limit, batch_size,
             num_fewshot, baseline, device, backend, device_map, max_memory, low_memory, cpu_weights,
             kv_cache, output, as_json, bits=None):
    """Evaluate MODEL (a kbit folder, a plain HF folder, or a Hub id).

    \b
      kbit eval DIR --ppl wiki-sample --tasks social_iqa-sample --limit 100
      kbit eval DIR --ppl ./wiki.txt --seqlen 2048 --protocol sliding --stride 512
      kbit eval DIR --ppl wikitext2 --ppl c4
      kbit eval DIR --tasks ./social_iqa.jsonl --limit 500 --json
      kbit eval DIR --tasks piqa,hellaswag
      kbit eval DIR --baseline ./hf-folder --ppl ./wiki.txt
      kbit eval DIR --ppl wiki-sample --low-memory     # CPU: only the packed weights resident
    """
    from kbitrt.eval.runner import EvalOptions, run_eval
    from kbitrt.eval.zeroshot import PAPER_TASKS
    from kbitrt.errors import RunError

    err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
    ppl_list, task_list = _csv(ppl), _csv(tasks)
    if not ppl_list and not task_list:
        task_list = list(PAPER_TASKS)
    opts = EvalOptions(ppl=ppl_list, tasks=task_list, seqlen=seqlen, protocol=protocol,
                       stride=stride, max_tokens=max_tokens, limit=limit, batch_size=batch_size,
                       num_fewshot=num_fewshot, device=device, backend=backend,
                       device_map=device_map, max_memory=max_memory, progress=sys.stderr.isatty(),
                       bits=bits, cpu_weights=resolve_cpu_weights(low_memory, cpu_weights),
                       kv_cache=resolve_kv_cache(low_memory, kv_cache))
    try:
        record = run_eval(model, opts, baseline, output,
                          log=lambda s: err.print(f"[dim]{s}[/]") if not as_json else None)
    except RunError as e:
        click.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(record, indent=2, default=str))
    else:
        err.print(results_table(record))
        err.print(f"[dim]written to {record['output']}[/]")


def _fmt(x, digits=4) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pm(r: dict, metric: str) -> str:
    v, se = r.get(metric), r.get(f"{metric}_stderr")
    return "" if v is None else _fmt(v) + (f" ± {_fmt(se)}" if se is not None else "")


def results_table(record: dict) -> Table:
    m = record["model"]
    base = record.get("baseline")
    title = f"{m['name']} ({m['quant_label']}, {m['backend']})"
    if base:
        title += f"  vs  {base['model']['name']} ({base['model']['quant_label']})"
    t = Table(title=title, header_style="bold")
    for col in ("result", "setting", "value") + (("baseline", "delta") if base else ()):
        t.add_column(col, justify="left" if col in ("result", "setting") else "right")
    delta = record.get("delta", {})
    for ds, r in record.get("perplexity", {}).items():
        setting = f"{r['protocol']} seqlen {r['seqlen']}" + \
            (f" stride {r['stride']}" if r.get("stride") else "") + f", {r['tokens']} tok"
        row = [f"ppl {ds}", setting, _fmt(r["perplexity"], 3)]
        if base:
            b = base.get("perplexity", {}).get(ds, {})
            d = delta.get("perplexity", {}).get(ds, {})
            row += [_fmt(b.get("perplexity"), 3), _fmt(d.get("perplexity"), 3)]
        t.add_row(*row)
    for task, r in record.get("tasks", {}).items():
        for metric in ("acc", "acc_norm"):
            if r.get(metric) is None:
                continue
            row = [f"{task} {metric}", f"0-shot, n={r.get('n')}", _pm(r, metric)]
            if base:
                row += [_pm(base.get("tasks", {}).get(task, {}), metric),
                        _pm(delta.get("tasks", {}).get(task, {}), metric)]
            t.add_row(*row)
    if record.get("mean"):
        row = ["mean acc", f"{len(record['tasks'])} tasks", _fmt(record["mean"]["acc"])]
        if base and base.get("mean"):
            row += [_fmt(base["mean"]["acc"]), _fmt(record["mean"]["acc"] - base["mean"]["acc"])]
        t.add_row(*row + [""] * (len(t.columns) - len(row)))
    return t
