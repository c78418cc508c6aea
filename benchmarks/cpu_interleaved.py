"""kbit vs llama.cpp decode in one process, the runtimes taking turns every --block tokens: this
VM's speed drifts by up to 2x from minute to minute, and subprocess rounds (cpu_scaling.py) give
per-round ratios from 0.74 to 1.52; here both runtimes see the same minutes.

    python benchmarks/cpu_interleaved.py --sizes 135m,1.1b --threads 2 --reps 5

The models are cpu_scaling.py's (built once under its --workdir: kbit nf4-b64 with the int8 head
and embedding as `kbit convert` writes them, llama.cpp Q4_0). Each rep decodes tg128 after a
16-token prompt in each runtime, in blocks ordered ABBA (neither runtime always goes first after
the other); each runtime keeps its own KV cache across its blocks. Per rep: tokens/s of each
runtime over its 128 tokens, and the ratio of each pair of neighbouring blocks. Both runtimes use
OpenMP from the same libgomp (llama-cpp-python's ggml links libgomp.so.1; torch's copy of it is
loaded first), so their thread pools do not spin against each other. Peak RSS and prefill stay
cpu_scaling.py's (one subprocess per measurement). Writes
benchmarks/results/cpu_interleaved-<threads>threads.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import cpu_scaling  # noqa: E402
from cpu_decode import machine, versions  # noqa: E402
from kbitrt.eval.results import git_commit  # noqa: E402

KBIT, LLAMA = "kbit", "llama.cpp-Q4_0"


def kbit_decoder(model_dir: Path, ids: list[int]):
    """(start, step_block): start fills the prompt into a fresh cache; step_block(i0, n) decodes
    tokens i0..i0+n-1 after it, one step each."""
    import torch

    from kbitrt.runtime.generate import decode_step
    from kbitrt.runtime.loader import load_model

    lm = load_model(str(model_dir), device="cpu")
    step, _ = decode_step(lm, False)
    model, t = lm.model, torch.tensor([ids])
    prompt, pos = cpu_scaling.PROMPT, torch.zeros(1, dtype=torch.long)

    @torch.no_grad()
    def start():
        model.setup_caches(1, prompt + cpu_scaling.NEW + 1)
        model(t[:, :prompt], torch.arange(prompt), last_only=True)

    @torch.no_grad()
    def step_block(i0: int, n: int):
        for i in range(i0, i0 + n):
            pos.fill_(prompt + i)
            step(t[:, prompt + i: prompt + i + 1], pos)

    return start, step_block


def llama_decoder(gguf: Path, ids: list[int], threads: int):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads,
                          n_ctx=1024, n_batch=512, n_ubatch=512, verbose=False, seed=0)
    prompt = cpu_scaling.PROMPT

    def start():
        llm.reset()
        llm.eval(ids[:prompt])

    def step_block(i0: int, n: int):
        for i in range(i0, i0 + n):
            llm.eval(ids[prompt + i: prompt + i + 1])

    return start, step_block


def one_rep(runtimes: dict, block: int) -> dict:
    """tg128 in each runtime, blocks alternating ABBA: seconds per block, per runtime."""
    for start, _ in runtimes.values():
        start()
    names, times = list(runtimes), {n: [] for n in runtimes}
    for b in range(cpu_scaling.NEW // block):
        order = names if (b + b // 2) % 2 == 0 else names[::-1]
        for name in order:
            t0 = time.perf_counter()
            runtimes[name][1](b * block, block)
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="135m,1.1b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--block", type=int, default=16, help="tokens per turn (divides 128)")
    ap.add_argument("--workdir", default=str(Path(os.environ.get("KBIT_CACHE", Path.home() / ".cache/kbitrt"))
                                             / "cpu-scaling"))
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args(argv)
    unknown = [s for s in args.sizes.split(",") if s not in cpu_scaling.SHAPES]
    if unknown or cpu_scaling.NEW % args.block:
        ap.error(f"sizes are {', '.join(cpu_scaling.SHAPES)} (got {', '.join(unknown)})" if unknown
                 else f"--block must divide {cpu_scaling.NEW}")
    import torch

    torch.set_num_threads(args.threads)
    prep = argparse.Namespace(workdir=args.workdir, runtimes=f"{KBIT},{LLAMA}", head_bits=None,
                              embedding_bits=None)
    ids = cpu_scaling.token_ids(cpu_scaling.PROMPT + cpu_scaling.NEW)
    commit = git_commit()  # with +dirty where kbitrt/ has uncommitted changes
    record = {"kind": "cpu_interleaved", "machine": machine(), "cores": os.cpu_count(),
              "threads": args.threads, "reps": args.reps, "block": args.block,
              "prompt_tokens": cpu_scaling.PROMPT, "decode_tokens": cpu_scaling.NEW,
              "versions": versions(("torch", "llama-cpp-python", "kbitrt")), "commit": commit,
              "argv": sys.argv, "loadavg_start": os.getloadavg(), "sizes": {}}
    out = Path(args.output or ROOT / f"benchmarks/results/cpu_interleaved-{args.threads}threads.json")
    for size in args.sizes.split(","):
        layers = cpu_scaling.DEFAULT_LAYERS.get(size, cpu_scaling.SHAPES[size]["layers"])
        paths = cpu_scaling.prepare(prep, size, layers)
        runtimes = {KBIT: kbit_decoder(paths[KBIT], ids),
                    LLAMA: llama_decoder(paths[LLAMA], ids, args.threads)}
        one_rep(runtimes, args.block)  # warm-up
        record["libgomp_mapped"] = sorted({line.split()[-1] for line in open("/proc/self/maps")
                                           if "libgomp" in line})
        reps = []
        for rep in range(args.reps):
            times = one_rep(runtimes, args.block)
            tok_s = {n: cpu_scaling.NEW / sum(t) for n, t in times.items()}
            pairs = [a / b for a, b in zip(times[LLAMA], times[KBIT])]  # > 1: kbit faster
            reps.append({"decode_tok_s": tok_s, "block_ratio_median": statistics.median(pairs),
                         "block_ratios": pairs, "s_per_block": times})
            print(f"{size} rep {rep}: kbit {tok_s[KBIT]:.1f} tok/s, llama.cpp {tok_s[LLAMA]:.1f}: "
                  f"{tok_s[KBIT] / tok_s[LLAMA]:.3f}x (blocks' median {statistics.median(pairs):.3f})",
                  file=sys.stderr, flush=True)
        ratios = [r["decode_tok_s"][KBIT] / r["decode_tok_s"][LLAMA] for r in reps]
        all_blocks = [x for r in reps for x in r["block_ratios"]]
        record["sizes"][size] = {
            "layers": layers, "kbit_model": str(paths[KBIT]), "gguf": str(paths[LLAMA]),
            "decode_tok_s_median": {n: statistics.median(r["decode_tok_s"][n] for r in reps)
                                    for n in (KBIT, LLAMA)},
            "ratio_per_rep": ratios, "ratio_median": statistics.median(ratios),
            "block_ratio_median": statistics.median(all_blocks),
            "block_ratio_range": [min(all_blocks), max(all_blocks)], "reps": reps}
        record["loadavg_end"] = os.getloadavg()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")
        s = record["sizes"][size]
        print(f"{size}: kbit/llama.cpp decode {s['ratio_median']:.3f}x (per rep "
              f"{min(ratios):.2f}-{max(ratios):.2f}; per block pair median "
              f"{s['block_ratio_median']:.3f})", flush=True)
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
