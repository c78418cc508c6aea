"""Triton fused-dequant kernels for y = x W^T (+ bias), W read as packed k-bit codes.

Twin of `reference.kbit_linear_torch` (same signature). W is never materialised: each program
loads a (BLOCK_N, BLOCK_K) tile of packed bytes, unpacks its bit slices in registers, looks the
codes up in the codebook (2^k fp32 values, an L1-resident table) and applies the block absmax.

The legacy byte kernels below serve what the word kernels (gemv_words, dot_words; `plan_launch`
picks) do not: blocks of 16 and rows whose padded length is not a multiple of 64. Three paths,
chosen by M (the rows of x):
- GEMV (M = 1): elementwise product and row reduction in fp32, no tensor cores; split-K when
  there are too few row tiles to fill the GPU.
- small batch (M = 2..16): tl.dot with BLOCK_M = 16 (the weight is read once for all rows), split-K.
- prefill (M > 16): the same dot kernel tiled over M, BLOCK_M 32..128, no split-K.

When BLOCK_K <= block_size a tile lies inside one absmax block per row, so the scale multiplies
the reduced partial sum (one multiply per row, not per weight); otherwise the tile is reshaped to
(BLOCK_N, BLOCK_K / B, B) and each block's partial sum is scaled. Split-K programs add fp32
partials atomically into a zeroed workspace (bias added by split 0), then one cast to x.dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from kbitrt.format import packing
from kbitrt.runtime.kernels.dot_words import dot_words_kernel
from kbitrt.runtime.kernels.gemv_words import gemv_words_kernel
from kbitrt.runtime.kernels.words import (AFFINE, decode_choice, decoder_for, gemv_words_ok,
                                          store_out)

_SLICE_WIDTHS = {b: tuple(w for w, _, _ in packing.slices(b)) for b in range(3, 9)}


@triton.jit
def _slice_codes(qw_row_ptr, k0, kp8, mask_n, OFF: tl.constexpr, S: tl.constexpr,  # sass:weights-fn
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 (BLOCK_N, BLOCK_K): the S-bit slice of codes k0..k0+BLOCK_K of each row.

    The slice starts OFF*Kp/8 bytes into the row and holds 8/S codes per byte, lowest code in the
    lowest bits, so BLOCK_K*S/8 contiguous bytes cover the tile.
    """
    NBYTES: tl.constexpr = BLOCK_K * S // 8
    # k0 is a multiple of BLOCK_K, so the hint holds; it lets the byte loads vectorize
    offs_b = k0 * S // 8 + tl.arange(0, NBYTES)
    offs_b = tl.max_contiguous(tl.multiple_of(offs_b, NBYTES), NBYTES)
    mask = mask_n[:, None] & (offs_b[None, :] < kp8 * S)  # the slice's own bytes only
    b = tl.load(qw_row_ptr + OFF * kp8 + offs_b[None, :],  # sass:weights
                mask=mask, other=0).to(tl.int32)
    if S == 8:
        return b
    PPB: tl.constexpr = 8 // S
    shifts = tl.arange(0, PPB) * S
    v = (b[:, :, None] >> shifts[None, None, :]) & ((1 << S) - 1)  # (BLOCK_N, NBYTES, PPB)
    return tl.reshape(v, (BLOCK_N, BLOCK_K))


@triton.jit
def _dequant_tile(qw_ptr, cb_ptr, offs_n, mask_n, k0, kp8, stride_qn,
                  S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GATHER: tl.constexpr):
    """fp32 (BLOCK_N, BLOCK_K) codebook values (not yet scaled) of the weight tile.

    GATHER: look the codes up in a register copy of the codebook (tl.gather) instead of loading
    from global memory (L1); which is faster is a per-GPU question for benchmarks/kernel_bench.py.
    """
    row = qw_ptr + offs_n[:, None].to(tl.int64) * stride_qn
    code = _slice_codes(row, k0, kp8, mask_n, 0, S0, BLOCK_N, BLOCK_K)
    if S1 > 0:
        code |= _slice_codes(row, k0, kp8, mask_n, S0, S1, BLOCK_N, BLOCK_K) << S0
    if S2 > 0:
        code |= _slice_codes(row, k0, kp8, mask_n, S0 + S1, S2, BLOCK_N, BLOCK_K) << (S0 + S1)
    if GATHER:
        cb = tl.load(cb_ptr + tl.arange(0, 1 << (S0 + S1 + S2)))
        flat = tl.gather(cb, tl.reshape(code, (BLOCK_N * BLOCK_K,)), 0)
        return tl.reshape(flat, (BLOCK_N, BLOCK_K))
    return tl.load(cb_ptr + code)  # padded to 2^k entries: every code is a valid index


