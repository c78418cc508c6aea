"""The paper's data types (Dettmers & Zettlemoyer 2023, Appendix A), each a codebook in [-1, 1].

A codebook is a sorted float32 tensor of at most 2^k values that contains 0. A block of weights is
divided by its absmax and every weight becomes the index of its nearest codebook value.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import numpy as np
import torch

from kbitrt.format.config import KbitFormatError, QuantConfig

# Values per block-normalised tensor that the quantile data type looks at (a strided subsample),
# the analogue of SRAM-quantiles' estimate; enough for 2^8 quantiles to 1e-3.
QUANTILE_SAMPLE = 1 << 22
# Below this many values nearest_index binary-searches instead of building a lookup table.
SMALL = 1 << 14


def int_codebook(bits: int) -> torch.Tensor:
    """Symmetric integer grid with an exact zero: linspace(-1, 1, 2^k - 1); int4 = {-7..7}/7."""
    half = 2 ** (bits - 1) - 1
    return (torch.arange(-half, half + 1, dtype=torch.float64) / half).float()


def fp_codebook(bits: int, exponent_bits: int | None = None) -> torch.Tensor:
    """Sign + E exponent + M mantissa bits (E + M = k - 1), subnormals, no inf/nan, max = 1.

    Bias 2^(E-1) - 1. E2M1 gives {0, .5, 1, 1.5, 2, 3, 4, 6}/6 with sign.
    """
    e_bits = math.ceil(bits / 2) if exponent_bits is None else exponent_bits
    m_bits = bits - 1 - e_bits
    if e_bits < 1 or m_bits < 0:
        raise KbitFormatError(f"fp with {bits} bits cannot have {e_bits} exponent bits")
    bias = 2 ** (e_bits - 1) - 1
    values = []
    for e in range(2**e_bits):
        for m in range(2**m_bits):
            frac = m / 2**m_bits
            # e == 0 is subnormal: no implicit 1, exponent fixed at 1 - bias
            v = frac * 2.0 ** (1 - bias) if e == 0 else (1 + frac) * 2.0 ** (e - bias)
            values += [v, -v]
    cb = torch.tensor(sorted(set(values)), dtype=torch.float64)
    return (cb / cb.abs().max()).float()


def dynamic_codebook(bits: int) -> torch.Tensor:
    """Dynamic exponent (dynamic tree) data type, signed, k bits.

    After the sign bit, the number of leading zeros e (0..k-2) is a decimal exponent 10^-e and the
    bits after the first 1 are a linear fraction in [0.1, 1] (midpoints of 2^f bins). Plus 0 and 1.
    """
    max_e = bits - 1  # exponent levels, as bitsandbytes' create_dynamic_map(max_exponent_bits=k-1)
    values = [0.0, 1.0]
    for i in range(max_e):
        n_frac = 2**i  # more fraction bits for larger magnitudes
        bounds = torch.linspace(0.1, 1.0, n_frac + 1, dtype=torch.float64)
        means = (bounds[:-1] + bounds[1:]) / 2
        scale = 10.0 ** (-(max_e - 1) + i)
        values += (scale * means).tolist() + (-scale * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float64).float()


def nf_codebook(bits: int) -> torch.Tensor:
    """Normal-float: quantiles of N(0, 1), asymmetric with an exact zero (QLoRA's NF4 for k=4).

    2^(k-1) positive and 2^(k-1) - 1 negative values; the outermost quantile sits at `offset`, the
    mean of 1 - 1/(2(2^k - 1)) and 1 - 1/(2 * 2^k) (0.9677083 for k = 4, as QLoRA).
    """
    n = 2**bits
    offset = 0.5 * ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n)))
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, n // 2 + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, n // 2, dtype=torch.float64)[:-1])
    cb = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    return (cb / cb.max()).float()


def quantile_codebook(bits: int, normalized: torch.Tensor) -> torch.Tensor:
    """Per-tensor codebook from the block-normalised weights' own quantiles.

    2^k - 1 quantiles at probabilities (i + 1/2) / n, plus an exact 0, divided by the largest
    magnitude. `normalized` holds values in [-1, 1] (weights / their block absmax); a deterministic
    strided subsample of at most QUANTILE_SAMPLE values is used, so conversion stays streaming.
    Ties (e.g. many zeros) leave repeated entries; the codebook still has exactly 2^k values.
    """
    flat = normalized.reshape(-1).float()
    if flat.numel() > QUANTILE_SAMPLE:
        flat = flat[:: -(-flat.numel() // QUANTILE_SAMPLE)]
    flat = flat.sort().values
    n = 2**bits - 1
    probs = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    # linear interpolation between order statistics, as torch.quantile does
    pos = probs * (flat.numel() - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=flat.numel() - 1)
    w = (pos - lo.double())
    q = flat[lo].double() * (1 - w) + flat[hi].double() * w
    cb = torch.cat([q, torch.zeros(1, dtype=torch.float64)]).sort().values
    peak = cb.abs().max()
    if peak > 0:
        cb = cb / peak
    return cb.float()


def fixed_codebook(config: QuantConfig) -> torch.Tensor | None:
    """The codebook of a data type that does not depend on the weights (None for quantile)."""
    if config.dtype == "int":
        return int_codebook(config.bits)
    if config.dtype == "fp":
        return fp_codebook(config.bits, config.fp_exponent_bits)
    if config.dtype == "dynamic":
        return dynamic_codebook(config.bits)
    if config.dtype == "nf":
        return nf_codebook(config.bits)
    return None


def codebook_len(config: QuantConfig) -> int:
    cb = fixed_codebook(config)
    return 2**config.bits if cb is None else cb.numel()


def thresholds(codebook: torch.Tensor) -> torch.Tensor:
    """float32 decision thresholds: value x gets index #{i : x >= t[i]} (ties go to the upper entry).

    t[i] is the smallest float32 >= the exact midpoint (cb[i] + cb[i+1]) / 2, computed with
    fractions, so comparing a float32 x against t[i] is the same as comparing it against the real
    midpoint: float32 arithmetic on midpoints is never trusted.
    """
    cb = codebook.detach().float().cpu().tolist()
    out = []
    for lo, hi in zip(cb[:-1], cb[1:]):
        mid = (Fraction(lo) + Fraction(hi)) / 2
        t = np.float32(float(mid))
        if Fraction(float(t)) < mid:  # rounded down: step up one float32
            t = np.nextafter(t, np.float32(np.inf))
        out.append(float(t))
    return torch.tensor(out, dtype=torch.float32, device=codebook.device)


def nearest_index_reference(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Exact nearest codebook index (uint8) of float32 `values` by binary search; the definition."""
    t = thresholds(codebook)
    return torch.bucketize(values.float(), t, right=True).to(torch.uint8)


class NearestTable:
    """Exact nearest-index lookup with one table gather per value, for large tensors.

    The float32 bit pattern r of x is cut into cells of 2^s consecutive patterns (the top 32 - s
    bits); every cell is an interval of values and, for the s chosen, holds at most one threshold.
    Inside a cell the key r' = r ^ (r >> 31) grows with x, so with a per-cell int32 entry
    e = (base << s) + (2^s - offset of the threshold) - key at the cell start, the index is
    (e + r') >> s: `base` below the threshold, base + 1 from it on. No float arithmetic is
    involved, so the result is bit-identical to `nearest_index_reference`.
    """

    MIN_SHIFT = 12  # table of at most 2^20 int32 entries (4 MB)

    def __init__(self, codebook: torch.Tensor) -> None:
        self.codebook = codebook
        self.thresholds = thresholds(codebook)
        bits = self.thresholds.cpu().view(torch.int32).long()
        keys = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # monotone in the value
        keys[self.thresholds.cpu() == 0] = -1  # x >= 0.0 holds for -0.0 too, whose key is -1
        self.shift, self.table = None, None
        for s in range(16, self.MIN_SHIFT - 1, -1):
            if self._fits(keys, s):
                self.shift, self.table = s, self._build(keys, s).to(codebook.device)
                break

    @staticmethod
    def _cell_start(cell: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(monotone key of the cell's lowest value, cell holds negative values) per cell id."""
        raw_lo = cell << s
        neg = raw_lo < 0
        return torch.where(neg, (raw_lo ^ 0x7FFFFFFF) - ((1 << s) - 1), raw_lo), neg

    @classmethod
    def _fits(cls, keys: torch.Tensor, s: int) -> bool:
        """No cell holds two thresholds above its start (one at the start just raises `base`)."""
        raw = torch.where(keys >= 0, keys, keys ^ 0x7FFFFFFF)
        cell = raw >> s
        inside = cell[keys != cls._cell_start(cell, s)[0]]
        return inside.unique().numel() == inside.numel()

    @classmethod
    def _build(cls, keys: torch.Tensor, s: int) -> torch.Tensor:
        n_cells = 1 << (32 - s)
        cell = torch.arange(n_cells, dtype=torch.int64)
        cell = torch.where(cell < n_cells // 2, cell, cell - n_cells)  # signed top bits of r
        key_lo, neg = cls._cell_start(cell, s)
        base = torch.searchsorted(keys, key_lo, right=True)
        inner = torch.searchsorted(keys, key_lo + (1 << s) - 1, right=True) - base
        offset = keys[base.clamp(max=keys.numel() - 1)] - key_lo
        entry = (base << s) + torch.where(inner == 1, (1 << s) - offset, 0)
        # r' = r ^ (r >> 31) equals the monotone key for r >= 0 and key + 2^31 for r < 0
        entry = entry - key_lo - torch.where(neg, 1 << 31, 0)
        return entry.to(torch.int32)

    def lookup(self, x: torch.Tensor, out: torch.Tensor | None = None,
               scratch: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """uint8 indices of contiguous float32 x; `scratch` is two int32 buffers of x's size."""
        if out is None:
            out = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
        if self.table is None:  # coinciding thresholds (a degenerate quantile codebook)
            return out.copy_(torch.bucketize(x, self.thresholds, right=True))
        r = x.reshape(-1).view(torch.int32)
        if scratch is None:
            scratch = (torch.empty_like(r), torch.empty_like(r))
        cell, e = scratch[0].view(-1)[: r.numel()], scratch[1].view(-1)[: r.numel()]
        torch.bitwise_right_shift(r, self.shift, out=cell)
        cell.bitwise_and_((1 << (32 - self.shift)) - 1)
        torch.index_select(self.table, 0, cell, out=e)
        torch.bitwise_right_shift(r, 31, out=cell)
        cell.bitwise_xor_(r)  # r', see the class docstring
        e.add_(cell).bitwise_right_shift_(self.shift)
        out.view(-1).copy_(e)
        return out


@functools.lru_cache(maxsize=32)
def _table(key: bytes, device: str) -> NearestTable:
    cb = torch.frombuffer(bytearray(key), dtype=torch.float32).to(device)
    return NearestTable(cb)


def nearest_table(codebook: torch.Tensor) -> NearestTable:
    """A (cached) NearestTable for this codebook."""
    cb = codebook.detach().float().contiguous()
    return _table(cb.cpu().numpy().tobytes(), str(cb.device))


def nearest_index(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook entry for each value (uint8); ties go to the upper entry.

    Exact for any sorted codebook: x (as float32) gets entry i when it lies between the real
    midpoints (cb[i-1]+cb[i])/2 and (cb[i]+cb[i+1])/2 (see `thresholds`). Large inputs use the
    table lookup, small ones binary search; both give the same indices.
    """
    if values.numel() < SMALL:
        return nearest_index_reference(values, codebook)
    return nearest_table(codebook).lookup(values.float().contiguous())
