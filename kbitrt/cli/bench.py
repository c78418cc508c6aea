"""`kbit bench`: llama-bench-style prefill/decode throughput table, or --kernels."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from kbitrt.cli.options import (cpu_weight_options, placement_options, resolve_cpu_weights,
                                resolve_kv_cache)
from kbitrt.runtime.kernels import cpu as cpu_kernels


@click.command("bench")
@click.argument("model")
@click.option("-b", "--batch", "batches", default="1", show_default=True,
              help="Batch sizes, comma-separated (e.g. 1,4,16).")
@click.option("-p", "--n-prompt", "prompt", type=int, default=512, show_default=True,
              help="Prefill length (pp N); 0 skips.")
@click.option("-n", "--n-gen", "gen", type=int, default=128, show_default=True,
              help="Decode length (tg N); 0 skips.")
@click.option("-r", "--reps", type=int, default=5, show_default=True)
@click.option("--warmup", type=int, default=1, show_default=True)
@click.option("--kernels", is_flag=True, help="Kernel table instead: us, GB/s, % of copy BW.")
@click.option("--device", default="auto", show_default=True)
@click.option("--backend", type=click.Choice(["auto", "native", "transformers"]), default="auto",
              show_default=True)
@click.option("--compile/--no-compile", "compile_", default=None,
              help="torch.compile the decode step (default: on for cuda; on the CPU the "
                   "default C++ layer stack is faster, docs/cpu.md).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON record file (default: <model>/bench-<timestamp>.json).")
@placement_options
@cpu_weight_options
@click.option("--draft-bits", type=int, default=None, help="Any-precision models: time "
              "self-speculative decoding (this width drafting for --bits) against the parent "
              "alone: acceptance rate and speed-up (greedy, -n new tokens).")
@click.option("--draft-tokens", type=int, default=None, help="Tokens drafted per round (default 4).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON record on stdout.")
@click.option("--csv", "as_csv", is_flag=True, help="Print the table as CSV on stdout.")
def bench_cmd(model, batches, prompt, gen, reps, warmup, kernels, device, backend, compile_,
              low_memory, cpu_weights, kv_cache, device_map, max_memory, draft_bits, draft_tokens,
              output, as_json, as_csv, bits=None):
    """Prefill and decode tokens/s of MODEL (kbit or plain HF folder), mean ± std over reps.

    \b
      kbit bench DIR
      kbit bench DIR --batch 1,4,16 -p 512 -n 128 --reps 5 --json
      kbit bench DIR --kernels
      kbit bench AP_DIR --bits 8 --draft-bits 3 --draft-tokens 4 -n 128
    """
    from kbitrt.eval.latency import import_run_code, rss_bytes
    from kbitrt.eval.model_open import open_model
    from kbitrt.eval.results import default_output, write_json
    from kbitrt.errors import RunError
    from transformers import AutoTokenizer  # noqa: F401  (imported before the RSS baseline)

    err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
    sizes = _parse_batches(batches)
    # the kernel table times the packed path, so it needs the packed weights
    cpu_weights = resolve_cpu_weights(low_memory, cpu_weights, packed=kernels)
    kv_cache = resolve_kv_cache(low_memory, kv_cache)
    import_run_code(model, device)  # code is not model memory (cpu_decode.py measures alike)
    rss0 = rss_bytes()
    try:
        if draft_tokens is not None and draft_bits is None:
            raise RunError("--draft-tokens needs --draft-bits (self-speculative decoding)")
        if draft_bits is not None:
            return _speculative(model, bits, draft_bits, draft_tokens, gen, reps, warmup, device,
                                backend, cpu_weights, kv_cache, device_map or kernels, compile_,
                                output, as_json, err, rss0)
        with err.status(f"loading {model}", spinner="dots"):
            lm = open_model(model, device=device, backend=backend, cpu_weights=cpu_weights,
                            bits=bits, device_map=device_map, max_memory=max_memory,
                            kv_cache=kv_cache)
        record = _measure(lm, model, sizes, prompt, gen, reps, warmup, kernels, compile_, err,
                          rss0)
    except RunError as e:
        click.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)
    path = output or default_output(lm.path, "bench")
    write_json(path, record)
    table = kernels_table(record) if kernels else bench_table(record)
    if as_json:
        click.echo(json.dumps(record, indent=2, default=str))
    elif as_csv:
        click.echo(_csv(table), nl=False)
    else:
        err.print(table)
    if not as_json and not as_csv:
        err.print(_memory_line(record))
    err.print(f"[dim]written to {path}[/]")


def _parse_batches(batches: str) -> list[int]:
    """--batch "1,4,16" -> [1, 4, 16]; anything but positive integers: one line, exit 2."""
    try:
        sizes = [int(b) for b in batches.split(",") if b.strip()]
        if not sizes or min(sizes) < 1:
            raise ValueError
    except ValueError:
        click.secho(f"error: --batch {batches!r}: give positive integers, e.g. 1,4,16", fg="red",
                    err=True)
        sys.exit(2)
    return sizes


def _measure(lm, model: str, sizes: list[int], prompt: int, gen: int, reps: int, warmup: int,
             kernels: bool, compile_: bool | None, err: Console, rss0: int) -> dict:
    """The bench record of the opened model `lm`: the kernel table (--kernels) or prefill/decode
    tokens/s per batch size, with the environment, model, held weights and memory."""
    from kbitrt.eval.latency import held_weights, kernel_table, memory_record, run_bench
    from kbitrt.eval.model_open import count_params
    from kbitrt.eval.results import environment, model_record

    params = count_params(lm.model)
    record = {"kind": "bench", **environment(lm.device), "model": model_record(model, lm),
              "params": params, "bits_per_param": 8 * lm.weight_bytes / params,
              "held": held_weights(lm.model),
              "options": dict(batches=sizes, prompt=prompt, gen=gen, reps=reps,
                              warmup=warmup, kernels=kernels,
                              cpu_weights=lm.cpu_weights, kv_cache=lm.kv_cache,
                              cpu_kernels=cpu_kernels.describe()
                              if lm.cpu_weights == "packed" else None,
                              cpu_activations=cpu_kernels.activations()
                              if lm.cpu_weights == "packed" else None)}
    if kernels:
        with err.status("timing kernels", spinner="dots"):
            rows, bw = kernel_table(lm)
        record.update(kernels=rows, copy_gbps=bw / 1e9)
    else:
        with err.status("benchmarking", spinner="dots") as status:
            rows = run_bench(lm, sizes, prompt, gen, reps, warmup,
                             "auto" if compile_ is None else compile_,
                             on_step=lambda s: status.update(f"benchmarking {s}"))
        record["results"] = [r.to_json() for r in rows]
        if hasattr(lm.model, "cpu_layers") and lm.device.type == "cpu":
            record["options"]["cpu_layers"] = lm.model.cpu_layers
    record["memory"] = memory_record(rss0)
    return record


def _memory_line(record: dict) -> str:
    """The line under the table: peak RSS, model memory, bits the quantized weights are held at."""
    mem, held = record["memory"], record["held"]
    bits = held["bits_per_quantized_weight_held"]
    return (f"memory: peak RSS {mem['peak_rss_mb']:.0f} MiB, model memory "
            f"{mem['model_memory_mb']:.0f} MiB (peak minus {mem['rss_after_imports_mb']:.0f}"
            f" MiB after imports)" + (f", quantized weights held at {bits:.2f} bits"
                                      if bits else "")
            + (f", KV cache {record['options']['kv_cache']}"
               if record["options"].get("kv_cache", "auto") != "auto" else ""))


def _speculative(model, bits, draft_bits, draft_tokens, gen, reps, warmup, device, backend,
                 cpu_weights, kv_cache, other_mode, compile_, output, as_json, err, rss0):
    """kbit bench --draft-bits: self-speculative decoding against the parent alone."""
    from kbitrt.errors import KbitFormatError
    from kbitrt.eval.latency import held_weights, memory_record, speculative_bench
    from kbitrt.eval.results import default_output, environment, model_record, write_json
    from kbitrt.errors import RunError
    from kbitrt.runtime.speculative import DEFAULT_DRAFT_TOKENS, load_speculative

    k = DEFAULT_DRAFT_TOKENS if draft_tokens is None else draft_tokens
    try:
        if other_mode:
            raise RunError("--draft-bits times generation on one device: drop --kernels and "
                           "--device-map")
        if gen < 1:
            raise RunError(f"-n {gen}: --draft-bits needs new tokens to generate")
        with err.status(f"loading {model}", spinner="dots"):
            lm, parent = load_speculative(model, bits, draft_bits, k, device=device,
                                          backend=backend, cpu_weights=cpu_weights,
                                          kv_cache=kv_cache)
        record = {"kind": "bench-speculative", **environment(lm.device),
                  "model": model_record(model, lm), "held": held_weights(lm.model)}
        with err.status("benchmarking (parent alone and speculative, alternating)", spinner="dots"):
            record["speculative"] = speculative_bench(
                lm, parent, draft_bits, k, gen, reps, warmup,
                compile="auto" if compile_ is None else compile_)
        record["memory"] = memory_record(rss0)
    except (RunError, KbitFormatError) as e:
        click.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)
    path = output or default_output(lm.path, "bench")
    write_json(path, record)
    if as_json:
        click.echo(json.dumps(record, indent=2, default=str))
    else:
        r = record["speculative"]
        t = Table(title=f"{record['device']}: {r['draft_bits']}-bit drafts of {r['draft_tokens']} "
                  f"for {r['bits']} bits, tg{r['gen']}", header_style="bold")
        for col in ("decoding", "t/s", "acceptance", "tok/round", "speed-up", "same tokens"):
            t.add_column(col, justify="left" if col == "decoding" else "right")
        t.add_row(f"parent ({r['bits']} bits) alone",
                  f"{r['parent_tokens_per_s']:.2f} ± {r['parent_std']:.2f}", "", "", "1.00", "")
        rate = r["acceptance_rate"]
        t.add_row("self-speculative", f"{r['speculative_tokens_per_s']:.2f} ± "
                  f"{r['speculative_std']:.2f}", "-" if rate is None else f"{100 * rate:.1f}%",
                  f"{r['tokens_per_round'] or 0:.2f}", f"{r['speedup']:.2f}",
                  "yes" if r["greedy_identical"] else "NO")
        err.print(t)
        bits_held = record["held"]["bits_per_quantized_weight_held"]
        err.print(f"quantized weights held at {bits_held:.2f} bits (both widths); load average "
                  f"{', '.join(f'{v:.1f}' for v in r['load_average'])}")
    err.print(f"[dim]written to {path}[/]")


def bench_table(record: dict) -> Table:
    m = record["model"]
    t = Table(title=f"{record['device']}", header_style="bold")
    for col in ("model", "size", "params", "bits/param", "backend", "test", "batch", "t/s"):
        t.add_column(col, justify="left" if col in ("model", "backend", "test") else "right")
    name = Path(m["name"]).name or m["name"]
    for r in record["results"]:
        t.add_row(f"{name} {m['quant_label']}", f"{m['weight_bytes'] / 2**20:.1f} MiB",
                  f"{record['params'] / 1e6:.1f} M", f"{record['bits_per_param']:.2f}",
                  m["backend"], r["test"], str(r["batch"]),
                  f"{r['tokens_per_s']:.2f} ± {r['std']:.2f}")
    return t


def kernels_table(record: dict) -> Table:
    t = Table(title=f"{record['device']}: copy bandwidth {record['copy_gbps']:.1f} GB/s",
              header_style="bold")
    for col in ("module", "N x K", "M", "k", "block", "us", "GB/s", "% copy BW", "dense us",
                "speedup"):
        t.add_column(col, justify="left" if col == "module" else "right")
    for r in record["kernels"]:
        t.add_row(r["module"], f"{r['N']} x {r['K']}", str(r["M"]), str(r["bits"]), str(r["block"]),
                  f"{r['us']:.1f}", f"{r['gbps']:.1f}", f"{r['pct_copy_bw']:.1f}",
                  f"{r['dense_us']:.1f}", f"{r['speedup_vs_dense']:.2f}")
    return t


def _csv(table: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([c.header for c in table.columns])
    for i in range(table.row_count):
        w.writerow([str(c._cells[i]) for c in table.columns])
    return buf.getvalue()
