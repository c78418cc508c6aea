"""16-bit CPU copies under fp32 activations: speed and logits of today's path (the fused kernels'
half_linear, fp32 activations, fp32 sums: linear.dense_linear) beside the previous one (the
activations cast to the weights' 16 bits, torch's F.linear, the result cast back).

Speed: SmolLM2-135M's linears of 30 layers (q, k, v, o, gate, up, down) at M = 1 and M = 8, fp16
and bf16 copies, wall time and process CPU time per pass over all of them, the two paths in turn
within each rep; on a loaded machine the minimum is the least disturbed figure (threads that wait
spin, so CPU time is inflated too). Logits: a kbit folder
(SmolLM2 nf4 by default) in fp16 and bf16 copies on the native decoder, each path against fp32
copies (max |diff| / max |logit| and ||diff|| / ||logits|| over 32 tokens).
Writes benchmarks/results/cpu_half_weights-<threads>threads.json.

    python benchmarks/cpu_half_weights.py --threads 2 --model ~/.cache/kbitrt/SmolLM2-135M-Instruct-nf4-b64-<hash>
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def cast_activations(x, w, bias):
    """The previous dense_linear: x rounded to W's 16 bits, the product cast back."""
    y = F.linear(x.to(w.dtype), w).to(x.dtype)
    return y + bias.to(x.dtype) if bias is not None else y


def time_paths(layers: int, reps: int) -> list[dict]:
    """Per dtype and M, the two paths timed in turn within each rep (both see the same load)."""
    from kbitrt.runtime.kernels.ops import dense_linear

    g = torch.Generator().manual_seed(0)
    paths = (("fp32 activations (half_linear)", dense_linear),
             ("activations cast to 16 bit (F.linear)", cast_activations))
    out = []
    for dtype in (torch.float16, torch.bfloat16):
        ws = [(torch.randn(n, k, generator=g) * 0.02).to(dtype)
              for _ in range(layers) for n, k in SHAPES]
        for m in (1, 8):
            xs = {k: torch.randn(m, k, generator=g) for k in {k for _, k in SHAPES}}
            walls, cpus = {name: [] for name, _ in paths}, {name: [] for name, _ in paths}
            for name, fn in paths:
                for w in ws[:7]:
                    fn(xs[w.shape[1]], w, None)  # warm-up
            for _ in range(reps):
                for name, fn in paths:
                    t0, c0 = time.perf_counter(), time.process_time()
                    for w in ws:
                        fn(xs[w.shape[1]], w, None)
                    walls[name].append(time.perf_counter() - t0)
                    cpus[name].append(time.process_time() - c0)
            for name, _ in paths:
                out.append({"dtype": str(dtype).replace("torch.", ""), "M": m, "path": name,
                            "ms_wall_min": round(1e3 * min(walls[name]), 3),
                            "ms_wall_median": round(1e3 * statistics.median(walls[name]), 3),
                            "ms_cpu_min": round(1e3 * min(cpus[name]), 3),
                            "ms_cpu_median": round(1e3 * statistics.median(cpus[name]), 3)})
                print(out[-1], flush=True)
    return out


def logit_errors(model: Path) -> list[dict]:
    import kbitrt.runtime.linear as linear
    from kbitrt.format.reader import KbitModel
    from kbitrt.runtime.loader import build_model

    km = KbitModel.open(model, check_model=False)
    ids = torch.randint(0, 40000, (1, 32), generator=torch.Generator().manual_seed(0))

    def logits(cpu_weights):
        with torch.no_grad():
            return build_model(km, "cpu", backend="native", cpu_weights=cpu_weights).model(ids)

    ref = logits("fp32")
    out = []
    for path, fn in (("fp32 activations (half_linear)", linear.dense_linear),
                     ("activations cast to 16 bit (F.linear)", cast_activations)):
        saved, linear.dense_linear = linear.dense_linear, fn
        try:
            for cw in ("fp16", "bf16"):
                d = logits(cw) - ref
                out.append({"cpu_weights": cw, "path": path,
                            "max_rel": float(d.abs().max() / ref.abs().max()),
                            "norm_rel": float(d.norm() / ref.norm())})
                print(out[-1], flush=True)
        finally:
            linear.dense_linear = saved
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--model", type=Path, default=None, help="a kbit folder for the logit errors")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    record = {"benchmark": "cpu_half_weights", "threads": args.threads, "layers": args.layers,
              "device": platform.processor() or platform.machine(),
              "torch": torch.__version__, "python": sys.version.split()[0],
              "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip(),
              "loadavg_at_start": os.getloadavg(),
              "note": "shared machine: other agents were running (see the load averages)",
              "speed": time_paths(args.layers, args.reps)}
    if args.model is not None:
        record["model"] = str(args.model)
        record["logits_vs_fp32_copies"] = logit_errors(args.model)
    record["loadavg_at_end"] = os.getloadavg()
    out = Path(args.output or ROOT / f"benchmarks/results/cpu_half_weights-{args.threads}threads.json")
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
