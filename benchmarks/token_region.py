"""The one-region token step (kernels/cpu_step.h) against the stack's loops, in one process:
decoding alternates between them every --block tokens, so this VM's minute-to-minute drift falls
on both alike (docs/cpu.md, "One parallel region per token").

    python benchmarks/token_region.py MODEL_DIR [MODEL_DIR ...] --threads 2

MODEL_DIR: a kbit model folder (benchmarks/cpu_scaling.py --prepare-only builds random-weight
ones). Positions cycle through --context slots after a 16-token prompt, as cpu_scaling's tg128
decodes at short context. Each block's tokens/s is one sample; the ratio is taken per pair of
neighbouring blocks. Writes benchmarks/results/token_region-<threads>threads.json.
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
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cpu_decode import machine, versions  # noqa: E402
from kbitrt.eval.results import git_commit  # noqa: E402


def alternate(model_dir: str, tokens: int, block: int, context: int) -> dict:
    """Seconds per token of each block, per mode ("loops", "region"), the modes alternating."""
    import torch

    from kbitrt.runtime.generate import decode_step
    from kbitrt.runtime.kernels import cpu
    from kbitrt.runtime.loader import load_model

    lm = load_model(model_dir, device="cpu")
    step, _ = decode_step(lm, False)
    model, ops = lm.model, torch.ops.kbitrt_cpu
    prompt = 16
    ids = torch.randint(0, 1000, (1, prompt + context + 1), generator=torch.Generator().manual_seed(0))
    per_block = {"loops": [], "region": []}
    served = 0
    with torch.no_grad():
        model.setup_caches(1, prompt + context + 1)
        model(ids[:, :prompt], torch.arange(prompt), last_only=True)
        pos = torch.tensor([prompt])
        for b in range(tokens // block):
            mode = ("loops", "region")[(b + b // 2) % 2]  # ABBA: neither mode always goes first
            ops.set_token_region(mode == "region")
            before = ops.token_region_steps()
            t0 = time.perf_counter()
            for j in range(block):
                slot = prompt + (b * block + j) % context
                pos.fill_(slot)
                step(ids[:, slot:slot + 1], pos)
            per_block[mode].append((time.perf_counter() - t0) / block)
            served += ops.token_region_steps() - before
    ops.set_token_region(True)
    pairs = [a / b for a, b in zip(per_block["loops"], per_block["region"])]
    return {"model": model_dir, "activations": cpu.activations(), "variant": cpu.loaded_variant(),
            "region_steps_served": served,
            "loops_tok_s_median": 1 / statistics.median(per_block["loops"]),
            "region_tok_s_median": 1 / statistics.median(per_block["region"]),
            "speedup_per_pair_median": statistics.median(pairs),
            "speedup_per_pair_range": [min(pairs), max(pairs)],
            "blocks_per_mode": len(pairs), "s_per_token": per_block}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024, help="per model, both modes together")
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("-o", "--out", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    results = []
    from kbitrt.errors import KbitError

    for m in args.models:
        try:
            r = alternate(m, args.tokens, args.block, args.context)
        except KbitError as e:  # a wrong path, not a kbit folder: one line, nothing written
            print(f"token_region: {e}", file=sys.stderr)
            return 2
        print(f"{m}: loops {r['loops_tok_s_median']:.1f} tok/s, region "
              f"{r['region_tok_s_median']:.1f} tok/s, per pair {r['speedup_per_pair_median']:.3f}x "
              f"({r['speedup_per_pair_range'][0]:.2f}-{r['speedup_per_pair_range'][1]:.2f})",
              flush=True)
        results.append(r)
    commit = git_commit()  # with +dirty where kbitrt/ has uncommitted changes
    record = {"kind": "token_region", "machine": machine(), "cores": os.cpu_count(),
              "threads": args.threads, "tokens": args.tokens, "block": args.block,
              "context": args.context, "versions": versions(("torch", "kbitrt")),
              "commit": commit, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
              "results": results}
    out = args.out or ROOT / "benchmarks" / "results" / f"token_region-{args.threads}threads.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
