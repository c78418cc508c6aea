"""Run the grid: quantize in memory, evaluate with the eval code, append one JSON line per cell.

Each model is loaded once (transformers, fp32 on the CPU); for each cell every linear but the
output head is quantized with the format's own reference (`quantize_weight`) and its dequantized
values are written into the model, so the model computes exactly what the kbit model would (in
fp32). Per-window NLLs and per-question correctness are kept in the line: the summary compares
cells on the same items (paired differences), which is far tighter than independent error bars.
A line is appended whole and fsynced as soon as its cell ends (results.py): a crash loses at most
the running cell, and resume truncates a line the crash cut instead of appending onto it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from kbitrt.sweep.grid import SCHEMA, UNQUANTIZED, Cell, linear_bytes
from kbitrt.sweep.results import append_row, read_results, repair_tail
from kbitrt.errors import KbitFormatError

__all__ = ["append_row", "read_results", "run_sweep", "SweepOptions", "SweepReport"]


@dataclass
class SweepOptions:
    ppl: list[str] = field(default_factory=list)  # text files (or dataset names when online)
    tasks: list[str] = field(default_factory=list)  # local JSONL multiple-choice files
    seqlen: int = 512
    max_tokens: int | None = 32768  # per text: keeps a cell to minutes on a CPU
    limit: int | None = None  # rows per task
    batch_size: int = 8
    device: str = "cpu"
    calib: str | None = None  # gptq cells: calibration text file (or dataset name)
    calib_samples: int = 128
    calib_seqlen: int = 2048
    shard: str | None = None  # "I/N" when this run is one slice of a grid (recorded in each row)
    grid_cells: int | None = None  # cells of the whole grid the slice was cut from


@dataclass
class SweepReport:
    done: int = 0
    skipped: int = 0
    failed_models: dict[str, str] = field(default_factory=dict)
    failed_cells: dict[str, str] = field(default_factory=dict)  # cell key -> last error (executors)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # what resume repaired or skipped, one line each


class ModelUnderTest:
    """One transformers model in fp32 (what is scored) and its in-memory kbit twin, which puts each
    cell's weights into it."""

    def __init__(self, name: str, device: str):
        from kbitrt.convert.source import resolve_model
        from kbitrt.eval.model_open import load_hf
        from kbitrt.runtime.in_memory import InMemoryKbit

        self.folder = resolve_model(name)
        self.calib: torch.Tensor | None = None  # gptq cells: (samples, seqlen) tokens
        self.lm = load_hf(self.folder, torch.device(device), torch.float32)
        hf = self.lm.model.model if hasattr(self.lm.model, "model") else self.lm.model
        self.kbit = InMemoryKbit(hf, None)
        if not self.kbit.linear_weights:
            raise KbitFormatError(f"{name}: no linear layers to quantize")
        seen = {p.data_ptr(): p.numel() for p in hf.parameters()}
        self.params = sum(seen.values())
        self.linear_params = sum(w.numel() for w in self.kbit.linear_weights.values())

    def apply(self, cell: Cell) -> tuple[int, float]:
        """Put the cell's weights in place; returns (total model bits, mean rel. weight error)."""
        rest_bits = 16 * (self.params - self.linear_params)
        config = None if cell.bits == UNQUANTIZED else cell.config()
        given = None
        if config is not None and config.method == "gptq":  # one-shot, on the calibration tokens
            from kbitrt.convert.calibrate import gptq_quantize_model

            if self.calib is None:
                raise KbitFormatError("gptq cells need calibration text: give --calib")
            given = gptq_quantize_model(self.folder, config, self.calib)
        try:
            self.kbit.quantize(config, given)
        finally:
            if given is not None:
                given.close()
        errors = list(self.kbit.load_into_model().values())
        if config is None:
            return 16 * self.linear_params + rest_bits, 0.0
        total = 0
        for name, w in self.kbit.linear_weights.items():
            qw = self.kbit.quantized(name)
            n_out = 0 if qw.outlier_idx is None else qw.outlier_idx.numel()
            total += 8 * linear_bytes(w.shape[0], w.shape[1], config, n_out)
        return total + rest_bits, sum(errors) / len(errors)


def _evaluate(mut: ModelUnderTest, texts: dict, tasks: dict, opts: SweepOptions) -> dict:
    from kbitrt.eval.perplexity import windows
    from kbitrt.eval.scoring import score
    from kbitrt.eval.zeroshot import mc_correct, mc_metrics

    out: dict = {"ppl": {}, "tasks": {}}
    for name, tokens in texts.items():
        wins = windows(len(tokens), "gptq", opts.seqlen)
        scores = score(mut.lm, [(tokens[b:e - s], tokens[e - s:e]) for b, e, s in wins],
                       batch_size=opts.batch_size, max_length=opts.seqlen)
        nll = [-lp / s for (lp, _), (_, _, s) in zip(scores, wins)]  # mean NLL per window
        mean = sum(nll) / len(nll)
        se = (sum((x - mean) ** 2 for x in nll) / max(len(nll) - 1, 1) / len(nll)) ** 0.5
        out["ppl"][name] = {"perplexity": math.exp(mean), "stderr": math.exp(mean) * se,
                            "nll": mean, "nll_stderr": se, "window_nll": [round(x, 6) for x in nll],
                            "protocol": "gptq", "seqlen": opts.seqlen, "tokens": len(tokens)}
    accs = []
    for name, (rows, requests) in tasks.items():
        lls = [lp for lp, _ in score(mut.lm, requests, batch_size=opts.batch_size * 4)]
        m = mc_metrics(rows, lls)
        correct, correct_norm = mc_correct(rows, lls)
        m["correct"] = "".join(map(str, correct))
        m["correct_norm"] = "".join(map(str, correct_norm))
        out["tasks"][name] = m
        accs.append((m["acc"], m["acc_stderr"], m["acc_norm"], m["acc_norm_stderr"]))
    if accs:
        n = len(accs)
        out["mean_acc"] = sum(a[0] for a in accs) / n
        out["mean_acc_stderr"] = math.sqrt(sum(a[1] ** 2 for a in accs)) / n
        out["mean_acc_norm"] = sum(a[2] for a in accs) / n
        out["mean_acc_norm_stderr"] = math.sqrt(sum(a[3] ** 2 for a in accs)) / n
    return out


