"""Parity of the Triton kernels with their torch twin and with QuantizedWeight.dequantize().

Without a GPU the kernels run under TRITON_INTERPRET=1 on the CPU. The interpreter is chosen when
`@triton.jit` decorates a kernel, so the variable is set here, before kbitrt.runtime.kernels.triton_kbit is
imported (kbitrt imports it lazily, on the first CUDA call only); `test_runs_triton` fails if some
earlier import compiled the kernels instead. With a GPU the same tests run the compiled kernels.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "kbitrt.runtime.kernels.triton_kbit" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

from kbitrt.format.quantizer import quantize_weight  # noqa: E402
from kbitrt.format.config import OutlierSpec, QuantConfig  # noqa: E402
from kbitrt.runtime.kernels import kbit_linear, pad_codebook  # noqa: E402
from kbitrt.runtime.kernels import triton_kbit as tk  # noqa: E402
from kbitrt.runtime.kernels.reference import dequantize_packed, kbit_linear_torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float16: 4e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}


def _quantized(n, k, bits, block, dtype="nf", outliers=None, seed=0, zero_blocks=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if zero_blocks:
        w[:, :block] = 0.0  # every row's first block
        w[n // 2] = 0.0  # one whole row
    cfg = QuantConfig(bits=bits, block_size=block, dtype=dtype,
                      outliers=OutlierSpec.parse(outliers) if outliers else None)
    return quantize_weight(w, cfg)


def _args(qw, device=DEVICE):
    """The kernel arguments of a QuantizedWeight (absmax decoded to fp16/fp32 once, as at load)."""
    absmax = qw.absmax_float() if qw.absmax_scale is not None else qw.absmax
    idx = qw.outlier_idx.to(device) if qw.outlier_idx is not None else None
    ow = qw.outlier_weight.to(device) if qw.outlier_weight is not None else None
    return (qw.qweight.to(device), absmax.to(device), pad_codebook(qw.codebook, qw.bits).to(device),
            idx, ow)


def _nan_empty(monkeypatch):
    """Make torch.empty return NaN-filled memory, so an output element never written shows."""
    real = torch.empty

    def empty(*a, **kw):
        t = real(*a, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", empty)


def _check(qw, m, act=torch.float16, bias=False, config=None, monkeypatch=None, seed=1):
    n, k = qw.shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(act).to(DEVICE)
    b = torch.randn(n, generator=g).to(act).to(DEVICE) if bias else None
    qweight, absmax, cb, idx, ow = _args(qw)
    if monkeypatch is not None:
        _nan_empty(monkeypatch)
    y = tk.kbit_linear_triton(x, qweight, absmax, cb, b, idx, ow, qw.bits, qw.block_size, k,
                              config=config)
    if monkeypatch is not None:
        monkeypatch.undo()
    ref = kbit_linear_torch(x, qweight, absmax, cb, b, idx, ow, qw.bits, qw.block_size, k)
    full = x.float() @ qw.dequantize().to(DEVICE).t() + (b.float() if bias else 0)
    assert y.shape == (m, n) and y.dtype == act
    assert not torch.isnan(y).any(), "NaN in the kernel output (an element not written?)"
    scale = ref.float().abs().max().item() + 1.0
    tol = TOL[act] * scale
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= tol, f"kernel vs torch twin: max err {err:.3g} > {tol:.3g}"
    err_full = (y.float() - full).abs().max().item()
    assert err_full <= tol + TOL[act] * scale, f"kernel vs dequantize(): {err_full:.3g}"


def test_runs_triton():
    if DEVICE == "cpu":
        assert tk.interpreted(), "triton_kbit was imported before TRITON_INTERPRET=1 was set"


@pytest.mark.parametrize("bits", range(3, 9))
@pytest.mark.parametrize("dtype", ["nf", "int", "fp", "quantile", "dynamic"])
@pytest.mark.parametrize("m", [1, 3, 16, 33])
def test_bits_dtypes(bits, dtype, m):
    # K = 203: ragged against the block (64) and not a multiple of 8 (padding codes in the row)
    _check(_quantized(37, 203, bits, 64, dtype), m)


@pytest.mark.parametrize("block", [32, 64, 128, 256, 1024, 4096])
@pytest.mark.parametrize("m", [1, 3, 16, 33])
def test_block_sizes(block, m):
    _check(_quantized(40, 300, 4, block, seed=block), m)


# tiles smaller and larger than the absmax block, with and without split-K
CONFIGS = [(16, 32, 1, False), (16, 64, 2, True), (32, 128, 3, False), (16, 256, 1, True)]


@pytest.mark.parametrize("bits", [3, 4, 5, 8])
@pytest.mark.parametrize("block_n,block_k,split,gather", CONFIGS)
@pytest.mark.parametrize("m", [1, 5, 40])
def test_configs(bits, block_n, block_k, split, gather, m, monkeypatch):
    block_m = 1 if m == 1 else 16 if m <= 16 else 32
    cfg = tk.KernelConfig(block_m, block_n, block_k, split, gather=gather)
    _check(_quantized(50, 260, bits, 64, seed=bits), m, bias=True, config=cfg,
           monkeypatch=monkeypatch)


@pytest.mark.parametrize("m", [1, 3, 16, 33])
@pytest.mark.parametrize("act", [torch.float16, torch.bfloat16, torch.float32])
def test_outliers_bias_dtypes(m, act, monkeypatch):
    _check(_quantized(33, 150, 4, 32, outliers="top:5%"), m, act=act, bias=True,
           monkeypatch=monkeypatch)


@pytest.mark.parametrize("bits", [3, 4, 6])
@pytest.mark.parametrize("m", [1, 16, 33])
def test_zero_blocks(bits, m):
    _check(_quantized(24, 192, bits, 32, zero_blocks=True), m, bias=True)


def test_dq8_absmax():
    qw = quantize_weight(torch.randn(30, 256), QuantConfig(bits=4, block_size=64,
                                                           absmax_dtype="dq8"))
    _check(qw, 1)
    _check(qw, 20)


def test_dispatch_by_m():
    dev = torch.device(DEVICE)
    assert tk.pick_config(1, 4096, 4096, 4, 64, dev).block_m == 1
    assert tk.pick_config(16, 4096, 4096, 4, 64, dev).block_m == 16
    assert tk.pick_config(512, 4096, 4096, 4, 64, dev).split_k == 1


def test_rejects_bad_codebook():
    qw = _quantized(16, 64, 4, 32)
    qweight, absmax, _, _, _ = _args(qw)
    with pytest.raises(ValueError, match="codebook"):
        tk.kbit_linear_triton(torch.randn(1, 64, device=DEVICE), qweight, absmax,
                              qw.codebook[:3].to(DEVICE), None, None, None, 4, 32, 64)


def test_dequantize_packed_exact():
    for bits in range(3, 9):
        qw = _quantized(9, 77, bits, 32, dtype="quantile", outliers="top:3%")
        got = dequantize_packed(qw.qweight, qw.absmax.float(), pad_codebook(qw.codebook, bits),
                                bits, 32, 77)
        want = qw.dequantize()
        want[:, qw.outlier_idx] = 0.0
        assert torch.equal(got, want)


def test_custom_op_cpu():
    qw = _quantized(20, 96, 5, 32, outliers="top:4%")
    qweight, absmax, cb, idx, ow = (a.cpu() if a is not None else None for a in _args(qw, "cpu"))
    x = torch.randn(2, 3, 96)
    y = kbit_linear(x, qweight, absmax, cb, None, idx, ow, 5, 32, 96)
    assert y.shape == (2, 3, 20)
    torch.testing.assert_close(y, x @ qw.dequantize().t(), rtol=1e-4, atol=1e-4)
    torch.library.opcheck(torch.ops.kbitrt.kbit_linear.default,
                          (x.reshape(6, 96), qweight, absmax, cb, None, idx, ow, 5, 32, 96))


_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kbitrt.runtime.kernels import triton_kbit as tk

def sig(names, act, out, consts):
    s = {n: "i32" for n in names}
    s.update(x_ptr="*" + act, qw_ptr="*u8", absmax_ptr="*fp16", cb_ptr="*fp32", bias_ptr="*fp16",
             out_ptr="*" + out)
    s.update({k: "constexpr" for k in consts})
    return s

sizes = ["N", "K", "kp8", "n_blocks", "stride_qn", "stride_an"]
for bits, block, bk, split in [(3, 64, 32, 2), (4, 64, 512, 1), (7, 32, 128, 1)]:
    w = tk._SLICE_WIDTHS[bits] + (0, 0)
    c = dict(S0=w[0], S1=w[1], S2=w[2], B=block, HAS_BIAS=True, BLOCK_N=16, BLOCK_K=bk,
             SPLIT_K=split, GATHER=bits == 4)
    s = sig(sizes, "fp16", "fp32" if split > 1 else "fp16", c)
    triton.compile(ASTSource(tk._gemv_kernel, s, c), target=GPUTarget("cuda", 90, 32))
sizes = ["M", "N", "K", "kp8", "n_blocks", "stride_xm", "stride_qn", "stride_an", "stride_om"]
for bits, block, bm, bk, split, act in [(5, 64, 16, 128, 2, "bf16"), (6, 32, 64, 64, 1, "fp16")]:
    w = tk._SLICE_WIDTHS[bits] + (0, 0)
    c = dict(S0=w[0], S1=w[1], S2=w[2], B=block, HAS_BIAS=False, BLOCK_M=bm, BLOCK_N=64,
             BLOCK_K=bk, SPLIT_K=split, GROUP_M=8, DOT_PRECISION="tf32", DOT_F32=False,
             GATHER=bits == 5)
    s = sig(sizes, act, "fp32" if split > 1 else act, c)
    triton.compile(ASTSource(tk._dot_kernel, s, c), target=GPUTarget("cuda", 90, 32))
print("compiled")
"""


