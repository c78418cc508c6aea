"""CPU matmul speed of what a CPU KbitLinear can hold at decode shapes (M=1): dense fp32, bf16 and
fp16 copies through torch, and the packed k-bit codes (k = 3..8, nf, block 64) through the fused
CPU kernels (kbitrt/runtime/kernels/cpu_kernels.cpp), with the head in fp16 through their
half_linear (also the AVX2 and portable builds of them, which CPUs without AVX-512 or AVX run,
built and timed on this one). Over a model's worth of distinct weights (SmolLM2-135M: 30 layers of q, k, v, o,
gate, up, down + the 49152 x 576 head), so the weights stream from memory as in a real decode.

Both wall time and process CPU time are recorded: on a shared machine the CPU time is the steadier
figure. Writes benchmarks/results/cpu_matmul-<threads>threads.json.

    python benchmarks/cpu_matmul.py --threads 2 --reps 5

`--shapes` times instead single linears of SmolLM2-135M's and TinyLlama-1.1B's shapes at M = 1
and 4 rows of x: the fp16 copy (half_linear) against the packed codes at k = 3..8 (nf, block 64)
through the fp32 path and the int8-activation path (kernels/cpu_int8.h), each over enough copies
of the weight (random codes) to stream >= 48 MB from memory. Writes
benchmarks/results/cpu_matmul_shapes-<threads>threads.json.

    python benchmarks/cpu_matmul.py --shapes --threads 1
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
SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
HEAD = (49152, 576)


def _dense(dt):
    return lambda w: (w.to(dt), w.to(dt).float(), w.numel() * torch.finfo(dt).bits // 8)


def _packed(bits: int):
    """A linear's packed codes (the head: its fp16 copy), the weight they stand for, their bytes."""
    from kbitrt.format.config import QuantConfig
    from kbitrt.format.quantizer import quantize_weight
    from kbitrt.runtime.kernels.reference import pad_codebook

    def prepare(w):
        if w.shape == HEAD:
            return ("head", w.half()), w.half().float(), w.numel() * 2
        qw = quantize_weight(w, QuantConfig(bits=bits, block_size=64, dtype="nf"))
        state = (qw.qweight, qw.kernel_absmax(), pad_codebook(qw.codebook, bits), bits, w.shape[1])
        nbytes = sum(t.numel() * t.element_size() for t in state[:3])
        return state, qw.dequantize(), nbytes
    return prepare


def _packed_linear(x, state, ops=None):
    """Through the native build (kernels/cpu.py), or another build's ops (M = 1 shapes only)."""
    from kbitrt.runtime.kernels import cpu

    if state[0] == "head":
        return cpu.half_linear(x, state[1]) if ops is None else ops.half_linear(x, state[1], None)
    q, a, c, bits, k = state
    if ops is not None:
        return ops.kbit_linear(x, q, a, c, None, bits, 64, k)
    return cpu.kbit_linear(x, q, a, c, None, bits, 64, k)


def _int8_linear(x, state):
    """The int8-activation path (the head stays fp16 through half_linear)."""
    if state[0] == "head":
        return _packed_linear(x, state)
    q, a, c, bits, k = state
    return torch.ops.kbitrt_cpu.kbit_linear_int8(x, q, a, c, None, bits, 64, k)


def variants():
    """name -> (prepare(w) -> (state, the weight it computes with, bytes held), fn(x, state))."""
    out = {"fp32 F.linear": (_dense(torch.float32), lambda x, w: F.linear(x, w))}
    for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        out[f"{name} F.linear"] = (_dense(dt), lambda x, w, dt=dt: F.linear(x.to(dt), w).float())
        out[f"{name} mkldnn"] = (_dense(dt), lambda x, w, dt=dt: torch.ops.mkldnn._linear_pointwise(
            x.to(dt), w, None, "none", [], "").float())
    from kbitrt.runtime.kernels import cpu

    if cpu.available():
        for bits in range(3, 9):
            out[f"kbit nf{bits} fused"] = (_packed(bits), _packed_linear)
            out[f"kbit nf{bits} fused int8"] = (_packed(bits), _int8_linear)
        # what a CPU without AVX-512 runs (AVX2 + FMA + F16C), and one without AVX: built here
        for variant in ("avx2", "portable"):
            ops = cpu.load_variant(variant)
            out[f"kbit nf4 fused, {variant} build"] = (
                _packed(4), lambda x, state, ops=ops: _packed_linear(x, state, ops))
    return out


def run(layers: int, reps: int, head: bool) -> dict:
    res = {}
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(n, k, generator=g) * 0.02 for _ in range(layers) for n, k in SHAPES]
    if head:
        base.append(torch.randn(*HEAD, generator=g) * 0.02)
    x = {k: torch.randn(1, k, generator=g) for k in (576, 1536)}
    for name, (prepare, fn) in variants().items():
        prepared = [prepare(w) for w in base]
        ws = [p[0] for p in prepared]
        try:
            outs = [fn(x[w.shape[1]], state) for w, state in zip(base, ws)]
        except RuntimeError as e:
            res[name] = {"error": str(e)[:200]}
            continue
        # error against the weights this variant holds (its own rounding/quantization excluded)
        err = max(float((o - F.linear(x[w.shape[1]], own)).abs().max()
                        / F.linear(x[w.shape[1]], own).abs().max())
                  for o, w, (_, own, _) in zip(outs, base, prepared))
        nbytes = sum(p[2] for p in prepared)
        del prepared
        walls, cpus = [], []
        for _ in range(reps):
            c0, t0 = time.process_time(), time.perf_counter()
            for w, state in zip(base, ws):
                fn(x[w.shape[1]], state)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        res[name] = {"ms_per_token_wall": 1e3 * statistics.median(walls),
                     "ms_per_token_wall_min": 1e3 * min(walls),
                     "ms_per_token_cpu": 1e3 * statistics.median(cpus),
                     "weight_mb": nbytes / 1e6,
                     "gbps_at_min_wall": nbytes / min(walls) / 1e9, "max_rel_err": err}
        del ws
    return res


