"""Seconds per `kbit sweep` cell on SmolLM2-135M, with the evaluation of benchmarks/sweep_smollm2.sh
(wiki_en_dev: 16,384 tokens in 512-token windows; social_iqa: 150 questions), on this CPU.

    python benchmarks/sweep_cell_time.py [--cells 16,nf4-b64,int3-b64] [--executor local|ray]

Runs the cells into a temporary results file with the sweep's own code, and records each cell's
seconds (quantize + evaluate, from the results line), the model load time, the tokens each cell
scores, and the machine's load average (the CPU is shared: a loaded machine is slower).
Writes benchmarks/results/sweep_cell_time-<device>.json (-ray appended with Ray) (device, versions, commit).
docs/scaling.md turns these numbers into the cost of the paper's grid.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kbitrt.eval.results import environment, write_json  # noqa: E402
from kbitrt.runtime.devices import resolve_device  # noqa: E402
from kbitrt.sweep.grid import Cell  # noqa: E402
from kbitrt.sweep.runner import SweepOptions, read_results, run_sweep  # noqa: E402



def parse_cell(model: str, label: str) -> Cell:
    if label == "16":
        return Cell(model, 16, None, None, "none")
    dtype_bits, block = label.split("-b")
    dtype = dtype_bits.rstrip("0123456789")
    return Cell(model, int(dtype_bits[len(dtype):]), int(block), dtype, "none")


def scored_tokens(model: str, opts: SweepOptions) -> dict:
    """Tokens one cell runs through the model: perplexity windows and every (context, choice)."""
    from transformers import AutoTokenizer

    from kbitrt.eval.zeroshot import encode_pair, read_jsonl

    tok = AutoTokenizer.from_pretrained(model)
    out = {}
    for task in opts.tasks:
        rows = read_jsonl(task, opts.limit)
        pairs = [encode_pair(tok, r["query"], " " + c) for r in rows for c in r["choices"]]
        out[Path(task).stem] = sum(len(a) + len(b) for a, b in pairs)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="16,nf4-b64,int3-b64")
    ap.add_argument("--executor", choices=["local", "ray"], default="local")
    ap.add_argument("--ray-cpus", type=int, default=2)
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args(argv)

    from kbitrt.convert.gguf import ensure_smollm2

    model = str(ensure_smollm2())
    opts = SweepOptions(ppl=["wiki-sample"], tasks=["social_iqa-sample"],
                        seqlen=512, max_tokens=16384, limit=150, batch_size=8)
    cells = [parse_cell(model, c) for c in args.cells.split(",")]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "r.jsonl"
        t0 = time.perf_counter()
        if args.executor == "ray":
            import ray

            from kbitrt.sweep.executors import RayOptions, run_ray

            ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
            t0 = time.perf_counter()  # Ray's start is not part of the cells
            run_ray(cells, opts, results, RayOptions(retries=0, cpus=1))
            ray.shutdown()
        else:
            run_sweep(cells, opts, results)
        wall = time.perf_counter() - t0
        rows = read_results(results)
    cell_seconds = {r["label"]: r["seconds"] for r in rows}
    ppl_tokens = sum(v["tokens"] for v in rows[0]["ppl"].values())
    mc_tokens = scored_tokens(model, opts)
    record = {
        "kind": "sweep_cell_time", **environment(resolve_device("cpu")),
        "cpu_count": os.cpu_count(), "torch_threads": __import__("torch").get_num_threads(),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "executor": args.executor, "model": "SmolLM2-135M-Instruct", "params": rows[0]["params"],
        "options": {"ppl_tokens": ppl_tokens, "seqlen": opts.seqlen, "mc_rows": opts.limit,
                    "mc_tokens": mc_tokens, "batch_size": opts.batch_size},
        "cells": cell_seconds,
        "mean_cell_seconds": sum(cell_seconds.values()) / len(cell_seconds),
        "wall_seconds": wall,
        "wall_seconds_per_cell": wall / len(rows),  # includes loading the model once
    }
    out = Path(args.output or ROOT / "benchmarks/results" /
               f"sweep_cell_time-cpu{'-ray' if args.executor == 'ray' else ''}.json")
    write_json(out, record)
    print(f"{out}: {record['cells']} mean {record['mean_cell_seconds']:.1f} s/cell, "
          f"wall {wall:.1f} s, load {load_before} -> {record['loadavg_after']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
