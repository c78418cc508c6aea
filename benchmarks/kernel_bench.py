"""Kernel benchmark: fused-dequant k-bit linear vs fp16 matmul vs the copy bandwidth (one GPU).
(Not named kernels.py: a script here puts benchmarks/ first on sys.path, which would shadow the
PyPI package `kernels` that bitsandbytes imports.)

    python benchmarks/kernel_bench.py --check            # parity on the GPU, then the full table
    python benchmarks/kernel_bench.py --check --quick    # parity + a few shapes (a minute or two)
    python benchmarks/kernel_bench.py --tune --quick     # sweep launch configs, report the best

Every timing is a CUDA-graph replay of many calls that rotate through >= 4 copies of the weight
(more when one copy fits in L2), so no call finds its weight in L2. The device-to-device copy
bandwidth is measured in the same run: % of copy BW = (weight + absmax bytes read / time) / copy BW.
Results go to benchmarks/results/kernels-<device>-<date>.json. Never tune on CPU timings: on a
machine without CUDA this script refuses to run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kbitrt.format import dtypes, packing  # noqa: E402
from kbitrt.runtime.kernels.reference import kbit_linear_torch, pad_codebook  # noqa: E402
from kbitrt.eval.results import git_commit  # noqa: E402

SHAPES = {  # name: (N = out, K = in)
    "7b-qkv": (12288, 4096), "7b-o": (4096, 4096), "7b-gateup": (22016, 4096),
    "7b-down": (4096, 11008), "7b-lmhead": (32000, 4096),
    "70b-qkv": (10240, 8192), "70b-o": (8192, 8192), "70b-gateup": (57344, 8192),
    "70b-down": (8192, 28672),
}
QUICK_SHAPES = ("7b-o", "7b-gateup", "70b-o")
L2_BYTES = 50 * 2**20  # H100; rotating copies must not fit


def _codebook(dtype: str, bits: int) -> torch.Tensor:
    cb = dtypes.get(dtype).levels(bits)
    return pad_codebook(cb, bits)


def _weights(n: int, k: int, bits: int, block: int, dtype: str, copies: int, dev: str):
    """`copies` random packed weights (random bytes are valid codes at any k) + shared codebook."""
    g = torch.Generator(device=dev).manual_seed(n * 31 + k)
    row = packing.packed_row_bytes(k, bits)
    nb = -(-k // block)
    out = []
    for _ in range(copies):
        qw = torch.randint(0, 256, (n, row), dtype=torch.uint8, device=dev, generator=g)
        am = (torch.rand(n, nb, device=dev, generator=g) * 0.1 + 0.01).half()
        out.append((qw, am))
    return out, _codebook(dtype, bits).to(dev)


def _n_copies(nbytes: int) -> int:
    return max(4, -(-3 * L2_BYTES // max(nbytes, 1)))


def time_graph(calls, reps: int = 20) -> float:
    """Seconds per call: `calls` (a list of closures) captured once in a CUDA graph, replayed."""
    for f in calls:  # warm-up: compiles, allocations, autotuning happen outside capture
        f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            for f in calls:
                f()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (reps * len(calls))


def copy_bandwidth(nbytes: int = 2**30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = time_graph([lambda: dst.copy_(src)] * 4, reps=10)
    return 2 * nbytes / t


def bench_kbit(n, k, m, bits, block, dtype, act=torch.float16, config=None) -> dict:
    from kbitrt.runtime.kernels.triton_kbit import kbit_linear_triton, pick_config

    wbytes = n * packing.packed_row_bytes(k, bits) + n * (-(-k // block)) * 2
    copies, cb = _weights(n, k, bits, block, dtype, _n_copies(wbytes), "cuda")
    x = torch.randn(m, k, device="cuda", dtype=act)
    cfg = config or pick_config(m, n, k, bits, block, x.device)
    calls = [lambda qw=qw, am=am: kbit_linear_triton(x, qw, am, cb, None, None, None, bits, block,
                                                     k, config=cfg) for qw, am in copies]
    t = time_graph(calls)
    del copies
    return {"us": t * 1e6, "bytes": wbytes, "gbps": wbytes / t / 1e9, "config": cfg.__dict__}


def bench_fp16(n, k, m) -> float:
    copies = [torch.randn(n, k, device="cuda", dtype=torch.float16)
              for _ in range(_n_copies(n * k * 2))]
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    t = time_graph([lambda w=w: torch.nn.functional.linear(x, w) for w in copies])
    del copies
    return t * 1e6


def bench_bnb(n, k, m) -> float | None:
    """bitsandbytes nf4 (block 64) matmul_4bit, None when bitsandbytes is not importable."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf
    except ImportError:
        return None
    copies = []
    for _ in range(_n_copies(n * k // 2)):
        w = torch.randn(n, k, device="cuda", dtype=torch.float16)
        copies.append(bf.quantize_4bit(w, blocksize=64, quant_type="nf4"))
        del w
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    calls = [lambda q=q, s=s: bnb.matmul_4bit(x, q.t(), quant_state=s) for q, s in copies]
    try:
        t = time_graph(calls)
    except RuntimeError as e:  # some versions cannot be captured: report, do not abort the run
        print(f"  bitsandbytes not graph-capturable here: {e}")
        return None
    return t * 1e6


# ------------------------------------------------------------------------------------ checks
def check(verbose: bool = True) -> int:
    """Parity of the Triton kernels with the torch twin on the GPU; returns the failure count."""
    from kbitrt.format.quantizer import quantize_weight
    from kbitrt.format.config import OutlierSpec, QuantConfig
    from kbitrt.runtime.kernels.triton_kbit import kbit_linear_triton

    fails, cases = 0, 0
    g = torch.Generator().manual_seed(0)
    for bits in range(3, 9):
        for dtype in ("nf", "int", "fp", "quantile"):
            for block in (32, 64, 128, 1024, 4096):
                n, k = 200, 1000 + 8 * bits + 3  # ragged against every block and against 8
                outl = OutlierSpec.parse("top:1%") if block == 64 else None
                qw = quantize_weight(torch.randn(n, k, generator=g),
                                     QuantConfig(bits=bits, block_size=block, dtype=dtype,
                                                 outliers=outl))
                args = [qw.qweight.cuda(), qw.absmax.cuda(), pad_codebook(qw.codebook, bits).cuda()]
                idx = qw.outlier_idx.cuda() if outl else None
                ow = qw.outlier_weight.cuda() if outl else None
                bias = torch.randn(n, generator=g).cuda()
                for m in (1, 2, 3, 16, 17, 64, 300):
                    for act in (torch.float16, torch.bfloat16):
                        x = torch.randn(m, k, generator=g).to(act).cuda()
                        y = kbit_linear_triton(x, *args, bias.to(act), idx, ow, bits, block, k)
                        r = kbit_linear_torch(x, *args, bias.to(act), idx, ow, bits, block, k)
                        tol = (4e-3 if act == torch.float16 else 2e-2) * (r.float().abs().max() + 1)
                        err = (y.float() - r.float()).abs().max()
                        cases += 1
                        if not torch.isfinite(y).all() or err > tol:
                            fails += 1
                            print(f"FAIL bits={bits} {dtype} block={block} M={m} {act}: "
                                  f"err {err:.3g} > {tol:.3g}")
    if verbose:
        print(f"check: {cases - fails}/{cases} parity cases pass")
    return fails


# ------------------------------------------------------------------------------------ sweep
def tune_configs(m: int) -> list:
    from kbitrt.runtime.kernels.triton_kbit import KernelConfig

    # word kernels (where they apply): tiles of 4 / 8 (row, group) pairs per thread (M = 1) and
    # 2 / 4 (M = 2..16), unsplit and split: whether a split's memset + cast launches pay for the
    # fill it buys is what a GPU decides (pick_config never splits them)
    if m == 1:
        words = [KernelConfig(1, bn, 64 * (pairs // bn), s, 4, 1)
                 for pairs in (512, 1024) for bn in (8, 16, 32, 64, 128, 256) for s in (1, 2, 4)]
        return words + [KernelConfig(1, bn, bk, s, w, 2, gather=g) for bn in (4, 8, 16, 32)
                        for bk in (256, 512, 1024) for s in (1, 2) for w in (4, 8)
                        for g in (False, True) if bn * bk <= 16384]
    words = [KernelConfig(16, bn, 64 * bg, s, 4, 1) for bn in (64, 128) for bg in (2, 4)
             for s in (1, 2, 4)]
    return words + [KernelConfig(16, bn, bk, s, 4, st, gather=g) for bn in (32, 64, 128)
                    for bk in (64, 128) for s in (1, 2) for st in (2, 3, 4)
                    for g in (False, True)]



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="a few shapes, M in {1, 16}, k in {3, 4, 8}")
    p.add_argument("--check", action="store_true", help="GPU parity checks first; stop on failure")
    p.add_argument("--tune", action="store_true",
                   help="sweep launch configs per case, keep the best (slow: use with --quick)")
    p.add_argument("--no-peers", action="store_true", help="skip the fp16 and bitsandbytes runs")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernel_bench.py needs a CUDA GPU: timings of the CPU path or of the Triton "
              "interpreter mean nothing for the kernels. Run it on a GPU machine.", file=sys.stderr)
        return 2
    import triton
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    if args.check and check() > 0:
        print("parity check failed: not benchmarking", file=sys.stderr)
        return 1
    shapes = QUICK_SHAPES if args.quick else tuple(SHAPES)
    ms = (1, 16) if args.quick else (1, 2, 4, 8, 16)
    bit_list = (3, 4, 8) if args.quick else (3, 4, 5, 6, 8)
    blocks = (64,) if args.quick else (64, 128, 1024)
    dtypes = ("nf",) if args.quick else ("nf", "int")
    bw = copy_bandwidth()
    dev_name = torch.cuda.get_device_name()
    print(f"{dev_name}: copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
    rows, fp16_us, bnb_us = [], {}, {}
    print(f"{'shape':>11} {'M':>3} {'k':>2} {'B':>5} {'dt':>3} {'us':>8} {'GB/s':>7} {'%copy':>6} "
          f"{'x fp16':>7} {'bnb us':>7}")
    for name in shapes:
        n, k = SHAPES[name]
        for m in ms:
            if not args.no_peers:
                fp16_us[name, m] = bench_fp16(n, k, m)
                bnb_us[name, m] = bench_bnb(n, k, m)
            for bits in bit_list:
                for block in blocks:
                    for dtype in dtypes:
                        if args.tune:
                            tries = []
                            for c in tune_configs(m):
                                try:
                                    tries.append(bench_kbit(n, k, m, bits, block, dtype, config=c))
                                except (RuntimeError, OutOfResources, CompilationError) as e:
                                    print(f"  skip {c}: {str(e).splitlines()[0][:80]}")
                            r = min(tries, key=lambda t: t["us"])
                        else:
                            r = bench_kbit(n, k, m, bits, block, dtype)
                        ref = fp16_us.get((name, m))
                        r.update(shape=name, N=n, K=k, M=m, bits=bits, block=block, dtype=dtype,
                                 pct_copy=100 * r["gbps"] * 1e9 / bw, fp16_us=ref,
                                 speedup_vs_fp16=ref / r["us"] if ref else None,
                                 bnb_nf4_b64_us=bnb_us.get((name, m)))
                        rows.append(r)
                        bnb = f"{r['bnb_nf4_b64_us']:7.1f}" if r["bnb_nf4_b64_us"] else "      -"
                        sp = f"{r['speedup_vs_fp16']:6.2f}x" if ref else "      -"
                        print(f"{name:>11} {m:>3} {bits:>2} {block:>5} {dtype:>3} {r['us']:8.1f} "
                              f"{r['gbps']:7.0f} {r['pct_copy']:5.1f}% {sp} {bnb}", flush=True)
    # the DESIGN.md ratio: M=16 time over M=1 time, per case
    by = {(r["shape"], r["bits"], r["block"], r["dtype"], r["M"]): r["us"] for r in rows}
    ratios = {f"{s}/k{b}/B{bl}/{d}": by[s, b, bl, d, 16] / by[s, b, bl, d, 1]
              for (s, b, bl, d, m) in by if m == 1 and (s, b, bl, d, 16) in by}
    if ratios:
        print(f"M=16 / M=1 time: max {max(ratios.values()):.2f} (target <= 1.25)")
    date = datetime.date.today().isoformat()
    out = args.out or ROOT / "benchmarks" / "results" / \
        f"kernels-{re.sub(r'[^A-Za-z0-9]+', '-', dev_name).strip('-').lower()}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "device": dev_name, "copy_bandwidth_gbps": bw / 1e9, "torch": torch.__version__,
        "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": git_commit() or "unknown", "date": date, "quick": args.quick, "tuned": args.tune,
        "m16_over_m1": ratios, "results": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
