"""Static SASS budget of the kbit Triton kernels: compiled for sm_80/89/90 on a CPU, no GPU needed.

    python benchmarks/sass_budget.py                       # table, sm_90, Llama-2-7B shapes
    python benchmarks/sass_budget.py --json                # one JSON record per variant
    python benchmarks/sass_budget.py --all --out benchmarks/results/sass_budget-<archs>.json

Every variant the dispatcher can choose (`triton_kbit.plan_launch`: M=1 GEMV, M=2..16 small batch,
prefill) is compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` with
the launch config `pick_config` chooses for that GPU's SM count, the same specialisations a launch
would get (16-byte divisibility of pointers and of sizes that are multiples of 16), and turned into
SASS with the `nvdisasm` shipped in the Triton wheel. The hot loop is the innermost backward branch
with the most instructions (the K loop). Per variant it reports:

- instr_per_weight: SASS instructions of one loop trip / weights one thread handles per trip;
- mix: the loop's instructions by opcode class (alu, fma, cvt, ldg, lds, sts, shfl, bar, ...);
- weight_load_bits: the widest global load of packed weights in the loop, found from the source
  lines (`-lineinfo`) marked `# sass:weights` in triton_kbit.py;
- regs, spills (local memory), smem, the occupancy the registers and smem allow;
- pred_frac_bw: a roofline on paper (docs/kernels.md lists every number and its source): the
  fraction of DRAM copy bandwidth the kernel can reach = min(1, issue, LSU, bytes in flight) x fill.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kbitrt.runtime.kernels import planes as kp  # noqa: E402
from kbitrt.runtime.kernels import triton_kbit as tk  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@dataclass(frozen=True)
class Gpu:
    """Paper figures of one GPU (sources in docs/kernels.md, section 'Roofline on paper')."""

    arch: str
    cc: int
    name: str
    sms: int
    clock_ghz: float  # boost clock
    dram_gbs: float  # peak DRAM bandwidth (datasheet)
    copy_frac: float  # device-to-device copy reaches this fraction of the peak
    smem_per_sm: int  # bytes usable by blocks
    max_warps: int  # resident warps per SM
    max_blocks: int  # resident blocks per SM
    latency_ns: float  # DRAM load latency under load

    @property
    def copy_gbs(self) -> float:
        return self.dram_gbs * self.copy_frac


GPUS = {
    "sm_90": Gpu("sm_90", 90, "H100 SXM5", 132, 1.98, 3350, 0.9, 228 * 1024, 64, 32, 700),
    "sm_80": Gpu("sm_80", 80, "A100 SXM4 80GB", 108, 1.41, 2039, 0.9, 164 * 1024, 64, 32, 600),
    "sm_89": Gpu("sm_89", 89, "RTX 4090", 128, 2.52, 1008, 0.9, 100 * 1024, 48, 24, 600),
}
SHAPES = {  # Llama-2 linear layers: name -> (N = out_features, K = in_features)
    "7b-qkv": (12288, 4096), "7b-o": (4096, 4096), "7b-gateup": (22016, 4096),
    "7b-down": (4096, 11008),
    "70b-qkv": (10240, 8192), "70b-o": (8192, 8192), "70b-kv": (1024, 8192),
    "70b-up": (28672, 8192), "70b-gateup": (57344, 8192), "70b-down": (8192, 28672),
}
M_OF_KERNEL = {"gemv": 1, "small": 16, "prefill": 512,
               # the bit-plane kernels of any-precision models (kernels/planes.py, issue 24)
               "planes-gemv": 1, "planes-small": 16, "planes-prefill": 512}
ISSUE_PER_SM_CLK = 128  # 4 schedulers x 32 lanes: thread-instructions per SM per clock
LAUNCH_US = 2.0  # an extra launch in a decode step (stream order or a graph node), in microseconds
LSU_PER_SM_CLK = 32  # one 32-lane memory instruction (LDG/LDS/STS/ATOM/SHFL) per SM per clock

_CLASSES = [  # (class, opcode prefixes), first match wins
    ("ldg", ("LDG",)), ("lds", ("LDS", "LDSM")), ("sts", ("STS",)), ("ldl", ("LDL",)),
    ("stl", ("STL",)), ("stg", ("STG", "RED", "ATOM")), ("ldc", ("LDC", "ULDC")),
    ("shfl", ("SHFL",)), ("bar", ("BAR", "DEPBAR", "SYNCS", "WARPSYNC")),
    ("mma", ("HMMA", "IMMA", "HGMMA", "WGMMA")), ("fma", ("FFMA", "FMUL", "FADD", "HFMA2", "HMUL2",
                                                         "HADD2", "FMNMX", "FSEL", "FSETP")),
    ("cvt", ("I2F", "F2F", "F2I", "I2FP", "F2FP", "PRMT")), ("branch", ("BRA", "EXIT", "BSSY",
                                                                         "BSYNC")),
    ("uniform", ("U",)), ("alu", ("",)),
]


def opclass(op: str) -> str:
    return next(c for c, prefixes in _CLASSES if op.startswith(prefixes))


@dataclass
class Instr:
    addr: int
    op: str  # opcode with modifiers, e.g. LDG.E.128
    text: str
    lines: frozenset  # source lines (file basename, line) incl. the inlined-at chain


def disassemble(cubin: bytes) -> list[Instr]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(BIN / "nvdisasm"), "-c", "-gi", f.name], check=True,
                             capture_output=True, text=True).stdout
    instrs, labels, loc, fresh = [], {}, set(), False
    for line in out.splitlines():
        s = line.strip()
        if s.startswith("//## File"):  # a location holds until the next one
            if not fresh:
                loc, fresh = set(), True
            loc |= {(os.path.basename(f), int(n))
                    for f, n in re.findall(r'"([^"]+)", line (\d+)', s)}
            continue
        m = re.match(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", s)
        if m:
            body = re.sub(r"^@!?U?P\w+\s+", "", m.group(2).strip())
            instrs.append(Instr(int(m.group(1), 16), body.split()[0], m.group(2), frozenset(loc)))
            fresh = False
        elif re.match(r"^\.L_x_\d+:", s):
            labels[s[:-1]] = len(instrs)
    for ins in instrs:  # resolve branch targets to instruction indices
        t = re.search(r"`\((\.L_x_\d+)\)", ins.text)
        ins.target = labels.get(t.group(1)) if t else None
    return instrs


def hot_loop(instrs: list[Instr]) -> list[Instr]:
    """The largest loop body [target, backward branch] that contains no other backward branch."""
    loops = []
    for i, ins in enumerate(instrs):
        if ins.op.startswith("BRA") and ins.target is not None and ins.target <= i:
            loops.append((ins.target, i))
    inner = [(a, b) for a, b in loops
             if not any(a <= c < d < b or a < c < d <= b for c, d in loops if (c, d) != (a, b))]
    if not inner:
        return []
    a, b = max(inner, key=lambda ab: ab[1] - ab[0])
    return instrs[a:b + 1]


def program_instrs(instrs: list[Instr]) -> list[Instr]:
    """The kernel's instructions without the padding after its end (NOPs, the branch-to-self
    that follows the last EXIT). Every other instruction counts once, taken or not."""
    return [ins for i, ins in enumerate(instrs)
            if not ins.op.startswith("NOP") and not (ins.op.startswith("BRA") and ins.target == i)]


def whole_program(plan: tk.LaunchPlan, gpu: Gpu, r: dict, n: int, k: int) -> dict:
    """Instructions per weight of the whole launch: every program's code outside the K loop
    (prologue, epilogue: counted whole, as if every branch were taken) plus the loop once per trip,
    summed over the grid, per weight and M tile (N x K x M tiles); plus each extra launch
    (split-K's memset and cast) charged as LAUNCH_US of the whole GPU's issue slots."""
    threads = plan.num_warps * 32
    programs = plan.grid[0] * plan.grid[1] * (plan.grid[2] if len(plan.grid) > 2 else 1)
    per_trip = r["loop_instr"] / r["unroll"]
    trips = plan.k_trips * programs // plan.split  # each (row tile, M tile, trip) runs once
    weights = n * k * plan.m_tiles
    body = threads * (programs * r["outside_loop_instr"] + trips * per_trip) / weights
    launches = plan.extra_launches * LAUNCH_US * 1e-6 * gpu.sms * ISSUE_PER_SM_CLK * \
        gpu.clock_ghz * 1e9 / weights
    return dict(whole_per_weight=round(body + launches, 3), whole_kernel_per_weight=round(body, 3),
                extra_launch_per_weight=round(launches, 3), extra_launches=plan.extra_launches,
                programs=programs, trips_per_program=-(-plan.k_trips // plan.split),
                weights_per_thread_program=round(weights / programs / threads, 1))


def _load_bits(op: str) -> int:
    m = re.search(r"\.(8|16|32|64|128)\b", op.replace(".U8", ".8").replace(".S8", ".8")
                  .replace(".U16", ".16").replace(".S16", ".16"))
    return int(m.group(1)) if m else 32


@functools.lru_cache(maxsize=1)
def weight_lines() -> frozenset:
    """Lines of the statements marked `# sass:weights` (a call's location may be any of them)."""
    out = set()
    for src in Path(tk.__file__).parent.glob("*.py"):
        lines = src.read_text().splitlines()
        for i, t in enumerate(lines):
            if "# sass:weights-fn" in t:  # a function that loads nothing but packed weights
                indent = len(t) - len(t.lstrip())
                j = i + 1
                while j < len(lines) and (not lines[j].strip()
                                          or len(lines[j]) - len(lines[j].lstrip()) > indent):
                    out.add((src.name, j + 1))
                    j += 1
            elif "# sass:weights" in t:
                depth, j = 0, i
                while True:
                    code = lines[j].split("#")[0]
                    depth += code.count("(") + code.count("[") - code.count(")") - code.count("]")
                    out.add((src.name, j + 1))
                    if depth <= 0 or j + 1 == len(lines):
                        break
                    j += 1
    return frozenset(out)


def _signature(plan: tk.LaunchPlan) -> tuple[dict, dict]:
    sig, attrs = {}, {}
    names = plan.kernel.arg_names
    for name, val in plan.args:
        if isinstance(val, str):  # a pointer: its element type
            sig[name] = "*" + val
            attrs[(names.index(name),)] = [["tt.divisibility", 16]]
        elif isinstance(val, float):
            sig[name] = "fp32"
        elif val >= 2**31:
            sig[name] = "i64"
        else:
            sig[name] = "i32"
            if val % 16 == 0 and name != "split_k":  # (split_k: one compile for every split)
                attrs[(names.index(name),)] = [["tt.divisibility", 16]]
    sig.update({k: "constexpr" for k, _ in plan.constexprs})
    return sig, attrs


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def compile_plan(plan: tk.LaunchPlan, gpu: Gpu) -> dict:
    """Compile one plan for `gpu`; returns the loop analysis (without the roofline)."""
    sig, attrs = _signature(plan)
    ck = triton.compile(ASTSource(plan.kernel, sig, dict(plan.constexprs), attrs),
                        target=GPUTarget("cuda", gpu.cc, 32),
                        options=dict(num_warps=plan.num_warps, num_stages=plan.num_stages,
                                     **plan.launch_options))
    cubin = ck.asm["cubin"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([str(BIN / "cuobjdump"), "-res-usage", f.name], check=True,
                             capture_output=True, text=True).stdout
    regs, stack, _, local = (int(v) for v in _RES.search(res).groups())
    instrs = disassemble(cubin)
    loop = hot_loop(instrs)
    mix: dict[str, int] = {}
    for ins in loop:
        c = opclass(ins.op)
        mix[c] = mix.get(c, 0) + 1
    wl = weight_lines()
    wloads = [ins for ins in loop if ins.op.startswith("LDG") and ins.lines & wl]
    threads = plan.num_warps * 32
    wpt = plan.weights_per_trip / threads
    # a loop unrolled u times loads u trips' weights: count the trips from the weight bytes
    wbytes = sum(_load_bits(i.op) for i in wloads) / 8
    unroll = max(1, round(wbytes / (wpt * plan.bits / 8))) if wloads else 1
    body = program_instrs(instrs)
    return dict(loop_instr=len(loop), unroll=unroll, weights_per_thread_trip=wpt,
                program_instr=len(body), outside_loop_instr=len(body) - len(loop),
                instr_per_weight=round(len(loop) / (wpt * unroll), 3) if loop else None,
                mix=dict(sorted(mix.items(), key=lambda kv: -kv[1])),
                weight_load_bits=max((_load_bits(i.op) for i in wloads), default=0),
                weight_loads=len(wloads), regs=regs, spill_bytes=local + stack,
                smem=ck.metadata.shared, total_instr=len(instrs))


def occupancy(gpu: Gpu, regs: int, smem: int, warps: int) -> int:
    """Resident warps per SM that registers (256-register warp granules), smem and limits allow."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (65536 // per_warp) // warps
    by_smem = gpu.smem_per_sm // smem if smem else gpu.max_blocks
    blocks = min(by_regs, by_smem, gpu.max_blocks, gpu.max_warps // warps)
    return blocks * warps


def roofline(gpu: Gpu, plan: tk.LaunchPlan, r: dict) -> dict:
    """Predicted fraction of the copy bandwidth (all inputs and sources in docs/kernels.md)."""
    bytes_per_weight = plan.bits / 8 + plan.absmax_bytes / plan.block_size
    bw_weights = gpu.copy_gbs * 1e9 / bytes_per_weight  # weights/s the copy bandwidth allows
    clk = gpu.clock_ghz * 1e9
    ipw = r["instr_per_weight"] or float("inf")
    issue = gpu.sms * ISSUE_PER_SM_CLK * clk / ipw / bw_weights
    mem_ops = sum(r["mix"].get(c, 0) for c in ("ldg", "lds", "sts", "shfl", "ldl", "stl"))
    mem_per_weight = mem_ops / (r["weights_per_thread_trip"] * r["unroll"])
    lsu = (gpu.sms * LSU_PER_SM_CLK * clk / mem_per_weight / bw_weights if mem_per_weight
           else float("inf"))
    warps = occupancy(gpu, r["regs"], r["smem"], plan.num_warps)
    programs = plan.grid[0] * plan.grid[1] * (plan.grid[2] if len(plan.grid) > 2 else 1)
    # resident warps on an SM that has work: what occupancy allows, at most the grid's share
    resident = min(warps, -(-programs // gpu.sms) * plan.num_warps)
    in_flight = resident * 32 * r["weights_per_thread_trip"] * bytes_per_weight  # bytes per SM
    need = gpu.copy_gbs * 1e9 / gpu.sms * gpu.latency_ns * 1e-9
    fill = min(1.0, programs / gpu.sms)
    frac = min(1.0, issue, lsu, in_flight / need) * fill
    return dict(occupancy_warps=warps, resident_warps=resident, pred_issue=round(issue, 3), pred_lsu=round(lsu, 3),
                pred_inflight=round(in_flight / need, 3), pred_fill=round(fill, 3),
                pred_frac_bw=round(frac, 3),
                bound=min((("issue", issue), ("lsu", lsu), ("latency", in_flight / need)),
                          key=lambda kv: kv[1])[0] if frac < fill else "bandwidth")


def variants(args) -> list[dict]:
    out = []
    for arch in args.arch:
        for shape in args.shapes:
            n, k = SHAPES[shape]
            for kern in args.kernels:
                for bits in args.bits:
                    for dtype in args.dtypes:
                        for block in args.blocks:
                            for act in args.acts:
                                out.append(dict(arch=arch, shape=shape, N=n, K=k,
                                                kernel=kern, M=M_OF_KERNEL[kern], bits=bits,
                                                dtype=dtype, block=block, act=act))
    return out


_CACHE: dict = {}


def measure(v: dict) -> dict:
    gpu = GPUS[v["arch"]]
    if v["kernel"].startswith("planes"):  # K planes of the stored layout (dtype: codebook only)
        plan = kp.plan_planes(v["M"], v["N"], v["K"], v["bits"], v["block"], act=v["act"],
                              sms=gpu.sms)
    else:
        plan = tk.plan_launch(v["M"], v["N"], v["K"], v["bits"], v["block"], act=v["act"],
                              codebook_kind=tk.codebook_kind_of(v["dtype"]), sms=gpu.sms,
                              prefill_words=True)
    name = getattr(plan.kernel, "__name__", str(plan.kernel))
    key = (v["arch"], name, tuple(sorted(plan.constexprs)),
           tuple((n, None if n == "split_k" else a if isinstance(a, (str, float)) else a % 16 == 0)
                 for n, a in plan.args),
           plan.num_warps, plan.num_stages)
    if key not in _CACHE:
        _CACHE[key] = compile_plan(plan, gpu)
    r = dict(_CACHE[key])
    rec = dict(v, kernel_fn=name, config=plan.config_str, grid=list(plan.grid),
               **r)
    rec.update(roofline(gpu, plan, r))
    rec.update(whole_program(plan, gpu, r, v["N"], v["K"]))
    rec["launch_options"] = dict(plan.launch_options)
    rec["budget"] = budget(v["M"], v["bits"])
    rec["within_budget"] = (rec["instr_per_weight"] is not None and rec["budget"] is not None
                            and rec["instr_per_weight"] <= rec["budget"])
    rec["whole_within_budget"] = (rec["budget"] is not None
                                  and rec["whole_per_weight"] <= rec["budget"])
    if v["kernel"].startswith("planes"):  # issue 24: the whole program against its ceilings
        rec["whole_program_instr_per_weight"] = planes_whole_program(plan, r, v["K"])
        rec["budget"] = PLANES_CEILING.get(v["bits"]) if v["M"] == 1 else None
        rec["within_budget"] = (rec["budget"] is not None
                                and rec["whole_program_instr_per_weight"] <= rec["budget"])
    return rec


# issue 24: above these (instructions per weight, whole program, sm_90) a plane kernel at width K
# is issue-bound, not bandwidth-bound
PLANES_CEILING = {3: 4.5, 4: 5.9, 5: 7.2, 6: 8.6, 7: 10.0, 8: 11.4}


def planes_whole_program(plan, r: dict, k: int) -> float | None:
    """SASS instructions a thread executes per weight over a whole program: prologue and
    epilogue (every instruction outside the hot loop, once) plus trips x the loop."""
    if not r["loop_instr"]:
        return None
    c = dict(plan.constexprs)
    k_per_trip = c["BLOCK_G"] * 64 if "BLOCK_G" in c else c["BLOCK_K"]
    trips = -(-k // k_per_trip) / r["unroll"]
    weights = trips * r["weights_per_thread_trip"] * r["unroll"]
    return round((r["total_instr"] - r["loop_instr"] + trips * r["loop_instr"]) / weights, 3)


def budget(m: int, bits: int) -> float | None:
    """Budgets in instructions per weight (sm_90), for the loop and, since issue 23, for the
    whole program: issue 10's M = 1 and M = 2..16 (4 bits); issue 23's prefill (M > 16, per
    weight and M tile: each weight is decoded once per M tile)."""
    if m == 1:
        return {3: 5, 4: 4, 5: 6, 6: 6, 7: 6, 8: 7}[bits]
    if m <= 16:
        return 5 if bits == 4 else None
    return 6 if bits == 4 else 8


def render(paths: list[Path], shapes: set | None = None, blocks: set | None = None) -> str:
    """Markdown: per (arch, kernel, shape, block, act), instr/weight and predicted % of copy
    bandwidth for k = 3..8, one column per data type; budgets and misses marked."""
    recs = [r for p in paths for r in json.loads(p.read_text())["records"]
            if (not shapes or r["shape"] in shapes) and (not blocks or r["block"] in blocks)]
    groups: dict = {}
    for r in recs:
        key = (r["arch"], r["kernel"], r["shape"], r["block"], r["act"])
        groups.setdefault(key, {})[(r["bits"], r["dtype"])] = r
    out = []
    for key in sorted(groups):
        arch, kern, shape, block, act = key
        g = groups[key]
        dts = sorted({d for _, d in g}, key=["int", "nf", "fp"].index)
        out.append(f"\n{arch} {kern} (M={M_OF_KERNEL[kern]}) {shape} block {block} {act}\n")
        out.append("| k | budget | " + " | ".join(f"{d}: instr/w (loop / whole), pred % BW"
                                                 for d in dts)
                   + " | load bits | regs |")
        out.append("|---|---|" + "---|" * len(dts) + "---|---|")
        for bits in sorted({b for b, _ in g}):
            cells, any_r = [], None
            for d in dts:
                r = g.get((bits, d))
                if r is None:
                    cells.append("")
                    continue
                any_r = r
                whole = f" / {r['whole_per_weight']:.2f}" if "whole_per_weight" in r else ""
                ok = r["within_budget"] and r.get("whole_within_budget", True)
                miss = "" if r["budget"] is None or ok else " **over**"
                cells.append(f"{r['instr_per_weight']:.2f}{whole}{miss}, "
                             f"{100 * r['pred_frac_bw']:.0f}%")
            b = any_r["budget"] if any_r and any_r["budget"] is not None else "-"
            out.append(f"| {bits} | {b} | " + " | ".join(cells)
                       + f" | {any_r['weight_load_bits']} | {any_r['regs']} |")
    return "\n".join(out)


def render_shapes(paths: list[Path]) -> str:
    """Markdown: one row per (arch, kernel, shape, block, act): at each k the worst over the data
    types of the loop-only and the whole-program instructions per weight ("loop / whole"; budget
    misses of either marked) and the launch `pick_config` chose at k = 4."""
    recs = [r for p in paths for r in json.loads(p.read_text())["records"]]
    groups: dict = {}
    for r in recs:
        key = (r["arch"], M_OF_KERNEL[r["kernel"]], r["kernel"], r["block"], r["act"],
               list(SHAPES).index(r["shape"]) if r["shape"] in SHAPES else 99, r["shape"])
        groups.setdefault(key, []).append(r)
    bits = sorted({r["bits"] for r in recs})
    out = ["| arch | kernel | block | shape | N x K | " + " | ".join(f"k={b}" for b in bits)
           + " | launch at k=4 |", "|---|---|---|---|---|" + "---|" * len(bits) + "---|"]
    for key in sorted(groups):
        arch, _, kern, block, act, _, shape = key
        g = groups[key]
        cells = []
        for b in bits:
            rb = [r for r in g if r["bits"] == b and r["instr_per_weight"] is not None]
            if not rb:
                cells.append("")
                continue
            loop = max(rb, key=lambda r: r["instr_per_weight"])
            whole = max(rb, key=lambda r: r.get("whole_per_weight", 0))
            cell = f"{loop['instr_per_weight']:.2f}"
            if "whole_per_weight" in whole:
                cell += f" / {whole['whole_per_weight']:.2f}"
            over = loop["budget"] is not None and (
                loop["instr_per_weight"] > loop["budget"]
                or whole.get("whole_per_weight", 0) > loop["budget"])
            cells.append(cell + (" **over**" if over else ""))
        r4 = next((r for r in g if r["bits"] == 4), g[0])
        grid = "x".join(str(d) for d in r4["grid"])
        trips = f", {r4['trips_per_program']} trips" if "trips_per_program" in r4 else ""
        out.append(f"| {arch} | {kern} {act} | {block} | {shape} | {r4['N']} x {r4['K']} | "
                   + " | ".join(cells) + f" | {r4['config']}, grid {grid}{trips} |")
    return "\n".join(out)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", nargs="+", choices=sorted(GPUS), help="default sm_90 (--all: every)")
    p.add_argument("--shapes", nargs="+", default=[s for s in SHAPES if s.startswith("7b")],
                   choices=sorted(SHAPES))
    p.add_argument("--kernels", nargs="+", default=["gemv", "small"],
                   choices=sorted(M_OF_KERNEL))
    p.add_argument("--bits", nargs="+", type=int, default=list(range(3, 9)))
    p.add_argument("--dtypes", nargs="+", default=["int", "nf", "fp"])
    p.add_argument("--blocks", nargs="+", type=int, default=[64])
    p.add_argument("--acts", nargs="+", default=["fp16"], choices=["fp16", "bf16", "fp32"])
    p.add_argument("--all", action="store_true",
                   help="every arch, shape, kernel, block 64/1024, fp16/bf16 (slow: many compiles)")
    p.add_argument("--json", action="store_true", help="print one JSON record per variant")
    p.add_argument("--out", type=Path, help="also write all records (with metadata) to this file")
    p.add_argument("--render", type=Path, nargs="+", metavar="JSON",
                   help="print the docs/kernels.md tables of results files (no compiling)")
    p.add_argument("--render-shapes", type=Path, nargs="+", metavar="JSON",
                   help="print the per-shape summary table of results files (no compiling)")
    args = p.parse_args()
    if args.render:
        print(render(args.render, shapes=set(args.shapes), blocks=set(args.blocks)))
        return 0
    if args.render_shapes:
        print(render_shapes(args.render_shapes))
        return 0
    if args.all:
        args.arch = args.arch or sorted(GPUS)
        args.shapes, args.kernels = list(SHAPES), list(M_OF_KERNEL)
        args.blocks, args.acts = [64, 1024], ["fp16", "bf16"]
    args.arch = args.arch or ["sm_90"]
    recs = []
    for v in variants(args):
        rec = measure(v)
        recs.append(rec)
        if args.json:
            print(json.dumps(rec), flush=True)
        else:
            print(f"{rec['arch']} {rec['shape']:10s} {rec['kernel']:7s} k={rec['bits']} "
                  f"{rec['dtype']:4s} B={rec['block']:<4d} {rec['act']} {rec['config']:28s} "
                  f"ipw={rec['instr_per_weight']} (budget {rec['budget']}) "
                  f"ld={rec['weight_load_bits']}b regs={rec['regs']} spill={rec['spill_bytes']} "
                  f"smem={rec['smem']} occ={rec['occupancy_warps']}w "
                  f"pred={rec['pred_frac_bw']} ({rec['bound']})", flush=True)
    if args.out:
        meta = dict(tool="benchmarks/sass_budget.py", commit=_git_commit(),
                    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    triton=triton.__version__, python=platform.python_version(),
                    kernels_sha=hashlib.sha256(Path(tk.__file__).read_bytes()).hexdigest()[:16],
                    device="none (static compile on CPU)", argv=sys.argv[1:],
                    gpus={a: vars(g) for a, g in GPUS.items()})
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(meta=meta, records=recs), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
