"""`kbit eval` as a library call: perplexity datasets and zero-shot tasks for one model (and an
optional baseline), every finished result written to the JSON record at once."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from kbitrt.eval import perplexity as ppl_mod
from kbitrt.eval import zeroshot
from kbitrt.eval.data import resolve as resolve_data
from kbitrt.eval.progress import progress_bar
from kbitrt.eval.results import deltas, environment, model_record, write_json
from kbitrt.errors import KbitFormatError


@dataclass
class EvalOptions:
    ppl: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    seqlen: int | None = None  # None: min(2048, the model's positions)
    protocol: str = "gptq"
    stride: int | None = None
    max_tokens: int | None = None
    limit: int | None = None
    batch_size: int = 16
    ppl_batch_size: int = 1
    num_fewshot: int = 0
    device: str = "auto"
    backend: str = "auto"
    cpu_weights: str = "auto"  # CPU: dense fp16/bf16/fp32 copies, or packed (--low-memory)
    kv_cache: str = "auto"  # the KV cache's dtype (loader.KV_CACHES; low-memory: fp16 on the CPU)
    device_map: str | None = None  # auto, balanced, sequential or a JSON file (runtime/placement.py)
    max_memory: str | None = None  # 0=20GiB,cpu=60GiB
    progress: bool = True
    bits: int | str | None = None  # width of an any-precision model (runtime/any_precision.py)

    def check(self) -> None:
        """Fail on bad input before any model is loaded."""
        if self.protocol not in ppl_mod.PROTOCOLS:
            raise KbitFormatError(f"--protocol {self.protocol!r}: use one of "
                                  f"{', '.join(ppl_mod.PROTOCOLS)}")
        for name in self.ppl:
            if not resolve_data(name).is_file() and name not in ppl_mod.DATASETS:
                raise FileNotFoundError(f"--ppl {name}: no such file, and not a known dataset "
                                        f"({', '.join(ppl_mod.DATASETS)})")
        for task in self.tasks:
            if zeroshot.is_local(task):
                zeroshot.read_jsonl(task, self.limit)  # every row checked now, not mid-run
        remote = [t for t in self.tasks if not zeroshot.is_local(t)]
        if remote:
            zeroshot.check_lm_eval_tasks(remote)


def _texts(names: list[str]) -> dict[str, tuple[str, str]]:
    """Load every text before the model, so a missing dataset fails fast."""
    return {name: ppl_mod.load_text(name) for name in names}


def evaluate_model(name: str, opts: EvalOptions, record: dict, save: Callable[[], None],
                   texts: dict, log: Callable[[str], None] = lambda s: None) -> dict:
    """Fill `record` (model, perplexity, tasks, mean) for one model, saving after each result.
    On the CPU the exact fp32 activations unless a mode was chosen (cpu.exact_unless_chosen)."""
    from kbitrt.runtime.kernels import cpu

    with cpu.exact_unless_chosen() as mode:
        return _evaluate_model(name, opts, record, save, texts, log, mode)


def _evaluate_model(name: str, opts: EvalOptions, record: dict, save: Callable[[], None],
                    texts: dict, log: Callable[[str], None], cpu_activations: str) -> dict:
    from kbitrt.eval.model_open import open_model

    t0 = time.perf_counter()
    lm = open_model(name, device=opts.device, backend=opts.backend, cpu_weights=opts.cpu_weights,
                    bits=opts.bits, device_map=opts.device_map, max_memory=opts.max_memory,
                    kv_cache=opts.kv_cache)
    record["model"] = model_record(name, lm)
    record["model"]["load_seconds"] = time.perf_counter() - t0
    record["model"]["cpu_weights"] = lm.cpu_weights  # None on CUDA or for a plain HF model
    record["model"]["kv_cache"] = getattr(lm, "kv_cache", "auto")  # fp16 with --low-memory
    if lm.cpu_weights is not None:  # the CPU's fused kernels: which activations they ran
        record["model"]["cpu_activations"] = cpu_activations
    if lm.note:
        log(f"note: {lm.note}")
    seqlen = opts.seqlen or min(2048, lm.max_positions or 2048)
    record.setdefault("perplexity", {})
    record.setdefault("tasks", {})
    for key, (label, text) in texts.items():
        tokens = ppl_mod.tokenize(lm, text, opts.max_tokens or ppl_mod.default_max_tokens(key, seqlen))
        n_win = len(ppl_mod.windows(len(tokens), opts.protocol, seqlen,
                                    opts.stride or (seqlen // 2 if opts.protocol == "sliding" else None)))
        with progress_bar(f"perplexity {label}", n_win, opts.progress) as advance:
            res = ppl_mod.perplexity(lm, tokens, opts.protocol, seqlen, opts.stride,
                                     opts.ppl_batch_size, label, on_batch=advance)
        record["perplexity"][label] = res.to_json()
        save()
        log(f"{label}: perplexity {res.perplexity:.3f} ({res.describe()})")
    local = [t for t in opts.tasks if zeroshot.is_local(t)]
    remote = [t for t in opts.tasks if not zeroshot.is_local(t)]
    for task in local:
        with progress_bar(f"task {zeroshot.task_name(task)}", zeroshot.n_requests(task, opts.limit),
                          opts.progress) as advance:
            res = zeroshot.eval_local(lm, task, opts.limit, opts.batch_size, on_batch=advance)
        record["tasks"][zeroshot.task_name(task)] = res
        save()
    if remote:
        record["tasks"].update(zeroshot.eval_lm_eval(lm, remote, opts.limit, opts.batch_size,
                                                     opts.num_fewshot, opts.progress))
        save()
    accs = [r for r in record["tasks"].values() if r.get("acc") is not None]
    if len(accs) > 1:
        record["mean"] = {m: sum(r.get(m, r["acc"]) for r in accs) / len(accs)
                          for m in ("acc", "acc_norm")}
    save()
    del lm
    gc.collect()
    return record


def run_eval(model: str, opts: EvalOptions, baseline: str | None = None,
             output: Path | None = None, log: Callable[[str], None] = lambda s: None) -> dict:
    """Evaluate `model` (then `baseline`), writing the record to `output` after every result.
    On Ctrl-C the record is written with "interrupted": true and the interrupt re-raised."""
    opts.check()
    texts = _texts(opts.ppl)
    record: dict = {"kind": "eval", **environment_for(opts), "options": _options(opts),
                    "interrupted": False}
    state = {"path": output}

    def save() -> None:
        if state["path"] is None:  # default: the model's folder, known once it is resolved
            from kbitrt.eval.results import default_output

            path = record.get("model", {}).get("path")
            state["path"] = default_output(Path(path) if path else None)
        write_json(state["path"], record)

    try:
        evaluate_model(model, opts, record, save, texts, log)
        if baseline:
            base: dict = {}
            record["baseline"] = base
            evaluate_model(baseline, replace(opts, bits=None), base, save, texts, log)
            record["delta"] = deltas(record, base)
            save()
    except KeyboardInterrupt:
        record["interrupted"] = True
        if record.get("model"):
            save()
        raise
    record["output"] = str(state["path"])
    return record


def environment_for(opts: EvalOptions) -> dict:
    from kbitrt.runtime.devices import resolve_device

    return environment(resolve_device(opts.device))


def _options(opts: EvalOptions) -> dict:
    return {k: v for k, v in opts.__dict__.items() if k != "progress"}
