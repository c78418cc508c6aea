"""The JSON record of an evaluation: model, options, versions, device, git commit, results.

Written after every finished dataset or task (atomically), so Ctrl-C leaves what was done."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def git_commit() -> str | None:
    """kbitrt's commit (with `+dirty` when the tree has changes), None outside a checkout."""
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "kbitrt"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("kbitrt", "transformers", "lm_eval", "datasets", "triton"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict:
    return {"timestamp": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "git_commit": git_commit(), "versions": versions(), "device": device_name(device),
            "platform": platform.platform(), "argv": sys.argv}


def model_record(name: str, lm) -> dict:
    """What identifies the evaluated model: its path, quantization config, backend and dtype."""
    return {"name": str(name), "path": str(lm.path) if lm.path else None,
            "quantization": lm.config.get("quantization_config"), "quant_label": lm.quant_label,
            "backend": lm.backend, "dtype": str(lm.dtype).replace("torch.", ""),
            "weight_bytes": lm.weight_bytes}


def default_output(model_path: Path | None, kind: str = "eval") -> Path:
    """`<model folder>/<kind>-<timestamp>.json`, or the working directory for a Hub model whose
    folder is the read-only HF cache."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = model_path if model_path is not None and os.access(model_path, os.W_OK) else Path.cwd()
    return Path(folder) / f"{kind}-{stamp}.json"


def write_json(path: Path, record: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(path)


def mean_stderr(p: float, n: int) -> float:
    """lm-eval's stderr of a mean of 0/1 scores: sqrt(p (1 - p) / (n - 1))."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


def deltas(main: dict, base: dict) -> dict:
    """main - baseline for every shared perplexity and accuracy; stderrs combined as independent
    (sqrt(a^2 + b^2)), which overstates the paired difference's error: a conservative bound."""
    out: dict = {"perplexity": {}, "tasks": {}}
    for ds, r in main.get("perplexity", {}).items():
        b = base.get("perplexity", {}).get(ds)
        if b:
            out["perplexity"][ds] = {"perplexity": r["perplexity"] - b["perplexity"],
                                     "ratio": r["perplexity"] / b["perplexity"]}
    for task, r in main.get("tasks", {}).items():
        b = base.get("tasks", {}).get(task)
        if not b:
            continue
        d = {}
        for m in ("acc", "acc_norm"):
            if r.get(m) is not None and b.get(m) is not None:
                d[m] = r[m] - b[m]
                se = [x.get(f"{m}_stderr") for x in (r, b)]
                d[f"{m}_stderr"] = math.hypot(*se) if None not in se else None
        out["tasks"][task] = d
    return out
