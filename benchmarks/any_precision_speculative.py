"""Self-speculative decoding of an any-precision SmolLM2-135M-Instruct against the parent alone.

One command (converts the any-precision model once into $KBIT_CACHE if it is missing):

    python benchmarks/any_precision_speculative.py                 # CPU, writes the JSON below
    python benchmarks/any_precision_speculative.py --device cuda --out benchmarks/results/any_precision_speculative-smollm2-cuda.json

For each draft width and number of draft tokens: kbitrt.eval.latency.speculative_bench (what
`kbit bench --draft-bits` runs): greedy decoding of --gen tokens after a 64-token prompt from the
shipped Wikipedia sample, the parent alone and the speculative run alternating, decode tokens/s,
acceptance rate, tokens per round, and whether the tokens are identical. Timings on a shared
machine are noisy: the JSON records the load average before and after every configuration.

The model is loaded once with the draft and parent widths (bits="D-P"): every linear holds the P
planes, one set of scales and the codebooks, and both the parent alone and the draft/verify steps
run the plane kernels on the first D or P planes (runtime/any_precision.py), on the CPU through
the C++ layer stack.
"""

from __future__ import annotations

import argparse
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

from kbitrt.eval.latency import held_weights, speculative_bench  # noqa: E402
from kbitrt.eval.results import environment  # noqa: E402

OUT = ROOT / "benchmarks/results/any_precision_speculative-smollm2-cpu.json"


def ensure_model(parent: int, lo: int) -> Path:
    from kbitrt.convert.any_precision import convert_any_precision
    from kbitrt.convert.gguf import DEFAULT_CACHE, ensure_smollm2
    from kbitrt.format.bitplane import AnyPrecisionConfig

    out = DEFAULT_CACHE / f"SmolLM2-135M-Instruct-ap-nf{lo}-{parent}-b64"
    if not (out / "config.json").exists():
        print(f"converting {out} (once)", flush=True)
        convert_any_precision(ensure_smollm2(), out, AnyPrecisionConfig(
            bits=parent, block_size=64, dtype="nf", min_bits=lo, max_bits=parent), force=True)
    return out


def reference_parent(folder: Path, parent: int, lo: int, gen: int, reps: int, device: str) -> dict:
    """The parent alone two ways, alternating: the plane kernels at width `parent` of a model
    loaded with bits="LO-P" (what the speculative rows compare against), and `--bits P` alone
    (the planes repacked at load; on the CPU above 6 bits a 16-bit dense copy by default)."""
    from kbitrt.eval.data import sample_path
    from kbitrt.runtime.generate import generate
    from kbitrt.runtime.loader import load_model

    planes = load_model(folder, bits=f"{lo}-{parent}", device=device)
    single = load_model(folder, bits=parent, device=device)
    ids = planes.tokenizer(sample_path("wiki-sample").read_text()[:20000])["input_ids"][:64]
    out = {"planes": [], "single": []}
    for i in range(reps + 1):
        for name, lm in (("planes", planes), ("single", single)):
            r = generate(lm, [ids], gen, bits=parent if name == "planes" else None)
            if i:
                out[name].append(r.stats.new_tokens_per_s)
    row = {"parent_bits": parent, "gen": gen, "reps": reps,
           "planes_tokens_per_s": statistics.fmean(out["planes"]), "planes_reps": out["planes"],
           "planes_bits_per_quantized_weight_held":
               held_weights(planes.model)["bits_per_quantized_weight_held"],
           "single_tokens_per_s": statistics.fmean(out["single"]), "single_reps": out["single"],
           "single_cpu_weights": single.cpu_weights,
           "single_bits_per_quantized_weight_held":
               held_weights(single.model)["bits_per_quantized_weight_held"],
           "load_average": list(os.getloadavg())}
    row["planes_over_single"] = row["planes_tokens_per_s"] / row["single_tokens_per_s"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=8, help="the parent width")
    ap.add_argument("--drafts", default="3,4,6", help="draft widths, comma-separated")
    ap.add_argument("--draft-tokens", default="2,4", help="tokens drafted per round, comma-separated")
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the parent-alone comparison (plane kernels vs --bits P alone)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    drafts = [int(v) for v in args.drafts.split(",")]
    ks = [int(v) for v in args.draft_tokens.split(",")]

    from kbitrt.runtime.speculative import load_speculative

    folder = ensure_model(args.bits, 3)
    result = {"model": "SmolLM2-135M-Instruct any-precision nf3-8 b64", "path": str(folder),
              "rows": [], "note": "shared 2-core machine: see load_average per row; the "
                                  "integrator may re-run this on an idle machine"}
    for d in drafts:
        lm, parent = load_speculative(folder, args.bits, d, device=args.device)
        held = held_weights(lm.model)
        for k in ks:
            before = os.getloadavg()
            t0 = time.perf_counter()
            row = speculative_bench(lm, parent, d, k, args.gen, args.reps, args.warmup)
            row.update(load_average_before=list(before), seconds=round(time.perf_counter() - t0, 1),
                       bits_per_quantized_weight_held=held["bits_per_quantized_weight_held"])
            result["rows"].append(row)
            print(json.dumps({key: row[key] for key in ("draft_bits", "draft_tokens", "speedup",
                                                         "acceptance_rate", "greedy_identical")}),
                  flush=True)
            result.update(environment(lm.device))
            result["threads"] = torch.get_num_threads()
            result["cpu"] = platform.processor() or platform.machine()
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
        del lm
    if not args.no_reference:
        result["reference_parent"] = reference_parent(folder, args.bits, min(drafts), args.gen,
                                                      args.reps, args.device)
        print(json.dumps(result["reference_parent"]), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
