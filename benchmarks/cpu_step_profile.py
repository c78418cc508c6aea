"""Where an eager CPU decode step goes: torch.profiler over single-token steps of a kbit model
(default: packed codes through the fused CPU kernels), counting the torch ops per step (top-level
and all), the kernels' calls among them and their time, and, separately, the wall-clock spread of
repeated 128-token decodes in one process (this VM's run-to-run noise); for the layer stack
(the default: the layers run from C++, runtime/layer_stack.py) and for the Python layers.

    python benchmarks/cpu_step_profile.py --kbit /tmp/smol-nf4 --threads 2

Writes benchmarks/results/cpu_step_profile-<threads>threads.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROMPT = "The history of the city begins"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kbit", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--decodes", type=int, default=8, help="128-token decodes for the spread")
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from torch.profiler import profile

    from kbitrt.runtime.kernels import cpu
    from kbitrt.runtime.loader import load_model

    lm = load_model(args.kbit, device="cpu")
    m = lm.model
    ids = lm.tokenizer(PROMPT, return_tensors="pt").input_ids
    T0 = ids.shape[1]

    def measure() -> dict:
        with torch.no_grad():
            m.setup_caches(1, T0 + 8 + args.steps)
            logits = m(ids, torch.arange(T0), last_only=True)
            tok, pos = logits[:, -1].argmax(-1, keepdim=True), torch.tensor([T0])
            for _ in range(4):
                m(tok, pos)
            with profile() as prof:
                for _ in range(args.steps):
                    m(tok, pos)
            layers = m.cpu_layers
            m.drop_caches()

            def decode(n: int = 128) -> float:
                m.setup_caches(1, T0 + n + 1)
                out = m(ids, torch.arange(T0), last_only=True)
                p = torch.tensor([T0])
                t0 = time.perf_counter()
                for i in range(n):
                    p.fill_(T0 + i)
                    out = m(out[:, -1].argmax(-1, keepdim=True), p).clone()
                dt = time.perf_counter() - t0
                m.drop_caches()
                return n / dt

            decode(16)
            rates = [decode() for _ in range(args.decodes)]
        events = prof.key_averages()
        top = [e for e in prof.events() if e.cpu_parent is None]
        # the kernels' ops: kbit_linear, half_linear, and the layer stack (its linears inside)
        kernels = [e for e in events if e.key.startswith("kbitrt_cpu")]
        steps = args.steps
        return {
            "cpu_layers": layers,
            "top_level_ops_per_step": len(top) / steps,
            "all_ops_per_step": sum(e.count for e in events) / steps,
            "kbitrt_cpu_calls_per_step": sum(e.count for e in kernels) / steps,
            "kbitrt_cpu_ms_per_step": sum(e.self_cpu_time_total for e in kernels) / steps / 1e3,
            "profiled_ms_per_step": sum(e.self_cpu_time_total for e in events) / steps / 1e3,
            "decode_tok_s_runs": rates, "decode_tok_s_median": statistics.median(rates),
            "decode_tok_s_min": min(rates), "decode_tok_s_max": max(rates)}

    paths = {}
    for name, use in (("layer stack", True), ("python layers", False)):
        m.use_layer_stack = use
        paths[name] = measure()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    record = {
        "kind": "cpu_step_profile", "machine": platform.processor() or platform.machine(),
        "threads": args.threads, "model": str(args.kbit), "cpu_weights": lm.cpu_weights,
        "cpu_kernels": cpu.describe(), "steps_profiled": args.steps, "paths": paths,
        "torch": torch.__version__, "commit": commit, "loadavg": os.getloadavg(),
    }
    out = Path(args.output or ROOT / f"benchmarks/results/cpu_step_profile-{args.threads}threads.json")
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