def test_compiles_for_sm90():
    """The interpreter is lenient; ptxas (shipped with triton) compiles for H100 without a GPU."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=300, cwd=root)
    if r.returncode and "ptxas" in r.stderr and "not found" in r.stderr.lower():
        pytest.skip("no ptxas in this triton install")
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]


# The word kernels (M <= 16, Kp % 64 == 0, blocks >= 64): K = 250 is ragged against 64 (x masked
# per element), K = 256 with blocks of 128 takes the unmasked path; split-K on 8 "SMs".
def _words_plan(m, qw, dtype):
    n, k = qw.shape
    return tk.plan_launch(m, n, k, qw.bits, qw.block_size, codebook_kind=tk.codebook_kind_of(dtype),
                          sms=8).kernel


@pytest.mark.parametrize("bits", range(3, 9))
@pytest.mark.parametrize("dtype", ["nf", "int", "fp", "quantile", "dynamic"])
@pytest.mark.parametrize("m", [1, 4])
def test_words_bits_dtypes(bits, dtype, m):
    qw = _quantized(24, 250, bits, 64, dtype, seed=bits)
    assert _words_plan(m, qw, dtype) in (tk.gemv_words_kernel, tk.dot_words_kernel)
    _check(qw, m)


@pytest.mark.parametrize("bits", [3, 4, 7, 8])
@pytest.mark.parametrize("dtype", ["nf", "int"])
@pytest.mark.parametrize("m", [1, 16])
def test_words_even_k(bits, dtype, m):
    _check(_quantized(40, 256, bits, 128, dtype, seed=3), m, bias=True)


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("act", [torch.float16, torch.bfloat16, torch.float32])
def test_words_outliers_bias_dtypes(m, act, monkeypatch):
    qw = _quantized(33, 192, 4, 64, outliers="top:5%")
    assert _words_plan(m, qw, "nf") in (tk.gemv_words_kernel, tk.dot_words_kernel)
    _check(qw, m, act=act, bias=True, monkeypatch=monkeypatch)


@pytest.mark.parametrize("bits", range(3, 9))
@pytest.mark.parametrize("dtype", ["nf", "int"])
def test_words_bf16_pairs(bits, dtype):
    """bf16 x with K % 64 == 0: the GEMV reads x two values per 32-bit load (every decoder)."""
    qw = _quantized(20, 256, bits, 64, dtype, seed=bits)
    assert _words_plan(1, qw, dtype) is tk.gemv_words_kernel
    _check(qw, 1, act=torch.bfloat16, bias=True)


def test_words_bf16_unaligned_x():
    """x at an address that is 2 mod 4 (a view one bf16 into a buffer) is copied to an aligned one
    before the 32-bit pair loads; the result matches the aligned x's."""
    qw = _quantized(20, 256, 7, 64, "nf", seed=7)
    qweight, absmax, cb, idx, ow = _args(qw)
    g = torch.Generator().manual_seed(2)
    buf = torch.randn(257, generator=g).to(torch.bfloat16).to(DEVICE)
    x = buf[1:].view(1, 256)
    assert x.data_ptr() % 4 == 2
    y = tk.kbit_linear_triton(x, qweight, absmax, cb, None, idx, ow, 7, 64, 256)
    ref = kbit_linear_torch(x.clone(), qweight, absmax, cb, None, idx, ow, 7, 64, 256)
    scale = ref.float().abs().max().item() + 1.0
    assert (y.float() - ref.float()).abs().max().item() <= TOL[torch.bfloat16] * scale


