"""Where the *model memory* of a CPU `kbit run --low-memory` goes: the RSS of one process at each
stage of a run, as the CLI and benchmarks/cpu_decode.py do it, plus the tokenizer alone.

Model memory (issue 13, benchmarks/cpu_decode.py) = peak RSS minus the RSS of the same process
after its imports, before the model is loaded. The `run` worker calls kbitrt.runtime.loader's
load_model as the CLI does (the functions it calls wrapped to take a mark) and records, after each
stage, the RSS, the peak RSS so far, the anonymous / file-backed split (/proc/self/smaps_rollup) and
glibc's heap statistics (mallinfo2: bytes in use, free bytes the heap still holds, mmapped):

    imports        torch, transformers' tokenizer and config modules, kbitrt (cpu_decode's imports)
    fused_kernels  the fused CPU kernels' library loaded (cpu_decode counts it as an import)
    open           the kbit folder opened and validated (headers, codebooks)
    tokenizer_loaded  load_tokenizer
    heap_trimmed   each release_free_heap (malloc_trim) load_model and build_model make
    weights        build_model: every tensor read, KbitLinears made, projections merged, one token
    caches         the static KV cache for the prompt + 128 new tokens
    prefill        the prompt through the model
    decode         128 greedy decode steps (cpu_decode's loop); `peak` is the run's peak
    generate       then generate() over the same prompt, as `kbit run -p` calls it

The `tokenizer` workers load the folder's tokenizer alone in a fresh process, through
transformers' AutoTokenizer, kbit's load_tokenizer, and the `tokenizers` library directly.

    python benchmarks/cpu_memory_breakdown.py [--kbit DIR] [--cpu-weights packed]

Writes benchmarks/results/cpu_memory_breakdown.json. Memory only: no timing is recorded.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import subprocess
import sys
from pathlib import Path

from cpu_decode import PROMPT, machine, peak, rss, versions  # the same figures as cpu_decode's

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20


# ------------------------------------------------------------------------------- measurements





def smaps() -> dict:
    """Rss split into anonymous (heap, tensors) and file-backed (libraries) pages, in bytes."""
    out = {}
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Anonymous", "Shared_Clean", "Private_Clean", "Private_Dirty"):
                out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    if "Rss" in out and "Anonymous" in out:
        out["File"] = out["Rss"] - out["Anonymous"]
    return out


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]


def mallinfo() -> dict:
    """glibc's heap: `in_use` (malloc'd and not freed, main arena + other arenas, mmapped chunks
    included), `free_held` (freed but still mapped by the heap), `mmapped` (chunks served by
    mmap), `arena` (bytes the arenas took with sbrk/mmap)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        f = libc.mallinfo2
    except (OSError, AttributeError):
        return {}
    f.restype = _MallInfo2
    m = f()
    return {"arena": m.arena, "mmapped": m.hblkhd, "in_use": m.uordblks + m.hblkhd,
            "free_held": m.fordblks}


class Stages:
    def __init__(self):
        self.rows: list[dict] = []

    def mark(self, name: str, **extra) -> None:
        self.rows.append({"stage": name, "rss": rss(), "peak": peak(), "smaps": smaps(),
                          "malloc": mallinfo(), **extra})


# -------------------------------------------------------------------------------------- workers

def worker_run(args) -> dict:
    """One `kbit run --low-memory`-equivalent run, stage by stage (see the module docstring)."""
    st = Stages()
    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer  # noqa: F401  (cpu_decode's imports)

    from kbitrt.eval.latency import held_weights
    from kbitrt.runtime import loader
    from kbitrt.runtime.generate import SamplingConfig, generate
    from kbitrt.runtime.kernels import cpu as cpu_kernels

    config = json.loads((Path(args.kbit) / "config.json").read_text())
    loader.hf_config(config)  # config machinery: code, as in cpu_decode
    st.mark("imports")
    cpu_kernels.available()
    st.mark("fused_kernels")
    rss0 = rss()  # cpu_decode's rss_after_imports

    # load_model itself, with a mark after each step it takes (the functions it calls, wrapped)
    def after(fn, name, before=None):
        def wrapped(*a, **kw):
            if before:
                st.mark(before)
            out = fn(*a, **kw)
            st.mark(name)
            return out
        return wrapped

    hooks = {"load_tokenizer": after(loader.load_tokenizer, "tokenizer_loaded", before="open"),
             "release_free_heap": after(loader.release_free_heap, "heap_trimmed"),
             "build_model": after(loader.build_model, "weights")}
    saved = {k: getattr(loader, k) for k in hooks}
    for k, fn in hooks.items():
        setattr(loader, k, fn)
    try:
        lm = loader.load_model(args.kbit, device="cpu", cpu_weights=args.cpu_weights,
                               kv_cache=args.kv_cache)
    finally:
        for k, fn in saved.items():
            setattr(loader, k, fn)
    held = held_weights(lm.model)
    st.rows[-1]["held"] = held

    ids = lm.tokenizer(PROMPT, return_tensors="pt").input_ids
    T0, n = ids.shape[1], args.new
    model = lm.model
    with torch.no_grad():  # cpu_decode's timed loop, once
        model.setup_caches(1, T0 + n + 1)
        kv = sum(b.numel() * b.element_size() for b in model.buffers()
                 if b.dim() == 4)  # the static KV cache's k and v
        st.mark("caches", kv_cache_bytes=kv)
        logits = model(ids, torch.arange(T0), last_only=True)
        st.mark("prefill")
        pos = torch.tensor([T0])
        for i in range(n):
            tok = logits[:, -1].argmax(-1, keepdim=True)
            pos.fill_(T0 + i)
            logits = model(tok, pos).clone()
        st.mark("decode")
        model.drop_caches()
    out = generate(lm, [PROMPT], n, SamplingConfig(temperature=0.0))
    st.mark("generate", new_tokens=out.stats.new_tokens)
    return {"rss_after_imports": rss0, "stages": st.rows, "cpu_weights": lm.cpu_weights,
            "fused_cpu_kernels": cpu_kernels.available(), "held": held,
            "malloc_env": {k: v for k, v in os.environ.items()
                           if k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}}


