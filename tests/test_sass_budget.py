"""The instruction budgets of issues 10 and 23, checked statically on every CI run (no GPU needed).

Compiles the kernels the dispatcher picks for a Llama-2-7B layer (4096 x 4096, blocks of 64; k = 7
also with blocks of 1024) for sm_90 with Triton's bundled ptxas: the M = 1 word GEMV at k = 3..8
(nf: the table decoders; int at 4, 7, 8: the arithmetic ones; nf k = 7 also with bf16 activations)
and the 4-bit M = 16 kernel. It
disassembles them with Triton's nvdisasm and fails when a hot loop spends more SASS instructions
per weight than the budget, reads packed weights with loads narrower than 64 bits, reduces across
threads (SHFL) inside the K loop or spills registers. Issue 23: the same budgets hold for the
whole program (prologue + trips x loop + epilogue over the grid, per weight, with no extra
launch), also at the 7B down projection (4096 x 11008, a different tile) and with blocks of 32;
prefill (M = 512, tensor cores on the word layout) within 6 (4 bits) / 8 instructions per weight
per M tile; every compile states floating-point fusion.
A count, not a timing: no later change can lose the budget silently."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = r"""
import json, sys
sys.path.insert(0, "benchmarks")
import sass_budget as sb
O = "7b-o"
CASES = ([("gemv", bits, "nf", 64, "fp16", O) for bits in range(3, 9)]
         + [("gemv", bits, "int", 64, "fp16", O) for bits in (4, 7, 8)]
         + [("gemv", 7, "nf", 1024, "fp16", O), ("gemv", 7, "nf", 64, "bf16", O)]
         + [("small", 4, dtype, 64, "fp16", O) for dtype in ("int", "nf")]
         + [("gemv", 4, "int", 32, "fp16", O), ("gemv", 4, "int", 64, "fp16", "7b-down"),
            ("gemv", 7, "nf", 64, "fp16", "7b-down")]
         + [("prefill", bits, dtype, 64, "fp16", O) for bits, dtype in ((4, "int"), (4, "nf"),
                                                                        (3, "nf"), (7, "nf"))])
out = []
for kernel, bits, dtype, block, act, shape in CASES:
    n, k = sb.SHAPES[shape]
    v = dict(arch="sm_90", shape=shape, N=n, K=k, kernel=kernel,
             M=sb.M_OF_KERNEL[kernel], bits=bits, dtype=dtype, block=block, act=act)
    out.append(sb.measure(v))
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def records():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    if r.returncode and "ptxas" in r.stderr and "not found" in r.stderr.lower():
        pytest.skip("no ptxas in this triton install")
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(s for s in r.stdout.splitlines() if s.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_budget_sm90(records):
    assert len(records) == 20
    assert any(r["act"] == "bf16" and r["bits"] == 7 for r in records)
    assert {r["bits"] for r in records if r["M"] == 1} == set(range(3, 9))
    assert {r["kernel_fn"] for r in records if r["M"] > 16} == {"dot_words_kernel"}
    for rec in records:
        name = (f"{rec['kernel']} M={rec['M']} {rec['dtype']}{rec['bits']} block {rec['block']} "
                f"{rec['act']} {rec['shape']} "
                f"({rec['kernel_fn']}, {rec['config']})")
        assert rec["instr_per_weight"] is not None, f"{name}: no hot loop found"
        assert rec["launch_options"] == {"enable_fp_fusion": True}, name
        assert rec["instr_per_weight"] <= rec["budget"], (
            f"{name}: {rec['instr_per_weight']} SASS instructions per weight > budget "
            f"{rec['budget']}; mix {rec['mix']}")
        assert rec["extra_launches"] == 0, f"{name}: {rec['extra_launches']} extra launches"
        assert rec["whole_per_weight"] <= rec["budget"], (
            f"{name}: whole program {rec['whole_per_weight']} instructions per weight "
            f"({rec['outside_loop_instr']} outside the loop, {rec['trips_per_program']} trips of "
            f"{rec['loop_instr']}) > budget {rec['budget']}")
        assert rec["outside_loop_instr"] > 0 and rec["programs"] >= 32, name
        assert rec["weight_load_bits"] >= 64, (
            f"{name}: packed weights loaded {rec['weight_load_bits']}-bit")
        assert "shfl" not in rec["mix"], f"{name}: cross-thread reduction in the K loop"
        assert rec["spill_bytes"] == 0, f"{name}: {rec['spill_bytes']} bytes of spills"


def test_hot_loop_parser():
    """The loop finder on a hand-written listing: the inner backward branch wins."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sass_budget as sb

    def ins(i, op, target=None):
        x = sb.Instr(i, op, op, frozenset())
        x.target = target
        return x
    code = [ins(0, "MOV"), ins(1, "IADD3"), ins(2, "FFMA"), ins(3, "FFMA"), ins(4, "BRA", 2),
            ins(5, "BRA", 1), ins(6, "EXIT")]
    assert [i.addr for i in sb.hot_loop(code)] == [2, 3, 4]
    assert sb.opclass("LDG.E.128") == "ldg" and sb.opclass("SHFL.BFLY") == "shfl"
    assert sb._load_bits("LDG.E.64") == 64 and sb._load_bits("LDG.E.U8") == 8
    assert sb._load_bits("LDG.E") == 32
    assert json.dumps(sb.budget(1, 4)) == "4"
    assert sb.budget(16, 5) is None and sb.budget(512, 4) == 6 and sb.budget(512, 7) == 8
    code.append(ins(7, "BRA", 7))
    code.append(ins(8, "NOP"))
    assert [i.addr for i in sb.program_instrs(code)] == [0, 1, 2, 3, 4, 5, 6]


def test_whole_program_sum():
    """whole_program on a made-up plan: 2 row tiles x 3 trips, 10 instructions outside the loop
    and 20 per trip, 1 warp, 64 weights per trip; a split of 3 adds 2 charged launches."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sass_budget as sb
    from kbitrt.runtime.kernels.triton_kbit import LaunchPlan

    gpu = sb.GPUS["sm_90"]
    r = dict(loop_instr=20, unroll=1, outside_loop_instr=10)
    plan = LaunchPlan(None, (2, 1), (), (), 1, 1, 64, 4, 64, 2, "", 1, 3, 1, 0)
    w = sb.whole_program(plan, gpu, r, 4, 96)  # N x K = 384 weights = 2 x 3 x 64
    assert w["whole_per_weight"] == round(32 * (2 * 10 + 6 * 20) / 384, 3)
    assert w["trips_per_program"] == 3 and w["extra_launches"] == 0
    split = LaunchPlan(None, (2, 3), (), (), 1, 1, 64, 4, 64, 2, "", 3, 3, 1, 2)
    ws = sb.whole_program(split, gpu, r, 4, 96)
    assert ws["trips_per_program"] == 1
    assert ws["whole_kernel_per_weight"] == round(32 * (6 * 10 + 6 * 20) / 384, 3)
    assert ws["extra_launch_per_weight"] > 1000
