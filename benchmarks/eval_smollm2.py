"""SmolLM2-135M-Instruct: perplexity on wiki_en_dev and social_iqa accuracy, fp32 vs kbit settings.

    python benchmarks/eval_smollm2.py [--tokens 4096] [--seqlen 512] [--rows 200]

Converts the fp32 SmolLM2 folder (kbitrt.convert.gguf) to each setting under a temp folder, evaluates
every model with the same code (kbitrt.eval), writes benchmarks/results/eval_smollm2-cpu.json and
prints a Markdown table for docs/eval.md. seqlen 512 and a few thousand tokens keep it to minutes
on a CPU; the published tables use seqlen 2048 on full test sets.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kbitrt.eval import perplexity as ppl  # noqa: E402
from kbitrt.eval import zeroshot  # noqa: E402
from kbitrt.eval.model_open import open_model  # noqa: E402
from kbitrt.eval.results import environment, model_record, write_json  # noqa: E402
from kbitrt.runtime.devices import resolve_device  # noqa: E402
from kbitrt.eval.data import HERE as DATA  # noqa: E402  (the samples shipped in the package)

SETTINGS = [("fp32", None), ("nf4/64", ("nf", 4, 64)), ("int4/64", ("int", 4, 64)),
            ("int3/64", ("int", 3, 64)), ("nf4/1024", ("nf", 4, 1024))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--text", default=str(DATA / "wiki_en_dev.txt"))
    ap.add_argument("--mc", default=str(DATA / "mc" / "social_iqa_dev.jsonl"))
    ap.add_argument("-o", "--output", default=str(ROOT / "benchmarks/results/eval_smollm2-cpu.json"))
    args = ap.parse_args(argv)

    from kbitrt.convert.converter import convert
    from kbitrt.format.config import QuantConfig
    from kbitrt.convert.gguf import ensure_smollm2

    src = ensure_smollm2()
    text = ppl.load_text(args.text)[1]
    record = {"kind": "eval_smollm2", **environment(resolve_device("cpu")),
              "options": vars(args), "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        for label, setting in SETTINGS:
            path = src
            if setting:
                dtype, bits, block = setting
                path = Path(tmp) / label.replace("/", "-")
                convert(src, path, QuantConfig(bits=bits, block_size=block, dtype=dtype))
            lm = open_model(str(path), device="cpu")
            tokens = ppl.tokenize(lm, text, args.tokens)
            p = ppl.perplexity(lm, tokens, "gptq", args.seqlen, dataset=Path(args.text).name)
            mc = zeroshot.eval_local(lm, args.mc, args.rows)
            row = {"setting": label, "model": model_record(str(path), lm),
                   "perplexity": p.to_json(), "social_iqa": mc}
            record["results"].append(row)
            write_json(Path(args.output), record)
            print(f"{label}: ppl {p.perplexity:.3f} ({p.describe()}); social_iqa acc "
                  f"{mc['acc']:.3f}±{mc['acc_stderr']:.3f} acc_norm {mc['acc_norm']:.3f}"
                  f"±{mc['acc_norm_stderr']:.3f} (n={mc['n']})", flush=True)
            del lm
    print(markdown(record))
    return 0


def markdown(record: dict) -> str:
    rows = record["results"]
    p0 = rows[0]["perplexity"]
    out = [f"| setting | weights (MiB) | ppl ({Path(record['options']['text']).name}, gptq seqlen "
           f"{p0['seqlen']}, {p0['scored_tokens']} scored tokens) | social_iqa acc | acc_norm "
           f"(n={rows[0]['social_iqa']['n']}) |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        s = r["social_iqa"]
        out.append(f"| {r['setting']} | {r['model']['weight_bytes'] / 2**20:.1f} | "
                   f"{r['perplexity']['perplexity']:.2f} | {s['acc']:.3f} ± {s['acc_stderr']:.3f} | "
                   f"{s['acc_norm']:.3f} ± {s['acc_norm_stderr']:.3f} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
