"""What the paper's grid (35,000 quantize-and-evaluate cells, 19M..176B parameters) would cost at
the per-cell time measured by benchmarks/sweep_cell_time.py on SmolLM2.

    python benchmarks/grid_cost.py [--measured benchmarks/results/sweep_cell_time-cpu.json]

Only one number here is measured: the seconds of a SmolLM2 cell on this CPU, over the tokens the
cell scores. Everything else is an assumption, named in the output JSON:
- a cell's time grows with parameters x tokens scored (its forward passes; quantizing is O(params));
- the 35,000 cells are spread evenly over the public checkpoints of the paper's four families
  (OPT, BLOOM, Pythia, GPT-2; sizes below);
- a paper cell scores `--paper-tokens` tokens (full LAMBADA, PIQA, WinoGrande and HellaSwag
  validation sets, every choice scored with its context: ~5 M by our count);
- a GPU does `--gpu-tflops` effective TFLOP/s on these forwards (default 200: about 20% of an
  H100's dense bf16 peak; the sweep runs fp32 models today, so this is optimistic until it runs
  bf16). The GPU figure is therefore an estimate, not a measurement.
Writes benchmarks/results/grid_cost.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kbitrt.eval.results import environment, write_json  # noqa: E402
from kbitrt.runtime.devices import resolve_device  # noqa: E402

# public checkpoints of the paper's families, parameters in billions
MODELS = {
    "OPT": [0.125, 0.35, 1.3, 2.7, 6.7, 13, 30, 66, 175],
    "BLOOM": [0.56, 1.1, 1.7, 3, 7.1, 176],
    "Pythia": [0.07, 0.16, 0.41, 1.0, 1.4, 2.8, 6.9, 12],
    "GPT-2": [0.124, 0.355, 0.774, 1.5],
}
CELLS = 35_000


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measured", default=str(ROOT / "benchmarks/results/sweep_cell_time-cpu.json"))
    ap.add_argument("--results", default=str(ROOT / "docs/scaling/smollm2.jsonl"),
                    help="a SmolLM2 sweep run with the same evaluation: its cells' median seconds "
                         "is a second per-cell time (same code, another machine state)")
    ap.add_argument("--paper-tokens", type=float, default=5e6)
    ap.add_argument("--gpu-tflops", type=float, default=200.0)
    ap.add_argument("-o", "--output", default=str(ROOT / "benchmarks/results/grid_cost.json"))
    args = ap.parse_args(argv)

    m = json.loads(Path(args.measured).read_text())
    tokens = m["options"]["ppl_tokens"] + sum(m["options"]["mc_tokens"].values())
    # quantized cells only: the 16-bit cell skips quantization
    quant = [s for label, s in m["cells"].items() if label != "16-bit"] or list(m["cells"].values())
    times = {"fresh run (sweep_cell_time)": (sum(quant) / len(quant),
                                             f"load average {m['loadavg_before'][0]:.1f} on {m['cpu_count']} cores")}
    if Path(args.results).exists():
        rows = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
        secs = [r["seconds"] for r in rows if r["bits"] != 16]
        times[f"median of {Path(args.results).name}"] = (
            statistics.median(secs), f"{len(secs)} quantized cells, min {min(secs):.0f} s, max {max(secs):.0f} s")
    sizes = [p * 1e9 for ps in MODELS.values() for p in ps]
    per_model = CELLS / len(sizes)
    gpu_seconds = sum(per_model * 2 * p * args.paper_tokens / (args.gpu_tflops * 1e12) for p in sizes)
    scenarios = {}
    for name, (t_cell, note) in times.items():
        rate = m["params"] * tokens / t_cell  # param-tokens per second on this CPU
        scenarios[name] = {
            "seconds_per_quantized_cell": t_cell, "note": note, "param_tokens_per_second": rate,
            "effective_gflops": 2 * rate / 1e9,
            "smollm2_sized_grid_cpu_hours": CELLS * t_cell / 3600,  # every cell a SmolLM2 cell
            "paper_grid_cpu_hours": sum(per_model * p * args.paper_tokens / rate for p in sizes) / 3600,
        }
    record = {
        "kind": "grid_cost", **environment(resolve_device("cpu")),
        "measured": {"device": m["device"], "params": m["params"], "tokens_per_cell": tokens,
                     "source": Path(args.measured).name},
        "per_cell_time": scenarios,
        "assumptions": {"cells": CELLS, "models": MODELS, "cells_per_model": per_model,
                        "mean_params": sum(sizes) / len(sizes),
                        "paper_tokens_per_cell": args.paper_tokens, "gpu_tflops": args.gpu_tflops,
                        "cost": "proportional to params x tokens scored"},
        "paper_grid_gpu_hours_estimate": gpu_seconds / 3600,
        "largest_cell_gpu_hours_estimate": 2 * max(sizes) * args.paper_tokens / (args.gpu_tflops * 1e12) / 3600,
    }
    write_json(Path(args.output), record)
    print(json.dumps({k: v for k, v in record.items() if k not in ("versions", "argv", "platform")},
                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