SHAPE_SETS = {"SmolLM2-135M": [(576, 576), (192, 576), (1536, 576), (576, 1536)],
              "TinyLlama-1.1B": [(2048, 2048), (256, 2048), (5632, 2048), (2048, 5632)]}
STREAM_BYTES = 48e6  # per timed pass: over this VM's 32 MB L3


def _shape_variants(n: int, k: int, g: torch.Generator) -> list[tuple]:
    """(path, bits, fn(x, state), states, bytes per state) for one shape: the fp16 copy and the
    packed codes (random, nf codebook, block 64) of each k through both paths, each over enough
    copies to stream STREAM_BYTES."""
    from kbitrt.runtime.kernels.reference import pad_codebook

    ops = torch.ops.kbitrt_cpu
    half = torch.randn(n, k, generator=g).half()
    out = [("fp16 copy", 16, lambda x, w: ops.half_linear(x, w, None),
            [half.clone() for _ in range(int(STREAM_BYTES // half.nbytes) + 1)], half.nbytes)]
    for bits in range(3, 9):
        cb, kp = pad_codebook(_nf_codebook(bits), bits), -(-k // 8) * 8
        q = torch.randint(0, 256, (n, kp * bits // 8), dtype=torch.uint8, generator=g)
        a = (torch.rand(n, -(-k // 64), generator=g) + 0.5).half()
        nbytes = q.nbytes + a.nbytes
        states = [(q.clone(), a.clone()) for _ in range(int(STREAM_BYTES // nbytes) + 1)]
        for path, op in (("fp32", ops.kbit_linear), ("int8", ops.kbit_linear_int8)):
            out.append((path, bits, lambda x, s, op=op, cb=cb, bits=bits: op(
                x, s[0], s[1], cb, None, bits, 64, k), states, nbytes))
    return out


def run_shapes(reps: int) -> list[dict]:
    """Per shape and M: ms (best wall, best process CPU) and GB/s of fp16 copies, the fp32 path and
    the int8 path at each k; the variants alternate within each rep, so a busy moment of the
    shared machine falls on all of them."""
    from kbitrt.runtime.kernels import cpu

    assert cpu.available(), cpu.unavailable_reason()
    torch.ops.kbitrt_cpu.set_int8_activations(0)  # kbit_linear: the fp32 path
    g, rows = torch.Generator().manual_seed(0), []
    for model, shapes in SHAPE_SETS.items():
        for n, k in shapes:
            variants_ = _shape_variants(n, k, g)
            for m in (1, 4):
                x = torch.randn(m, k, generator=g)
                wall = [float("inf")] * len(variants_)
                cpu_s = list(wall)
                for v in variants_:
                    v[2](x, v[3][0])  # warm-up
                for _ in range(reps):
                    for i, (_, _, fn, states, _) in enumerate(variants_):
                        c0, t0 = time.process_time(), time.perf_counter()
                        for st in states:
                            fn(x, st)
                        wall[i] = min(wall[i], (time.perf_counter() - t0) / len(states))
                        cpu_s[i] = min(cpu_s[i], (time.process_time() - c0) / len(states))
                for (path, bits, _, _, nbytes), t, c in zip(variants_, wall, cpu_s):
                    rows.append({"model": model, "N": n, "K": k, "M": m, "path": path,
                                 "bits": bits, "ms": 1e3 * t, "cpu_ms": 1e3 * c,
                                 "gbps": nbytes / t / 1e9})
                print(f"{model} {n}x{k} M={m} ms: " + ", ".join(
                    f"{r['path']}{'' if r['bits'] == 16 else r['bits']} {r['ms']:.3f}"
                    for r in rows[-len(variants_):]), flush=True)
            del variants_
    return rows


def _nf_codebook(bits: int) -> torch.Tensor:
    from kbitrt.format.config import QuantConfig
    from kbitrt.format.quantizer import quantize_weight

    return quantize_weight(torch.randn(4, 64), QuantConfig(bits=bits, block_size=64,
                                                           dtype="nf")).codebook


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", action="store_true",
                    help="single linears of SmolLM2 / TinyLlama shapes, fp16 vs fp32 vs int8")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.shapes:
        return _main_shapes(args)
    with torch.no_grad():
        run(2, 1, False)  # warm-up
        res = run(args.layers, args.reps, True)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    record = {"kind": "cpu_matmul", **_record(args), "layers": args.layers,
              "loadavg_at_end": load, "results": res}
    out = Path(args.output or ROOT / f"benchmarks/results/cpu_matmul-{args.threads}threads.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    for name, r in res.items():
        print(f"{name:16s}", {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})
    print(f"written to {out}")
    return 0


def _record(args) -> dict:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    return {"machine": platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": args.threads, "reps": args.reps, "torch": torch.__version__,
            "python": sys.version.split()[0], "commit": commit}


def _main_shapes(args) -> int:
    with torch.no_grad():
        rows = run_shapes(args.reps)
    record = {"kind": "cpu_matmul_shapes", **_record(args),
              "int8_width": int(torch.ops.kbitrt_cpu.int8_width()),
              "stream_bytes": STREAM_BYTES, "loadavg_at_end": list(os.getloadavg()),
              "note": "other agents were running on this 2-core VM", "results": rows}
    out = Path(args.output or
               ROOT / f"benchmarks/results/cpu_matmul_shapes-{args.threads}threads.json")
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