@triton.jit
def _gemv_kernel(
    # pointers
    x_ptr, qw_ptr, absmax_ptr, cb_ptr, bias_ptr, out_ptr,
    # sizes
    N, K, kp8, n_blocks,
    # strides (the last dimension of every tensor is contiguous)
    stride_qn, stride_an,
    # meta-parameters
    S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, B: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    GATHER: tl.constexpr,
):
    """x (1, K), W packed (N, Kp*k/8), absmax (N, n_blocks), codebook (2^k,) -> out (1, N)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    a_row = absmax_ptr + offs_n.to(tl.int64) * stride_an
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
        k0 = t * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        w = _dequant_tile(qw_ptr, cb_ptr, offs_n, mask_n, k0, kp8, stride_qn,
                          S0, S1, S2, BLOCK_N, BLOCK_K, GATHER)
        if BLOCK_K <= B:
            s = tl.load(a_row + k0 // B, mask=mask_n, other=0.0).to(tl.float32)
            acc += tl.sum(w * x[None, :], axis=1) * s
        else:
            NBT: tl.constexpr = BLOCK_K // B
            offs_blk = k0 // B + tl.arange(0, NBT)
            s = tl.load(a_row[:, None] + offs_blk[None, :],
                        mask=mask_n[:, None] & (offs_blk[None, :] < n_blocks), other=0.0)
            part = tl.sum(tl.reshape(w * x[None, :], (BLOCK_N, NBT, B)), axis=2)
            acc += tl.sum(part * s.to(tl.float32), axis=1)
    store_out(out_ptr, acc[None, :], tl.arange(0, 1), offs_n, tl.arange(0, 1) < 1, mask_n, 0,
              bias_ptr, pid_k, HAS_BIAS, SPLIT_K > 1)


@triton.jit
def _dot_kernel(
    # pointers
    x_ptr, qw_ptr, absmax_ptr, cb_ptr, bias_ptr, out_ptr,
    # sizes
    M, N, K, kp8, n_blocks,
    # strides
    stride_xm, stride_qn, stride_an, stride_om,
    # meta-parameters
    S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, B: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr, GATHER: tl.constexpr,
):
    """x (M, K) -> out (M, N): a dequantized (BLOCK_N, BLOCK_K) tile feeds tl.dot per step."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # grouped ordering: GROUP_M row tiles share a weight column tile while it sits in L2
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_row = absmax_ptr + offs_n.to(tl.int64) * stride_an
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
        k0 = t * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & (offs_k[None, :] < K),
                    other=0.0)
        if DOT_F32:
            x = x.to(tl.float32)
        w = _dequant_tile(qw_ptr, cb_ptr, offs_n, mask_n, k0, kp8, stride_qn,
                          S0, S1, S2, BLOCK_N, BLOCK_K, GATHER)
        if BLOCK_K <= B:
            s = tl.load(a_row + k0 // B, mask=mask_n, other=0.0).to(tl.float32)
            part = tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=DOT_PRECISION)
            acc += part * s[None, :]
        else:
            NBT: tl.constexpr = BLOCK_K // B
            offs_blk = k0 // B + tl.arange(0, NBT)
            s = tl.load(a_row[:, None] + offs_blk[None, :],
                        mask=mask_n[:, None] & (offs_blk[None, :] < n_blocks), other=0.0)
            w = tl.reshape(tl.reshape(w, (BLOCK_N, NBT, B)) * s.to(tl.float32)[:, :, None],
                           (BLOCK_N, BLOCK_K))
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=DOT_PRECISION)
    store_out(out_ptr, acc, offs_m, offs_n, mask_m, mask_n, stride_om, bias_ptr, pid_k,
              HAS_BIAS, SPLIT_K > 1)


@dataclass(frozen=True)
class KernelConfig:
    """Launch shape of one call; `pick_config` chooses it, benchmarks/kernel_bench.py sweeps it."""

    block_m: int  # 1 selects the GEMV kernel
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2
    group_m: int = 8
    gather: bool = False  # codebook lookup with tl.gather instead of a global (L1) load


