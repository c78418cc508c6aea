"""Whole-model CPU decode per instruction-set build (issue 29): SmolLM2-135M nf4 decoded by kbit
with KBIT_CPU_ISA forced to each variant this CPU runs (kernels/cpu_build.py: avx512_vnni, avx2,
portable, ...), side by side in one JSON, so the AVX2 build's speed is measured on this AVX-512
machine. Each figure is benchmarks/cpu_decode.py's kbit worker (its own process, 128 greedy steps,
median of --reps, wall and CPU time); `kbit` is the default weights (`auto`: the packed codes on a
vector build, 16-bit copies on the portable one), `kbit-low-memory` forces the packed codes (not
on the portable build by default: its loops are ~15x slower, benchmarks/cpu_matmul.py).

    python benchmarks/cpu_isa.py --threads 2 --reps 3

Writes benchmarks/results/cpu_isa-<threads>threads.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from cpu_decode import machine, run_one, versions  # noqa: E402

PROBE = ("from kbitrt.runtime.kernels import cpu; "
         "print(cpu.loaded_variant(), '|', cpu.describe())")


def variant_of(isa: str) -> str:
    env = dict(os.environ, KBIT_CPU_ISA=isa, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True)
    return p.stdout.strip() or p.stderr.strip().splitlines()[-1]


def main(argv=None) -> int:
    from kbitrt.runtime.kernels.cpu_build import runnable

    cache = Path(os.environ.get("KBIT_CACHE", Path.home() / ".cache" / "kbitrt"))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--isas", default=",".join(runnable()))
    ap.add_argument("--runtimes", default="kbit,kbit-low-memory")
    ap.add_argument("--portable-runtimes", default="kbit")
    ap.add_argument("--kbit", type=Path, default=cache / "smol-nf4",
                    help="a kbit folder (kbit convert SmolLM2 --bits 4 --block 64 --dtype nf)")
    ap.add_argument("-o", "--output", type=Path, default=None)
    args = ap.parse_args(argv)
    out = args.output or ROOT / f"benchmarks/results/cpu_isa-{args.threads}threads.json"
    worker_args = argparse.Namespace(threads=args.threads, new=args.new, reps=args.reps,
                                     low_memory_reps=args.reps, kbit=args.kbit, hf=args.kbit,
                                     gguf=args.kbit, compile=False, memory_only=False,
                                     timeout=1800)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    load0 = os.getloadavg()
    results: dict = {}
    best = args.isas.split(",")[0]
    for isa in args.isas.split(","):
        os.environ["KBIT_CPU_ISA"] = isa
        results[isa] = {"loaded": variant_of(isa)}
        names = (args.portable_runtimes if isa == "portable" else args.runtimes).split(",")
        for name in names:
            print(f"{isa} {name} ...", file=sys.stderr, flush=True)
            results[isa][name] = run_one(worker_args, name)
            print(f"  {json.dumps(results[isa][name])[:300]}", file=sys.stderr, flush=True)
            write(out, args, commit, load0, results, best)  # after each: partial runs count
    os.environ.pop("KBIT_CPU_ISA", None)
    print(json.dumps(write(out, args, commit, load0, results, best), indent=2))
    return 0


def write(out: Path, args, commit: str, load0, results: dict, best: str) -> dict:
    """The record so far; returns the speed ratios against the first (best) variant."""
    def vs_best(key: str) -> dict:
        return {isa: {name: r[name][key] / results[best][name][key] for name in r
                      if key in r[name] and key in results[best].get(name, {})}
                for isa, r in results.items()}

    ratios = vs_best("tok_s")
    record = {"kind": "cpu_isa", "machine": machine(), "cores": os.cpu_count(),
              "threads": args.threads, "new_tokens": args.new, "reps": args.reps,
              "model": str(args.kbit), "versions": versions(("torch", "kbitrt")),
              "commit": commit, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
              "note": "forced variants of one AVX-512 machine (KBIT_CPU_ISA); other agents were "
                      "running on this 2-core machine",
              "results": results, f"tok_s_vs_{best}": ratios,
              f"tok_s_cpu_time_vs_{best}": vs_best("tok_s_cpu_time")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    return ratios


if __name__ == "__main__":
    sys.exit(main())
