"""Answers to the paper's questions from a results file, each with its numbers and uncertainty.

Cells of one model are compared on the same windows and questions, so differences use paired
standard errors (the spread of per-item differences), and a difference under two standard errors
is called "within noise".
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass


@dataclass
class Comparison:
    a: str
    b: str
    diff: float  # metric(a) - metric(b)
    stderr: float
    metric: str

    @property
    def within_noise(self) -> bool:
        return abs(self.diff) < 2 * self.stderr

    def text(self) -> str:
        verdict = "within noise" if self.within_noise else (
            f"{self.a} {'better' if self.better_a else 'worse'}")
        return f"{self.a} vs {self.b}: {self.metric} {self.diff:+.4f} +/- {self.stderr:.4f} ({verdict})"

    @property
    def better_a(self) -> bool:
        return self.diff < 0 if self.metric == "nll" else self.diff > 0

    def to_json(self) -> dict:
        return {"a": self.a, "b": self.b, "metric": self.metric, "diff": self.diff,
                "stderr": self.stderr, "within_noise": self.within_noise}


def _paired(x: list[float], y: list[float]) -> tuple[float, float]:
    d = [a - b for a, b in zip(x, y)]
    n = len(d)
    mean = sum(d) / n
    var = sum((v - mean) ** 2 for v in d) / max(n - 1, 1)
    return mean, math.sqrt(var / n)


def metric_of(row: dict) -> tuple[str, float, float]:
    """(name, value, stderr) of a cell's headline metric: mean accuracy, else mean NLL."""
    if "mean_acc" in row:
        return "acc", row["mean_acc"], row["mean_acc_stderr"]
    ppl = list(row["ppl"].values())
    return "nll", sum(p["nll"] for p in ppl) / len(ppl), \
        math.sqrt(sum(p["nll_stderr"] ** 2 for p in ppl)) / len(ppl)


def compare(a: dict, b: dict) -> Comparison:
    """Paired difference of two cells of the same model on their shared items."""
    name, _, _ = metric_of(a)
    if name == "acc":
        diffs, ses = [], []
        for task in a["tasks"]:
            ca = [int(c) for c in a["tasks"][task]["correct"]]
            cb = [int(c) for c in b["tasks"][task]["correct"]]
            m, s = _paired(ca, cb)
            diffs.append(m)
            ses.append(s)
    else:
        diffs, ses = [], []
        for text in a["ppl"]:
            m, s = _paired(a["ppl"][text]["window_nll"], b["ppl"][text]["window_nll"])
            diffs.append(m)
            ses.append(s)
    k = len(diffs)
    return Comparison(a["label"], b["label"], sum(diffs) / k, math.sqrt(sum(s * s for s in ses)) / k, name)


def _better(name: str, x: float, y: float) -> bool:
    return x < y if name == "nll" else x > y


def frontier(rows: list[dict]) -> list[dict]:
    """Cells no other cell beats with at most as many total bits (the bit-level optimum)."""
    out, best = [], None
    for row in sorted(rows, key=lambda r: (r["total_bits"], -metric_of(r)[1] if metric_of(r)[0] == "acc"
                                           else metric_of(r)[1])):
        name, value, _ = metric_of(row)
        if best is None or _better(name, value, best):
            out.append(row)
            best = value
    return out


def summarize(rows: list[dict]) -> dict:
    """The paper's four questions, per model."""
    by_model: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_model[r["model"]].append(r)
    report = {}
    for model, mine in by_model.items():
        name = metric_of(mine[0])[0]
        section: dict = {"metric": "mean zero-shot accuracy" if name == "acc" else "mean NLL (log perplexity)"}
        front = frontier(mine)
        section["frontier"] = [{"label": r["label"], "total_bits": r["total_bits"],
                                "bits_per_param": r["bits_per_param"], "metric": metric_of(r)[1],
                                "stderr": metric_of(r)[2]} for r in front]
        best_per_bits = {}
        for r in mine:
            cur = best_per_bits.get(r["bits"])
            if cur is None or _better(name, metric_of(r)[1], metric_of(cur)[1]):
                best_per_bits[r["bits"]] = r
        section["best_per_precision"] = [
            {"bits": b, "label": r["label"], "total_bits": r["total_bits"], "metric": metric_of(r)[1],
             "stderr": metric_of(r)[2]} for b, r in sorted(best_per_bits.items())]
        # is each precision's best within noise of the next higher precision's best?
        steps = []
        ordered = [r for _, r in sorted(best_per_bits.items())]
        for lo, hi in zip(ordered, ordered[1:]):
            steps.append(compare(lo, hi).to_json())
        section["precision_steps"] = steps
        section["block_size_at_4bit"] = _block_question(mine)
        section["dtype_at_4bit"] = _dtype_question(mine, name)
        section["outliers_at_3bit"] = _outlier_question(mine)
        report[model] = section
    return report


def _block_question(rows: list[dict]) -> list[dict]:
    out = []
    four = [r for r in rows if r["bits"] == 4 and r["outliers"] == "none"]
    for dtype in sorted({r["dtype"] for r in four}):
        cells = sorted((r for r in four if r["dtype"] == dtype), key=lambda r: r["block"])
        if len(cells) >= 2:
            out.append(compare(cells[0], cells[-1]).to_json())
    return out


def _dtype_question(rows: list[dict], name: str) -> list[dict]:
    out = []
    four = [r for r in rows if r["bits"] == 4 and r["outliers"] == "none"]
    for block in sorted({r["block"] for r in four}):
        cells = [r for r in four if r["block"] == block]
        if len(cells) < 2:
            continue
        best = max(cells, key=lambda r: metric_of(r)[1] if name == "acc" else -metric_of(r)[1])
        for other in cells:
            if other is not best:
                out.append(compare(best, other).to_json())
    return out


def _outlier_question(rows: list[dict]) -> list[dict]:
    out = []
    three = [r for r in rows if r["bits"] == 3]
    for r in three:
        if r["outliers"] == "none":
            continue
        base = next((b for b in three if b["outliers"] == "none" and b["dtype"] == r["dtype"]
                     and b["block"] == r["block"]), None)
        if base is not None:
            out.append(compare(r, base).to_json())
    return out
