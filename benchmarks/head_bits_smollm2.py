"""SmolLM2-135M: the perplexity cost of a k-bit output head and embedding (convert --head-bits,
--embedding-bits) over an nf4-b64 body, against the 16-bit head and the fp32 model.

    python benchmarks/head_bits_smollm2.py [--tokens 8192] [--seqlen 512]

SmolLM2 ties its head to its embedding: at one width the pair is stored once and read by both.
Writes benchmarks/results/head_bits_smollm2-cpu.json (every setting's perplexity on wiki_en_dev,
file and held bytes) and prints a Markdown table for docs/cpu.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kbitrt.eval import perplexity as ppl  # noqa: E402
from kbitrt.eval.data import HERE as DATA  # noqa: E402
from kbitrt.eval.model_open import open_model  # noqa: E402
from kbitrt.eval.results import environment, model_record, write_json  # noqa: E402
from kbitrt.runtime.devices import resolve_device  # noqa: E402

# (label, head bits, embedding bits[, their data type]); None: 16 bits. "fp32" is the source.
# "int8" is `kbit convert`'s default (--head-dtype auto); the others keep the linears' nf.
SETTINGS = [("fp32", None, None), ("nf4 head16 emb16", 16, 16), ("nf4 head8 emb8", 8, 8),
            ("nf4 head6 emb6", 6, 6), ("nf4 head5 emb5", 5, 5), ("nf4 head4 emb4", 4, 4),
            ("nf4 head8 emb16", 8, 16), ("nf4 head16 emb4", 16, 4),
            ("nf4 head8 emb8 int8", 8, 8, "int")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--text", default=str(DATA / "wiki_en_dev.txt"))
    ap.add_argument("-o", "--output",
                    default=str(ROOT / "benchmarks/results/head_bits_smollm2-cpu.json"))
    ap.add_argument("--settings", default=None,
                    help="comma-separated labels of SETTINGS to run (default: all)")
    ap.add_argument("--head-speed-only", action="store_true",
                    help="time the head GEMV alone and add it to the existing JSON")
    args = ap.parse_args(argv)
    if args.head_speed_only:
        import json

        record = json.loads(Path(args.output).read_text())
        record["head_gemv"] = {**environment(resolve_device("cpu")), **head_gemv_ms()}
        write_json(Path(args.output), record)
        print(record["head_gemv"]["ms"])
        return 0

    from kbitrt.convert.converter import convert
    from kbitrt.convert.gguf import ensure_smollm2
    from kbitrt.format.config import QuantConfig

    src = ensure_smollm2()
    text = ppl.load_text(args.text)[1]
    record = {"kind": "head_bits_smollm2", **environment(resolve_device("cpu")),
              "options": vars(args), "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        wanted = args.settings.split(",") if args.settings else [s[0] for s in SETTINGS]
        for label, head, emb, *head_dtype in (s for s in SETTINGS if s[0] in wanted):
            path = src
            if head is not None:
                path = Path(tmp) / label.replace(" ", "-")
                convert(src, path, QuantConfig(bits=4, block_size=64, dtype="nf",
                                               head_bits=None if head == 16 else head,
                                               embedding_bits=None if emb == 16 else emb,
                                               head_dtype=(head_dtype or [None])[0]))
            lm = open_model(str(path), device="cpu")
            tokens = ppl.tokenize(lm, text, args.tokens)
            p = ppl.perplexity(lm, tokens, "gptq", args.seqlen, dataset=Path(args.text).name)
            files = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
            record["results"].append({"setting": label, "head_bits": head, "embedding_bits": emb,
                                      "head_dtype": (head_dtype or [None])[0],
                                      "model": model_record(str(path), lm), "file_bytes": files,
                                      "perplexity": p.to_json()})
            write_json(Path(args.output), record)
            print(f"{label}: ppl {p.perplexity:.4f} ({p.describe()}), file {files / 2**20:.1f} MiB",
                  flush=True)
            del lm
    print(markdown(record))
    return 0


def head_gemv_ms(rounds: int = 5, calls: int = 5, threads: int = 2) -> dict:
    """ms per decode-step call of a SmolLM2-shaped head (49152 x 576) on the CPU: the fp16 head
    the runtime holds today (HalfLinear) against packed k-bit KbitLinears, interleaved, medians."""
    import os
    import statistics
    import time

    import torch

    from kbitrt.format.config import QuantConfig
    from kbitrt.format.quantizer import quantize_weight
    from kbitrt.runtime.kernels import cpu
    from kbitrt.runtime.linear import HalfLinear, KbitLinear

    torch.set_num_threads(threads)
    w = torch.randn(49152, 576, generator=torch.Generator().manual_seed(0)) * 0.02
    mods = {"fp16": HalfLinear(torch.nn.Parameter(w.half(), requires_grad=False))}
    for b in (4, 5, 6, 8):
        mods[f"nf{b}"] = KbitLinear.from_quantized(quantize_weight(w, QuantConfig(bits=b)),
                                                   compute_dtype=torch.float32, cpu_cache=False)
    x, times = torch.randn(1, 576), {k: [] for k in mods}
    load0 = os.getloadavg()
    with torch.no_grad():
        for _ in range(rounds):
            for k, m in mods.items():
                m(x)
                t0 = time.perf_counter()
                for _ in range(calls):
                    m(x)
                times[k].append((time.perf_counter() - t0) / calls * 1e3)
    return {"threads": threads, "fused_cpu_kernels": cpu.available(), "loadavg": [load0, os.getloadavg()],
            "ms": {k: statistics.median(v) for k, v in times.items()}, "ms_reps": times}


def markdown(record: dict) -> str:
    rows = record["results"]
    base = next(r for r in rows if r["setting"] == "nf4 head16 emb16")["perplexity"]["perplexity"]
    p0 = rows[0]["perplexity"]
    out = [f"| setting | file (MiB) | held (MiB) | ppl (wiki_en_dev, seqlen {p0['seqlen']}, "
           f"{p0['scored_tokens']} tokens) | vs 16-bit head |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        p = r["perplexity"]["perplexity"]
        out.append(f"| {r['setting']} | {r['file_bytes'] / 2**20:.1f} | "
                   f"{r['model']['weight_bytes'] / 2**20:.1f} | {p:.3f} | {100 * (p / base - 1):+.2f}% |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
