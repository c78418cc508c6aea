"""Shared pieces of the word kernels (gemv_words, dot_words): 64-bit word loads of the packed
weight, compile-time bit-field extraction, and the decode tables built once per codebook.

In `bitslice-v1` (docs/format.md) a slice of width s holds the s bits of 64 consecutive codes of a
row in s consecutive 64-bit words, so with Kp % 64 == 0 every slice's part of a group of 64 codes
is s aligned int64 loads; the two (four) codes a pair (quad) table looks up together lie side by
side in every slice.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kbitrt.format import packing


@triton.jit
def load_word(rows, goff, q, S: tl.constexpr, Q: tl.constexpr, mask):  # sass:weights-fn
    """int64 word Q of a slice of width S (words goff + q ... of each row), or 0 past S."""
    if Q < S:
        return tl.load(rows + goff + q + Q, mask=mask, other=0)
    else:
        return 0


@triton.jit
def load_group(rows, g, n_groups, S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr):
    """The words of groups g (BLOCK_G,) of each row: 8 of the first slice (a0..a7), 2 of the
    second (b0, b1), 1 of the third (c0), 0 past a slice's width. Slice j of a row starts at word
    (S0 + .. + S_(j-1)) * n_groups; group g's words at g * S_j. Unmasked (no zeroing of the
    registers): groups past the last read the last one, and the caller passes row pointers kept
    in bounds; their products must be zeroed by the caller (scale 0, x 0 or an unstored row)."""
    g = tl.minimum(g, n_groups - 1)[None, :]
    mask = True
    g0 = g * S0
    g1 = S0 * n_groups + g * S1
    g2 = (S0 + S1) * n_groups + g * S2
    return (load_word(rows, g0, 0, S0, 0, mask), load_word(rows, g0, 0, S0, 1, mask),
            load_word(rows, g0, 0, S0, 2, mask), load_word(rows, g0, 0, S0, 3, mask),
            load_word(rows, g0, 0, S0, 4, mask), load_word(rows, g0, 0, S0, 5, mask),
            load_word(rows, g0, 0, S0, 6, mask), load_word(rows, g0, 0, S0, 7, mask),
            load_word(rows, g1, 0, S1, 0, mask), load_word(rows, g1, 0, S1, 1, mask),
            load_word(rows, g2, 0, S2, 0, mask))


@triton.jit
def store_out(out_ptr, acc, offs_m, offs_n, mask_m, mask_n, stride_om, bias_ptr, pid_k,
              HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) fp32 -> out, bias added once (by split 0); atomics into fp32 when
    the K loop is split."""
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if pid_k == 0:
            acc += b[None, :]
    ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if not ATOMIC:
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask)


@triton.jit
def _pick4(w0, w1, w2, w3, Q: tl.constexpr):
    if Q == 0:
        return w0
    elif Q == 1:
        return w1
    elif Q == 2:
        return w2
    else:
        return w3


