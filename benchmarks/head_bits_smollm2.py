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

# (label, head bits, embedding bits); None: 16 bits. "fp32" is the source itself.
SETTINGS = [("fp32", None, None), ("nf4 head16 emb16", 16, 16), ("nf4 head8 emb8", 8, 8),
            ("nf4 head6 emb6", 6, 6), ("nf4 head5 emb5", 5, 5), ("nf4 head4 emb4", 4, 4),
            ("nf4 head8 emb16", 8, 16), ("nf4 head16 emb4", 16, 4)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--text", default=str(DATA / "wiki_en_dev.txt"))
    ap.add_argument("-o", "--output",
                    default=str(ROOT / "benchmarks/results/head_bits_smollm2-cpu.json"))
    args = ap.parse_args(argv)

    from kbitrt.convert.converter import convert
    from kbitrt.convert.gguf import ensure_smollm2
    from kbitrt.format.config import QuantConfig

    src = ensure_smollm2()
    text = ppl.load_text(args.text)[1]
    record = {"kind": "head_bits_smollm2", **environment(resolve_device("cpu")),
              "options": vars(args), "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        for label, head, emb in SETTINGS:
            path = src
            if head is not None:
                path = Path(tmp) / label.replace(" ", "-")
                convert(src, path, QuantConfig(bits=4, block_size=64, dtype="nf",
                                               head_bits=None if head == 16 else head,
                                               embedding_bits=None if emb == 16 else emb))
            lm = open_model(str(path), device="cpu")
            tokens = ppl.tokenize(lm, text, args.tokens)
            p = ppl.perplexity(lm, tokens, "gptq", args.seqlen, dataset=Path(args.text).name)
            files = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
            record["results"].append({"setting": label, "head_bits": head, "embedding_bits": emb,
                                      "model": model_record(str(path), lm), "file_bytes": files,
                                      "perplexity": p.to_json()})
            write_json(Path(args.output), record)
            print(f"{label}: ppl {p.perplexity:.4f} ({p.describe()}), file {files / 2**20:.1f} MiB",
                  flush=True)
            del lm
    print(markdown(record))
    return 0


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
