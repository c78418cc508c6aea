"""CPU time of the bit-plane kernel (cpu_planes.h: an any-precision model's planes read as stored,
K planes per call) beside the bitslice kernel at the same K (the repacked copy today's
`--bits K` path holds), M = 1 (decoding) and M = 5 (a speculative verify of 4 drafts).

Over a SmolLM2-135M's worth of distinct linears (30 layers of q, k, v, o, gate, up, down, no head),
so weights stream from memory as in a real decode. Parent codes are random 8-bit codes; width K is
their top K bits: the planes hold all 8 (as a 3-8 model holds them resident), the bitslice copy K.
The two kernels alternate per repetition (a change of machine load hits both); the figure is the
median over reps of the whole pass, wall and process CPU time.

    python benchmarks/cpu_planes.py --threads 2 --reps 7
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
BLOCK = 64


def layers(n_layers: int, parent: int = 8) -> list[dict]:
    from kbitrt.format import packing
    from kbitrt.format.bitplane import pack_planes

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n_layers):
        for n, k in SHAPES:
            codes = torch.randint(0, 2**parent, (n, k), generator=g, dtype=torch.uint8)
            absmax = (torch.rand(n, -(-k // BLOCK), generator=g) + 0.5).half()
            bitslice = {b: packing.pack(codes >> (parent - b), b) for b in range(3, parent + 1)}
            out.append({"k": k, "planes": pack_planes(codes, parent), "absmax": absmax,
                        "bitslice": bitslice})
    return out


def one_pass(ls, x, bits, cbs, kind) -> float:
    from kbitrt.runtime.kernels import cpu

    c0 = time.process_time()
    for lay in ls:
        xi = x[lay["k"]]
        if kind == "planes":
            cpu.kbit_linear_planes(xi, lay["planes"], lay["absmax"], cbs[bits], None, bits, BLOCK,
                                   lay["k"])
        else:
            cpu.kbit_linear(xi, lay["bitslice"][bits], lay["absmax"], cbs[bits], None, bits,
                            BLOCK, lay["k"])
    return time.process_time() - c0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from kbitrt.runtime.kernels import cpu

    if not cpu.available():
        print("the fused CPU kernels are not available here", file=sys.stderr)
        return 1
    ls = layers(args.layers)
    g = torch.Generator().manual_seed(1)
    cbs = {b: torch.sort(torch.randn(2**b, generator=g)).values for b in range(3, 9)}
    rows = []
    load_before = os.getloadavg()
    with torch.no_grad():
        for m in (1, 5):
            x = {k: torch.randn(m, k, generator=g) for k in (576, 1536)}
            for bits in range(3, 9):
                for kind in ("planes", "bitslice"):
                    one_pass(ls, x, bits, cbs, kind)  # warm-up
                walls = {"planes": [], "bitslice": []}
                cpus = {"planes": [], "bitslice": []}
                for _ in range(args.reps):
                    for kind in ("planes", "bitslice"):
                        t0 = time.perf_counter()
                        cpus[kind].append(one_pass(ls, x, bits, cbs, kind))
                        walls[kind].append(time.perf_counter() - t0)
                row = {"m": m, "bits": bits}
                for kind in ("planes", "bitslice"):
                    row[f"{kind}_ms_wall"] = 1e3 * statistics.median(walls[kind])
                    row[f"{kind}_ms_cpu"] = 1e3 * statistics.median(cpus[kind])
                row["ratio_wall"] = row["planes_ms_wall"] / row["bitslice_ms_wall"]
                row["ratio_cpu"] = row["planes_ms_cpu"] / row["bitslice_ms_cpu"]
                rows.append(row)
                print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()},
                      flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    record = {"kind": "cpu_planes", "machine": platform.processor() or platform.machine(),
              "simd": cpu.describe(), "threads": args.threads, "layers": args.layers,
              "reps": args.reps, "block_size": BLOCK, "torch": torch.__version__,
              "python": sys.version.split()[0], "commit": commit,
              "load_average_before": list(load_before), "load_average_after": list(os.getloadavg()),
              "note": "shared 2-core machine (other agents running): see the load averages",
              "rows": rows}
    out = Path(args.output or ROOT / f"benchmarks/results/cpu_planes-{args.threads}threads.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
