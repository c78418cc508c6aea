"""`kbit sweep --executor ray`: every cell a Ray task, the driver the only writer of the results.

Ray (the optional extra `kbitrt[ray]`) schedules the cells over a cluster (`--address`, after
`ray start --head` on one node and `ray start --address=HEAD:6379` on the others) or over a local
cluster it starts. Each task declares what it needs: one GPU on CUDA, else `cpus` CPU cores, and
the host memory the in-memory fp32 model takes (from the checkpoint's parameter count), so Ray
packs cells onto nodes without running them out of memory.

The driver appends each finished cell to the JSONL (append + fsync, like the one-process sweep):
a crashed worker or driver loses at most the cells in flight, and re-running resumes. A cell
whose task raises, or whose worker dies, is retried at most `retries` times; every failed attempt
is recorded with its error in `<results>.failed.jsonl` (a separate file, so summaries and plots
read only measured cells). Models are read by each worker from the path given (a shared file
system) or from its own Hugging Face cache (Hub ids).

A worker keeps the last model it loaded (with its tokenized texts), so the cells of one model,
submitted in grid order, mostly reuse a loaded model instead of reading it again.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from kbitrt.errors import KbitError, KbitFormatError
from kbitrt.sweep.grid import Cell
from kbitrt.sweep.results import append_row
from kbitrt.sweep.runner import SweepOptions, SweepReport, measure_cell, open_model, resume_keys

EXECUTORS = ("local", "ray")
GiB = 2 ** 30


class ExecutorError(KbitError):
    """The cluster cannot run the sweep (Ray missing, no node large enough); one clear line."""


@dataclass
class RayOptions:
    address: str | None = None  # None: start a local cluster
    retries: int = 1  # extra attempts of a failing cell
    cpus: int = 1  # CPU cores per cell (threads of its torch)
    memory: int | None = None  # bytes per cell; None: from the model size


@dataclass
class Counts:
    """Where the sweep stands across the cluster (what the progress bar shows)."""

    total: int  # cells to run in this call (those already in the results are not counted)
    done: int = 0
    failed: int = 0  # cells that failed every attempt
    running: int = 0  # submitted and not finished (queued on the cluster or running)
    retried: int = 0  # failed attempts that were retried
    failed_cells: dict[str, str] = field(default_factory=dict)


def failures_path(results: Path) -> Path:
    """`results.jsonl` -> `results.failed.jsonl`: one line per failed attempt."""
    return results.with_name(f"{results.stem}.failed{results.suffix or '.jsonl'}")


# ------------------------------------------------------------------------------------ resources

def model_params(model: str) -> int:
    """Parameters of a plain checkpoint, from its headers (no weights read)."""
    from kbitrt.convert.checkpoint import CheckpointTensors
    from kbitrt.convert.source import find_checkpoint, resolve_model

    tensors = CheckpointTensors(find_checkpoint(resolve_model(model)))
    total = 0
    for name in tensors.names():
        n = 1
        for d in tensors.shape(name):
            n *= d
        total += n
    return total


def cell_memory(params: int) -> int:
    """Host bytes one cell takes: the fp32 model, an fp32 copy of its linears, a dequantized
    weight in flight and activations (x1.5), plus 1 GiB for the interpreter, torch and tokenizer."""
    return int(8 * params * 1.5) + GiB


def cell_resources(model: str, opts: SweepOptions, ray_opts: RayOptions) -> dict:
    """The Ray resources of one cell of `model`."""
    memory = ray_opts.memory or cell_memory(model_params(model))
    if opts.device.startswith("cuda"):
        return {"num_gpus": 1, "num_cpus": 1, "memory": memory}
    return {"num_gpus": 0, "num_cpus": ray_opts.cpus, "memory": memory}


def _check_fits(ray, demand: dict, model: str) -> str | None:
    """Why no live node of the cluster can run a cell of `model`, or None."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    need = {"CPU": demand["num_cpus"], "GPU": demand["num_gpus"], "memory": demand["memory"]}
    if any(all(n.get(k, 0) >= v for k, v in need.items() if v) for n in nodes):
        return None
    best = {k: max((n.get(k, 0) for n in nodes), default=0) for k in need}
    return (f"a cell of {model} needs {need['CPU']} CPU, {need['GPU']} GPU and "
            f"{need['memory'] / GiB:.1f} GiB memory; the largest node has {best['CPU']:g} CPU, "
            f"{best['GPU']:g} GPU, {best['memory'] / GiB:.1f} GiB")


# --------------------------------------------------------------------------------------- worker

_LOADED: dict = {}  # in a worker process: the last model loaded, keyed by (model, options)


def measure_in_worker(cell: Cell, opts: SweepOptions, cpus: int) -> dict:
    """A Ray task: one results line for `cell` (the worker keeps its last model loaded)."""
    import torch

    if not opts.device.startswith("cuda"):
        torch.set_num_threads(max(1, cpus))
    key = (cell.model, json.dumps(asdict(opts), sort_keys=True))
    if key not in _LOADED:
        _LOADED.clear()  # one model per worker: the memory Ray was told about
        _LOADED[key] = open_model(cell.model, opts)
    mut, texts, tasks = _LOADED[key]
    row = measure_cell(mut, texts, tasks, cell, opts)
    row["worker"] = f"{socket.gethostname()}:{os.getpid()}"
    return row


# --------------------------------------------------------------------------------------- driver

def _import_ray():
    try:
        import ray
    except ImportError:
        raise ExecutorError("--executor ray needs Ray: pip install 'kbitrt[ray]'") from None
    return ray