_SM_COUNT: dict[int, int] = {}
# (M bucket, N, K, bits, block_size) -> KernelConfig, e.g. filled from a benchmark sweep
CONFIG_OVERRIDES: dict[tuple, KernelConfig] = {}


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":  # pragma: no cover - needs a GPU
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in _SM_COUNT:
            _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        return _SM_COUNT[idx]
    # the interpreter runs a grid's programs one after another in Python: plan for one SM, so a
    # tiny layer is one or two programs (tests that exercise split-K pass sms or a config)
    return 1


def m_bucket(m: int) -> int:
    return 1 if m == 1 else 16 if m <= 16 else 17


def _split_k(n_tiles: int, k_tiles: int, sms: int) -> int:
    """Split K (legacy kernels) only when the row tiles fill less than one wave: a split costs a
    memset and a cast (two more launches), which at ~3 us per decode GEMV is not free. Then aim
    at ~2 waves."""
    if n_tiles >= sms:
        return 1
    want = -(-2 * sms // max(n_tiles, 1))
    return max(1, min(want, k_tiles, 16))


def _words_tile(n: int, n_groups: int, pairs: int, sms: int, min_rows: int,
                max_rows: int = 256) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_G) of a word kernel with `pairs` (row, group) pairs per program: the fewest,
    longest programs that still give about one program per SM (>= 0.9 x SMs), so each program's
    prologue and epilogue spread over as many loop trips as the grid allows and no split-K (two
    more launches) is needed; where N is too small for that, the most programs (the grid's fill
    decides the bandwidth a decode GEMV reaches, docs/kernels.md). Tiles whose last trip would
    run more than 6% clamped groups past K (work without weights) are avoided where any other
    tile fits."""
    g_cap = triton.next_power_of_2(max(n_groups, 1))
    tiles = [(bn, pairs // bn) for bn in (256, 128, 64, 32, 16, 8)
             if min_rows <= bn <= min(pairs, max_rows) and pairs // bn <= g_cap]
    if not tiles:
        rows = max(min_rows, min(max_rows, pairs))  # K of a few groups: the most rows
        return rows, max(1, pairs // rows)
    tight = [t for t in tiles if -(-n_groups // t[1]) * t[1] <= 1.06 * n_groups] or tiles
    for bn, bg in tight:
        if triton.cdiv(n, bn) >= 0.9 * sms:
            return bn, bg
    return tight[-1]


def pick_config(m: int, n: int, k: int, bits: int, block_size: int,
                device: torch.device) -> KernelConfig:
    """A heuristic launch shape (untuned: GPU tuning lives in benchmarks/kernel_bench.py)."""
    return _pick(m, n, k, bits, block_size, _sm_count(device))


def _pick(m: int, n: int, k: int, bits: int, block_size: int, sms: int,
          prefill_words: bool = False, words: bool = True) -> KernelConfig:
    key = (m_bucket(m), n, k, bits, block_size)
    if key in CONFIG_OVERRIDES:
        return CONFIG_OVERRIDES[key]
    kpow = max(32, triton.next_power_of_2(k))
    n_groups = packing.padded_len(k) // 64
    words = words and gemv_words_ok(k, block_size)
    if m == 1 and words:
        # 4 warps; 8 (row, group) pairs per thread (4 at k >= 6, where registers run out)
        bn, bg = _words_tile(n, n_groups, 1024 if bits <= 5 else 512, sms, 8)
        return KernelConfig(1, bn, 64 * bg, 1, num_warps=4, num_stages=1)
    if m == 1:
        block_n, block_k = 16, min(512, kpow)
        split = _split_k(triton.cdiv(n, block_n), triton.cdiv(k, block_k), sms)
        return KernelConfig(1, block_n, block_k, split, num_warps=4, num_stages=2)
    if m <= 16 and words:
        # 2 (row, group) pairs per thread (4 spill registers), >= 64 rows (fewer rows re-read x
        # from smem per weight); BLOCK_K >= 128 keeps the tile's smem stores 128 bits wide (with BLOCK_K = 64
        # Triton stores the dot operand 16 bits at a time)
        bn, bg = _words_tile(n, n_groups, 256, sms, 64, 128)
        return KernelConfig(16, bn, 64 * bg, 1, num_warps=4, num_stages=1)
    if m <= 16:
        block_n, block_k = 64, min(128, kpow)
        split = _split_k(triton.cdiv(n, block_n), triton.cdiv(k, block_k), sms)
        return KernelConfig(16, block_n, block_k, split, num_warps=4, num_stages=3)
    if prefill_words and words:
        # tensor cores on the word layout: each weight decoded once per 64 rows of x; 8 warps
        # (1 (row, group) pair per thread: with 4 warps the 64 x 128 fp32 accumulator and two
        # pairs spilled at 4-bit nf), 4 at k = 8 (8 warps spent 8.1 per weight on its byte table)
        return KernelConfig(64, 128, 128, 1, num_warps=4 if bits == 8 else 8, num_stages=1)
    block_m = 64 if m <= 64 else 128
    return KernelConfig(block_m, 128, min(64, kpow), 1, num_warps=8 if block_m == 128 else 4,
                        num_stages=3)


_TL_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def codebook_kind_of(dtype: str) -> str:
    """'affine' for data types whose codebook is equally spaced (int), else 'table'."""
    return "affine" if dtype == "int" else "table"


@dataclass(frozen=True)
class LaunchPlan:
    """One launch: kernel, grid, constexprs and the argument list (name -> pointer element type
    as a Triton type string, or an int value). `plan_launch` builds it; benchmarks/sass_budget.py
    compiles exactly it."""

    kernel: object
    grid: tuple
    args: tuple
    constexprs: tuple
    num_warps: int
    num_stages: int
    weights_per_trip: int  # weights one program handles per trip of its K loop
    bits: int
    block_size: int
    absmax_bytes: int
    config_str: str
    split: int = 1  # programs that share one tile's K loop (split-K)
    k_trips: int = 1  # trips of the K loop over the whole K (split programs share them)
    m_tiles: int = 1  # M tiles (programs along M; the weight is decoded once per M tile)
    extra_launches: int = 0  # launches besides the kernel (split-K: memset + cast)
    # compile/launch options stated, not left to Triton's defaults (the counts depend on them)
    launch_options: dict = field(default_factory=lambda: dict(LAUNCH_OPTIONS))


# Floating-point contraction (FFMA) is stated: Triton 3.9 fuses by default and announces the
# default turns off in 3.10; every count in docs/kernels.md assumes it on.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def launch(plan: LaunchPlan, call_args: list) -> None:
    """Run `plan` with its argument values (in `plan.args` order) and its stated options."""
    plan.kernel[plan.grid](*call_args, **dict(plan.constexprs), num_warps=plan.num_warps,
                           num_stages=plan.num_stages, **plan.launch_options)


def plan_launch(m: int, n: int, k: int, bits: int, block_size: int, act: str = "fp16",
                codebook_kind: str = "table", sms: int = 132, absmax: str = "fp16",
                has_bias: bool = False, config: KernelConfig | None = None,
                prefill_words: bool = False, words: bool = True) -> LaunchPlan:
    """The launch of one call. Word kernels (packed weight as int64 words, decode tables from
    `words.decode_choice`) where `gemv_words_ok`: M = 1, M = 2..16 and, with `prefill_words`
    (the caller prepared the tables for M > 16 too), prefill on tensor cores. `words=False`
    (a weight not 8-byte aligned, no tables) plans the legacy byte kernels only."""
    kp = packing.padded_len(k)
    nb = -(-k // block_size)
    cfg = config or _pick(m, n, k, bits, block_size, sms, prefill_words, words)
    if words and cfg.block_k % 64 == 0 and gemv_words_ok(k, block_size):
        if (cfg.block_m == 1 or (cfg.block_m == 16 and m <= 16)
                or (prefill_words and m > 16 and cfg.block_m >= 32)):
            return _plan_words(1 if cfg.block_m == 1 else m, n, k, bits, block_size, act,
                               codebook_kind, absmax, has_bias, cfg)
    widths = _SLICE_WIDTHS[bits] + (0, 0)
    split = cfg.split_k
    out = "fp32" if split > 1 else act
    common = dict(S0=widths[0], S1=widths[1], S2=widths[2], B=block_size, HAS_BIAS=has_bias,
                  BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split, GATHER=cfg.gather)
    ptrs = (("x_ptr", act), ("qw_ptr", "u8"), ("absmax_ptr", absmax), ("cb_ptr", "fp32"),
            ("bias_ptr", act if has_bias else out), ("out_ptr", out))
    cstr = f"bm{cfg.block_m} bn{cfg.block_n} bk{cfg.block_k} sk{split} w{cfg.num_warps}"
    row = kp * bits // 8
    if cfg.block_m == 1:
        if m != 1:
            raise ValueError("the GEMV config (block_m=1) needs M = 1")
        grid = (triton.cdiv(n, cfg.block_n), split)
        ints = (("N", n), ("K", k), ("kp8", kp // 8), ("n_blocks", nb), ("stride_qn", row),
                ("stride_an", nb))
        return LaunchPlan(_gemv_kernel, grid, ptrs + ints, tuple(common.items()), cfg.num_warps,
                          cfg.num_stages, cfg.block_n * cfg.block_k, bits, block_size,
                          4 if absmax == "fp32" else 2, cstr, split, triton.cdiv(k, cfg.block_k),
                          1, 2 if split > 1 else 0)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
    precision = "ieee" if act == "fp32" else "tf32"
    dot_f32 = act == "bf16" and interpreted()
    common.update(BLOCK_M=cfg.block_m, GROUP_M=cfg.group_m,
                  DOT_PRECISION="ieee" if dot_f32 else precision, DOT_F32=dot_f32)
    ints = (("M", m), ("N", n), ("K", k), ("kp8", kp // 8), ("n_blocks", nb),
            ("stride_xm", k), ("stride_qn", row), ("stride_an", nb), ("stride_om", n))
    return LaunchPlan(_dot_kernel, grid, ptrs + ints, tuple(common.items()), cfg.num_warps,
                      cfg.num_stages, cfg.block_n * cfg.block_k, bits, block_size,
                      4 if absmax == "fp32" else 2, cstr, split, triton.cdiv(k, cfg.block_k),
                      triton.cdiv(m, cfg.block_m), 2 if split > 1 else 0)


_ADDR = 1 << 40  # placeholder of the table address in a plan (the launch passes the real one)


def _plan_words(m, n, k, bits, block_size, act, codebook_kind, absmax, has_bias,
                cfg) -> LaunchPlan:
    """The plan of a word kernel: gemv_words_kernel for M = 1, else dot_words_kernel."""
    kp = packing.padded_len(k)
    widths = _SLICE_WIDTHS[bits] + (0, 0)
    decode = decoder_for(bits, codebook_kind == "affine")
    split = cfg.split_k
    out = "fp32" if split > 1 else act
    block_g = cfg.block_k // 64
    c = dict(S0=widths[0], S1=widths[1], S2=widths[2], B=block_size, DECODE=decode,
             HAS_BIAS=has_bias)
    ptrs = (("x_ptr", act), ("qw_ptr", "i64"), ("absmax_ptr", absmax),
            ("tab_ptr", "i64" if decode in (1, 3) else "fp32"),
            ("bias_ptr", act if has_bias else out), ("out_ptr", out))
    nb = -(-k // block_size)
    tail = (("cb_base", 0.0), ("cb_step", 0.0), ("dmask", ((1 << bits) - 1) << (23 - bits)),
            ("tab_addr", _ADDR), ("split_k", split))
    if m == 1:
        kernel, name = gemv_words_kernel, "words"
        c.update(BLOCK_N=cfg.block_n, BLOCK_G=block_g, ATOMIC=split > 1, EVEN_K=k % 64 == 0,
                 ASM=not interpreted())
        ints = (("N", n), ("K", k), ("n_groups", kp // 64), ("stride_qn", kp * bits // 64),
                ("stride_an", nb))
    else:
        kernel, name = dot_words_kernel, "dotwords"
        dot_f32 = act == "bf16" and interpreted()
        c.update(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_G=block_g, ATOMIC=split > 1,
                 DOT_F32=dot_f32, DOT_PRECISION="ieee" if dot_f32 or act == "fp32" else "tf32")
        ints = (("M", m), ("N", n), ("K", k), ("n_groups", kp // 64), ("stride_xm", k),
                ("stride_qn", kp * bits // 64), ("stride_an", nb), ("stride_om", n))
    m_tiles = 1 if m == 1 else triton.cdiv(m, cfg.block_m)
    n_tiles = triton.cdiv(n, cfg.block_n)
    grid = (n_tiles, split) if m == 1 else (m_tiles, n_tiles, split)
    bm = "" if m == 1 else f" bm{cfg.block_m}"
    return LaunchPlan(kernel, grid, ptrs + ints + tail,
                      tuple(c.items()), cfg.num_warps, cfg.num_stages, cfg.block_n * cfg.block_k,
                      bits, block_size, 4 if absmax == "fp32" else 2,
                      f"{name} d{decode}{bm} bn{cfg.block_n} bg{block_g} sk{split} "
                      f"w{cfg.num_warps}", split, triton.cdiv(kp // 64, block_g), m_tiles,
                      2 if split > 1 else 0)


def kbit_linear_triton(x: torch.Tensor, qweight: torch.Tensor, absmax: torch.Tensor,
                       codebook: torch.Tensor, bias: torch.Tensor | None,
                       outlier_idx: torch.Tensor | None, outlier_weight: torch.Tensor | None,
                       bits: int, block_size: int, in_features: int,
                       config: KernelConfig | None = None) -> torch.Tensor:
    """x (M, K) fp16/bf16/fp32 -> (M, N) in x.dtype with fp32 accumulation.

    qweight uint8 (N, Kp*bits/8), absmax fp16/fp32 (N, ceil(K/block_size)), codebook fp32 padded
    to 2^bits (`reference.pad_codebook`), bias (N,) or None, outliers as in QuantizedWeight.
    """
    m, k = x.shape
    n = qweight.shape[0]
    kp = packing.padded_len(k)
    if k != in_features or qweight.shape[1] != kp * bits // 8:
        raise ValueError(f"x has {k} features and qweight rows {qweight.shape[1]} bytes; "
                         f"expected K={in_features}, {kp * bits // 8} bytes at {bits} bits")
    if codebook.numel() != 1 << bits or codebook.dtype != torch.float32:
        raise ValueError("codebook must be fp32 with 2^bits entries (use pad_codebook)")
    if block_size & (block_size - 1) or not 16 <= block_size <= 4096:
        raise ValueError(f"block_size {block_size} must be a power of two in 16..4096")
    x = x.contiguous()
    if x.data_ptr() % 4:  # the word GEMV reads bf16 x in 32-bit pairs (words.x_pair)
        x = x.clone()
    qweight, absmax = qweight.contiguous(), absmax.contiguous()
    kind, table, scalars = "table", codebook, {}
    words = gemv_words_ok(k, block_size) and qweight.data_ptr() % 8 == 0
    if words:  # the word kernels (every M): 64-bit loads and the codebook's decode tables
        decode, table, base, step = decode_choice(codebook, bits)
        kind = "affine" if decode == AFFINE.value else "table"
        scalars = dict(cb_base=base, cb_step=step, tab_addr=table.data_ptr())
        qweight = qweight.view(torch.int64)
    plan = plan_launch(m, n, k, bits, block_size, act=_TL_NAMES[x.dtype],
                       codebook_kind=kind, sms=_sm_count(x.device),
                       absmax=_TL_NAMES[absmax.dtype], has_bias=bias is not None, config=config,
                       prefill_words=words, words=words)
    if plan.kernel not in (gemv_words_kernel, dot_words_kernel) and qweight.dtype != torch.uint8:
        qweight = qweight.view(torch.uint8)
    c = dict(plan.constexprs)
    split = c["SPLIT_K"] if "SPLIT_K" in c else dict(plan.args)["split_k"]
    out = (torch.zeros((m, n), device=x.device, dtype=torch.float32) if split > 1
           else torch.empty((m, n), device=x.device, dtype=x.dtype))
    tensors = dict(x_ptr=x, qw_ptr=qweight, absmax_ptr=absmax, cb_ptr=codebook, tab_ptr=table,
                   bias_ptr=bias if bias is not None else out, out_ptr=out)
    call = [tensors[name] if isinstance(v, str) else scalars.get(name, v)
            for name, v in plan.args]
    launch(plan, call)
    if split > 1:
        out = out.to(x.dtype)
    if outlier_idx is not None and outlier_idx.numel():
        out = out.addmm_(x.index_select(1, outlier_idx), outlier_weight.to(x.dtype).t())
    return out


def interpreted() -> bool:
    """True when these kernels run under TRITON_INTERPRET=1 (decided when this module loaded)."""
    return type(_gemv_kernel).__name__ == "InterpretedFunction"

