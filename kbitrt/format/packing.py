"""Exact k-bit packing in power-of-two bit slices (`bitslice-v1`, docs/format.md).

A k-bit code is split into slices of 4, 2 and 1 bits (3 = 2+1, 5 = 4+1, 6 = 4+2, 7 = 4+2+1; 4 and
8 are one slice), lowest bits in the widest slice. Each row of K codes is padded to Kp = ceil(K/8)*8
codes (padding codes are 0) and stored as the concatenation of its slices; a slice of width s holds
8/s consecutive codes per byte, code i of the slice in bits [(i mod 8/s)*s, +s) of byte i // (8/s).
A row therefore takes Kp*k/8 bytes: exactly k bits per weight, plus < 1 byte per row of padding.
Every slice is a power of two wide, so a kernel extracts any code with one load, shift and mask.
"""

from __future__ import annotations

import sys

import torch

_SLICES = {3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1), 8: (8,)}


def slices(bits: int) -> tuple[tuple[int, int, int], ...]:
    """(width, bit shift within the code, byte offset of the slice within a row of Kp codes / 8)."""
    out, shift, offset = [], 0, 0
    for width in _SLICES[bits]:
        out.append((width, shift, offset))
        shift += width
        offset += width  # a slice of width s takes Kp*s/8 bytes = s bytes per 8 codes
    return tuple(out)


def padded_len(k: int) -> int:
    return -(-k // 8) * 8


def packed_row_bytes(k: int, bits: int) -> int:
    return padded_len(k) * bits // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 (N, K) codes < 2^bits -> uint8 (N, packed_row_bytes(K, bits))."""
    n, k = codes.shape
    kp = padded_len(k)
    c = codes.to(torch.uint8)
    if kp != k:
        c = torch.nn.functional.pad(c, (0, kp - k))
    out = torch.empty(n, kp * bits // 8, dtype=torch.uint8, device=codes.device)
    return pack_padded(c.contiguous(), bits, out)


def pack_padded(codes: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
    """Pack contiguous uint8 (N, Kp) codes (Kp % 8 == 0, padding already 0) into out (N, Kp*k/8).

    Works on int64 words of 8 codes: OR-ing each word with itself shifted right by (8 - s),
    2(8 - s), 4(8 - s) bits gathers the 8/s codes of a packed byte into its first byte, then a
    strided copy keeps every (8/s)-th byte. Codes (masked to the slice) are < 128, so the
    arithmetic shift of int64 brings in zeros.
    """
    n, kp = codes.shape
    if sys.byteorder != "little":
        raise RuntimeError("kbitrt packing assumes a little-endian host")
    if bits == 8:
        return out.copy_(codes)
    words = codes.view(torch.int64)  # (N, Kp/8), code j of a word in its byte j
    for width, shift, offset in slices(bits):
        v = words >> shift if shift else words.clone()
        if width < bits:  # keep only this slice's bits (the shift brought in the next byte's)
            v &= ((1 << width) - 1) * 0x0101010101010101
        step = 8 - width
        for _ in range((8 // width).bit_length() - 1):  # log2(codes per byte) rounds
            v |= v >> step
            step *= 2
        dst = out[:, offset * kp // 8: (offset + width) * kp // 8].view(n, kp // 8, width)
        dst.copy_(v.view(torch.uint8).view(n, kp // 8, 8)[:, :, :: 8 // width])
    return out


def unpack(packed: torch.Tensor, k: int, bits: int, keep_padding: bool = False) -> torch.Tensor:
    """uint8 (N, packed_row_bytes(K, bits)) -> uint8 (N, K) codes, or (N, Kp) with the padding
    codes when `keep_padding` (the torch twin of the kernels reads whole rows of 8-code words).

    Each slice is unpacked with one shift per code of a byte; at 8 bits the result is `packed`.
    """
    n = packed.shape[0]
    kp = padded_len(k)
    if packed.shape[1] != kp * bits // 8:
        raise ValueError(f"packed rows hold {packed.shape[1]} bytes; {kp * bits // 8} expected "
                         f"for K={k} at {bits} bits")
    codes = None
    for width, shift, offset in slices(bits):
        part = packed[:, offset * kp // 8: (offset + width) * kp // 8]
        if width < 8:
            shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=packed.device)
            part = ((part.unsqueeze(-1) >> shifts) & ((1 << width) - 1)).reshape(n, kp)
        codes = part if codes is None else codes | (part << shift)
    return codes if keep_padding else codes[:, :k]
