"""Any-precision fidelity on SmolLM2-135M-Instruct: every width of one nested model beside the
directly converted model of the same data type and block size.

For each width k, every nn.Linear of the decoder layers is replaced by (a) width k of the
any-precision model (kbitrt.convert.any_precision.quantize_any_precision, the converter's
algorithm: each of these tensors is below the 2^22-value fit sample, so it is exactly what
`kbit convert --any-precision` writes) and (b) the direct k-bit conversion (quantize_weight), both
dequantized into the fp32 model. lm_head and embeddings stay fp32.

Protocol `gptq` on the shared dev text: tokenized once, non-overlapping windows of --seqlen tokens,
tail dropped, mean NLL over every predicted token, exp. The standard error of the perplexity
ratio (any-precision / direct) is paired per token: SE of the mean per-token NLL difference,
ratio = exp(mean diff). Sizes are the bytes of the quantized linears' stored tensors.

    python benchmarks/any_precision_fidelity.py --windows 4
    python benchmarks/any_precision_fidelity.py --render   # the table in docs/any_precision.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kbitrt.convert.any_precision import quantize_any_precision  # noqa: E402
from kbitrt.format.bitplane import AnyPrecisionConfig  # noqa: E402
from kbitrt.eval.data import sample_path  # noqa: E402
from kbitrt.format.quantizer import quantize_weight  # noqa: E402
from kbitrt.format.config import QuantConfig  # noqa: E402
from kbitrt.eval.results import git_commit  # noqa: E402
from smollm2_text import token_nll, token_windows  # noqa: E402  (benchmarks/)

DATA = sample_path("wiki-sample")  # the shipped Wikipedia sample (kbitrt/eval/data)
OUT = ROOT / "benchmarks/results/any_precision-smollm2-cpu.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=0, help="use only the first N windows (0: all)")
    ap.add_argument("--dtype", default="nf")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--widths", default="3-8")
    ap.add_argument("--eval-widths", default="", help="comma-separated widths to evaluate "
                    "(default: all of --widths); the model is still built over all of --widths")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--nll-cache", default="", help="folder keeping the fp32 and direct models' "
                    "per-token NLLs (they do not depend on the any-precision algorithm)")
    args = ap.parse_args()
    lo, hi = (int(v) for v in args.widths.split("-"))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kbitrt.convert.gguf import ensure_smollm2

    path = ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    n_tokens, windows, n_win, n_all = token_windows(tok, DATA, args.seqlen, args.windows)

    linears = {n: m for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)}
    original = {n: m.weight.detach().clone() for n, m in linears.items()}
    cfg = AnyPrecisionConfig(bits=hi, block_size=args.block, dtype=args.dtype, min_bits=lo,
                             max_bits=hi)
    t0 = time.perf_counter()
    ap_q = {n: quantize_any_precision(w, cfg) for n, w in original.items()}
    ap_seconds = time.perf_counter() - t0
    ap_bytes = sum(q.planes.numel() + q.absmax.numel() * 2 + 4 * q.tree.packed_codebooks().numel()
                   + 16 for q in ap_q.values())

    result = {"model": "SmolLM2-135M-Instruct (fp32)", "dtype": args.dtype, "block": args.block,
              "widths": [lo, hi],
              "protocol": {"name": "gptq", "text": DATA.name, "seqlen": args.seqlen,
                           "windows": n_win, "windows_available": n_all,
                           "predicted_tokens": n_win * (args.seqlen - 1)},
              "any_precision_quantize_seconds": round(ap_seconds, 1),
              "any_precision_linear_bytes": ap_bytes, "rows": [],
              "device": {"cpu": platform.processor() or platform.machine(),
                         "threads": torch.get_num_threads()},
              "versions": {"python": platform.python_version(), "torch": torch.__version__},
              "commit": git_commit()}
    cache = NllCache(args.nll_cache, f"s{args.seqlen}-w{n_win}")
    base = cache.get("fp32", lambda: token_nll(model, windows))
    result["fp32_ppl"] = math.exp(base.mean().item())
    print("fp32", result["fp32_ppl"], flush=True)
    direct_sum = 0
    todo = [int(v) for v in args.eval_widths.split(",")] if args.eval_widths else range(lo, hi + 1)
    for k in todo:
        row = {"bits": k}
        nll = {}
        direct_w = {}
        for kind in ("direct", "any_precision"):
            errs, nbytes = [], 0
            for n, m in linears.items():
                w = original[n]
                if kind == "direct":
                    q = quantize_weight(w, QuantConfig(bits=k, block_size=args.block, dtype=args.dtype))
                    deq = direct_w[n] = q.dequantize()
                    nbytes += q.qweight.numel() + q.absmax.numel() * 2 + 4 * q.codebook.numel() + 16
                else:
                    deq = ap_q[n].dequantize(k)
                errs.append(((deq - w).norm() / w.norm()).item())
                m.weight.data.copy_(deq)
            t = time.perf_counter()
            if kind == "direct":
                nll[kind] = cache.get(f"direct-{args.dtype}{k}-b{args.block}",
                                      lambda: token_nll(model, windows))
            elif all(torch.equal(ap_q[n].dequantize(k), direct_w[n]) for n in linears):
                nll[kind] = nll["direct"]  # the seed width: the same weights, the same forward
                row["identical_to_direct"] = True
            else:
                nll[kind] = token_nll(model, windows)
            row[kind] = {"ppl": math.exp(nll[kind].mean().item()),
                         "rel_weight_error": sum(errs) / len(errs),
                         "seconds": round(time.perf_counter() - t, 1)}
            if kind == "direct":
                row[kind]["linear_bytes"] = nbytes
                direct_sum += nbytes
        d = nll["any_precision"] - nll["direct"]
        se = d.std().item() / math.sqrt(d.numel())
        row["ppl_ratio"] = math.exp(d.mean().item())
        row["ppl_ratio_se"] = row["ppl_ratio"] * se  # delta method
        row["target"] = 1.10 if k == 3 else 1.03
        row["meets_target"] = row["ppl_ratio"] <= row["target"]
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        result["direct_linear_bytes_sum"] = direct_sum
        result["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for n, m in linears.items():
        m.weight.data.copy_(original[n])


class NllCache:
    """Per-token NLL tensors of the models that do not change with the any-precision algorithm
    (fp32, direct nf_k), kept in a folder as `<name>-<protocol>.pt`; no folder: no cache."""

    def __init__(self, folder: str, protocol: str):
        self.folder, self.protocol = Path(folder) if folder else None, protocol

    def get(self, name: str, compute):
        if self.folder is None:
            return compute()
        path = self.folder / f"{name}-{self.protocol}.pt"
        if path.exists():
            return torch.load(path)
        out = compute()
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(out, path)
        return out


def render(result: dict) -> str:
    """The docs/any_precision.md table from the JSON."""
    p = result["protocol"]
    lines = [f"fp32 perplexity {result['fp32_ppl']:.3f}; {p['windows']} of {p['windows_available']} "
             f"windows, {p['predicted_tokens']} predicted tokens.", "",
             "| width | any-precision ppl | direct nf ppl | ratio (± paired SE) | target | rel. weight "
             "error AP / direct | direct linears (MB) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        a, d = r["any_precision"], r["direct"]
        ok = "met" if r["meets_target"] else "**missed**"
        lines.append(f"| {r['bits']} | {a['ppl']:.3f} | {d['ppl']:.3f} | {r['ppl_ratio']:.4f} ± "
                     f"{r['ppl_ratio_se']:.4f} | <= {r['target']:.2f} ({ok}) | "
                     f"{a['rel_weight_error']:.4f} / {d['rel_weight_error']:.4f} | "
                     f"{d['linear_bytes'] / 1e6:.2f} |")
    ws = [r["bits"] for r in result["rows"]]
    lo, hi = result["widths"]
    missing = [k for k in range(lo, hi + 1) if k not in ws]
    lines += ["", f"Stored bytes of the quantized linears: the any-precision model "
              f"{result['any_precision_linear_bytes'] / 1e6:.2f} MB serves widths {lo}..{hi}; the "
              f"separate direct models of the measured widths ({', '.join(map(str, ws))}) sum to "
              f"{result['direct_linear_bytes_sum'] / 1e6:.2f} MB.",
              *([f"Not measured (stopped for time): widths {', '.join(map(str, missing))}."]
                if missing else []),
              "", f"Commit {result['commit']}, {result['date']}, torch {result['versions']['torch']}, "
              f"{result['device']['threads']} CPU threads (shared machine)."]
    return "\n".join(lines)


if __name__ == "__main__":
    if "--render" in sys.argv:  # rewrite the table of docs/any_precision.md from the JSON
        doc = ROOT / "docs/any_precision.md"
        text = doc.read_text()
        result = json.loads(OUT.read_text())
        for extra in sorted(OUT.parent.glob(OUT.stem + "-w*.json")):  # widths run in parallel
            more = json.loads(extra.read_text())
            have = {r["bits"] for r in result["rows"]}
            result["rows"] += [r for r in more["rows"] if r["bits"] not in have]
            result["direct_linear_bytes_sum"] += more.get("direct_linear_bytes_sum", 0)
            result["commit"] += f", {more['commit'][:10]} ({extra.name})"
        result["rows"].sort(key=lambda r: r["bits"])
        table = render(result)
        start, end = "<!-- fidelity table -->", "<!-- end fidelity table -->"
        if start in text:
            text = text[: text.index(start)] + start + "\n" + table + "\n" + text[text.index(end):]
        else:
            text = text.replace("RESULTS_TABLE", f"{start}\n{table}\n{end}")
        doc.write_text(text)
    else:
        main()
