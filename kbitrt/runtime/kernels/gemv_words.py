"""The M = 1 GEMV on 64-bit words: the budget kernel (docs/kernels.md, issue 10).

Works on groups of 64 codes. In `bitslice-v1` (docs/format.md) a slice of width s holds the s bits
of 64 consecutive codes of a row in s consecutive 64-bit words, so with Kp % 64 == 0 every slice's
part of a group is s aligned int64 loads. A program owns BLOCK_N rows and walks K one trip of
BLOCK_G groups at a time; each thread holds a few (row, group) pairs and, for each, decodes the 64
codes with compile-time shifts (`tl.static_range`), multiplies by x and keeps a 2-D fp32 partial;
rows are reduced once, after the loop (no cross-thread reduction in the K loop).

Decoders (DECODE, named in words.py and chosen by words.decoder_for):
- AFFINE (0), arithmetic (affine codebooks: int, k = 4 and 8): the code is OR-ed into the top of the mantissa
  of 1.0, f = 1 + c / 2^k (two integer ops, no conversion); with cb[c] = base + step * c,
  sum cb[c] x = step 2^k sum f x + (base - step 2^k) sum x, the scale applied per (row, group).
- PAIR (1), pair table (k = 4..7): the 2k bits of two neighbouring codes, which lie side by side in every
  slice, index a table of (cb[c0], cb[c1]) fp32 pairs: one 64-bit load per two weights.
- BYTE (2), byte table (k = 8): one fp32 load per weight, indexed by the code byte.
- QUAD (3), quad table (k = 3): the 12 bits of four neighbouring codes index (cb[c0], .., cb[c3]): a 64 KB
  table, two 64-bit loads per four weights.

Tables are aligned to their size (words.aligned_copy): an entry's address is tab_addr | offset, an
OR the field extraction absorbs, where base + offset costs a 64-bit add (two instructions).

x is read as [BLOCK_N, BLOCK_G] tensors with a zero row stride (the weights' layout: no layout
conversion), one per code position, so each thread loads each x element once for all its rows.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kbitrt.runtime.kernels.words import (AFFINE, PAIR, QUAD, bit_field, in_register, load_group,
                                          one_bits, pair7_pointer, x_pair)


@triton.jit
def _x2(xg, g, i: tl.constexpr, K, xmask, EVEN_K: tl.constexpr):
    """fp32 (x[64 g + i], x[64 g + i + 1]) for an even i, as `words.x_pair`; fp16 with
    K % 64 == 0 also as one 32-bit load of both (each half widened by its own HADD2.F32), which
    halves the x loads a thread issues for its rows (the launch keeps x 4-byte aligned)."""
    if EVEN_K and xg.dtype.element_ty == tl.float16:
        w = tl.load((xg + i).to(tl.pointer_type(tl.int32), bitcast=True))
        lo = w.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return lo, hi
    else:
        return x_pair(xg, g, i, K, xmask, EVEN_K)


@triton.jit
def _codes_times_x(p, xs, a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, c0, xg, g, K, xmask, tab, tab_lo,
                   tab_hi, tab_ptr, dmask, LO: tl.constexpr, HI: tl.constexpr, S0: tl.constexpr,
                   S1: tl.constexpr, S2: tl.constexpr, DECODE: tl.constexpr,
                   EVEN_K: tl.constexpr, ASM: tl.constexpr):
    """(p + sum cb[c] x, xs + sum x) over the code pairs LO..HI-1 (codes 2 LO .. 2 HI - 1) of
    each (row, group): cb[c] as DECODE decodes it (for 0, f = 1 + c / 2^k; xs only for 0)."""
    KB: tl.constexpr = S0 + S1 + S2
    if DECODE == AFFINE:  # arithmetic: f = 1 + c / 2^KB from the code OR-ed into 1.0's mantissa
        for j in tl.static_range(LO, HI):  # (fp16 pairs: no fewer instructions, 2x registers)
            x0, x1 = x_pair(xg, g, 2 * j, K, xmask, EVEN_K)
            f = bit_field(a0, a1, a2, a3, a4, a5, a6, a7, S0, 2 * j, 1, 23 - KB, dmask)
            f = (f | one_bits(dmask)).to(tl.float32, bitcast=True)
            p += f * x0
            xs += x0
            f = bit_field(a0, a1, a2, a3, a4, a5, a6, a7, S0, 2 * j + 1, 1, 23 - KB, dmask)
            f = (f | one_bits(dmask)).to(tl.float32, bitcast=True)
            p += f * x1
            xs += x1
    elif DECODE == QUAD:  # quad table (k = 3): 4 codes (12 bits) -> two 64-bit loads
        for u in tl.static_range(LO // 2, HI // 2):
            idx = bit_field(a0, a1, a2, a3, a4, a5, a6, a7, S0, 4 * u, 4, 4)
            idx |= bit_field(b0, b1, 0, 0, 0, 0, 0, 0, S1, 4 * u, 4, 4 * S0 + 4)
            q_ptr = (tab | idx.to(tl.int64)).to(tl.pointer_type(tl.int64))
            q01 = tl.load(q_ptr)
            q23 = tl.load(q_ptr + 1)
            x0, x1 = _x2(xg, g, 4 * u, K, xmask, EVEN_K)
            x2, x3 = _x2(xg, g, 4 * u + 2, K, xmask, EVEN_K)
            p += q01.to(tl.int32).to(tl.float32, bitcast=True) * x0
            p += (q01 >> 32).to(tl.int32).to(tl.float32, bitcast=True) * x1
            p += q23.to(tl.int32).to(tl.float32, bitcast=True) * x2
            p += (q23 >> 32).to(tl.int32).to(tl.float32, bitcast=True) * x3
    elif DECODE == PAIR:  # pair table: 2 codes -> one 64-bit load
        for u in tl.static_range(LO, HI):
            if S2 > 0 and ASM:  # k = 7: the address in PTX (words.pair7_asm)
                pair = tl.load(pair7_pointer(a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, c0,
                                             tab_lo, tab_hi, 2 * u))
            else:
                idx = bit_field(a0, a1, a2, a3, a4, a5, a6, a7, S0, 2 * u, 2, 3)
                if S1 > 0:
                    idx |= bit_field(b0, b1, 0, 0, 0, 0, 0, 0, S1, 2 * u, 2, 2 * S0 + 3)
                if S2 > 0:
                    idx |= bit_field(c0, 0, 0, 0, 0, 0, 0, 0, S2, 2 * u, 2, 2 * (S0 + S1) + 3)
                pair = tl.load((tab | idx.to(tl.int64)).to(tl.pointer_type(tl.int64)))
            v0 = pair.to(tl.int32).to(tl.float32, bitcast=True)
            v1 = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
            x0, x1 = _x2(xg, g, 2 * u, K, xmask, EVEN_K)
            p += v0 * x0
            p += v1 * x1
    else:  # byte table (k = 8)
        tab32 = tab_ptr.to(tl.pointer_type(tl.float32), bitcast=True)
        for j in tl.static_range(LO, HI):
            x0, x1 = _x2(xg, g, 2 * j, K, xmask, EVEN_K)
            idx = bit_field(a0, a1, a2, a3, a4, a5, a6, a7, S0, 2 * j, 1, 0)
            p += tl.load(tab32 + idx) * x0
            idx = bit_field(a0, a1, a2, a3, a4, a5, a6, a7, S0, 2 * j + 1, 1, 0)
            p += tl.load(tab32 + idx) * x1
    return p, xs


@triton.jit
def gemv_words_kernel(
    x_ptr, qw_ptr, absmax_ptr, tab_ptr, bias_ptr, out_ptr,
    N, K, n_groups, stride_qn, stride_an, cb_base, cb_step, dmask, tab_addr, split_k,
    S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, B: tl.constexpr,
    DECODE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
    ATOMIC: tl.constexpr, EVEN_K: tl.constexpr, ASM: tl.constexpr,
):
    """x (1, K) -> out (1, N); qw_ptr is the packed weight as int64 words (row stride in words).

    Requires Kp % 64 == 0 (n_groups = Kp / 64 whole groups per row) and B >= 32 (B = 32: two
    scales per group, the first half's partial scaled and flushed halfway through the codes).
    """
    KB: tl.constexpr = S0 + S1 + S2
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    # rows past N and groups past the last read the last one (in bounds, no mask: no zeroing of
    # the destination registers); their scale s is 0 and rows past N are not stored
    rows = qw_ptr + tl.minimum(offs_n, N - 1)[:, None].to(tl.int64) * stride_qn
    a_rows = absmax_ptr + offs_n[:, None].to(tl.int64) * stride_an
    x_base = x_ptr + (offs_n * 0)[:, None]  # a zero row stride keeps x in the weights' layout
    tab = in_register(tab_addr, dmask)
    tab_lo = tab.to(tl.int32)
    tab_hi = (tab >> 32).to(tl.int32)
    acc = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
    accx = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
    for t in range(pid_k, tl.cdiv(n_groups, BLOCK_G), split_k):
        g = t * BLOCK_G + tl.arange(0, BLOCK_G)
        mask = mask_n[:, None] & (g < n_groups)[None, :]
        a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, c0 = load_group(rows, g, n_groups, S0, S1, S2)
        s = tl.load(a_rows + (g * 64 // B)[None, :], mask=mask, other=0.0).to(tl.float32)
        # past the last group x is read at the last group (in bounds) and the scale s is 0
        xg = x_base + tl.minimum(g, n_groups - 1)[None, :] * 64
        xmask = (g < n_groups)[None, :] & (offs_n * 0 == 0)[:, None]
        p = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
        xs = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
        if B == 32:  # two blocks per group: codes 0..31 take s, codes 32..63 s_hi
            s_hi = tl.load(a_rows + (g * 2 + 1)[None, :], mask=mask, other=0.0).to(tl.float32)
            p, xs = _codes_times_x(p, xs, a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, c0, xg, g, K,
                                   xmask, tab, tab_lo, tab_hi, tab_ptr, dmask, 0, 16, S0, S1, S2,
                                   DECODE, EVEN_K, ASM)
            acc += p * s
            accx += xs * s
            s = s_hi
            p = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
            xs = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
            p, xs = _codes_times_x(p, xs, a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, c0, xg, g, K,
                                   xmask, tab, tab_lo, tab_hi, tab_ptr, dmask, 16, 32, S0, S1, S2,
                                   DECODE, EVEN_K, ASM)
        else:
            p, xs = _codes_times_x(p, xs, a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, c0, xg, g, K,
                                   xmask, tab, tab_lo, tab_hi, tab_ptr, dmask, 0, 32, S0, S1, S2,
                                   DECODE, EVEN_K, ASM)
        acc += p * s
        if DECODE == AFFINE:
            accx += xs * s
    if DECODE == AFFINE:  # one row reduction: the two partials combined per element first
        acc = acc * (cb_step * (1 << KB)) + accx * (cb_base - cb_step * (1 << KB))
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if pid_k == 0:
            y += b
    if not ATOMIC:
        tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=mask_n)
    else:
        tl.atomic_add(out_ptr + offs_n, y, mask=mask_n)