@triton.jit
def half32(w0, w1, w2, w3, w4, w5, w6, w7, H: tl.constexpr):
    """int32 half H (0..15) of the words w0..w7 (little-endian: half 2q is the low half of wq)."""
    if H // 2 < 4:
        w = _pick4(w0, w1, w2, w3, H // 2)
    else:
        w = _pick4(w4, w5, w6, w7, H // 2 - 4)
    if H % 2 == 1:
        w = w >> 32
    return w.to(tl.int32)


@triton.jit
def shift_const(v, by: tl.constexpr):
    """v << by for by >= 0, logical v >> -by otherwise (by a compile-time amount)."""
    if by > 0:
        return v << by
    elif by < 0:
        return (v.to(tl.uint32, bitcast=True) >> (-by)).to(tl.int32, bitcast=True)
    else:
        return v


@triton.jit
def field_at(a0, a1, a2, a3, a4, a5, a6, a7, S: tl.constexpr, I: tl.constexpr, DEST: tl.constexpr):
    """The 32-bit half holding code I of a slice of width S, shifted so code I starts at DEST."""
    PER: tl.constexpr = 32 // S  # codes per 32-bit half
    return shift_const(half32(a0, a1, a2, a3, a4, a5, a6, a7, I // PER), DEST - S * (I % PER))


@triton.jit
def bit_field(a0, a1, a2, a3, a4, a5, a6, a7, S: tl.constexpr, I: tl.constexpr, N: tl.constexpr,
              DEST: tl.constexpr, mask=None):
    """The S*N bits of codes I..I+N-1 of a slice of width S, moved to bit DEST (masked).

    `mask`, when given, is the same mask as a run-time value: it stays in a register (or the
    constant bank) where a second immediate would be rebuilt in a register for every use."""
    MASK: tl.constexpr = ((1 << (S * N)) - 1) << DEST
    if mask is None:
        return field_at(a0, a1, a2, a3, a4, a5, a6, a7, S, I, DEST) & MASK
    else:
        return field_at(a0, a1, a2, a3, a4, a5, a6, a7, S, I, DEST) & mask


LUT_AND_OR = 0xEA  # lop3 truth table of (a & b) | c: (0xF0 & 0xCC) | 0xAA


def pair7_fields() -> tuple[tuple[int, int], ...]:
    """(width, DEST) of the 2 * width bits a k = 7 pair takes from each slice: the byte offset
    of its entry in the pair table (`pair_table`: slice j at index bit 2 * shift_j, 8 bytes)."""
    return tuple((w, 2 * shift + 3) for w, shift, _ in packing.slices(7))


def pair7_asm() -> str:
    """PTX of a k = 7 pair's table address from the three shifted slice halves ($1..$3), the
    table's low and high words ($4, $5): (t & mask) | acc three times, the table folded into the
    first. Written as asm because LLVM reassociates the ORs so that ptxas cannot fuse the table
    into a mask (one more LOP3 per pair); the interpreter runs the plain twin (`ASM` False)."""
    masks = [((1 << (2 * w)) - 1) << dest for w, dest in pair7_fields()]
    return ("{.reg .b32 t; "
            f"lop3.b32 t, $1, {masks[0]:#x}, $4, {LUT_AND_OR:#x}; "
            f"lop3.b32 t, $2, {masks[1]:#x}, t, {LUT_AND_OR:#x}; "
            f"lop3.b32 t, $3, {masks[2]:#x}, t, {LUT_AND_OR:#x}; "
            "mov.b64 $0, {t, $5};}")


PAIR7_ASM = tl.constexpr(pair7_asm())
_P7 = pair7_fields()
P7_D0 = tl.constexpr(_P7[0][1])
P7_D1 = tl.constexpr(_P7[1][1])
P7_D2 = tl.constexpr(_P7[2][1])


@triton.jit
def pair7_pointer(a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, c0, tab_lo, tab_hi, I: tl.constexpr):
    """Pointer to the pair-table entry of codes I, I + 1 (k = 7, slices 4 + 2 + 1), in PTX."""
    ta = field_at(a0, a1, a2, a3, a4, a5, a6, a7, 4, I, P7_D0)
    tb = field_at(b0, b1, 0, 0, 0, 0, 0, 0, 2, I, P7_D1)
    tc = field_at(c0, 0, 0, 0, 0, 0, 0, 0, 1, I, P7_D2)
    addr = tl.inline_asm_elementwise(PAIR7_ASM, "=l,r,r,r,r,r",
                                     [ta, tb, tc, ta * 0 + tab_lo, ta * 0 + tab_hi],
                                     dtype=tl.int64, is_pure=True, pack=1)
    return addr.to(tl.pointer_type(tl.int64))


@triton.jit
def one_bits(dmask):
    """0x3F800000 (1.0's bits) as a run-time value (dmask < 2^23, so dmask >> 31 is 0): with the
    mask also in a register ptxas merges mask and OR into one LOP3 on sm_80/sm_89 too, where an
    immediate 1.0 and the mask from the constant bank cost two (sm_90 fuses either way)."""
    return (dmask >> 31) + 0x3F800000


@triton.jit
def in_register(tab_addr, dmask):
    """tab_addr as a value computed in the kernel (dmask < 2^23, so dmask >> 31 is 0). A kernel
    argument stays in the constant bank on sm_80/sm_89, and a LOP3 cannot take it beside the
    field mask's immediate: tab | (field & mask) then costs two LOP3s per lookup instead of one."""
    return tab_addr + (dmask >> 31)


@triton.jit
def x_at(xg, g, i: tl.constexpr, K, xmask, EVEN_K: tl.constexpr):
    """fp32 x[64 g + i] in the weights' layout; 0 past K (checked only when K % 64 != 0)."""
    if EVEN_K:  # no mask: identical loads of a thread's rows then merge into one
        return tl.load(xg + i).to(tl.float32)
    else:
        return tl.load(xg + i, mask=xmask & (g[None, :] * 64 + i < K), other=0.0).to(tl.float32)


@triton.jit
def x_pair(xg, g, i: tl.constexpr, K, xmask, EVEN_K: tl.constexpr):
    """fp32 (x[64 g + i], x[64 g + i + 1]) for an even i, as `x_at`. bf16 with K % 64 == 0: one
    32-bit load of both, widened by a shift and a mask (the launch keeps x 4-byte aligned). Two
    16-bit loads let ptxas re-convert each bf16 value per use (IMAD.U32 x, 0x10000 about twice
    per x at k = 7), where fp16's HADD2.F32 is kept once."""
    if EVEN_K and xg.dtype.element_ty == tl.bfloat16:
        w = tl.load((xg + i).to(tl.pointer_type(tl.int32), bitcast=True))
        return (w << 16).to(tl.float32, bitcast=True), (w & -65536).to(tl.float32, bitcast=True)
    else:
        return x_at(xg, g, i, K, xmask, EVEN_K), x_at(xg, g, i + 1, K, xmask, EVEN_K)


def gemv_words_ok(k: int, block_size: int) -> bool:
    """Whether the word kernels apply: whole 64-code groups per row and blocks of >= 32 codes."""
    return (-(-k // 8) * 8) % 64 == 0 and block_size >= 32


# id(codebook) -> (weak reference to it, its _version, decode_choice's answer). Not a
# WeakKeyDictionary: that compares keys with ==, which on tensors is elementwise, so a second call
# with the same codebook raised "Boolean value of Tensor ... is ambiguous".
_TABLES: dict[int, tuple[weakref.ref, int, tuple]] = {}


def affine_params(codebook: torch.Tensor) -> tuple[float, float] | None:
    """(base, step) when codebook[c] == base + step * c for every entry (int data types padded by
    `reference.pad_codebook`), else None. Reads the codebook on the host: call it outside graphs."""
    cb = codebook.detach().double().cpu()
    step = (cb[-1] - cb[0]).item() / (cb.numel() - 1)
    ideal = cb[0] + step * torch.arange(cb.numel(), dtype=torch.float64)
    if step <= 0 or (cb - ideal).abs().max().item() > 1e-6 * max(1.0, cb.abs().max().item()):
        return None
    return float(cb[0]), step


def aligned_copy(table: torch.Tensor) -> torch.Tensor:
    """`table` (int64) copied to an address aligned to its own size (a power of two in bytes),
    so that a kernel forms an entry's address as base | offset: one OR merged into the index."""
    nbytes = table.numel() * 8
    buf = torch.zeros(2 * table.numel(), dtype=torch.int64, device=table.device)
    start = (-buf.data_ptr() % nbytes) // 8
    out = buf[start:start + table.numel()]
    out.copy_(table)
    return out


def pair_table(codebook: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 (2^(2 bits),): (cb[c0], cb[c1]) fp32 pairs, indexed as the word GEMV builds the index
    of two neighbouring codes: slice j's 2*s_j bits (c0's s_j bits, then c1's) at bit 2*shift_j."""
    idx = torch.arange(1 << (2 * bits), device=codebook.device)
    c0 = torch.zeros_like(idx)
    c1 = torch.zeros_like(idx)
    for width, shift, _ in packing.slices(bits):
        field = (idx >> (2 * shift)) & ((1 << (2 * width)) - 1)
        c0 |= (field & ((1 << width) - 1)) << shift
        c1 |= (field >> width) << shift
    cb = codebook.float()
    return aligned_copy(torch.stack([cb[c0], cb[c1]], dim=1).contiguous().view(torch.int64)
                        .view(-1))


def quad_table(codebook: torch.Tensor) -> torch.Tensor:
    """int64 (2 * 4096,): for k = 3, (cb[c0], .., cb[c3]) fp32 of four neighbouring codes, indexed
    by their 2-bit slice byte | their 1-bit slice nibble << 8."""
    idx = torch.arange(1 << 12, device=codebook.device)
    codes = [((idx >> (2 * j)) & 3) | (((idx >> (8 + j)) & 1) << 2) for j in range(4)]
    cb = codebook.float()
    return aligned_copy(torch.stack([cb[c] for c in codes], dim=1).contiguous()
                        .view(torch.int64).view(-1))


# The word kernels' four decoders (the DECODE constexpr), chosen by `decoder_for` only.
AFFINE = tl.constexpr(0)  # arithmetic, for equally spaced codebooks (int) at k = 4 and 8
PAIR = tl.constexpr(1)  # a table of (cb[c0], cb[c1]) pairs: k = 4..7
BYTE = tl.constexpr(2)  # one fp32 load per code byte: k = 8
QUAD = tl.constexpr(3)  # a table of four values per 12 bits: k = 3


def decoder_for(bits: int, affine: bool) -> int:
    """The word kernels' decoder for a width and a codebook that is (or is not) equally spaced."""
    if affine and bits in (4, 8):
        return AFFINE.value
    return {8: BYTE.value, 3: QUAD.value}.get(bits, PAIR.value)


class DecodeTables(NamedTuple):
    """What a word kernel reads of a codebook: its decoder, the table (or the codebook itself)
    and, for AFFINE, cb[c] = base + step * c."""

    decoder: int
    table: torch.Tensor
    base: float
    step: float


def decode_choice(codebook: torch.Tensor, bits: int) -> DecodeTables:
    """The decoder and tables of a padded codebook, cached per codebook tensor (by identity,
    rebuilt when the tensor was written in place)."""
    hit = _TABLES.get(id(codebook))
    if hit is not None and hit[0]() is codebook and hit[1] == codebook._version:
        return hit[2]
    affine = None
    if bits in (4, 8) and not (codebook.is_cuda and torch.cuda.is_current_stream_capturing()):
        affine = affine_params(codebook)
    decoder = decoder_for(bits, affine is not None)
    if decoder == AFFINE.value:
        out = DecodeTables(decoder, codebook, affine[0], affine[1])
    elif decoder == BYTE.value:
        out = DecodeTables(decoder, codebook, 0.0, 0.0)
    elif decoder == QUAD.value:
        out = DecodeTables(decoder, quad_table(codebook), 0.0, 0.0)
    else:
        out = DecodeTables(decoder, pair_table(codebook, bits), 0.0, 0.0)
    _TABLES[id(codebook)] = (weakref.ref(codebook, _forget(id(codebook))), codebook._version, out)
    return out


def _forget(key: int, tables: dict = _TABLES):
    """A weakref callback dropping the cache entry of a codebook that died (unless another
    tensor has taken its id since). `tables` is bound here: at interpreter exit the module's
    globals may already be None when the last codebooks die."""
    def drop(ref: weakref.ref) -> None:
        hit = tables.get(key)
        if hit is not None and hit[0] is ref:
            del tables[key]
    return drop
