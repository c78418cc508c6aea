"""The first `kbit run` after install, before and after the prebuilt CPU kernels (issue 29):
wall time and the peak RSS of the largest process it starts (the compiler included).

    python benchmarks/first_run.py --reps 2

`before`: the kernels are built on first use (KBIT_CPU_ISA=native, the old default: a compiler
runs inside the command). `after`: the prebuilt variant this CPU runs is loaded (the package's
kernels/_prebuilt/, built here first by kernels/build_prebuilt.py if missing; that build's own
time is recorded as the install-time cost). Every run starts on an empty kernel cache
(KBIT_CACHE is a fresh folder), reps alternate between the two. The model is SmolLM2-135M nf4
(converted once, untimed). Writes benchmarks/results/first_run.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from cpu_decode import machine, versions  # noqa: E402

PROMPT = "The capital of France is"
# runs a command and prints the largest peak RSS of any process it waited for (the compiler too)
WRAP = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)")


def kbit_model(cache: Path) -> Path:
    out = cache / "smol-nf4"
    if not (out / "config.json").exists():
        from kbitrt.convert.converter import convert
        from kbitrt.convert.gguf import ensure_smollm2
        from kbitrt.format.config import QuantConfig

        convert(ensure_smollm2(), out, QuantConfig(bits=4, block_size=64, dtype="nf"), force=True)
    return out


def ensure_prebuilt() -> tuple[dict, float | None]:
    """The package's prebuilt set for these sources, built now if missing (seconds, or None)."""
    import torch

    from kbitrt.runtime.kernels.cpu import HEADERS, SOURCE
    from kbitrt.runtime.kernels.cpu_build import MANIFEST, prebuilt_dir, prebuilt_library

    if prebuilt_library((SOURCE, *HEADERS), "auto", torch.__version__)[0] is not None:
        return json.loads((prebuilt_dir() / MANIFEST).read_text()), None
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kbitrt.runtime.kernels.build_prebuilt"], check=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return json.loads((prebuilt_dir() / MANIFEST).read_text()), time.perf_counter() - t0


def first_run(model: Path, isa: str, threads: int, new: int) -> dict:
    """One `kbit run` on an empty kernel cache; wall seconds, peak RSS, what it said on stderr."""
    cache = Path(tempfile.mkdtemp(prefix="kbit-first-run-"))
    env = {k: v for k, v in os.environ.items() if k not in ("KBIT_CPU_ISA", "KBIT_PREBUILT_DIR")}
    env.update(KBIT_CACHE=str(cache), PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads),
               KBIT_CPU_ISA=isa)
    kbit = Path(sys.executable).with_name("kbit")
    cmd = [str(kbit), "run", str(model), "-p", PROMPT, "--greedy", "--max-new-tokens", str(new)]
    try:
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", WRAP, *cmd], env=env, capture_output=True,
                           text=True, timeout=1800)
        wall = time.perf_counter() - t0
        peak_kb, rc = (int(v) for v in p.stdout.strip().splitlines()[-1].split()[1:3])
        built = (cache / "cpu-kernels").exists()
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    notes = [ln for ln in p.stderr.splitlines() if ln.startswith("kbit:")]
    return {"seconds": wall, "peak_rss_mb": peak_kb / 1024, "returncode": rc,
            "compiled": built, "stderr_kbit_lines": notes}


def summary(runs: list[dict]) -> dict:
    return {"seconds_median": statistics.median(r["seconds"] for r in runs),
            "peak_rss_mb_median": statistics.median(r["peak_rss_mb"] for r in runs),
            "compiled": [r["compiled"] for r in runs], "runs": runs}


def main(argv=None) -> int:
    cache = Path(os.environ.get("KBIT_CACHE", Path.home() / ".cache" / "kbitrt"))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--model", type=Path, default=None, help="a kbit folder (default: SmolLM2 nf4)")
    ap.add_argument("-o", "--output", type=Path, default=ROOT / "benchmarks/results/first_run.json")
    args = ap.parse_args(argv)
    model = args.model or kbit_model(cache)
    manifest, build_s = ensure_prebuilt()
    load0 = os.getloadavg()
    results: dict[str, list] = {"before": [], "after": []}
    for _ in range(args.reps):  # alternating
        results["before"].append(first_run(model, "native", args.threads, args.new))
        results["after"].append(first_run(model, "auto", args.threads, args.new))
        print(json.dumps({k: v[-1] for k, v in results.items()})[:600], file=sys.stderr)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    before, after = summary(results["before"]), summary(results["after"])
    record = {"kind": "first_run", "machine": machine(), "cores": os.cpu_count(),
              "threads": args.threads, "reps": args.reps, "new_tokens": args.new,
              "command": f"kbit run <smol-nf4> -p {PROMPT!r} --greedy --max-new-tokens {args.new}",
              "model": str(model), "versions": versions(), "commit": commit,
              "loadavg_start": load0, "loadavg_end": os.getloadavg(),
              "note": "other agents were running on this 2-core machine; peak RSS is the largest "
                      "single process the command started (the compiler's cc1plus included)",
              "prebuilt": {"variants": list(manifest["variants"]), "torch": manifest["torch"],
                           "build_seconds_all_variants": build_s},
              "before_built_on_first_use": before, "after_prebuilt": after,
              "speedup": before["seconds_median"] / after["seconds_median"],
              "peak_rss_ratio": after["peak_rss_mb_median"] / before["peak_rss_mb_median"]}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("speedup", "peak_rss_ratio")}
                     | {"before_s": before["seconds_median"], "after_s": after["seconds_median"],
                        "before_mb": before["peak_rss_mb_median"],
                        "after_mb": after["peak_rss_mb_median"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