def test_words_zero_blocks():
    qw = _quantized(24, 256, 5, 64, zero_blocks=True)
    _check(qw, 1, bias=True)
    _check(qw, 9, bias=True)


def test_pad_codebook_affine():
    from kbitrt.format import dtypes
    cb = pad_codebook(dtypes.get("int").levels(4), 4)
    assert torch.allclose(cb[15], torch.tensor(8 / 7)) and torch.allclose(cb[14], torch.tensor(1.0))
    nf = pad_codebook(dtypes.get("nf").levels(4)[:-2], 4)
    assert nf[-1] == nf[-3]  # not equally spaced: the last entry repeats


def _ptx_emulate(asm: str, regs: dict) -> int:
    """The few PTX statements of words.pair7_asm (lop3.b32, mov.b64 {lo, hi}) run in Python."""
    import re

    val = dict(regs)

    def get(tok):
        tok = tok.strip()
        return int(tok, 0) if tok[0].isdigit() else val[tok]

    for stmt in asm.strip("{}").split(";"):
        stmt = stmt.strip()
        if not stmt or stmt.startswith(".reg"):
            continue
        op, rest = stmt.split(None, 1)
        if op == "lop3.b32":
            d, a, b, c, lut = (t.strip() for t in rest.split(","))
            a, b, c, lut = get(a), get(b), get(c), get(lut)
            out = 0
            for i in range(8):  # truth-table index: a -> 4, b -> 2, c -> 1 (0xF0, 0xCC, 0xAA)
                if lut >> i & 1:
                    out |= ((a if i & 4 else ~a) & (b if i & 2 else ~b) & (c if i & 1 else ~c))
            val[d] = out & 0xFFFFFFFF
        elif op == "mov.b64":
            d, lo, hi = re.match(r"(\S+),\s*\{(\S+),\s*(\S+)\}", rest).groups()
            val[d] = get(lo) | get(hi) << 32
        else:
            raise AssertionError(f"unexpected PTX {stmt!r}")
    return val["$0"]


