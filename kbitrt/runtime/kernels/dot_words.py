"""The M = 2..16 kernel on 64-bit words: one dequantized weight tile feeds tl.dot for all rows.

Same loads and decoders as the M = 1 word GEMV (words.py, gemv_words.py). Each thread decodes the
64 codes of its (row, group) pairs in registers (the block scale multiplies the dot's result when
the tile lies inside one block per row, BLOCK_K <= B, else each weight), casts to the activation
dtype and assembles the [BLOCK_N, 64 * BLOCK_G] tile with a tree
of `tl.join`s over the code index (register renaming, no data movement); tl.dot then reads it
through shared memory once. The decode is shared by all M rows of x.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kbitrt.runtime.kernels.words import (AFFINE, BYTE, PAIR, bit_field, in_register, load_group,
                                          one_bits, store_out)


@triton.jit
def _leaf(a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, c0, tab_ptr, tab_addr, s, alpha, beta, dmask,
          s2, alpha2, beta2,
          U: tl.constexpr, J: tl.constexpr, S0: tl.constexpr, S1: tl.constexpr,
          S2: tl.constexpr, DECODE: tl.constexpr, W_DTYPE: tl.constexpr, HALF: tl.constexpr):
    """Scaled weight of code U of each (row, group) pair (J: which code of a pair / quad unit).
    HALF (blocks of 32): codes 32..63 take the second block's s2, alpha2, beta2."""
    KB: tl.constexpr = S0 + S1 + S2
    if HALF and U >= 32:
        s = s2
        alpha = alpha2
        beta = beta2
    if DECODE == AFFINE:  # arithmetic: f = 1 + c / 2^KB, w = f * alpha + beta
        f = bit_field(a0, a1, a2, a3, a4, a5, a6, a7, S0, U, 1, 23 - KB, dmask)
        v = (f | one_bits(dmask)).to(tl.float32, bitcast=True) * alpha + beta
    elif DECODE == BYTE:  # byte table
        idx = bit_field(a0, a1, a2, a3, a4, a5, a6, a7, S0, U, 1, 0)
        v = tl.load(tab_ptr.to(tl.pointer_type(tl.float32), bitcast=True) + idx) * s
    elif DECODE == PAIR:  # pair table: the unit of code U is the pair U // 2
        P: tl.constexpr = U - U % 2
        idx = bit_field(a0, a1, a2, a3, a4, a5, a6, a7, S0, P, 2, 3)
        if S1 > 0:
            idx |= bit_field(b0, b1, 0, 0, 0, 0, 0, 0, S1, P, 2, 2 * S0 + 3)
        if S2 > 0:
            idx |= bit_field(c0, 0, 0, 0, 0, 0, 0, 0, S2, P, 2, 2 * (S0 + S1) + 3)
        pair = tl.load((tab_addr | idx.to(tl.int64)).to(tl.pointer_type(tl.int64)))
        if U % 2 == 1:
            pair = pair >> 32
        v = pair.to(tl.int32).to(tl.float32, bitcast=True) * s
    else:  # quad table (k = 3)
        Q: tl.constexpr = U - U % 4
        idx = bit_field(a0, a1, a2, a3, a4, a5, a6, a7, S0, Q, 4, 4)
        idx |= bit_field(b0, b1, 0, 0, 0, 0, 0, 0, S1, Q, 4, 4 * S0 + 4)
        q = tl.load((tab_addr | idx.to(tl.int64)).to(tl.pointer_type(tl.int64)) + (U % 4) // 2)
        if U % 2 == 1:
            q = q >> 32
        v = q.to(tl.int32).to(tl.float32, bitcast=True) * s
    return v.to(W_DTYPE)


@triton.jit
def _tree(a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, c0, tab_ptr, tab_addr, s, alpha, beta, dmask,
          s2, alpha2, beta2,
          LO: tl.constexpr, STRIDE: tl.constexpr, CNT: tl.constexpr, S0: tl.constexpr,
          S1: tl.constexpr, S2: tl.constexpr, DECODE: tl.constexpr, W_DTYPE: tl.constexpr,
          HALF: tl.constexpr):
    """Codes LO, LO + STRIDE, .. (CNT of them) joined so that the flattened trailing dims run
    over them in order (each join appends the lowest remaining bit of the code index last)."""
    if CNT == 1:
        return _leaf(a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, c0, tab_ptr, tab_addr, s, alpha, beta,
                     dmask, s2, alpha2, beta2, LO, 0, S0, S1, S2, DECODE, W_DTYPE, HALF)
    else:
        lo = _tree(a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, c0, tab_ptr, tab_addr, s, alpha, beta,
                   dmask, s2, alpha2, beta2, LO, 2 * STRIDE, CNT // 2, S0, S1, S2, DECODE,
                   W_DTYPE, HALF)
        hi = _tree(a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, c0, tab_ptr, tab_addr, s, alpha, beta,
                   dmask, s2, alpha2, beta2, LO + STRIDE, 2 * STRIDE, CNT // 2, S0, S1, S2,
                   DECODE, W_DTYPE, HALF)
        return tl.join(lo, hi)


@triton.jit
def dot_words_kernel(
    x_ptr, qw_ptr, absmax_ptr, tab_ptr, bias_ptr, out_ptr,
    M, N, K, n_groups, stride_xm, stride_qn, stride_an, stride_om, cb_base, cb_step, dmask,
    tab_addr, split_k,
    S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, B: tl.constexpr,
    DECODE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr, ATOMIC: tl.constexpr, DOT_F32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """x (M, K) -> out (M, N); qw_ptr: the packed weight as int64 words. Programs: axis 0 the
    M tiles of BLOCK_M rows (fastest, so the M tiles of one weight tile run together and share
    its reads in L2), axis 1 the BLOCK_N row tiles of W, axis 2 the K splits; each program
    decodes its weight tile once for its BLOCK_M rows of x."""
    KB: tl.constexpr = S0 + S1 + S2
    BK: tl.constexpr = 64 * BLOCK_G
    # affine: the per-weight FMA stays; prefill (BLOCK_M > 16): scaling its 64-row result per
    # trip would cost more than the per-weight multiply
    SCALE_AFTER: tl.constexpr = B >= BK and DECODE != AFFINE and BLOCK_M <= 16
    W_DTYPE: tl.constexpr = tl.float32 if DOT_F32 else x_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    HALF: tl.constexpr = B == 32  # two blocks per group of 64 codes
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    # unmasked weight loads (no zeroing of their registers): rows past N and groups past the last
    # read the last one; x is 0 past K and rows past N are not stored
    rows = qw_ptr + tl.minimum(offs_n, N - 1)[:, None].to(tl.int64) * stride_qn
    a_rows = absmax_ptr + offs_n[:, None].to(tl.int64) * stride_an
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    tab = in_register(tab_addr, dmask)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(pid_k, tl.cdiv(n_groups, BLOCK_G), split_k):
        g = t * BLOCK_G + tl.arange(0, BLOCK_G)
        mask = mask_n[:, None] & (g < n_groups)[None, :]
        a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, c0 = load_group(rows, g, n_groups, S0, S1, S2)
        if SCALE_AFTER:  # the tile lies in one block per row: scale the dot's result, per column
            s = 1.0
            alpha = cb_step * (1 << KB)
            beta = cb_base - cb_step * (1 << KB)
        else:  # past the last group s = 0 zeroes the tile
            s = tl.load(a_rows + (g * 64 // B)[None, :], mask=mask, other=0.0).to(tl.float32)
            alpha = s * (cb_step * (1 << KB))
            beta = s * (cb_base - cb_step * (1 << KB))
        if HALF:  # Kp % 64 == 0, so every group's second block exists
            s2 = tl.load(a_rows + (g * 2 + 1)[None, :], mask=mask, other=0.0).to(tl.float32)
            alpha2 = s2 * (cb_step * (1 << KB))
            beta2 = s2 * (cb_base - cb_step * (1 << KB))
        else:
            s2 = s
            alpha2 = alpha
            beta2 = beta
        w = _tree(a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, c0, tab_ptr, tab, s, alpha, beta,
                  dmask, s2, alpha2, beta2, 0, 1, 64, S0, S1, S2, DECODE, W_DTYPE, HALF)
        w = tl.reshape(w, (BLOCK_N, BK))
        offs_k = t * BK + tl.arange(0, BK)
        x = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & (offs_k < K)[None, :],
                    other=0.0)
        if DOT_F32:
            x = x.to(tl.float32)
        if SCALE_AFTER:
            sn = tl.load(absmax_ptr + offs_n.to(tl.int64) * stride_an + t * BK // B, mask=mask_n,
                         other=0.0).to(tl.float32)
            acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION) * sn[None, :]
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    store_out(out_ptr, acc, offs_m, offs_n, mask_m, mask_n, stride_om, bias_ptr, pid_k, HAS_BIAS,
              ATOMIC)
