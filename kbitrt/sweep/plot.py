"""`kbit plot`: the paper's Figure 2 / Figure 3 panels from a sweep results file (matplotlib extra)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from kbitrt.errors import KbitFormatError
from kbitrt.sweep.summary import frontier, metric_of


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no screen
        import matplotlib.pyplot as plt
    except ImportError:
        raise KbitFormatError("kbit plot needs matplotlib: pip install 'kbitrt[plot]'") from None
    return plt


def _best(rows: list[dict], key) -> dict[tuple, dict]:
    """The best cell per key (e.g. per (model, bits)) by the headline metric."""
    out: dict[tuple, dict] = {}
    for r in rows:
        k = key(r)
        name, v, _ = metric_of(r)
        cur = out.get(k)
        if cur is None or (v < metric_of(cur)[1] if name == "nll" else v > metric_of(cur)[1]):
            out[k] = r
    return out


def _ppl(r: dict) -> tuple[float, float]:
    p = list(r["ppl"].values())
    if not p:
        return math.nan, 0.0
    return sum(x["perplexity"] for x in p) / len(p), math.sqrt(sum(x["stderr"] ** 2 for x in p)) / len(p)


def _acc(r: dict) -> tuple[float, float]:
    _, value, stderr = metric_of(r, "acc_norm")
    return value, stderr


def _plot_scaling(ax_acc, ax_ppl, rows: list[dict], has_acc: bool, has_ppl: bool) -> None:
    """Figure 2: metric vs total model bits, one line per precision (best cell per model), every
    cell faintly, and the bit-level frontier."""
    best = _best(rows, lambda r: (r["model"], r["bits"]))
    lines: dict[int, list[dict]] = defaultdict(list)
    for (_, bits), r in best.items():
        lines[bits].append(r)
    for bits, rs in sorted(lines.items()):
        rs.sort(key=lambda r: r["total_bits"])
        x = [r["total_bits"] for r in rs]
        if has_acc:
            ax_acc.errorbar(x, [_acc(r)[0] for r in rs], yerr=[_acc(r)[1] for r in rs],
                            marker="o", capsize=3, label=f"{bits}-bit")
        if has_ppl:
            ax_ppl.errorbar(x, [_ppl(r)[0] for r in rs], yerr=[_ppl(r)[1] for r in rs],
                            marker="o", capsize=3, label=f"{bits}-bit")
    # every cell, faintly: with a single model each precision is one point per setting
    if has_acc:
        ax_acc.scatter([r["total_bits"] for r in rows], [_acc(r)[0] for r in rows],
                       s=12, c="0.6", zorder=0, label="all cells")
    if has_ppl:
        ax_ppl.scatter([r["total_bits"] for r in rows], [_ppl(r)[0] for r in rows],
                       s=12, c="0.6", zorder=0, label="all cells")
    if has_acc:
        front = frontier(rows, "acc_norm")
        ax_acc.plot([r["total_bits"] for r in front], [_acc(r)[0] for r in front], "k--", lw=1,
                    label="bit-level frontier")
    if has_ppl:
        front = frontier(rows, "nll")
        ax_ppl.plot([r["total_bits"] for r in front], [_ppl(r)[0] for r in front], "k--", lw=1,
                    label="bit-level frontier")
    for ax, title, ylabel in ((ax_acc, "Mean zero-shot accuracy (acc_norm) vs total model bits", "acc_norm"),
                              (ax_ppl, "Perplexity vs total model bits", "perplexity")):
        ax.set_xscale("log")
        ax.set_xlabel("total model bits")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    if has_ppl:
        ax_ppl.set_yscale("log")


def _plot_settings(ax_block, ax_dtype, rows: list[dict], has_ppl: bool) -> None:
    """Figure 3 style: block size at 4 bits (per data type) and data types across precisions."""
    # perplexity separates settings that a few hundred questions cannot; accuracy otherwise
    value = _ppl if has_ppl else _acc
    four = [r for r in rows if r["bits"] == 4 and r["outliers"] == "none"]
    for dtype in sorted({r["dtype"] for r in four}):
        rs = sorted((r for r in four if r["dtype"] == dtype), key=lambda r: r["block"])
        ax_block.errorbar([r["block"] for r in rs], [value(r)[0] for r in rs],
                          yerr=[value(r)[1] for r in rs], marker="o", capsize=3, label=dtype)
    ax_block.set_xscale("log", base=2)
    ax_block.set_xlabel("block size")
    ax_block.set_title("4-bit: block size per data type")
    quant = [r for r in rows if r["bits"] != 16 and r["outliers"] == "none"]
    small = min((r["block"] for r in quant), default=None)
    for dtype in sorted({r["dtype"] for r in quant}):
        rs = sorted((r for r in quant if r["dtype"] == dtype and r["block"] == small),
                    key=lambda r: r["bits"])
        ax_dtype.errorbar([r["bits"] for r in rs], [value(r)[0] for r in rs],
                          yerr=[value(r)[1] for r in rs], marker="o", capsize=3, label=dtype)
    ax_dtype.set_xlabel("bits per weight")
    ax_dtype.set_title(f"data types across precisions (block {small})")
    for ax in (ax_block, ax_dtype):
        ax.set_ylabel("perplexity" if has_ppl else "acc_norm")
        if has_ppl:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)


def plot(rows: list[dict], output: Path) -> list[Path]:
    """Write `output` (.png) and the same figure as .svg; returns both paths."""
    if not rows:
        raise KbitFormatError("the results file has no cells to plot")
    plt = _pyplot()
    has_acc = bool(rows[0].get("tasks"))
    has_ppl = bool(rows[0].get("ppl"))
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    (ax_acc, ax_ppl), (ax_block, ax_dtype) = axes
    _plot_scaling(ax_acc, ax_ppl, rows, has_acc, has_ppl)
    _plot_settings(ax_block, ax_dtype, rows, has_ppl)
    fig.suptitle(", ".join(sorted({Path(r["model"]).name for r in rows})))
    fig.tight_layout()
    output = Path(output)
    paths = [output.with_suffix(".png"), output.with_suffix(".svg")]
    for p in paths:
        fig.savefig(p, dpi=110)
    plt.close(fig)
    return paths
