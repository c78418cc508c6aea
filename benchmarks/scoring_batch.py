"""Batched vs one-at-a-time multiple-choice scoring (the path behind `kbit eval --tasks`).

    python benchmarks/scoring_batch.py [--rows 100] [--reps 3]

SmolLM2 nf4-b64 (converted once into a temp folder), social_iqa rows, native runtime, CPU.
Writes benchmarks/results/scoring_batch-cpu.json with versions, device and commit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kbitrt.eval import zeroshot  # noqa: E402
from kbitrt.eval.data import sample_path  # noqa: E402
from kbitrt.eval.results import environment  # noqa: E402
from kbitrt.eval.scoring import score  # noqa: E402
from kbitrt.convert.converter import convert  # noqa: E402
from kbitrt.format.config import QuantConfig  # noqa: E402
from kbitrt.runtime.loader import load_model  # noqa: E402
from kbitrt.convert.gguf import ensure_smollm2  # noqa: E402

SIQA = sample_path("social_iqa-sample")  # shipped in the package


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--mc", default=str(SIQA))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scoring_batch-cpu.json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        convert(ensure_smollm2(), Path(tmp) / "q", QuantConfig(bits=4, block_size=64, dtype="nf"))
        lm = load_model(Path(tmp) / "q", device="cpu")
        rows = zeroshot.read_jsonl(a.mc, a.rows)
        reqs = [zeroshot.encode_pair(lm.tokenizer, r["query"], " " + c) for r in rows for c in r["choices"]]
        score(lm, reqs[:8], batch_size=8)  # warm-up
        result = {}
        for bs in (1, 4, 16, 64):
            times = []
            for _ in range(a.reps):
                t0 = time.perf_counter()
                score(lm, reqs, batch_size=bs)
                times.append(time.perf_counter() - t0)
            result[str(bs)] = {"seconds_mean": statistics.mean(times),
                               "seconds_std": statistics.stdev(times) if len(times) > 1 else 0.0,
                               "requests_per_s": len(reqs) / statistics.mean(times)}
            print(f"batch {bs:3d}: {len(reqs) / statistics.mean(times):7.1f} requests/s", file=sys.stderr)
        record = {"benchmark": "scoring_batch", "model": "SmolLM2-135M-Instruct nf4-b64 (native)",
                  "task": Path(a.mc).name, "rows": len(rows), "requests": len(reqs), "reps": a.reps,
                  "by_batch_size": result, **environment(lm.device)}
    a.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: round(v["requests_per_s"], 1) for k, v in result.items()}))


if __name__ == "__main__":
    main()