def test_pair7_asm_matches_twin():
    """The compiled k = 7 GEMV forms the pair-table address in PTX (the interpreter cannot run
    it); emulated, it equals the twin's tab_addr | fields for random halves and table addresses."""
    from kbitrt.runtime.kernels import words
    asm = words.pair7_asm()
    masks = [((1 << (2 * w)) - 1) << d for w, d in words.pair7_fields()]
    assert [d for _, d in words.pair7_fields()] == [3, 11, 15]  # pair_table: 8-byte entries
    span = 1 << (7 * 2 + 3)  # the table's bytes; aligned_copy aligns it to its size
    g = torch.Generator().manual_seed(0)
    vals = torch.randint(0, 2**32, (5, 300), dtype=torch.int64, generator=g).tolist()
    for ta, tb, tc, lo, hi in zip(*vals):
        lo = lo // span * span
        got = _ptx_emulate(asm, {"$1": ta, "$2": tb, "$3": tc, "$4": lo, "$5": hi})
        want = (hi << 32 | lo) | (ta & masks[0]) | (tb & masks[1]) | (tc & masks[2])
        assert got == want


# Issue 23: blocks of 32 on the word kernels (two scales per group of 64 codes), and prefill
# (M > 16) on tensor cores on the word layout. kbit_linear_triton prepares decode tables for
# M <= 16 only; `_prefill` runs the prefill plan (`plan_launch(prefill_words=True)`) through
# `triton_kbit.launch` with the tables of `words.decode_choice`, as the launch path will.
@pytest.mark.parametrize("bits", range(3, 9))
@pytest.mark.parametrize("dtype", ["nf", "int"])
@pytest.mark.parametrize("m", [1, 5])
def test_words_block32(bits, dtype, m):
    qw = _quantized(20, 250 if bits % 2 else 256, bits, 32, dtype, seed=bits)
    assert _words_plan(m, qw, dtype) in (tk.gemv_words_kernel, tk.dot_words_kernel)
    _check(qw, m, bias=bits == 5)


