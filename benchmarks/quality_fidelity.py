"""SmolLM2-135M perplexity: mse scales, Lloyd codebooks, input importance, GPTQ vs nf4/nf3 (issue 15).

    python benchmarks/quality_fidelity.py --text kbitrt/eval/data/wiki_en_dev.txt --windows 8
    python benchmarks/quality_fidelity.py --text ... --only gptq      # add rows to the same JSON
    python benchmarks/quality_fidelity.py --text ... --windows 2 --threads 1 --only mse-random

Importance rows (`--importance`, format/scales.py): `-norm` weights the zero-shot searches by the
squared norm gains, `-random-rNxT` by the input second moments while the model reads N x T seeded
random tokens (no data), `-hessian-cNxT` by those on N x T calibration tokens (rtn or GPTQ).

Protocol `gptq`: the text tokenized once, non-overlapping windows of --seqlen, the first --windows
evaluated. GPTQ calibrates on --calib-samples windows of --calib-seqlen taken from the END of the
same text (disjoint from the evaluated windows). Every decoder linear is quantized (in memory, with
the format's own quantize_weight, or kbitrt.convert.calibrate), lm_head and embeddings stay fp32.
bits/param counts the stored tensors (codes + scales + codebook) of the quantized linears. Every
row carries the paired standard error of its mean per-token NLL difference against nf4-b64 (same
tokens), and its share of the nf4-b64 -> fp32 gap closed. Writes
benchmarks/results/quality-fidelity-smollm2-cpu.json (rows are kept across runs, by setting).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.fidelity import cpu_name, decoder_linears, git_commit, versions  # noqa: E402
from kbitrt.format.quantizer import quantize_weight  # noqa: E402
from kbitrt.format.config import QuantConfig  # noqa: E402
from smollm2_text import token_nll  # noqa: E402  (benchmarks/)

OUT = ROOT / "benchmarks/results/quality-fidelity-smollm2-cpu.json"
REF = "nf4-b64"


def settings(calib_samples: int = 32, calib_seqlen: int = 512,
             act_order: bool = False) -> list[tuple[str, dict, dict]]:
    """(label, QuantConfig options, GPTQ options) per row; a GPTQ row's label names its calibration
    (`-c64x512`, `-ao` with act-order), so rows calibrated differently never share cached NLLs."""
    rows = [("fp32", {}, {})]
    gptq = dict(samples=calib_samples, seqlen=calib_seqlen, act_order=act_order)
    tail = f"-c{calib_samples}x{calib_seqlen}" + ("-ao" if act_order else "")
    for bits in (4, 3):
        for dtype in ("nf", "lloyd"):
            for sc in ("absmax", "mse"):
                rows.append((QuantConfig(bits=bits, dtype=dtype, scales=sc).label,
                             dict(bits=bits, dtype=dtype, scales=sc), {}))
        # importance weighting (zero-shot: the norm gains the linear reads)
        for dtype, sc in (("nf", "mse"), ("lloyd", "absmax"), ("lloyd", "mse")):
            opts = dict(bits=bits, dtype=dtype, scales=sc, importance="norm")
            rows.append((QuantConfig(**opts).label, opts, {}))
        for opts in (dict(bits=bits, method="gptq"),
                     dict(bits=bits, dtype="lloyd", scales="mse", method="gptq"),
                     dict(bits=bits, scales="mse", method="gptq", importance="hessian")):
            rows.append((QuantConfig(**opts).label + tail, opts, gptq))
        # calibrated round-to-nearest: mse scales weighted by the inputs' second moments
        rtn_tail = f"-c{calib_samples}x{calib_seqlen}"
        for opts in (dict(bits=bits, scales="mse", importance="hessian"),):
            rows.append((QuantConfig(**opts).label + rtn_tail, opts, {**gptq, "act_order": False}))
        # no data: the same, with the model reading seeded uniformly random tokens
        for opts in (dict(bits=bits, scales="mse", importance="random"),
                     dict(bits=bits, dtype="lloyd", importance="random"),
                     dict(bits=bits, dtype="lloyd", scales="mse", importance="random")):
            rows.append((QuantConfig(**opts).label + f"-r{calib_samples}x{calib_seqlen}", opts,
                         {**gptq, "act_order": False, "tokens": "random, seed 0"}))
    return rows


def stored_bits(q) -> int:
    return (q.qweight.numel() * 8 + q.absmax.numel() * q.absmax.element_size() * 8
            + q.codebook.numel() * 32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", help="evaluation text file (required unless --render)")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--act-order", action="store_true", help="GPTQ rows with --act-order")
    ap.add_argument("--only", default="", help="comma-separated substrings of settings to run")
    ap.add_argument("--skip", default="", help="comma-separated settings to skip (exact labels)")
    ap.add_argument("--cache", default="/tmp/kbit-quality-nll", help="per-token NLLs of each row")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--merge", action="append", default=[], help="JSON of another run: add its rows")
    ap.add_argument("--render", default="", help="only print the markdown table of this JSON")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--keep-max", action="store_true",
                    help="experiment: mse scale candidates >= the block absmax only (no clipping); "
                         "the mse rows get a -keepmax label")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return
    if not args.text:
        ap.error("--text is required")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kbitrt.convert.gguf import ensure_smollm2

    path = ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok(Path(args.text).read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    windows = ids[: args.windows * args.seqlen].view(args.windows, args.seqlen)
    n_cal = args.calib_samples * args.calib_seqlen
    if n_cal + windows.numel() > ids.numel():
        raise SystemExit("text too short for disjoint evaluation and calibration tokens")
    calib = ids[ids.numel() - n_cal:].view(args.calib_samples, args.calib_seqlen)
    print(f"{ids.numel()} tokens; eval {windows.shape}, calib {calib.shape}", flush=True)

    linears = decoder_linears(model)
    original = {name: m.weight.detach().clone() for name, m in linears.items()}
    from kbitrt.convert.importance import norm_inputs

    reads = norm_inputs(model.config)  # checkpoint names: model.layers.{i}.<linear> -> its norm
    gains = {name: model.get_submodule(reads[f"model.layers.{name}"]).weight.detach().float().square()
             for name in linears if f"model.layers.{name}" in reads}
    print(f"norm-gain importance for {len(gains)}/{len(linears)} linears", flush=True)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else {"rows": []}
    rows = {r["setting"]: r for r in old["rows"]}
    for extra in args.merge:  # rows another run (e.g. the GPTQ ones, in parallel) wrote
        rows.update({r["setting"]: r for r in json.loads(Path(extra).read_text())["rows"]})
    todo = [s for s in settings(args.calib_samples, args.calib_seqlen, args.act_order) if not args.only or s[0] in (REF, "fp32")
            or any(k in s[0] for k in args.only.split(","))]
    todo = [s for s in todo if s[0] not in args.skip.split(",")]
    if args.keep_max:  # format/scales.py's keep_max, for every mse row of this run
        import functools

        from kbitrt.format import scales

        scales.block_scales = functools.partial(scales.block_scales, keep_max=True)
        todo = [(label.replace("-mse", "-mse-keepmax", 1), {**opts, "keep_max": True}, gptq)
                for label, opts, gptq in todo if opts.get("scales") == "mse"]
    for label, opts, gptq in todo:
        nll_file = cache / f"{label}-{args.windows}x{args.seqlen}.pt"
        if nll_file.exists() and label not in rows:
            rows[label] = {"setting": label, "options": opts, **({"gptq": gptq} if gptq else {})}
        if label in rows and nll_file.exists() and not any(k in label for k in args.only.split(",") if k):
            if opts and "bits_per_param" not in rows[label] and not gptq:
                rows[label].update(quantize_rows(linears, original, opts, None, None, None, apply=False,
                                                  gains=gains))
            continue
        t0 = time.perf_counter()
        stats = quantize_rows(linears, original, opts, path, calib, gptq, gains=gains)
        qsecs = time.perf_counter() - t0
        nll = token_nll(model, windows)
        torch.save(nll, nll_file)
        rows[label] = {"setting": label, "options": opts,
                       **({"gptq": {**gptq, "damp": 0.01} if opts.get("method") == "gptq" else gptq}
                          if gptq else {}),
                       "ppl": math.exp(nll.mean().item()),
                       "mean_nll": nll.mean().item(),
                       **stats,
                       "quantize_seconds": round(qsecs, 1),
                       "seconds": round(time.perf_counter() - t0, 1)}
        for name, m in linears.items():
            m.weight.data.copy_(original[name])
        write(args, out, rows, cache, ids.numel(), calib.shape)
        print(json.dumps(rows[label]), flush=True)
    write(args, out, rows, cache, ids.numel(), calib.shape)  # also after a --merge only


def quantize_rows(linears: dict, original: dict, opts: dict, path, calib, gptq: dict | None,
                  apply: bool = True, gains: dict | None = None) -> dict:
    """Quantize every decoder linear as `opts` say (into the model when `apply`): the mean relative
    weight error and the stored bits per parameter. `gains`: linear -> gain^2 of the norm it reads
    (kbitrt.convert.importance, the converter's rule), for `importance="norm"`."""
    if not opts:
        return {"rel_error": None, "bits_per_param": 32.0}
    config = QuantConfig(**{k: v for k, v in opts.items() if k != "keep_max"})
    quantized = None
    if config.method == "gptq" or config.importance in ("hessian", "random"):
        from kbitrt.convert.calibrate import gptq_quantize_model, random_windows

        if config.importance == "random":  # no data: seeded random token ids
            calib = random_windows(path, gptq["samples"], gptq["seqlen"])
        # checkpoint module names
        quantized = gptq_quantize_model(path, config, calib, act_order=gptq["act_order"])
    errs, bits, numel = [], 0, 0
    for name, m in linears.items():
        w = original[name]
        imp = (gains or {}).get(name) if config.importance == "norm" else None
        q = quantized[f"model.layers.{name}"] if quantized else \
            quantize_weight(w, config, name, importance=imp)
        deq = q.dequantize(torch.float32)
        errs.append(((deq - w).norm() / w.norm()).item())
        bits += stored_bits(q)
        numel += w.numel()
        if apply:
            m.weight.data.copy_(deq)
    return {"rel_error": sum(errs) / len(errs), "bits_per_param": bits / numel}


def write(args, out: Path, rows: dict, cache: Path, n_tokens: int, calib_shape) -> None:
    """Paired statistics against nf4-b64 and fp32, from the cached per-token NLLs."""
    def nll(label):
        f = cache / f"{label}-{args.windows}x{args.seqlen}.pt"
        return torch.load(f) if f.exists() else None

    ref, fp = nll(REF), nll("fp32")
    for label, row in rows.items():
        x = nll(label)
        if x is None:
            continue
        row["ppl"], row["mean_nll"] = math.exp(x.mean().item()), x.mean().item()
        if ref is None:
            continue
        d = x - ref
        row["delta_nll_vs_nf4"] = d.mean().item()
        row["stderr_delta_nll_vs_nf4"] = (d.std() / math.sqrt(d.numel())).item()
        if fp is not None:
            gap = (ref - fp).mean().item()
            row["gap_closed_vs_nf4_b64"] = -d.mean().item() / gap if gap > 0 else None
        if fp is not None and label.startswith(("nf3", "lloyd3")):
            ref3 = nll("nf3-b64")
            if ref3 is not None:
                excess = (ref3 - fp).mean().item()
                row["excess_nll_vs_nf3_b64"] = (x - fp).mean().item() / excess if excess > 0 else None
                # its paired standard error (against nf3-b64, on the same tokens)
                row["stderr_excess_nll_vs_nf3_b64"] = ((x - ref3).std() / math.sqrt(x.numel())).item() \
                    / excess if excess > 0 else None
    result = {
        "benchmark": "quality_fidelity",
        "model": "SmolLM2-135M-Instruct (fp32, dequantized from its Q4_1 GGUF)",
        "protocol": {"name": "gptq", "text": Path(args.text).name, "seqlen": args.seqlen,
                     "windows": args.windows, "predicted_tokens": args.windows * (args.seqlen - 1),
                     "total_tokens": n_tokens,
                     "calibration": {"source": "the last samples x seqlen tokens of the same text "
                                               "(disjoint from the evaluated windows); per GPTQ row "
                                               "under 'gptq' and in its label (-cNxT, -ao)"}},
        "rows": sorted(rows.values(), key=order),
        "device": {"cpu": cpu_name(), "threads": torch.get_num_threads()},
        "load_average": list(os.getloadavg()),  # when this file was written (shared machine)
        "versions": versions(), "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": " ".join(sys.argv[1:]),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def data_used(row: dict) -> str:
    """What a row's quantization read besides the weights: nothing, random tokens, calibration text."""
    opts, cal = row.get("options", {}), row.get("gptq") or {}
    if opts.get("importance") == "random":
        return f"random tokens {cal.get('samples')}x{cal.get('seqlen')}"
    if opts.get("method") == "gptq" or opts.get("importance") == "hessian":
        return f"text {cal.get('samples')}x{cal.get('seqlen')}"
    return "-"


def order(row: dict) -> tuple:
    """fp32, then per bit width (4, 3): its nf row, zero-shot rows (weights only, then random
    tokens), one-shot rows (calibrated rtn, then GPTQ)."""
    label, opts = row["setting"], row.get("options", {})
    group = {"random": 1, "hessian": 2}.get(opts.get("importance"), 0)
    return (bool(opts), -opts.get("bits", 32), 3 if opts.get("method") == "gptq" else group,
            label not in (REF, "nf3-b64"), label)


def render(result: dict) -> str:
    """The docs/fidelity.md table of a result JSON."""
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = ["| setting | data read | bits/param | rel. weight error | perplexity "
             "| dNLL vs nf4-b64 (+/- paired se) | nf4->fp32 gap closed | share of nf3's excess NLL left "
             "(+/- paired se) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        d, se = r.get("delta_nll_vs_nf4"), r.get("stderr_delta_nll_vs_nf4")
        gap = r.get("gap_closed_vs_nf4_b64")
        lines.append(
            f"| {r['setting']} | {data_used(r)} | {f(r.get('bits_per_param'), '.3f')} "
            f"| {f(r.get('rel_error'), '.4f')} "
            f"| {f(r.get('ppl'), '.3f')} | {'-' if d is None else f'{d:+.4f} +/- {se:.4f}'} "
            f"| {'-' if gap is None or r.get('options', {}).get('bits') == 3 else format(gap, '.0%')} "
            f"| {f(r.get('excess_nll_vs_nf3_b64'), '.0%')}"
            + (f" +/- {r['stderr_excess_nll_vs_nf3_b64']:.0%}" if r.get("stderr_excess_nll_vs_nf3_b64")
               else "") + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
