"""Decode speed of the native decoder beside the transformers backend (KbitLinear / KbitExperts)
on tiny-random Qwen3 and Qwen3-MoE models of realistic layer shapes (hidden 1024; Qwen3-0.6B's
attention and MLP widths; the MoE with 8 experts of width 1024, top-2), nf4 block 64, CPU.

Both are saved by transformers (random init), converted by kbit convert's converter, and loaded
as a kbit folder with the default CPU weights (packed codes through the fused CPU kernels). Decode
speed: `--tokens` greedy single-token steps after an 8-token prompt, `--reps` times after a
warm-up, wall and process CPU time (the steadier figure on a shared machine), the load average
before and after. Writes benchmarks/results/moe_decode-<threads>threads.json.

    python benchmarks/moe_decode.py --threads 2 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = dict(vocab_size=8192, hidden_size=1024, num_attention_heads=16, num_key_value_heads=8,
              head_dim=128, max_position_embeddings=512)
MODELS = {
    "qwen3": lambda layers: dict(model_type="qwen3", intermediate_size=3072,
                                 num_hidden_layers=layers, **SHAPES),
    "qwen3_moe": lambda layers: dict(model_type="qwen3_moe", intermediate_size=3072,
                                     moe_intermediate_size=1024, num_experts=8,
                                     num_experts_per_tok=2, norm_topk_prob=True,
                                     num_hidden_layers=layers, **SHAPES),
}


def make(name: str, layers: int, folder: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from kbitrt.convert.converter import convert
    from kbitrt.format.config import QuantConfig

    cfg = dict(MODELS[name](layers))
    torch.manual_seed(0)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder / "src")
    convert(folder / "src", folder / "kbit", QuantConfig(bits=4, block_size=64, dtype="nf"))
    return folder / "kbit"


def decode(path: Path, backend: str, tokens: int, reps: int) -> dict:
    from kbitrt.format.reader import KbitModel
    from kbitrt.runtime.loader import build_model

    lm = build_model(KbitModel.open(path), "cpu", backend=backend)
    model = lm.model
    prompt = torch.arange(1, 9)[None]

    def run() -> list[int]:
        model.setup_caches(1, 8 + tokens)
        out = []
        try:
            with torch.no_grad():
                logits = model(prompt, torch.arange(8))
                for t in range(tokens):
                    nxt = int(logits[0, -1].argmax())
                    out.append(nxt)
                    logits = model(torch.tensor([[nxt]]), torch.tensor([8 + t]))
        finally:
            model.drop_caches()
        return out

    run()  # warm-up
    walls, cpus, ids = [], [], None
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        ids = run()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    layers = getattr(model, "cpu_layers", None)
    return {"backend": lm.backend, "cpu_weights": lm.cpu_weights, "cpu_layers": layers,
            "tok_s_wall_median": round(tokens / statistics.median(walls), 2),
            "tok_s_cpu_median": round(tokens / statistics.median(cpus), 2),
            "walls_s": [round(w, 3) for w in walls], "greedy_ids_head": ids[:8]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    record = {"benchmark": "moe_decode", "threads": args.threads, "layers": args.layers,
              "tokens": args.tokens, "quant": "nf4-b64", "shapes": SHAPES,
              "device": platform.processor() or platform.machine(),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": sys.version.split()[0]},
              "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip(),
              "note": "shared 2-core machine: other agents were running (see the load averages); "
                      "CPU time is the steadier figure",
              "loadavg_at_start": os.getloadavg(), "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            path = make(name, args.layers, Path(tmp) / name)
            rows = {}
            for backend in ("native", "transformers"):
                rows[backend] = decode(path, backend, args.tokens, args.reps)
                print(name, rows[backend], flush=True)
            rows["native_over_transformers_cpu"] = round(
                rows["native"]["tok_s_cpu_median"] / rows["transformers"]["tok_s_cpu_median"], 3)
            record["results"][name] = rows
    record["loadavg_at_end"] = os.getloadavg()
    out = Path(args.output or ROOT / f"benchmarks/results/moe_decode-{args.threads}threads.json")
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
