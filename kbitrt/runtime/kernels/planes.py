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

from kbitrt.runtime.kernels.words import shift_const


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
def _signed32(m: tl.constexpr):
    """A 32-bit mask as a signed int32 constant."""
    if m >= 2147483648:
        return m - 4294967296
    else:
        return m


@triton.jit
def assemble_codes(w0, w1, w2, w3, w4, w5, w6, w7, KP: tl.constexpr, H: tl.constexpr,
                   Q: tl.constexpr):
    """int32 with the KP-bit codes 32H + 8t + Q (t = 0..3) of a group of 64 in its bytes."""
    a = tl.zeros_like(w0.to(tl.int32))
    for p in tl.static_range(KP):
        w = _pick8(w0, w1, w2, w3, w4, w5, w6, w7, p)
        if H == 1:
            w = w >> 32
        half = w.to(tl.int32)
        DEST: tl.constexpr = KP - 1 - p
        MASK: tl.constexpr = _signed32(0x01010101 << DEST)
        a = a | (shift_const(half, DEST - Q) & MASK)
    return a


@triton.jit
def _code_byte(a, T: tl.constexpr):
    """Byte T of a (an int32 of four codes)."""
    if T == 3:
        return (a.to(tl.uint32, bitcast=True) >> 24).to(tl.int32, bitcast=True)
    elif T == 0:
        return a & 0xFF
    else:
        return (a >> (8 * T)) & 0xFF


@triton.jit
def _x_at(xg, g, i: tl.constexpr, K, xmask, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(xg + i).to(tl.float32)
    else:
        return tl.load(xg + i, mask=xmask & (g[None, :] * 64 + i < K), other=0.0).to(tl.float32)


@triton.jit
def _half_partial(xg, g, K, xmask, cb_ptr, w0, w1, w2, w3, w4, w5, w6, w7, KP: tl.constexpr,
                  H: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_G: tl.constexpr):
    """sum over the 32 codes of half H of each (row, group) of codebook[code] * x."""
    part = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
    for q in tl.static_range(8):
        a = assemble_codes(w0, w1, w2, w3, w4, w5, w6, w7, KP, H, q)
        for t in tl.static_range(4):
            v = tl.load(cb_ptr + _code_byte(a, t))
            part += v * _x_at(xg, g, 32 * H + 8 * t + q, K, xmask, EVEN_K)
    return part


@triton.jit
def planes_gemv_kernel(
    x_ptr, pl_ptr, absmax_ptr, cb_ptr, bias_ptr, out_ptr,
    N, K, n_groups, plane_stride, stride_an, n_blocks,
    KP: tl.constexpr, B: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr, EVEN_K: tl.constexpr,
):
    """x (1, K) -> out (1, N) fp32; pl_ptr: the planes as int64 words (rows of n_groups words,
    planes plane_stride words apart). Requires ceil(K/8) % 8 == 0 and B % 32 == 0."""
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = pl_ptr + tl.minimum(offs_n, N - 1)[:, None].to(tl.int64) * n_groups
    a_rows = absmax_ptr + offs_n[:, None].to(tl.int64) * stride_an
    x_base = x_ptr + (offs_n * 0)[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
    for t0 in range(0, n_groups, BLOCK_G):
        g = t0 + tl.arange(0, BLOCK_G)
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
        s0 = tl.load(a_rows + k_lo // B, mask=m0, other=0.0).to(tl.float32)
        p0 = _half_partial(xg, g, K, xmask, cb_ptr, w0, w1, w2, w3, w4, w5, w6, w7, KP, 0,
                           EVEN_K, BLOCK_N, BLOCK_G)
        if B == 32:
            s1 = tl.load(a_rows + (k_lo + 32) // B, mask=m1, other=0.0).to(tl.float32)
            p1 = _half_partial(xg, g, K, xmask, cb_ptr, w0, w1, w2, w3, w4, w5, w6, w7, KP, 1,
                               EVEN_K, BLOCK_N, BLOCK_G)
            acc += p0 * s0 + p1 * s1
        else:  # B % 64 == 0: one scale per group
            p1 = _half_partial(xg, g, K, xmask, cb_ptr, w0, w1, w2, w3, w4, w5, w6, w7, KP, 1,
                               EVEN_K, BLOCK_N, BLOCK_G)
            acc += (p0 + p1) * s0
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
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


GEMV_BLOCK_N, GEMV_BLOCK_G = 16, 8


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
    out = torch.empty(m, n, dtype=torch.float32, device=x.device)
    has_bias = bias is not None and not (outlier_idx is not None and outlier_idx.numel())
    b = bias if has_bias else out
    if m == 1 and gemv_planes_ok(k, block_size):
        words = planes.view(torch.int64)  # (P, N, nb / 8)
        grid = (triton.cdiv(n, GEMV_BLOCK_N),)
        planes_gemv_kernel[grid](
            x, words, absmax, cb, b, out, n, k, nb // 8, n * nb // 8, absmax.stride(0),
            absmax.shape[1], KP=k_planes, B=block_size, HAS_BIAS=has_bias,
            BLOCK_N=GEMV_BLOCK_N, BLOCK_G=GEMV_BLOCK_G, EVEN_K=k % 64 == 0, num_warps=4)
    else:
        block_m = 16 if m <= 16 else 64
        block_n, block_k = 64, 64
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
