"""Quantization throughput with --scales mse and --dtype lloyd beside absmax (issue 15), on the CPU.

    python benchmarks/quality_throughput.py [--reps 3] [--threads 2]

Each tensor is fp16, quantized whole by `quantize_weight` (scales, codebook, codes, packing), as
the converter does chunk by chunk. After a warm-up every repetition is timed by the wall clock and
by the process CPU time; on a shared machine the wall clock includes other jobs' time, so the rate
per CPU-second times the threads is the figure for an idle machine ("M params/s on N cores").
Writes benchmarks/results/quality-throughput-cpu.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.fidelity import cpu_name, git_commit  # noqa: E402
from kbitrt.format.quantizer import quantize_weight  # noqa: E402
from kbitrt.format.config import QuantConfig  # noqa: E402

SETTINGS = [dict(dtype="nf"), dict(dtype="nf", scales="mse"), dict(dtype="int", scales="mse"),
            dict(dtype="fp", scales="mse"), dict(dtype="lloyd"), dict(dtype="lloyd", scales="mse")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default="4096x4096,11008x4096")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/quality-throughput-cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    shapes = [tuple(int(v) for v in x.split("x")) for x in args.shapes.split(",")]
    for shape in shapes:
        w = (torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.02).half()
        for opts in SETTINGS:
            config = QuantConfig(bits=4, block_size=64, **opts)
            quantize_weight(w, config)  # warm-up (lookup tables, allocator)
            wall, cpu = [], []
            for _ in range(args.reps):
                c0, w0 = time.process_time(), time.perf_counter()
                quantize_weight(w, config)
                wall.append(time.perf_counter() - w0)
                cpu.append(time.process_time() - c0)
            numel = w.numel()
            per_cpu = [numel / s / 1e6 for s in cpu]
            row = {"label": config.label, "shape": list(shape),
                   "mparams_s_wall_mean": statistics.mean(numel / s / 1e6 for s in wall),
                   "mparams_per_cpu_s_mean": statistics.mean(per_cpu),
                   "mparams_per_cpu_s_std": statistics.pstdev(per_cpu),
                   "mparams_s_idle_estimate": statistics.mean(per_cpu) * args.threads,
                   "mparams_s_2core_estimate": statistics.mean(per_cpu) * 2,
                   "wall_s": wall, "cpu_s": cpu}
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("label", "shape", "mparams_s_wall_mean",
                                                  "mparams_s_2core_estimate")}), flush=True)
            write(args, rows)


def write(args, rows: list[dict]) -> None:
    result = {"benchmark": "quality_throughput", "bits": 4, "block_size": 64, "input_dtype": "float16",
              "threads": args.threads, "reps": args.reps, "rows": rows,
              "device": {"cpu": cpu_name(), "threads": args.threads},
              "load_average": list(__import__("os").getloadavg()),
              "versions": {"torch": torch.__version__}, "commit": git_commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