def worker_tokenizer(args, how: str) -> dict:
    """The folder's tokenizer alone: RSS after the imports, after loading, after a heap trim."""
    st = Stages()
    if how == "tokenizers":
        from tokenizers import Tokenizer
    else:
        import torch  # noqa: F401  (as in a run: transformers' tokenizers import it anyway)
        from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401
        if how == "load_tokenizer":
            from kbitrt.runtime.memory import release_free_heap
            from kbitrt.runtime.tokenizer import load_tokenizer
    st.mark("imports")
    if how == "tokenizers":
        tok = Tokenizer.from_file(str(Path(args.kbit) / "tokenizer.json"))
        n_ids = len(tok.encode(PROMPT).ids)
    elif how == "AutoTokenizer":
        tok = AutoTokenizer.from_pretrained(args.kbit)
        n_ids = len(tok(PROMPT)["input_ids"])
    else:
        tok = load_tokenizer(args.kbit)
        n_ids = len(tok(PROMPT)["input_ids"])
    st.mark("loaded", prompt_tokens=n_ids, cls=type(tok).__name__)
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc_trim(0)
    st.mark("trimmed")
    return {"stages": st.rows}


def worker(args) -> None:
    out = worker_run(args) if args.worker == "run" else worker_tokenizer(args, args.worker)
    out["peak_rss"] = peak()
    print("RESULT " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------------------- main





def subprocess_result(args, name: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--threads", str(args.threads),
           "--new", str(args.new), "--kbit", str(args.kbit), "--cpu-weights", args.cpu_weights,
           "--kv-cache", args.kv_cache]
    return worker_result(cmd, args.threads, args.timeout)


def worker_result(cmd: list[str], threads: int, timeout: int) -> dict:
    """Run a worker subprocess at `threads` threads; its `RESULT {json}` line, or {"error": ...}."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode or line is None:
        return {"error": (p.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(line[len("RESULT "):])


def in_mb(obj):
    """Every byte count (keys rss, peak, *_bytes, smaps and malloc entries) in MiB."""
    if isinstance(obj, list):
        return [in_mb(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    out = {}
    for k, v in obj.items():
        if isinstance(v, dict) and k in ("smaps", "malloc"):
            out[f"{k}_mb"] = {kk: round(vv / MB, 2) for kk, vv in v.items()}
        elif isinstance(v, int) and (k in ("rss", "peak", "peak_rss", "rss_after_imports")
                                     or k.endswith("_bytes")):
            out[f"{k}_mb"] = round(v / MB, 2)
        else:
            out[k] = in_mb(v)
    return out


def summary(run: dict) -> dict:
    """Each stage's share of the model memory: the RSS above the imports after it, how much it
    raised the RSS, and the peak so far above the imports (MiB)."""
    rows, base = run["stages"], run["rss_after_imports"]
    stages, prev = [], base
    for r in rows[2:]:
        stages.append({"stage": r["stage"], "rss_above_imports_mb": round((r["rss"] - base) / MB, 2),
                       "rss_delta_mb": round((r["rss"] - prev) / MB, 2),
                       "peak_above_imports_mb": round((r["peak"] - base) / MB, 2)})
        prev = r["rss"]
    held = run["held"]
    last = rows[-1]
    return {"model_memory_mb": round((run["peak_rss"] - base) / MB, 2),
            "tensors_held_mb": round((held["quantized_bytes_held"] + held["other_bytes_held"]) / MB, 2),
            "file_backed_above_imports_mb": round(
                (last["smaps"].get("File", 0) - rows[1]["smaps"].get("File", 0)) / MB, 2),
            "stages": stages}


def main(argv=None) -> int:
    cache = Path(os.environ.get("KBIT_CACHE", Path.home() / ".cache" / "kbitrt"))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--kbit", type=Path, default=cache / "smol-nf4",
                    help="a kbit folder (kbit convert SmolLM2 --bits 4 --block 64 --dtype nf)")
    ap.add_argument("--cpu-weights", default="packed", help="packed = --low-memory")
    ap.add_argument("--kv-cache", default="fp16", help="fp16 = --low-memory's (auto: fp32)")
    ap.add_argument("--timeout", type=int, default=1200)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    load0 = os.getloadavg()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    results = {}
    for name in ("run", "AutoTokenizer", "load_tokenizer", "tokenizers"):
        print(f"{name} ...", file=sys.stderr, flush=True)
        results[name] = subprocess_result(args, name)
    record = {"kind": "cpu_memory_breakdown", "machine": machine(), "cores": os.cpu_count(),
              "threads": args.threads, "new_tokens": args.new, "prompt": PROMPT,
              "cpu_weights": args.cpu_weights, "kv_cache": args.kv_cache, "model": str(args.kbit),
              "versions": versions(("torch", "transformers", "tokenizers", "kbitrt"), libc=True),
              "commit": commit, "dirty": dirty, "loadavg_start": load0,
              "loadavg_end": os.getloadavg(),
              "summary": summary(results["run"]) if "stages" in results["run"] else None,
              "results": in_mb(results)}
    out = Path(args.output or ROOT / "benchmarks/results/cpu_memory_breakdown.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["summary"], indent=2))
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
