"""Any-precision splitting variants on SmolLM2-135M-Instruct weights: tensor MSE of width k over the
MSE of the direct nf_k conversion (block 64), summed over a spread of 8 decoder linears.

Variants (docs/any_precision.md, "Width 4"):
- `nf` the converter's algorithm (nf3 seed, unweighted 2-means splits);
- `quantile` the data type `quantile` as the seed (3-bit quantiles of the tensor's normalised values);
- `nf-scale2` (width 4 only) the first split's 2-means weighted by each value's block scale squared,
  so that it minimises the tensor's real squared error rather than the normalised one.

    python benchmarks/any_precision_split_variants.py    # ~1 min; weight error only, no timing
"""

from __future__ import annotations

import datetime
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kbitrt.convert.any_precision import normalize, quantize_any_precision  # noqa: E402
from kbitrt.eval.results import git_commit  # noqa: E402
from kbitrt.format import dtypes  # noqa: E402
from kbitrt.format.bitplane import AnyPrecisionConfig  # noqa: E402
from kbitrt.format.config import QuantConfig  # noqa: E402
from kbitrt.format.quantizer import quantize_weight  # noqa: E402

OUT = ROOT / "benchmarks/results/any_precision-split-variants.json"
BLOCK = 64


def weighted_split(x: torch.Tensor, wt: torch.Tensor, steps: int = 100):
    """Weighted 1-D 2-means (Lloyd from the weighted mean): (t, mean below, mean above) or None."""
    t = (x * wt).sum() / wt.sum()
    for _ in range(steps):
        lo = x < t
        if lo.all() or not lo.any():
            return None
        a = (x[lo] * wt[lo]).sum() / wt[lo].sum()
        b = (x[~lo] * wt[~lo]).sum() / wt[~lo].sum()
        t2 = (a + b) / 2
        if t2 == t:
            break
        t = t2
    return t, a, b


def width4_scale2(w: torch.Tensor, q) -> torch.Tensor:
    """Width 4 with the 3 -> 4 split weighted by block scale squared (seed: q's nf3 codebook)."""
    x = normalize(w, q.absmax, BLOCK)
    scale = q.absmax.float().repeat_interleave(BLOCK, 1)[:, : w.shape[1]]
    cb3 = q.tree.codebooks[3]
    seed = dtypes.nearest_index(x.contiguous(), cb3).long().reshape(-1)
    xs, ws = x.reshape(-1), scale.reshape(-1) ** 2
    cb4, code4 = torch.empty(16), torch.empty_like(seed)
    for c in range(8):
        m = seed == c
        r = weighted_split(xs[m], ws[m]) if m.any() else None
        if r is None:
            cb4[2 * c] = cb4[2 * c + 1] = cb3[c]
            code4[m] = 2 * c
            continue
        t, a, b = r
        cb4[2 * c], cb4[2 * c + 1] = a, b
        code4[m] = 2 * c + (xs[m] >= t).long()
    return cb4[code4].view_as(w) * scale


def main() -> None:
    from safetensors import safe_open

    from kbitrt.convert.gguf import ensure_smollm2

    path = ensure_smollm2()
    f = safe_open(str(path / "model.safetensors"), "pt")
    names = sorted(n for n in f.keys() if n.endswith("proj.weight"))
    pick = [names[i] for i in range(0, len(names), len(names) // 8)][:8]
    sums: dict[str, dict[int, float]] = {"direct": {}, "nf": {}, "quantile": {}, "nf-scale2": {}}
    for n in pick:
        w = f.get_tensor(n).float()
        q = {dt: quantize_any_precision(w, AnyPrecisionConfig(bits=8, min_bits=3, max_bits=8,
                                                              dtype=dt, block_size=BLOCK))
             for dt in ("nf", "quantile")}
        for k in range(3, 9):
            d = (quantize_weight(w, QuantConfig(bits=k, dtype="nf", block_size=BLOCK)).dequantize()
                 - w).square().sum().item()
            sums["direct"][k] = sums["direct"].get(k, 0.0) + d
            for dt in ("nf", "quantile"):
                e = (q[dt].dequantize(k) - w).square().sum().item()
                sums[dt][k] = sums[dt].get(k, 0.0) + e
        e = (width4_scale2(w, q["nf"]) - w).square().sum().item()
        sums["nf-scale2"][4] = sums["nf-scale2"].get(4, 0.0) + e
        print(n, flush=True)
    ratios = {v: {k: s / sums["direct"][k] for k, s in sums[v].items()}
              for v in ("nf", "quantile", "nf-scale2")}
    result = {"model": "SmolLM2-135M-Instruct", "tensors": pick, "block": BLOCK,
              "metric": "sum over the tensors of the squared weight error, width k / direct nf_k",
              "mse_ratio_vs_direct_nf": ratios, "commit": git_commit(),
              "versions": {"python": platform.python_version(), "torch": torch.__version__},
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(ratios, indent=1))


if __name__ == "__main__":
    main()
