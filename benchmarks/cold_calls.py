"""What one torch call costs from Python on small tensors, warm and cold: cold is right after a
sweep over a large buffer, as a decoding step's calls around the layer stack run after the
weights have streamed through the caches (docs/cpu.md, "Fewer torch calls around the stack").

    python benchmarks/cold_calls.py --threads 2

Writes benchmarks/results/cold_calls-<threads>threads.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from cpu_decode import machine, versions  # noqa: E402
from kbitrt.eval.results import git_commit  # noqa: E402


def timings(fn, sweep=None, reps: int = 200) -> list[float]:
    """Microseconds per call of fn(), each after sweep() when given (outside the timing)."""
    out = []
    for _ in range(reps):
        if sweep is not None:
            sweep()
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=576, help="SmolLM2-135M's hidden size")
    ap.add_argument("--sweep-mb", type=int, default=128, help="more than the last-level cache")
    ap.add_argument("-o", "--out", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    x, w = torch.randn(1, 1, args.dim), torch.randn(args.dim)
    big = torch.ones(args.sweep_mb * 2**20 // 4)
    calls = {"x + x": lambda: x + x, "x.cos()": lambda: x.cos(),
             "torch.rms_norm": lambda: torch.rms_norm(x, w.shape, w, 1e-5)}
    results = {}
    for name, fn in calls.items():
        for _ in range(50):
            fn()
        warm, cold = timings(fn), timings(fn, sweep=lambda: big.add_(1.0), reps=60)
        results[name] = {"warm_us_median": statistics.median(warm),
                         "cold_us_median": statistics.median(cold)}
        print(f"{name}: warm {results[name]['warm_us_median']:.1f} us, "
              f"cold {results[name]['cold_us_median']:.1f} us", flush=True)
    commit = git_commit()  # with +dirty where kbitrt/ has uncommitted changes
    record = {"kind": "cold_calls", "machine": machine(), "cores": os.cpu_count(),
              "threads": args.threads, "dim": args.dim, "sweep_mb": args.sweep_mb,
              "versions": versions(("torch", "kbitrt")), "commit": commit,
              "loadavg": os.getloadavg(), "calls": results}
    out = args.out or ROOT / "benchmarks" / "results" / f"cold_calls-{args.threads}threads.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
