"""Fidelity of the CPU decode path's int8 activations (kernels/cpu_int8.h) against its fp32 path on
SmolLM2-135M-Instruct: relative logits error, top-1 agreement and perplexity on the bundled
wiki_en_dev text, per width.

Decoding steps (up to FUSED_MAX_ROWS tokens) take the fused kernels; prefill and perplexity
normally dequantize + torch matmul. Here FUSED_MAX_ROWS is raised for the run so every window goes
through the fused kernels, whose y[m] does not depend on how many rows x has: each logit is the one
a token-by-token decode computes. The head stays fp16 (half_linear, same on both paths).

    python benchmarks/cpu_int8_fidelity.py [--bits 3 4 8] [--tokens 2048] [--seqlen 256]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kbitrt.eval import perplexity as ppl  # noqa: E402
from kbitrt.eval.data import HERE as DATA  # noqa: E402
from kbitrt.eval.model_open import open_model  # noqa: E402
from kbitrt.runtime.kernels import cpu  # noqa: E402


def window_logits(lm, tokens: list[int], seqlen: int) -> list[torch.Tensor]:
    """fp32 logits (seqlen, V) of each whole window of `tokens`."""
    with torch.no_grad():
        return [lm.model(torch.tensor([tokens[b:b + seqlen]]))[0].float()
                for b in range(0, len(tokens) - seqlen + 1, seqlen)]


def compare(ref: list[torch.Tensor], got: list[torch.Tensor], tokens: list[int],
            seqlen: int) -> dict:
    """Relative logits error (Frobenius, worst window and all), top-1 agreement, perplexities."""
    errs = [float((g - r).norm() / r.norm()) for r, g in zip(ref, got)]
    agree = sum(int((g.argmax(-1) == r.argmax(-1)).sum()) for r, g in zip(ref, got))
    total = sum(r.shape[0] for r in ref)

    def perplexity(logits):
        nll, n = 0.0, 0
        for w, lg in enumerate(logits):
            target = torch.tensor(tokens[w * seqlen + 1:(w + 1) * seqlen])
            lp = lg[:-1].log_softmax(-1).gather(-1, target[:, None])
            nll -= float(lp.double().sum())
            n += target.numel()
        return math.exp(nll / n)

    return {"rel_logits_err_mean": sum(errs) / len(errs), "rel_logits_err_max": max(errs),
            "top1_agreement": agree / total, "ppl_fp32": perplexity(ref),
            "ppl_int8": perplexity(got), "windows": len(ref), "positions": total}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4, 8])
    ap.add_argument("--dtype", default="nf")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-o", "--output", default=str(ROOT / "benchmarks/results/cpu_int8_fidelity.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from kbitrt.convert.converter import convert
    from kbitrt.convert.gguf import ensure_smollm2
    from kbitrt.format.config import QuantConfig

    assert cpu.available(), cpu.unavailable_reason()
    cpu.FUSED_MAX_ROWS = 1 << 30  # every window through the fused (decode) kernels
    src = ensure_smollm2()
    text = ppl.load_text(str(DATA / "wiki_en_dev.txt"))[1]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for bits in args.bits:
            path = Path(tmp) / f"{args.dtype}{bits}"
            convert(src, path, QuantConfig(bits=bits, block_size=args.block, dtype=args.dtype))
            logits = {}
            for mode in ("fp32", "int8"):
                cpu.set_activations(mode)
                lm = open_model(str(path), device="cpu", cpu_weights="packed")
                tokens = ppl.tokenize(lm, text, args.tokens)
                logits[mode] = window_logits(lm, tokens, args.seqlen)
                del lm
            row = {"bits": bits, "dtype": args.dtype, "block": args.block,
                   **compare(logits["fp32"], logits["int8"], tokens, args.seqlen)}
            results.append(row)
            print(row, flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    record = {"kind": "cpu_int8_fidelity", "model": "SmolLM2-135M-Instruct",
              "text": "wiki_en_dev.txt", "machine": platform.processor() or platform.machine(),
              "int8_width": int(torch.ops.kbitrt_cpu.int8_width()), "torch": torch.__version__,
              "commit": commit, "loadavg": list(os.getloadavg()), "options": vars(args),
              "results": results}
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
