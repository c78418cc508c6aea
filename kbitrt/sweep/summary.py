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


HEADLINE = {"metric": "auto"}  # "auto": NLL where perplexity was measured, else acc_norm


def metric_of(row: dict, metric: str | None = None) -> tuple[str, float, float]:
    """(name, value, stderr) of a cell's headline metric.

    `nll`: mean NLL over the texts (its paired differences resolve far smaller effects than
    a few hundred questions can); `acc_norm`: mean zero-shot acc_norm over the tasks
    (length-normalised; small models sit at chance on raw acc for some tasks).
    """
    metric = metric or HEADLINE["metric"]
    tasks = list(row.get("tasks", {}).values())
    if metric == "acc_norm" or (metric == "auto" and not row.get("ppl")):
        return "acc_norm", sum(t["acc_norm"] for t in tasks) / len(tasks), \
            math.sqrt(sum(t["acc_norm_stderr"] ** 2 for t in tasks)) / len(tasks)
    ppl = list(row["ppl"].values())
    return "nll", sum(p["nll"] for p in ppl) / len(ppl), \
        math.sqrt(sum(p["nll_stderr"] ** 2 for p in ppl)) / len(ppl)


def compare_nll(a: dict, b: dict) -> Comparison | None:
    """Paired difference in mean NLL over the same windows (None without perplexity data)."""
    if not a.get("ppl"):
        return None
    diffs, ses = [], []
    for text in a["ppl"]:
        m, s = _paired(a["ppl"][text]["window_nll"], b["ppl"][text]["window_nll"])
        diffs.append(m)
        ses.append(s)
    k = len(diffs)
    return Comparison(a["label"], b["label"], sum(diffs) / k, math.sqrt(sum(x * x for x in ses)) / k, "nll")


def compare(a: dict, b: dict) -> Comparison:
    """Paired difference of two cells of the same model on their shared items."""
    return compare_nll(a, b) if metric_of(a)[0] == "nll" else _compare_acc(a, b)


def _compare_acc(a: dict, b: dict) -> Comparison:
    diffs, ses = [], []
    for task in a["tasks"]:
        ca = [int(c) for c in a["tasks"][task]["correct_norm"]]
        cb = [int(c) for c in b["tasks"][task]["correct_norm"]]
        m, s = _paired(ca, cb)
        diffs.append(m)
        ses.append(s)
    k = len(diffs)
    return Comparison(a["label"], b["label"], sum(diffs) / k, math.sqrt(sum(x * x for x in ses)) / k,
                      "acc_norm")


def both(a: dict, b: dict) -> list[dict]:
    """The headline comparison and the other metric, when it was measured."""
    out = [compare(a, b).to_json()]
    if out[0]["metric"] == "nll" and a.get("tasks"):
        out.append(_compare_acc(a, b).to_json())
    elif out[0]["metric"] != "nll" and a.get("ppl"):
        out.append(compare_nll(a, b).to_json())
    return out


def _better(name: str, x: float, y: float) -> bool:
    return x < y if name == "nll" else x > y


def frontier(rows: list[dict], metric: str | None = None) -> list[dict]:
    """Cells no other cell beats with at most as many total bits (the bit-level optimum)."""
    def value(r: dict) -> float:
        name, v, _ = metric_of(r, metric)
        return v if name == "nll" else -v  # lower is better either way

    out, best = [], None
    for row in sorted(rows, key=lambda r: (r["total_bits"], value(r))):
        if best is None or value(row) < best:
            out.append(row)
            best = value(row)
    return out


def summarize(rows: list[dict], metric: str = "auto") -> dict:
    """The paper's four questions, per model, decided by `metric` (auto, nll or acc_norm)."""
    HEADLINE["metric"] = metric
    by_model: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_model[r["model"]].append(r)
    report = {}
    for model, mine in by_model.items():
        name = metric_of(mine[0])[0]
        section: dict = {"metric": "mean zero-shot acc_norm" if name == "acc_norm" else "mean NLL per token (log perplexity; lower is better)"}
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
            steps.extend(both(lo, hi))
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
            out.extend(both(cells[0], cells[-1]))
    return out


def _dtype_question(rows: list[dict], name: str) -> list[dict]:
    out = []
    four = [r for r in rows if r["bits"] == 4 and r["outliers"] == "none"]
    for block in sorted({r["block"] for r in four}):
        cells = [r for r in four if r["block"] == block]
        if len(cells) < 2:
            continue
        best = max(cells, key=lambda r: -metric_of(r)[1] if name == "nll" else metric_of(r)[1])
        for other in cells:
            if other is not best:
                out.extend(both(best, other))
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
            out.extend(both(r, base))
    return out