def _one_line(error: BaseException) -> str:
    cause = getattr(error, "cause", None)  # RayTaskError: the exception the task raised
    if isinstance(cause, BaseException):
        error = cause
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()


def _init_ray(ray, ray_opts: RayOptions) -> bool:
    """Join the cluster at --address, or start a local one, unless Ray is already initialized;
    returns whether it was started here (and is to be shut down here)."""
    started_here = not ray.is_initialized()
    if started_here:
        try:
            if ray_opts.address:
                ray.init(address=ray_opts.address, log_to_driver=False)
            else:
                ray.init(include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"join the Ray cluster at {ray_opts.address}" if ray_opts.address else "start Ray"
            raise ExecutorError(f"cannot {where}: {_one_line(e)}") from None
    return started_here


def _cell_tasks(ray, todo: list[Cell], opts: SweepOptions, ray_opts: RayOptions,
                cell_fn: Callable[[Cell, SweepOptions, int], dict] | None) -> tuple[dict, dict]:
    """(resources, Ray remote function) per model of the cells to run; on a local cluster, one
    clear line when some model's cell fits no node."""
    demands = {m: cell_resources(m, opts, ray_opts) for m in dict.fromkeys(c.model for c in todo)}
    for model, demand in demands.items():
        why = _check_fits(ray, demand, model)
        if why and not ray_opts.address:
            raise ExecutorError(f"{why}: no cell could ever start on this local cluster")
    remotes = {m: ray.remote(cell_fn or measure_in_worker).options(max_retries=0, **d)
               for m, d in demands.items()}
    return demands, remotes


def _record_failure(error: BaseException, cell: Cell, attempt: int, results: Path,
                    ray_opts: RayOptions, counts: Counts, queue: deque) -> bool:
    """A failed attempt: its line in the failures file, then the cell queued again (first in
    line) while retries are left, else counted as failed; returns whether it is retried."""
    message = _one_line(error)
    retry = attempt <= ray_opts.retries
    append_row(failures_path(results), {
        "cell": cell.key, "label": cell.label, "attempt": attempt, "error": message,
        "retried": retry, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    if retry:
        counts.retried += 1
        queue.appendleft((cell, attempt + 1))
    else:
        counts.failed += 1
        counts.failed_cells[cell.key] = message
    return retry


def run_ray(cells: list[Cell], opts: SweepOptions, results: Path, ray_opts: RayOptions,
            on_progress: Callable[[Counts, Cell | None, str], None] | None = None,
            cell_fn: Callable[[Cell, SweepOptions, int], dict] | None = None) -> SweepReport:
    """Run every cell not yet in `results` as a Ray task; append rows as they come back.

    `on_progress(counts, cell, event)`, event one of start, done, retry, failed. `cell_fn`
    replaces the task body (tests use it to kill a worker mid-cell).
    """
    if not opts.ppl and not opts.tasks:
        raise KbitFormatError("nothing to measure: give --ppl TEXT and/or --tasks FILE.jsonl")
    if ray_opts.retries < 0 or ray_opts.cpus < 1:
        raise ExecutorError("--retries must be >= 0 and --cpus-per-cell >= 1")
    ray = _import_ray()
    report = SweepReport()
    done_keys = resume_keys(results, report.notes)
    todo = [c for c in dict.fromkeys(cells) if c.key not in done_keys]
    report.skipped = len(cells) - len(todo)
    counts = Counts(total=len(todo))
    start = time.perf_counter()
    if not todo:
        return report
    results.parent.mkdir(parents=True, exist_ok=True)
    started_here = _init_ray(ray, ray_opts)
    pending: dict = {}  # ObjectRef -> (cell, attempt)
    try:
        demands, remotes = _cell_tasks(ray, todo, opts, ray_opts, cell_fn)
        queue = deque((c, 1) for c in todo)  # grid order: a worker mostly stays on one model
        while queue or pending:
            capacity = _capacity(ray, demands[queue[0][0].model]) if queue else 0
            while queue and len(pending) < capacity:
                cell, attempt = queue.popleft()
                pending[remotes[cell.model].remote(cell, opts, ray_opts.cpus)] = (cell, attempt)
                counts.running = len(pending)
                if on_progress:
                    on_progress(counts, cell, "start")
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
            for ref in ready:
                cell, attempt = pending.pop(ref)
                counts.running = len(pending)
                try:
                    row = ray.get(ref)
                except Exception as e:  # the task raised, or its worker died
                    retry = _record_failure(e, cell, attempt, results, ray_opts, counts, queue)
                    if on_progress:
                        on_progress(counts, cell, "retry" if retry else "failed")
                    continue
                row["attempt"] = attempt
                append_row(results, row)
                counts.done += 1
                if on_progress:
                    on_progress(counts, cell, "done")
    finally:
        for ref in pending:  # interrupted: do not leave cells running on a shared cluster
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()
    report.done = counts.done
    report.failed_cells = dict(counts.failed_cells)
    report.seconds = time.perf_counter() - start
    return report


def _capacity(ray, demand: dict) -> int:
    """How many cells of this demand the live cluster holds at once (>= 1): submitting only that
    many keeps 'running' honest and lets a crashed driver lose little."""
    total = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        r = node.get("Resources", {})
        fits = [int(r.get(key, 0) // v) for key, v in (("CPU", demand["num_cpus"]),
                                                       ("GPU", demand["num_gpus"]),
                                                       ("memory", demand["memory"])) if v]
        total += min(fits) if fits else 0
    return max(1, total)
