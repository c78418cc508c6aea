"""Exact k-bit packing in power-of-two bit slices (`bitslice-v1`, docs/format.md).

A k-bit code is split into slices of 4, 2 and 1 bits (3 = 2+1, 5 = 4+1, 6 = 4+2, 7 = 4+2+1; 4 and
8 are one slice), lowest bits in the widest slice. Each row of K codes is padded to Kp = ceil(K/8)*8
codes (padding codes are 0) and stored as the concatenation of its slices; a slice of width s holds
8/s consecutive codes per byte, code i of the slice in bits [(i mod 8/s)*s, +s) of byte i // (8/s).
A row therefore takes Kp*k/8 bytes: exactly k bits per weight, plus < 1 byte per row of padding.
Every slice is a power of two wide, so a kernel extracts any code with one load, shift and mask.
"""

from __future__ import annotations

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
    parts = []
    for width, shift, _ in slices(bits):
        per_byte = 8 // width
        v = ((c >> shift) & ((1 << width) - 1)).view(n, kp // per_byte, per_byte)
        byte = v[..., 0].clone()
        for j in range(1, per_byte):
            byte |= v[..., j] << (j * width)
        parts.append(byte)
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0].contiguous()


def unpack(packed: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    """uint8 (N, packed_row_bytes(K, bits)) -> uint8 (N, K) codes."""
    n = packed.shape[0]
    kp = padded_len(k)
    if packed.shape[1] != kp * bits // 8:
        raise ValueError(f"packed rows hold {packed.shape[1]} bytes; {kp * bits // 8} expected "
                         f"for K={k} at {bits} bits")
    codes = torch.zeros(n, kp, dtype=torch.uint8, device=packed.device)
    for width, shift, offset in slices(bits):
        per_byte = 8 // width
        nbytes = kp * width // 8
        part = packed[:, offset * kp // 8: offset * kp // 8 + nbytes]
        mask = (1 << width) - 1
        shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=packed.device)
        v = (part[..., None] >> shifts) & mask  # (N, nbytes, per_byte)
        codes |= v.reshape(n, nbytes * per_byte) << shift
    return codes[:, :k]
