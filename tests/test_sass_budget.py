"""The instruction budget of issue 10, checked statically on every CI run (no GPU needed).

Compiles the kernels the dispatcher picks for a Llama-2-7B layer (4096 x 4096, blocks of 64; k = 7
also with blocks of 1024) for sm_90 with Triton's bundled ptxas: the M = 1 word GEMV at k = 3..8
(nf: the table decoders; int at 4, 7, 8: the arithmetic ones; nf k = 7 also with bf16 activations)
and the 4-bit M = 16 kernel. It
disassembles them with Triton's nvdisasm and fails when a hot loop spends more SASS instructions
per weight than the budget, reads packed weights with loads narrower than 64 bits, reduces across
threads (SHFL) inside the K loop or spills registers.
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
CASES = ([("gemv", bits, "nf", 64, "fp16") for bits in range(3, 9)]
         + [("gemv", bits, "int", 64, "fp16") for bits in (4, 7, 8)]
         + [("gemv", 7, "nf", 1024, "fp16"), ("gemv", 7, "nf", 64, "bf16")]
         + [("small", 4, dtype, 64, "fp16") for dtype in ("int", "nf")])
out = []
for kernel, bits, dtype, block, act in CASES:
    v = dict(arch="sm_90", shape="7b-o", N=4096, K=4096, kernel=kernel,
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
    assert len(records) == 13
    assert any(r["act"] == "bf16" and r["bits"] == 7 for r in records)
    assert {r["bits"] for r in records if r["M"] == 1} == set(range(3, 9))
    for rec in records:
        name = (f"{rec['kernel']} M={rec['M']} {rec['dtype']}{rec['bits']} block {rec['block']} "
                f"{rec['act']} "
                f"({rec['kernel_fn']}, {rec['config']})")
        assert rec["instr_per_weight"] is not None, f"{name}: no hot loop found"
        assert rec["instr_per_weight"] <= rec["budget"], (
            f"{name}: {rec['instr_per_weight']} SASS instructions per weight > budget "
            f"{rec['budget']}; mix {rec['mix']}")
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
