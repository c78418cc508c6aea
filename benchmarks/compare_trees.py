"""Before/after on one machine: the same benchmark run from two checkouts, alternating, in one run.

This VM's speed drifts 15-30% over minutes, so a figure from yesterday's JSON cannot be compared
with today's. Here each round runs the benchmark once from each checkout (the order flips every
round), each in its own process, and the medians of the rounds are compared.

    git worktree add /tmp/before <commit>
    python benchmarks/compare_trees.py --before /tmp/before --after . --rounds 3 \\
        -- benchmarks/cpu_decode.py --runtimes kbit,kbit-low-memory --reps 2

The benchmark must accept `-o FILE` and write a JSON whose `results` map runtime names to dicts
with a `tok_s` (cpu_decode.py does). Writes benchmarks/results/compare_trees-<name>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from cpu_decode import machine, versions  # noqa: E402  (a sibling script, not a package)


def commit_of(tree: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True,
                          text=True).stdout.strip()


def run_tree(tree: Path, bench: list[str], timeout: int) -> dict:
    """One run of the benchmark from `tree` (its own script, its own kbitrt): its `results`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        env = {**os.environ, "PYTHONPATH": str(tree)}
        cmd = [sys.executable, str(tree / bench[0]), *bench[1:], "-o", str(out)]
        p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        if p.returncode or not out.exists():
            return {"error": (p.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        return json.loads(out.read_text())["results"]


def summarize(rounds: list[dict]) -> dict:
    """Per runtime: each side's tok/s per round, medians, and after/before."""
    out = {}
    names = {n for r in rounds for side in r.values() for n in side if n != "error"}
    for name in sorted(names):
        per = {side: [r[side][name]["tok_s"] for r in rounds
                      if "tok_s" in r[side].get(name, {})] for side in ("before", "after")}
        if not per["before"] or not per["after"]:
            continue
        med = {side: statistics.median(v) for side, v in per.items()}
        out[name] = {"tok_s_before": per["before"], "tok_s_after": per["after"],
                     "median_before": med["before"], "median_after": med["after"],
                     "after_vs_before": med["after"] / med["before"]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True, help="checkout of the old commit")
    ap.add_argument("--after", type=Path, default=ROOT, help="checkout of the new commit")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--name", default="cpu_decode")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("-o", "--output", default=None)
    ap.add_argument("bench", nargs=argparse.REMAINDER, help="-- SCRIPT ARGS... (relative to a tree)")
    args = ap.parse_args(argv)
    bench = args.bench[1:] if args.bench[:1] == ["--"] else args.bench
    if not bench:
        ap.error("give the benchmark after --, e.g. -- benchmarks/cpu_decode.py --runtimes kbit")
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    load0, rounds = os.getloadavg(), []
    for i in range(args.rounds):
        order = ("before", "after") if i % 2 == 0 else ("after", "before")
        done = {}
        for side in order:
            t0 = time.perf_counter()
            done[side] = run_tree(trees[side], bench, args.timeout)
            print(f"round {i + 1} {side}: {time.perf_counter() - t0:.0f} s "
                  f"{json.dumps(done[side])[:300]}", file=sys.stderr, flush=True)
        rounds.append(done)
    record = {"kind": "compare_trees", "benchmark": bench, "machine": machine(),
              "cores": os.cpu_count(), "versions": versions(),
              "commits": {side: commit_of(t) for side, t in trees.items()},
              "loadavg_start": load0, "loadavg_end": os.getloadavg(), "rounds": rounds,
              "summary": summarize(rounds)}
    out = Path(args.output or ROOT / f"benchmarks/results/compare_trees-{args.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
