"""Width 3 and 4 of a nested (any-precision) nf code on SmolLM2-135M-Instruct: which partition of
the normalised weights costs perplexity. Every decoder linear is replaced by the variant's weights
(lm_head and embeddings fp32); protocol as benchmarks/any_precision_fidelity.py (gptq, seqlen 2048,
the first --windows windows of the shared dev text), ratio = exp(mean per-token NLL difference)
against the direct nf3 and nf4 models, standard error paired per token.

Variants (x = w / block absmax, block 64, fp16 scales; "means": every cell takes its mean):
- merge_mean: width 3 as the top 3 bits of an nf4 seed (nf4 cells merged in pairs), means;
- m0: merge_mean with the merged zero cell at exactly 0;
- nf3_refit: nf3's cells, means;
- d1: nf3's cells with merge_mean's two extreme cells (|x| > 0.61 / 0.64), means;
- d2: merge_mean's cells with nf3's extreme cells, means;
- split2means: width 4, every nf3 cell split by 2-means (the converter before the zero rule);
- zero_split: width 4, as split2means but nf3's zero cell split keeping a child at 0 (the rule of
  kbitrt.convert.any_precision.zero_split);
- nf4_cuts: width 4, each nf3 cell cut at the nf4 cell boundary inside it that minimises the
  squared error (the zero cell on its negative side), means.

    python benchmarks/any_precision_seed_variants.py --nll-cache /tmp/nll   # ~2 min per variant, 1 thread
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from any_precision_fidelity import NllCache  # noqa: E402  (benchmarks/)
from kbitrt.convert.any_precision import normalize, two_means, zero_split  # noqa: E402
from kbitrt.eval.data import sample_path  # noqa: E402
from kbitrt.eval.results import git_commit  # noqa: E402
from kbitrt.format import blockwise, dtypes  # noqa: E402
from kbitrt.format.config import QuantConfig  # noqa: E402
from kbitrt.format.quantizer import quantize_weight  # noqa: E402
from smollm2_text import token_nll, token_windows  # noqa: E402

OUT = ROOT / "benchmarks/results/any_precision-seed-variants.json"
B = 64
CB3, CB4 = (dtypes.fixed_codebook(QuantConfig(bits=b, dtype="nf")) for b in (3, 4))
NF3_CUTS = ((CB3[1:] + CB3[:-1]) / 2).tolist()
NF4_CUTS = ((CB4[1:] + CB4[:-1]) / 2).tolist()
MERGED_CUTS = NF4_CUTS[1::2]  # the top 3 bits of nf4's codes


def prep(w):
    _, _, _, a = blockwise.quantize_absmax(blockwise.block_absmax(w, B), "fp16")
    return normalize(w, a, B), a.float().repeat_interleave(B, 1)[:, : w.shape[1]]


def cell_means(x, cells, n, zero_cell=None):
    v = torch.stack([x[cells == j].mean() for j in range(n)])
    if zero_cell is not None:
        v[zero_cell] = 0.0
    return v[cells]


def by_cuts(cuts, zero_cell=None):
    def f(w):
        x, s = prep(w)
        return cell_means(x, torch.bucketize(x, torch.tensor(cuts)), len(cuts) + 1, zero_cell) * s
    return f


def split_nf3(rule):
    """Width 4: each nf3 cell cut in two by `rule(sorted values, nf3 level)` -> (t, lo, hi)."""
    def f(w):
        x, s = prep(w)
        c3 = dtypes.nearest_index(x.contiguous(), CB3).long()
        out = torch.empty_like(x)
        for j in range(8):
            m = c3 == j
            v = x[m].sort().values
            t, a, b = rule(v, CB3[j].item())
            out[m] = torch.where(x[m] >= t, torch.tensor(b), torch.tensor(a))
        return out * s
    return f


def two_means_rule(v, level, keep_zero=False):
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), v.double().cumsum(0)])
    s, e = torch.tensor([0]), torch.tensor([v.numel()])
    if keep_zero and level == 0:
        split = zero_split(v, prefix, 0, v.numel())
        if split is not None:
            return split
    t, a, b = two_means(v, prefix, s, e)
    return t.item(), a.item(), b.item()


def nf4_cut_rule(v, level):
    best = None
    for t in NF4_CUTS:
        if not v[0] < t <= v[-1] or (level == 0 and t > 0):
            continue
        lo, hi = v[v < t], v[v >= t]
        sse = (lo - lo.mean()).square().sum() + (hi - hi.mean()).square().sum()
        if best is None or sse < best[0]:
            best = (sse, t, lo.mean().item(), hi.mean().item())
    return best[1:]


d1_cuts = [MERGED_CUTS[0], *NF3_CUTS[1:-1], MERGED_CUTS[-1]]
d2_cuts = [NF3_CUTS[0], *MERGED_CUTS[1:-1], NF3_CUTS[-1]]
VARIANTS = {
    "merge_mean": (3, by_cuts(MERGED_CUTS)), "m0": (3, by_cuts(MERGED_CUTS, zero_cell=3)),
    "nf3_refit": (3, by_cuts(NF3_CUTS)), "d1": (3, by_cuts(d1_cuts)), "d2": (3, by_cuts(d2_cuts)),
    "split2means": (4, split_nf3(two_means_rule)),
    "zero_split": (4, split_nf3(lambda v, lv: two_means_rule(v, lv, keep_zero=True))),
    "nf4_cuts": (4, split_nf3(nf4_cut_rule)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--nll-cache", default="")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--note", default="", help="recorded in the JSON (e.g. where cached NLLs came from)")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kbitrt.convert.gguf import ensure_smollm2

    path = ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    _, windows, n_win, n_all = token_windows(tok, sample_path("wiki-sample"), 2048, args.windows)
    linears = {n: m for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)}
    original = {n: m.weight.detach().clone() for n, m in linears.items()}
    cache = NllCache(args.nll_cache, f"s2048-w{n_win}")

    def nll(fn):
        def run():
            for n, m in linears.items():
                m.weight.data.copy_(fn(original[n]))
            out = token_nll(model, windows)
            for n, m in linears.items():
                m.weight.data.copy_(original[n])
            return out
        return run

    direct = {k: cache.get(f"direct-nf{k}-b{B}", nll(
        lambda w, k=k: quantize_weight(w, QuantConfig(bits=k, block_size=B, dtype="nf")).dequantize()))
        for k in (3, 4)}
    rows = []
    for name in args.variants.split(","):
        bits, fn = VARIANTS[name]
        got = cache.get(f"variant-{name}", nll(fn))
        d = got - direct[bits]
        r = math.exp(d.mean().item())
        rows.append({"variant": name, "bits": bits, "ppl": math.exp(got.mean().item()),
                     f"ppl_ratio_vs_direct_nf{bits}": r,
                     "paired_se": r * d.std().item() / math.sqrt(d.numel())})
        print(json.dumps(rows[-1]), flush=True)
    result = {"model": "SmolLM2-135M-Instruct (fp32)", "block": B,
              "protocol": {"name": "gptq", "seqlen": 2048, "windows": n_win,
                           "windows_available": n_all},
              "direct_ppl": {f"nf{k}": math.exp(v.mean().item()) for k, v in direct.items()},
              "rows": rows, "note": args.note, "commit": git_commit(),
              "versions": {"python": platform.python_version(), "torch": torch.__version__},
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
