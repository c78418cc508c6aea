"""CPU prefill matmuls at TinyLlama-1.1B's shapes: the k-bit GEMM over decoded tiles
(kernels/cpu_gemm.h, what kbit_linear runs above FUSED_MAX_ROWS rows) and its int8 twin
(kernels/cpu_gemm_int8.h, what `auto` runs on AVX-512 VNNI) against the old path (the
whole layer dequantized into an fp32 temporary, torch's matmul) and against torch's bf16 matmul
on a bf16 copy of the weight (oneDNN: what a 16-bit model would run), same run, alternating.

Shapes (N, K): the stack's merged q|k|v (2560 x 2048), o (2048 x 2048), merged gate|up
(11264 x 2048), down (2048 x 5632), each projection alone (q 2048, k/v 256, gate/up 5632), and
the output head (49152 x 2048) as a 4-bit weight (kbit's head is 16-bit today; another change
may quantize it). M = 64, 256, 512 tokens; k = 3..8 (nf, block 64) on the merged layer shapes at
M = 256, k = 4 (the headline) everywhere. Weights are random codes (speed does not depend on
their values). Per shape: median and best ms over reps, GFLOP/s at the median, tokens/s at the
median (M / time), the temporary each path allocates, and the new path's largest difference
from the old relative to the output's scale. "layer" sums q|k|v + o + gate|up + down and gives
the linears' share of a 22-layer prefill as tokens/s.

    flock /work/bench.lock python benchmarks/cpu_prefill.py --json --threads 2

writes benchmarks/results/cpu_prefill-<threads>threads.json (device, versions, commit, load).
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

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
LAYERS = 22
LAYER = {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (11264, 2048), "down": (2048, 5632)}
ALONE = {"q": (2048, 2048), "k/v": (256, 2048), "gate/up": (5632, 2048)}
HEAD = {"head (4-bit)": (49152, 2048)}
BLOCK = 64


def packed(n: int, k: int, bits: int, seed: int = 0):
    """Random codes of an (n, k) weight: qweight, fp16 block scales, the nf codebook."""
    from kbitrt.format.config import QuantConfig
    from kbitrt.format.quantizer import quantize_weight
    from kbitrt.runtime.kernels.reference import pad_codebook

    g = torch.Generator().manual_seed(seed)
    cb = quantize_weight(torch.randn(4, 64, generator=g),
                         QuantConfig(bits=bits, block_size=BLOCK, dtype="nf")).codebook
    q = torch.randint(0, 256, (n, (k + 7) // 8 * bits), dtype=torch.uint8, generator=g)
    a = (torch.rand(n, (k + BLOCK - 1) // BLOCK, generator=g) * 0.05).half()
    return q, a, pad_codebook(cb, bits)


def paths(q, a, c, bits, k, bf16: bool = True):
    """name -> fn(x): the new GEMM, the old dequantize + fp32 matmul, a bf16 copy + oneDNN."""
    from kbitrt.runtime.kernels import cpu

    assert cpu.available(), cpu.unavailable_reason()

    def old(x):
        return F.linear(x, torch.ops.kbitrt_cpu.kbit_dequantize(q, a, c, bits, BLOCK, k))

    def gemm(mode):  # kbit_linear's GEMM under an activations mode (set per call: a global)
        def run(x):
            cpu.set_activations(mode)
            return cpu.kbit_linear(x, q, a, c, None, bits, BLOCK, k)
        return run

    # "new": the fp32 GEMM (cpu_gemm.h); "new int8": the int8 GEMM (cpu_gemm_int8.h), what
    # `auto` runs on AVX-512 VNNI
    out = {"new": gemm("fp32"), "new int8": gemm("int8"), "old": old}
    if bf16:
        w16 = cpu.kbit_dequantize(q, a, c, bits, BLOCK, k).bfloat16()
        out["bf16 matmul (16-bit copy)"] = lambda x: F.linear(x.bfloat16(), w16).float()
    return out


def temporaries(n: int, k: int, m: int, threads: int) -> dict:
    """Bytes each path allocates beyond x and y (cpu_gemm.h's sizes at AVX-512: 12-row groups,
    32-token strips, 512 KiB panels)."""
    nc = min(max(2, 512 * 1024 // (k * 4 * 12)), (n + 11) // 12) * 12
    mp = (m + 31) // 32 * 32
    return {"old": n * k * 4, "new": mp * k * 4 + m * k * 4 + threads * nc * (k + mp) * 4}


def time_shape(n: int, k: int, m: int, bits: int, reps: int, threads: int) -> dict:
    q, a, c = packed(n, k, bits)
    fns = paths(q, a, c, bits, k)
    x = torch.randn(m, k)
    outs = {name: fn(x) for name, fn in fns.items()}  # warm-up, and the difference
    scale = outs["old"].abs().max().item()
    times, cpu_times = {name: [] for name in fns}, {name: [] for name in fns}
    for _ in range(reps):  # alternating
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
    flop = 2.0 * m * n * k
    res = {"N": n, "K": k, "M": m, "bits": bits,
           "temp_bytes": temporaries(n, k, m, threads),
           "new_vs_old_max_diff_rel": (outs["new"] - outs["old"]).abs().max().item() / scale,
           "int8_vs_old_max_diff_rel": (outs["new int8"] - outs["old"]).abs().max().item()
           / scale,
           "bf16_vs_old_max_diff_rel": (outs["bf16 matmul (16-bit copy)"] - outs["old"]).abs()
           .max().item() / scale}
    for name, ts in times.items():
        med = statistics.median(ts)
        cpu_s = statistics.median(cpu_times[name])
        res[name] = {"ms_median": 1e3 * med, "ms_best": 1e3 * min(ts),
                     "gflops_median": flop / med / 1e9, "tok_per_s_median": m / med,
                     # all threads' CPU time: steadier than the wall on a shared machine
                     "cpu_ms_median": 1e3 * cpu_s, "gflops_per_cpu_s": flop / cpu_s / 1e9}
    res["speedup_new_vs_old"] = res["old"]["ms_median"] / res["new"]["ms_median"]
    res["speedup_int8_vs_new"] = res["new"]["ms_median"] / res["new int8"]["ms_median"]
    return res


def layer_summary(rows: list[dict], m: int, bits: int) -> dict:
    """The four merged linears of a layer: summed median ms, and 22 layers as tokens/s."""
    mine = [r for r in rows if r["M"] == m and r["bits"] == bits and (r["N"], r["K"])
            in LAYER.values() and r["name"] in LAYER]
    out = {"M": m, "bits": bits}
    for path in ("new", "new int8", "old", "bf16 matmul (16-bit copy)"):
        ms = sum(r[path]["ms_median"] for r in mine)
        cpu_ms = sum(r[path]["cpu_ms_median"] for r in mine)
        out[path] = {"layer_ms": ms, "linears_tok_per_s_22_layers": m / (LAYERS * ms / 1e3),
                     "layer_cpu_ms": cpu_ms}
    out["speedup_new_vs_old"] = out["old"]["layer_ms"] / out["new"]["layer_ms"]
    out["speedup_int8_vs_new"] = out["new"]["layer_ms"] / out["new int8"]["layer_ms"]
    return out


def plan(quick: bool) -> list[tuple[str, tuple[int, int], int, int]]:
    """(name, (N, K), M, bits) in the order they are timed."""
    ms = (256,) if quick else (64, 256, 512)
    items = [(name, shape, m, 4) for m in ms for name, shape in {**LAYER, **ALONE}.items()]
    items += [(name, shape, 256, 4) for name, shape in HEAD.items()]
    if not quick:
        items += [(name, shape, 256, b) for b in (3, 5, 6, 7, 8) for name, shape in LAYER.items()]
    return items


PEAK = """
import sys, torch
def hwm():  # peak RSS of this process image in KiB (ru_maxrss would carry the parent's across exec)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
sys.path.insert(0, {here!r})
from cpu_prefill import packed, paths
torch.set_num_threads({threads})
n, k, m = {n}, {k}, {m}
q, a, c = packed(n, k, 4)
x = torch.randn(m, k)
paths(*packed(64, k, 4), 4, k, bf16=False)[{path!r}](x)  # warm-up: libraries, threads
fn = paths(q, a, c, 4, k, bf16=False)[{path!r}]
before = hwm()
fn(x)
print(hwm() - before)
"""


def peak_growth(n: int, k: int, m: int, threads: int) -> dict:
    """Peak RSS growth (MiB) of one call, each path in a fresh process (after a smaller call)."""
    out = {}
    for path in ("new", "old"):
        code = PEAK.format(here=str(Path(__file__).parent), threads=threads, n=n, k=k, m=m,
                           path=path)
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True)
        out[path] = int(run.stdout.split()[-1]) / 1024
    return {"N": n, "K": k, "M": m, "peak_rss_growth_mib": out,
            "fp32_layer_mib": n * k * 4 / 2**20}


def git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="M=256, k=4 only")
    ap.add_argument("--json", action="store_true", help="write the JSON record")
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from kbitrt.runtime.kernels import cpu

    if not cpu.available():
        print(f"fused CPU kernels unavailable: {cpu.unavailable_reason()}", file=sys.stderr)
        return 1
    load_start, rows = os.getloadavg(), []
    with torch.no_grad():
        for name, (n, k), m, bits in plan(args.quick):
            r = {"name": name, **time_shape(n, k, m, bits, args.reps, args.threads)}
            rows.append(r)
            print(f"{name:13s} N={n:5d} K={k:4d} M={m:3d} k={bits}: new "
                  f"{r['new']['gflops_median']:6.1f} int8 {r['new int8']['gflops_median']:6.1f} "
                  f"old {r['old']['gflops_median']:6.1f} "
                  f"bf16 {r['bf16 matmul (16-bit copy)']['gflops_median']:6.1f} GFLOP/s "
                  f"(x{r['speedup_new_vs_old']:.2f}); per CPU-s new "
                  f"{r['new']['gflops_per_cpu_s']:6.1f} old {r['old']['gflops_per_cpu_s']:6.1f}",
                  flush=True)
    memory = [peak_growth(n, k, 256, args.threads) for n, k in (LAYER["gate_up"], LAYER["down"])]
    for r in memory:
        print(f"peak RSS growth of one call N={r['N']} K={r['K']} M=256: "
              f"new {r['peak_rss_growth_mib']['new']:.1f} MiB, old "
              f"{r['peak_rss_growth_mib']['old']:.1f} MiB (fp32 layer {r['fp32_layer_mib']:.0f})")
    layers = [layer_summary(rows, m, b) for m, b in sorted({(r["M"], r["bits"]) for r in rows
                                                            if r["name"] in LAYER})]
    for s in layers:
        print(f"layer M={s['M']} k={s['bits']}: linears of 22 layers at "
              f"{s['new']['linears_tok_per_s_22_layers']:.1f} tok/s new, "
              f"{s['new int8']['linears_tok_per_s_22_layers']:.1f} int8, "
              f"{s['old']['linears_tok_per_s_22_layers']:.1f} old (x{s['speedup_new_vs_old']:.2f})")
    record = {"kind": "cpu_prefill", "device": platform.processor() or platform.machine(),
              "cpu_model": next((line.split(":", 1)[1].strip() for line in
                                 Path("/proc/cpuinfo").read_text().splitlines()
                                 if line.startswith("model name")), None),
              "kernels": cpu.describe(), "threads": args.threads, "reps": args.reps,
              "torch": torch.__version__, "python": sys.version.split()[0],
              "commit": git_commit(), "loadavg_start": load_start,
              "loadavg_end": os.getloadavg(),
              "note": "shared 2-core VM; other agents' jobs were running unless the load says "
                      "otherwise", "rows": rows, "layers": layers, "memory": memory}
    if args.json:
        out = Path(args.output or ROOT / f"benchmarks/results/cpu_prefill-{args.threads}threads"
                   f"{'-quick' if args.quick else ''}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
