"""Tokens/s of perplexity evaluation: SmolLM2 4-bit (kbitrt) vs the same model through plain
transformers fp32, in the same run on this machine.

    python benchmarks/eval_throughput.py [--tokens 4096] [--seqlen 512] [--reps 2]

Writes benchmarks/results/eval_throughput-<cpu|cuda>.json (versions, commit, device).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kbitrt.eval import perplexity as ppl  # noqa: E402
from kbitrt.eval.model_open import load_hf, open_model  # noqa: E402
from kbitrt.eval.results import environment, model_record, write_json  # noqa: E402
from kbitrt.runtime.devices import resolve_device  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--text", default="wiki-sample")
    args = ap.parse_args(argv)

    from kbitrt.convert.converter import convert
    from kbitrt.format.config import QuantConfig
    from kbitrt.convert.gguf import ensure_smollm2

    device = resolve_device(args.device)
    src = ensure_smollm2()
    text = ppl.load_text(args.text)[1]
    record = {"kind": "eval_throughput", **environment(device), "options": vars(args),
              "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        k4 = Path(tmp) / "smollm2-nf4"
        convert(src, k4, QuantConfig(bits=4, block_size=64, dtype="nf"))
        models = {"kbit nf4/64": lambda: open_model(str(k4), device=str(device)),
                  "transformers fp32": lambda: load_hf(src, device, torch.float32)}
        for label, load in models.items():
            lm = load()
            tokens = ppl.tokenize(lm, text, args.tokens)
            ppl.perplexity(lm, tokens[:2 * args.seqlen], "gptq", args.seqlen)  # warm-up
            runs = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                res = ppl.perplexity(lm, tokens, "gptq", args.seqlen)
                runs.append(res.windows * res.seqlen / (time.perf_counter() - t0))
            record["results"][label] = {
                "model": model_record(str(k4 if "kbit" in label else src), lm),
                "perplexity": res.perplexity, "tokens": res.windows * res.seqlen,
                "tokens_per_s": statistics.fmean(runs), "tokens_per_s_runs": runs}
            print(f"{label}: {statistics.fmean(runs):.1f} tok/s (ppl {res.perplexity:.3f}, "
                  f"{res.describe()})", flush=True)
            del lm
    r = record["results"]
    record["kbit_over_fp32"] = r["kbit nf4/64"]["tokens_per_s"] / r["transformers fp32"]["tokens_per_s"]
    out = ROOT / f"benchmarks/results/eval_throughput-{device.type}.json"
    write_json(out, record)
    print(f"kbit / fp32 speed: {record['kbit_over_fp32']:.2f}x -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