def _prefill(x, qw, bias=None):
    """y of the word prefill kernel for x (M > 16, K), outliers added as the launch adds them."""
    from kbitrt.runtime.kernels import words
    m, k = x.shape
    n = qw.shape[0]
    qweight, absmax, cb, idx, ow = _args(qw)
    decode, table, base, step = words.decode_choice(cb, qw.bits)
    plan = tk.plan_launch(m, n, k, qw.bits, qw.block_size, act=tk._TL_NAMES[x.dtype],
                          codebook_kind="affine" if decode == 0 else "table", sms=8,
                          absmax=tk._TL_NAMES[absmax.dtype], has_bias=bias is not None,
                          prefill_words=True)
    assert plan.kernel is tk.dot_words_kernel and dict(plan.constexprs)["BLOCK_M"] >= 64
    assert plan.launch_options["enable_fp_fusion"] is True
    out = torch.empty((m, n), device=x.device, dtype=x.dtype).fill_(float("nan"))
    tensors = dict(x_ptr=x, qw_ptr=qweight.view(torch.int64), absmax_ptr=absmax, tab_ptr=table,
                   bias_ptr=bias if bias is not None else out, out_ptr=out)
    scalars = dict(cb_base=base, cb_step=step, tab_addr=table.data_ptr())
    tk.launch(plan, [tensors[name] if isinstance(v, str) else scalars.get(name, v)
                     for name, v in plan.args])
    if idx is not None and idx.numel():
        out = out.addmm_(x.index_select(1, idx), ow.to(x.dtype).t())
    return out


def _check_prefill(qw, m, act=torch.float16, bias=False, seed=1):
    n, k = qw.shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(act).to(DEVICE)
    b = torch.randn(n, generator=g).to(act).to(DEVICE) if bias else None
    y = _prefill(x, qw, b)
    qweight, absmax, cb, idx, ow = _args(qw)
    ref = kbit_linear_torch(x, qweight, absmax, cb, b, idx, ow, qw.bits, qw.block_size, k)
    assert y.shape == (m, n) and y.dtype == act and not torch.isnan(y).any()
    scale = ref.float().abs().max().item() + 1.0
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= TOL[act] * scale, f"prefill vs torch twin: max err {err:.3g}"


@pytest.mark.parametrize("bits", range(3, 9))
@pytest.mark.parametrize("dtype", ["nf", "int"])
def test_prefill_words_bits(bits, dtype):
    # K = 250: ragged against 64 (x masked past K); M = 70: a partial M tile
    _check_prefill(_quantized(24, 250, bits, 64, dtype, seed=bits), 70)


@pytest.mark.parametrize("block,m", [(32, 65), (1024, 130)])
def test_prefill_words_blocks(block, m):
    _check_prefill(_quantized(20, 256, 4, block, "int", seed=block), m, bias=True)
    _check_prefill(_quantized(20, 192, 5, block, "nf", seed=block), m)


@pytest.mark.parametrize("act", [torch.bfloat16, torch.float32])
def test_prefill_words_act_outliers(act):
    _check_prefill(_quantized(33, 192, 4, 64, outliers="top:5%"), 67, act=act, bias=True)


def test_prefill_words_zero_blocks():
    _check_prefill(_quantized(24, 256, 6, 32, zero_blocks=True), 80, bias=True)


def test_words_plans_state_fusion_and_never_split():
    """Every plan states FP fusion; the word kernels' default launches at the Llama shapes on
    132 SMs take no split-K (no memset and cast launches) and give >= 64 programs."""
    shapes = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (8192, 8192),
              (28672, 8192), (8192, 28672), (1024, 8192)]
    for n, k in shapes:
        for m in (1, 16, 512):
            for bits in range(3, 9):
                p = tk.plan_launch(m, n, k, bits, 64, sms=132, prefill_words=True)
                assert p.launch_options == {"enable_fp_fusion": True}
                assert p.kernel in (tk.gemv_words_kernel, tk.dot_words_kernel)
                assert p.split == 1 and p.extra_launches == 0, (n, k, m, bits, p.config_str)
                if n >= 4096:
                    assert p.grid[0] * p.grid[1] * (p.grid[2] if len(p.grid) > 2 else 1) >= 32
    legacy = tk.plan_launch(1, 4096, 4100, 4, 64, sms=132)
    assert legacy.launch_options == {"enable_fp_fusion": True}


def test_plan_without_words():
    """words=False (no decode tables, e.g. a weight not 8-byte aligned) plans only byte kernels."""
    for m in (1, 8, 64):
        p = tk.plan_launch(m, 4096, 4096, 4, 64, sms=132, words=False, prefill_words=True)
        assert p.kernel in (tk._gemv_kernel, tk._dot_kernel)
        assert p.launch_options == {"enable_fp_fusion": True}