def _inputs(mut: ModelUnderTest, opts: SweepOptions) -> tuple[dict, dict]:
    from kbitrt.eval.perplexity import load_text, tokenize
    from kbitrt.eval.zeroshot import encode_pair, read_jsonl, task_name

    texts = {}
    for p in opts.ppl:
        name, text = load_text(p)
        texts[name] = tokenize(mut.lm, text, opts.max_tokens)
        if len(texts[name]) < opts.seqlen:
            raise KbitFormatError(f"{p}: {len(texts[name])} tokens, fewer than --seqlen {opts.seqlen}")
    tasks = {}
    for t in opts.tasks:
        rows = read_jsonl(t, opts.limit)
        tasks[task_name(t)] = (rows, [encode_pair(mut.lm.tokenizer, r["query"], " " + c)
                                      for r in rows for c in r["choices"]])
    return texts, tasks


def _versions() -> dict:
    import kbitrt

    return {"kbitrt": kbitrt.__version__, "torch": torch.__version__}


def open_model(model: str, opts: SweepOptions) -> tuple[ModelUnderTest, dict, dict]:
    """The model of a run of cells, with its tokenized texts and tasks (shared by its cells)."""
    mut = model_under_test(model, opts.device, ModelUnderTest)  # sweep/any_precision.py
    texts, tasks = _inputs(mut, opts)
    return mut, texts, tasks


def measure_cell(mut: ModelUnderTest, texts: dict, tasks: dict, cell: Cell, opts: SweepOptions) -> dict:
    """One results line: the cell's weights put in place, then evaluated."""
    t0 = time.perf_counter()
    total_bits, rel_err = mut.apply(cell)
    row = {"schema": SCHEMA, "cell": cell.key, "model": cell.model, "label": cell.label,
           "bits": cell.bits, "block": cell.block, "dtype": cell.dtype,
           "outliers": cell.outliers, "params": mut.params, "total_bits": total_bits,
           "bits_per_param": total_bits / mut.params, "mean_rel_weight_error": rel_err}
    row.update({k: v for k, v in (("scales", cell.scales), ("method", cell.method))
                if v not in ("absmax", "rtn")})  # issue 15 dimensions, when not default
    row.update(_evaluate(mut, texts, tasks, opts))
    row["seconds"] = time.perf_counter() - t0
    row["versions"] = _versions()
    row["device"] = opts.device
    if opts.shard:  # lets --merge name the slices and cells that are missing
        row["shard"], row["grid_cells"] = opts.shard, opts.grid_cells
    return row


def resume_keys(results: Path, notes: list[str]) -> set[str]:
    """The cells already in `results`, after truncating a line cut by a crash (so nothing is ever
    appended onto it); what was repaired or skipped goes to `notes`."""
    note = repair_tail(results)
    if note:
        notes.append(note)
    return {r["cell"] for r in read_results(results, notes)}


def model_under_test(name: str, device: str, default):
    from kbitrt.sweep.any_precision import model_under_test as pick

    return pick(name, device, default)


def run_sweep(cells: list[Cell], opts: SweepOptions, results: Path,
              on_cell: Callable[[int, int, Cell, float | None, str | None], None] | None = None,
              ) -> SweepReport:
    """Evaluate every cell not yet in `results`; `on_cell(done, total, cell, seconds, error)`."""
    if not opts.ppl and not opts.tasks:
        raise KbitFormatError("nothing to measure: give --ppl TEXT and/or --tasks FILE.jsonl")
    report = SweepReport()
    done_keys = resume_keys(results, report.notes)
    todo = [c for c in cells if c.key not in done_keys]
    report.skipped = len(cells) - len(todo)
    start, finished = time.perf_counter(), 0
    results.parent.mkdir(parents=True, exist_ok=True)
    for model in dict.fromkeys(c.model for c in todo):
        mine = [c for c in todo if c.model == model]
        try:
            mut, texts, tasks = open_model(model, opts)
            if opts.calib and any(c.method == "gptq" for c in mine):
                from kbitrt.eval.perplexity import load_text
                from kbitrt.convert.calibrate import calibration_windows

                mut.calib = calibration_windows(mut.folder, load_text(opts.calib)[1],
                                                opts.calib_samples, opts.calib_seqlen)
        except (KbitFormatError, OSError, ValueError) as e:
            report.failed_models[model] = str(e).splitlines()[0] if str(e) else type(e).__name__
            for c in mine:
                finished += 1
                if on_cell:
                    on_cell(finished, len(todo), c, None, report.failed_models[model])
            continue
        for cell in mine:
            row = measure_cell(mut, texts, tasks, cell, opts)
            append_row(results, row)
            finished += 1
            report.done += 1
            if on_cell:
                on_cell(finished, len(todo), cell, row["seconds"], None)
        del mut
    report.seconds = time.perf_counter() - start
    return report
