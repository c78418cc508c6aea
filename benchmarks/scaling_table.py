"""Markdown table of a sweep results file (for docs/scaling.md).

    python benchmarks/scaling_table.py docs/scaling/smollm2.jsonl
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kbitrt.sweep.runner import read_results  # noqa: E402


def main(path: str) -> None:
    rows = read_results(Path(path))
    rows.sort(key=lambda r: (-r["bits"], r["outliers"] != "none", r["block"] or 0, r["dtype"] or ""))
    print("| cell | bits/param (model) | total bits | rel. weight error | perplexity +/- se | "
          "acc_norm +/- se | acc +/- se |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        p = next(iter(r["ppl"].values()))
        t = next(iter(r["tasks"].values()))
        print(f"| {r['label']} | {r['bits_per_param']:.3f} | {r['total_bits']:.4g} | "
              f"{r['mean_rel_weight_error']:.4f} | {p['perplexity']:.2f} +/- {p['stderr']:.2f} | "
              f"{t['acc_norm']:.3f} +/- {t['acc_norm_stderr']:.3f} | {t['acc']:.3f} +/- {t['acc_stderr']:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1])
