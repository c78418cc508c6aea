"""Triton kernels for y = x W^T (+ bias) read from the bit planes of an any-precision model as
stored (`bitplane-v1`): the number of planes K is an argument of each call, and a call at width K
reads only the first K planes (K bits per weight). Twin: planes_reference.kbit_linear_planes_torch.

M = 1 (`planes_gemv_kernel`, rows whose planes are whole 64-bit words and blocks of 32k codes):
a program owns BLOCK_N rows and walks K one trip of BLOCK_G groups of 64 codes at a time. Per
(row, group) a thread loads K int64 words, one per plane. In a little-endian 32-bit half of a
plane word, bit 8t + q is the bit of code 8t + q, so for each q = 0..7

    A_q = OR_p ((half_p >> q) << (K - 1 - p)) & (0x01010101 << (K - 1 - p))

holds the K-bit codes of 8t + q (t = 0..3) in its four bytes: a compile-time shift and one
and-or per plane per four weights (0.5 instructions per weight per plane), then per weight a byte
extraction, a codebook load and an FMA. The block scale multiplies each half's partial sum.
x is read as [BLOCK_N, BLOCK_G] tensors with a zero row stride (the weights' layout); the 2-D
fp32 partial is reduced once after the loop.

M >= 2 and everything else (`planes_dot_kernel`): a (BLOCK_N, BLOCK_K) tile of W is decoded
(one byte load and bit extraction per plane), scaled, and multiplied by tl.dot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kbitrt.runtime.kernels.words import aligned_copy, in_register, shift_const


PAIR_MAX_BITS = tl.constexpr(5)  # widths decoded through a pair table (2^(8 + K) entries)


@triton.jit
def _plane_word(base, q: tl.constexpr, KP: tl.constexpr, plane_stride):  # sass:weights-fn
    """int64 word of plane q at `base` (0 past the K planes)."""
    if q < KP:
        return tl.load(base + q * plane_stride)  # sass:weights
    else:
        return 0


@triton.jit
def _pick8(w0, w1, w2, w3, w4, w5, w6, w7, P: tl.constexpr):
    if P == 0:
        return w0
    elif P == 1:
        return w1
    elif P == 2:
        return w2
    elif P == 3:
        return w3
    elif P == 4:
        return w4
    elif P == 5:
        return w5
    elif P == 6:
        return w6
    else:
        return w7


@triton.jit
def _and_const(x, M: tl.constexpr):
    """x & M for an int32 x and a 32-bit constant M (as the int32 of the same bits)."""
    if M >= 2147483648:
        return x & (M - 4294967296)
    else:
        return x & M


@triton.jit
def _half(w, H: tl.constexpr):
    if H == 1:
        w = w >> 32
    return w.to(tl.int32)


@triton.jit
def _select(a, u, M: tl.constexpr):
    """u's bits where M is set, a's elsewhere (one LOP3)."""
    return _and_const(u, M) | _and_const(a, 0xFFFFFFFF ^ M)


@triton.jit
def assemble_codes(w0, w1, w2, w3, w4, w5, w6, w7, KP: tl.constexpr, H: tl.constexpr,
                   Q: tl.constexpr, Q0: tl.constexpr):
    """int32 holding the KP-bit codes 32H + 8t + Q (t = 0..3) at bits 8t + Q - Q0 .. + KP - 1
    (other bits: garbage). Plane p shifted by KP - 1 - p - Q0 puts its bit of code 8t + Q at
    8t + Q - Q0 + KP - 1 - p for every Q of the window Q0 .. Q0 + 8 - KP (no bit of a code
    shifted out), so a window shares the K shifts and each Q costs K - 1 selects."""
    a = shift_const(_half(w0, H), KP - 1 - Q0)
    for p in tl.static_range(1, KP):
        u = shift_const(_half(_pick8(w0, w1, w2, w3, w4, w5, w6, w7, p), H), KP - 1 - p - Q0)
        a = _select(a, u, 0x01010101 << (KP - 1 - p + Q - Q0))
    return a


@triton.jit
def _entry(tab, a, DEST: tl.constexpr, MASK: tl.constexpr):
    """Address of the table entry whose byte offset is the bits MASK of `a` moved by DEST:
    tab | field (the table is aligned to its size: one and-or, no 64-bit add)."""
    return (tab | _and_const(shift_const(a, DEST), MASK).to(tl.int64)).to(
        tl.pointer_type(tl.int64))


@triton.jit
def _x_at(xg, g, i: tl.constexpr, K, xmask, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(xg + i).to(tl.float32)
    else:
        return tl.load(xg + i, mask=xmask & (g[None, :] * 64 + i < K), other=0.0).to(tl.float32)


@triton.jit
def _half_partial(xg, g, K, xmask, tab, w0, w1, w2, w3, w4, w5, w6, w7, KP: tl.constexpr,
                  H: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_G: tl.constexpr):
    """sum over the 32 codes of half H of each (row, group) of codebook[code] * x. Small KP: the
    code bytes 2h, 2h + 1 of A_q index a pair table (one 64-bit load per two weights); else one
    fp32 load per weight from the codebook (KP > PAIR_MAX_BITS)."""
    part = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
    for q in tl.static_range(8):
        a = assemble_codes(w0, w1, w2, w3, w4, w5, w6, w7, KP, H, q, q // (9 - KP) * (9 - KP))
        if KP <= PAIR_MAX_BITS:
            for h in tl.static_range(2):  # bytes 2h, 2h + 1: index (lo | hi << 8) * 8
                pair = tl.load(_entry(tab, a, 3 - 16 * h - q % (9 - KP),
                                      ((1 << KP) - 1) * 0x0101 << 3))
                v0 = pair.to(tl.int32).to(tl.float32, bitcast=True)
                v1 = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
                part += v0 * _x_at(xg, g, 32 * H + 16 * h + q, K, xmask, EVEN_K)
                part += v1 * _x_at(xg, g, 32 * H + 16 * h + 8 + q, K, xmask, EVEN_K)
        else:
            for t in tl.static_range(4):
                ptr = _entry(tab, a, 2 - 8 * t - q % (9 - KP), ((1 << KP) - 1) << 2)
                ptr = ptr.to(tl.pointer_type(tl.float32), bitcast=True)
                part += tl.load(ptr) * _x_at(xg, g, 32 * H + 8 * t + q, K, xmask, EVEN_K)
    return part


@triton.jit
def planes_gemv_kernel(
    x_ptr, pl_ptr, absmax_ptr, bias_ptr, out_ptr,
    N, K, n_groups, plane_stride, stride_an, tab_addr, zero, split_k,
    KP: tl.constexpr, B: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr, EVEN_K: tl.constexpr, ATOMIC: tl.constexpr, EVEN_NG: tl.constexpr,
):
    """x (1, K) -> out (1, N) fp32; pl_ptr: the planes as int64 words (rows of n_groups words,
    planes plane_stride words apart); tab_addr: the decode table (`decode_table`), aligned to its
    size; zero: 0 (keeps the table address in a register). Program (i, j) takes trips j,
    j + split_k, ... of its rows (split-K: fp32 atomics into a zeroed out, bias by split 0).
    Requires ceil(K/8) % 8 == 0 and B % 32 == 0. EVEN_NG: N % BLOCK_N == 0 and n_groups % BLOCK_G
    == 0, so no row or group is masked or clamped (every 7B shape)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = pl_ptr + tl.minimum(offs_n, N - 1)[:, None].to(tl.int64) * n_groups
    a_rows = absmax_ptr + offs_n[:, None].to(tl.int64) * stride_an
    x_base = x_ptr + (offs_n * 0)[:, None]
    tab = in_register(tab_addr, zero)
    acc = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
    for t in range(pid_k, tl.cdiv(n_groups, BLOCK_G), split_k):
        g = t * BLOCK_G + tl.arange(0, BLOCK_G)
        gc = tl.minimum(g, n_groups - 1)[None, :]
        base = rows + gc
        w0 = _plane_word(base, 0, KP, plane_stride)
        w1 = _plane_word(base, 1, KP, plane_stride)
        w2 = _plane_word(base, 2, KP, plane_stride)
        w3 = _plane_word(base, 3, KP, plane_stride)
        w4 = _plane_word(base, 4, KP, plane_stride)
        w5 = _plane_word(base, 5, KP, plane_stride)
        w6 = _plane_word(base, 6, KP, plane_stride)
        w7 = _plane_word(base, 7, KP, plane_stride)
        xg = x_base + gc * 64
        xmask = (g < n_groups)[None, :] & (offs_n * 0 == 0)[:, None]
        k_lo = g[None, :] * 64
        m0 = mask_n[:, None] & (g < n_groups)[None, :] & (k_lo < K)
        m1 = mask_n[:, None] & (g < n_groups)[None, :] & (k_lo + 32 < K)
        if EVEN_NG:
            s0 = tl.load(a_rows + k_lo // B).to(tl.float32)
        else:
            s0 = tl.load(a_rows + k_lo // B, mask=m0, other=0.0).to(tl.float32)
        p0 = _half_partial(xg, g, K, xmask, tab, w0, w1, w2, w3, w4, w5, w6, w7, KP, 0,
                           EVEN_K, BLOCK_N, BLOCK_G)
        if B == 32:
            if EVEN_NG:
                s1 = tl.load(a_rows + (k_lo + 32) // B).to(tl.float32)
            else:
                s1 = tl.load(a_rows + (k_lo + 32) // B, mask=m1, other=0.0).to(tl.float32)
            p1 = _half_partial(xg, g, K, xmask, tab, w0, w1, w2, w3, w4, w5, w6, w7, KP, 1,
                               EVEN_K, BLOCK_N, BLOCK_G)
            acc += p0 * s0 + p1 * s1
        else:  # B % 64 == 0: one scale per group
            p1 = _half_partial(xg, g, K, xmask, tab, w0, w1, w2, w3, w4, w5, w6, w7, KP, 1,
                               EVEN_K, BLOCK_N, BLOCK_G)
            acc += (p0 + p1) * s0
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if pid_k == 0:
            y += b
    if ATOMIC:
        tl.atomic_add(out_ptr + offs_n, y, mask=mask_n)
    else:
        tl.store(out_ptr + offs_n, y, mask=mask_n)


@triton.jit
def planes_dot_kernel(
    x_ptr, pl_ptr, absmax_ptr, cb_ptr, bias_ptr, out_ptr,
    M, N, K, nb, plane_stride, stride_xm, stride_an, stride_om,
    KP: tl.constexpr, B: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    """x (M, K) -> out (M, N) fp32: W tiles decoded from KP planes (byte loads), then tl.dot."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        wmask = mask_n[:, None] & mask_k[None, :]
        byte_ptr = pl_ptr + offs_n[:, None].to(tl.int64) * nb + (offs_k // 8)[None, :]
        shift = (offs_k % 8)[None, :]
        code = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
        for p in tl.static_range(KP):
            byte = tl.load(byte_ptr + p * plane_stride, mask=wmask, other=0).to(tl.int32)  # sass:weights
            code = code | (((byte >> shift) & 1) << (KP - 1 - p))
        s = tl.load(absmax_ptr + offs_n[:, None].to(tl.int64) * stride_an + (offs_k // B)[None, :],
                    mask=wmask, other=0.0).to(tl.float32)
        w = tl.load(cb_ptr + code) * s
        xt = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(xt.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(xt, tl.trans(w.to(xt.dtype)))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc,
             mask=mask_m[:, None] & mask_n[None, :])


def gemv_planes_ok(in_features: int, block_size: int) -> bool:
    """Whether the word GEMV applies: plane rows of whole 64-bit words, blocks of 32k codes."""
    return (-(-in_features // 8)) % 8 == 0 and block_size % 32 == 0


GEMV_BLOCK_G = 8


def gemv_split(n: int, k: int, bits: int, sms: int) -> int:
    """Split-K factor of the word GEMV: enough programs for two per SM, at most one per trip."""
    tiles = triton.cdiv(n, gemv_block_n(bits))
    trips = triton.cdiv(-(-k // 64), GEMV_BLOCK_G)
    return max(1, min(trips, triton.cdiv(2 * sms, tiles)))


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: a few programs, so split-K runs in the tests too


def gemv_block_n(bits: int) -> int:
    """Rows per program of the word GEMV: 4 (row, group) pairs per thread share their x loads
    (8 at 3 bits, where the registers allow it); counted by benchmarks/sass_budget.py."""
    return 128 if bits == 3 else 64


def even_ng(n: int, n_groups: int, bits: int) -> bool:
    """Whether the word GEMV's programs cover whole row tiles and whole trips (no masks)."""
    return n % gemv_block_n(bits) == 0 and n_groups % GEMV_BLOCK_G == 0


def decode_table(codebook: torch.Tensor, bits: int) -> torch.Tensor:
    """The word GEMV's table for a width-`bits` codebook (fp32 (2^bits,)), aligned to its size:
    bits <= PAIR_MAX_BITS, (cb[lo], cb[hi]) fp32 pairs at index lo | hi << 8 (codes of two bytes
    of A_q); else the codebook itself. Cached on the codebook tensor (rebuilt when it changes)."""
    hit = getattr(codebook, "_kbit_planes_table", None)
    if hit is not None and hit[0] == (codebook._version, bits):
        return hit[1]
    cb = codebook.float().reshape(-1)
    n = 1 << bits
    if bits <= PAIR_MAX_BITS.value:
        i = torch.arange(1 << (8 + bits), device=cb.device)
        lo, hi = (i & 0xFF).clamp(max=n - 1), i >> 8
        table = torch.stack([cb[lo], cb[hi]], dim=1).contiguous().view(torch.int64).view(-1)
    else:
        table = cb[:n].contiguous().view(torch.int64)
    table = aligned_copy(table)
    codebook._kbit_planes_table = ((codebook._version, bits), table)
    return table


def kbit_linear_planes_triton(x: torch.Tensor, planes: torch.Tensor, absmax: torch.Tensor,
                              codebook: torch.Tensor, bias: torch.Tensor | None,
                              outlier_idx: torch.Tensor | None,
                              outlier_weight: torch.Tensor | None, k_planes: int, block_size: int,
                              in_features: int) -> torch.Tensor:
    """x (M, K) -> (M, N) in x.dtype; same arguments as planes_reference.kbit_linear_planes_torch.
    planes: uint8 (P >= k_planes, N, ceil(K/8)) contiguous; codebook: fp32 (2^k_planes,)."""
    m, k = x.shape
    p, n, nb = planes.shape
    if k != in_features or nb != -(-k // 8) or not 1 <= k_planes <= min(p, 8):
        raise ValueError(f"planes {tuple(planes.shape)} with k_planes={k_planes} do not fit x "
                         f"{tuple(x.shape)} (in_features {in_features})")
    planes = planes.contiguous()
    x = x.contiguous()
    absmax = absmax.contiguous()
    cb = codebook.float().contiguous()
    gemv = m == 1 and gemv_planes_ok(k, block_size)
    split = gemv_split(n, k, k_planes, sm_count(x.device)) if gemv else 1
    out = (torch.zeros if split > 1 else torch.empty)(m, n, dtype=torch.float32, device=x.device)
    has_bias = bias is not None and not (outlier_idx is not None and outlier_idx.numel())
    b = bias if has_bias else out
    if gemv:
        words = planes.view(torch.int64)  # (P, N, nb / 8)
        table = decode_table(codebook, k_planes)
        block_n = gemv_block_n(k_planes)
        grid = (triton.cdiv(n, block_n), split)
        planes_gemv_kernel[grid](
            x, words, absmax, b, out, n, k, nb // 8, n * nb // 8, absmax.stride(0),
            table.data_ptr(), 0, split, KP=k_planes, B=block_size, HAS_BIAS=has_bias,
            BLOCK_N=block_n, BLOCK_G=GEMV_BLOCK_G, EVEN_K=k % 64 == 0, ATOMIC=split > 1,
            EVEN_NG=even_ng(n, nb // 8, k_planes), num_warps=4)
    else:
        block_m, block_n, block_k = dot_block_m(m), dot_block_n(m), DOT_BLOCK_K
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        planes_dot_kernel[grid](
            x, planes, absmax, cb, b, out, m, n, k, nb, n * nb, x.stride(0), absmax.stride(0),
            out.stride(0), KP=k_planes, B=block_size, HAS_BIAS=has_bias, BLOCK_M=block_m,
            BLOCK_N=block_n, BLOCK_K=block_k, IEEE=x.dtype == torch.float32, num_warps=4)
    if not has_bias:
        if outlier_idx is not None and outlier_idx.numel():
            out += x.float().index_select(1, outlier_idx) @ outlier_weight.float().t()
        if bias is not None:
            out += bias.float()
    return out.to(x.dtype)


DOT_BLOCK_K = 64


def dot_block_m(m: int) -> int:
    return 16 if m <= 16 else 64


def dot_block_n(m: int) -> int:
    """Rows of W per tile: 32 for M <= 16 (64 spills the decoded tile's registers at sm_90)."""
    return 32 if m <= 16 else 64


def plan_planes(m: int, n: int, k: int, bits: int, block_size: int, act: str = "fp16",
                absmax: str = "fp16", has_bias: bool = False, sms: int = 132):
    """The launch kbit_linear_planes_triton makes for these shapes, as a triton_kbit.LaunchPlan
    (benchmarks/sass_budget.py compiles exactly it)."""
    from kbitrt.runtime.kernels.triton_kbit import LaunchPlan

    nb = -(-k // 8)
    n_blocks = -(-k // block_size)
    c = dict(KP=bits, B=block_size, HAS_BIAS=has_bias)
    bias = act if has_bias else "fp32"
    if m == 1 and gemv_planes_ok(k, block_size):
        bn, split = gemv_block_n(bits), gemv_split(n, k, bits, sms)
        c.update(BLOCK_N=bn, BLOCK_G=GEMV_BLOCK_G, EVEN_K=k % 64 == 0, ATOMIC=split > 1,
                 EVEN_NG=even_ng(n, nb // 8, bits))
        args = (("x_ptr", act), ("pl_ptr", "i64"), ("absmax_ptr", absmax), ("bias_ptr", bias),
                ("out_ptr", "fp32"), ("N", n), ("K", k), ("n_groups", nb // 8),
                ("plane_stride", n * nb // 8), ("stride_an", n_blocks), ("tab_addr", 2**40),
                ("zero", 3), ("split_k", split))
        return LaunchPlan(planes_gemv_kernel, (triton.cdiv(n, bn), split), args,
                          tuple(c.items()), 4, 3, bn * GEMV_BLOCK_G * 64, bits, block_size,
                          4 if absmax == "fp32" else 2,
                          f"planes-gemv bn{bn} bg{GEMV_BLOCK_G} sk{split} w4")
    bm, bn = dot_block_m(m), dot_block_n(m)
    c.update(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=DOT_BLOCK_K, IEEE=act == "fp32")
    args = (("x_ptr", act), ("pl_ptr", "u8"), ("absmax_ptr", absmax), ("cb_ptr", "fp32"),
            ("bias_ptr", bias), ("out_ptr", "fp32"), ("M", m), ("N", n), ("K", k), ("nb", nb),
            ("plane_stride", n * nb), ("stride_xm", k), ("stride_an", n_blocks),
            ("stride_om", n))
    return LaunchPlan(planes_dot_kernel, (triton.cdiv(m, bm), triton.cdiv(n, bn)), args,
                      tuple(c.items()), 4, 3, bn * DOT_BLOCK_K, bits, block_size,
                      4 if absmax == "fp32" else 2, f"planes-dot bm{bm} bn{bn} bk{DOT_BLOCK_K} w4")
