"""Quantization throughput on the CPU: M params/s per data type (4 bits, block 64) beside bitsandbytes.

    python benchmarks/quantize_throughput.py [--reps 5] [--threads N]

Each tensor is fp16, quantized whole by `quantize_weight` (absmax, normalise, nearest index, pack).
bitsandbytes' `quantize_4bit` (nf4, block 64) runs on the same tensors in the same run. After a
warm-up, every repetition is timed both by the wall clock and by the process CPU time: on a shared
machine the wall clock includes other jobs' time, CPU time / threads does not. Writes
benchmarks/results/quantize_throughput-cpu.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
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

SHAPES = [(4096, 4096), (11008, 4096)]
DATA_TYPES = ["int", "fp", "nf", "quantile", "dynamic"]


def timed(fn, reps: int) -> dict:
    fn()  # warm-up: caches, lookup tables, allocator
    wall, cpu = [], []
    for _ in range(reps):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return {"wall_s": wall, "cpu_s": cpu}


def summarise(t: dict, numel: int) -> dict:
    rate = [numel / s / 1e6 for s in t["wall_s"]]
    rate_cpu = [numel / s / 1e6 for s in t["cpu_s"]]  # M params per CPU-second (one core)
    return {"mparams_s_mean": statistics.mean(rate), "mparams_s_std": statistics.pstdev(rate),
            "mparams_s_best": max(rate),
            "mparams_per_cpu_s_mean": statistics.mean(rate_cpu),
            "mparams_per_cpu_s_std": statistics.pstdev(rate_cpu), **t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/quantize_throughput-cpu.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import bitsandbytes
    import bitsandbytes.functional as bnbf

    rows = []
    for shape in SHAPES:
        w = (torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.02).half()
        for dt in DATA_TYPES:
            cfg = QuantConfig(bits=4, block_size=64, dtype=dt)
            r = summarise(timed(lambda: quantize_weight(w, cfg), args.reps), w.numel())
            rows.append({"impl": "kbitrt", "dtype": dt, "shape": list(shape), **r})
            print(f"{shape} kbitrt {dt:9s} {r['mparams_s_mean']:7.1f} +/- {r['mparams_s_std']:5.1f} M/s "
                  f"wall, {r['mparams_per_cpu_s_mean']:7.1f} M/CPU-s", flush=True)
        r = summarise(timed(lambda: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4"),
                            args.reps), w.numel())
        rows.append({"impl": "bitsandbytes.quantize_4bit", "dtype": "nf4", "shape": list(shape), **r})
        print(f"{shape} bnb    nf4       {r['mparams_s_mean']:7.1f} +/- {r['mparams_s_std']:5.1f} M/s "
              f"wall, {r['mparams_per_cpu_s_mean']:7.1f} M/CPU-s", flush=True)

    result = {
        "benchmark": "quantize_throughput", "bits": 4, "block_size": 64, "input_dtype": "float16",
        "absmax_dtype": "fp16", "reps": args.reps, "rows": rows,
        "device": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                   "load_average_at_end": os.getloadavg()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "bitsandbytes": bitsandbytes.__version__, "kbitrt": "0.1.0"},
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "notes": "M params/s = numel / wall seconds; M/CPU-s = numel / process CPU seconds "
                 "(all threads), robust to other jobs on a shared machine.",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
