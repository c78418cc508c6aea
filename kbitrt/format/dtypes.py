"""The paper's data types (Dettmers & Zettlemoyer 2023, Appendix A) as a registry of classes.

A data type is one `DataType` subclass: its levels (a codebook: a sorted float32 tensor of at most
2^k values in [-1, 1] that contains 0), how block-normalised values become codes and codes values,
the QuantConfig keys only it reads, and their validation. Defining the subclass registers it under
its `name` (as gguf-py registers its quantization types), so a new type is one class here.

A block of weights is divided by its absmax and every weight becomes the index of its nearest
codebook value (`nearest_index`, exact; blockwise.py runs the same rule chunk by chunk).
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from typing import ClassVar, Protocol

import numpy as np
import torch

from kbitrt.errors import KbitFormatError



class QuantConfig(Protocol):
    """What a data type reads of a quantization config (format/config.py's QuantConfig, which
    imports this module: a Protocol here keeps the import graph one way)."""

    bits: int
    dtype: str
    exponent_bits: int | None

# Values per tensor that a data type fitted to the weights looks at (a strided subsample of the
# block-normalised weights), the analogue of SRAM-quantiles' estimate; enough for 2^8 quantiles to 1e-3.
WEIGHT_SAMPLE = 1 << 22
# Below this many values nearest_index binary-searches instead of building a lookup table.
SMALL = 1 << 14

_REGISTRY: dict[str, type[DataType]] = {}


class DataType:
    """One data type. Subclasses set `name` and implement `levels` (or `fit` when `fitted`)."""

    name: ClassVar[str] = ""
    # QuantConfig fields only this type reads -> the CLI flag that sets them (for messages)
    options: ClassVar[dict[str, str]] = {}
    # the codebook is estimated from each tensor's own normalised weights (`fit`), not fixed
    fitted: ClassVar[bool] = False
    # fitted on a sample of whole rows with their block scales (format/lloyd.py), not on `fit`
    whole_rows: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.name:
            raise TypeError(f"{cls.__name__} needs a `name` to be registered as a data type")
        if cls.name in _REGISTRY:
            raise TypeError(f"data type {cls.name!r} is registered twice")
        _REGISTRY[cls.name] = cls

    @classmethod
    def validate(cls, config: QuantConfig) -> None:
        """Refuse settings of this type's own keys that cannot work (one clear line)."""

    @classmethod
    def levels(cls, bits: int, **options) -> torch.Tensor:
        """The fixed codebook for `bits` and this type's option values."""
        raise NotImplementedError(f"data type {cls.name!r} is fitted to the weights: use fit()")

    @classmethod
    def fit(cls, bits: int, normalized: torch.Tensor) -> torch.Tensor:
        """The codebook estimated from a sample of block-normalised weights (fitted types)."""
        raise NotImplementedError(f"data type {cls.name!r} has a fixed codebook: use levels()")

    @classmethod
    def option_values(cls, config: QuantConfig) -> dict:
        """This type's config keys as they take effect (defaults filled in)."""
        return {key: getattr(config, key) for key in cls.options}

    @classmethod
    def codebook(cls, config: QuantConfig, sample: torch.Tensor | None = None) -> torch.Tensor:
        """The codebook of one tensor; `sample` (normalised weights) is needed when `fitted`."""
        if cls.fitted:
            if sample is None:
                raise ValueError(f"data type {cls.name!r} needs a sample of the weights")
            return cls.fit(config.bits, sample)
        return cls.levels(config.bits, **cls.option_values(config))

    @classmethod
    def codebook_len(cls, config: QuantConfig) -> int:
        """Entries of a stored codebook (2^k for fitted types, whose ties may repeat values)."""
        return 2**config.bits if cls.fitted else cls.codebook(config).numel()

    @classmethod
    def label(cls, config: QuantConfig) -> str:
        """Short name of the type at these settings, e.g. `nf4` or `fp4(E3M0)`."""
        return f"{cls.name}{config.bits}"

    @staticmethod
    def quantize(normalized: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """uint8 codes: the nearest codebook entry of each value in [-1, 1] (ties go up)."""
        return nearest_index(normalized, codebook)

    @staticmethod
    def dequantize(codes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """float32 values in [-1, 1] of uint8 codes."""
        return codebook.float()[codes.long()]


def get(name: str) -> type[DataType]:
    """The data type registered as `name`; an unknown name is one clear line."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KbitFormatError(f"--dtype {name!r} is unknown: use one of {', '.join(names())}") from None


def names() -> tuple[str, ...]:
    """Names of the registered data types, in registration order."""
    return tuple(_REGISTRY)


def option_flags() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every type-specific config key -> (its CLI flag, the types that read it)."""
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    for dt in _REGISTRY.values():
        for key, flag in dt.options.items():
            out[key] = (flag, out.get(key, (flag, ()))[1] + (dt.name,))
    return out


class Int(DataType):
    """Symmetric integer grid with an exact zero: linspace(-1, 1, 2^k - 1); int4 = {-7..7}/7."""

    name = "int"

    @classmethod
    def levels(cls, bits: int) -> torch.Tensor:
        half = 2 ** (bits - 1) - 1
        return (torch.arange(-half, half + 1, dtype=torch.float64) / half).float()


class Fp(DataType):
    """Sign + E exponent + M mantissa bits (E + M = k - 1), subnormals, no inf/nan, max = 1.

    Bias 2^(E-1) - 1; E defaults to ceil(k/2). E2M1 gives {0, .5, 1, 1.5, 2, 3, 4, 6}/6 with sign.
    """

    name = "fp"
    options = {"exponent_bits": "--exponent-bits"}

    @classmethod
    def validate(cls, config: QuantConfig) -> None:
        e, bits = config.exponent_bits, config.bits
        if e is not None and not 1 <= e <= bits - 1:
            raise KbitFormatError(f"--exponent-bits {e} with {bits} bits: use 1..{bits - 1}"
                                  " (one bit is the sign; the rest split into exponent and mantissa)")

    @classmethod
    def option_values(cls, config: QuantConfig) -> dict:
        return {"exponent_bits": cls.exponent_bits(config.bits, config.exponent_bits)}

    @staticmethod
    def exponent_bits(bits: int, exponent_bits: int | None) -> int:
        return math.ceil(bits / 2) if exponent_bits is None else exponent_bits

    @classmethod
    def label(cls, config: QuantConfig) -> str:
        e = cls.exponent_bits(config.bits, config.exponent_bits)
        return f"{cls.name}{config.bits}(E{e}M{config.bits - 1 - e})"

    @classmethod
    def levels(cls, bits: int, exponent_bits: int | None = None) -> torch.Tensor:
        e_bits = cls.exponent_bits(bits, exponent_bits)
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


class Quantile(DataType):
    """Per-tensor codebook from the block-normalised weights' own quantiles.

    2^k - 1 quantiles at probabilities (i + 1/2) / n, plus an exact 0, divided by the largest
    magnitude. The sample holds values in [-1, 1] (weights / their block absmax); a deterministic
    strided subsample of at most WEIGHT_SAMPLE values is used, so conversion stays streaming.
    Ties (e.g. many zeros) leave repeated entries; the codebook still has exactly 2^k values.
    """

    name = "quantile"
    fitted = True

    @classmethod
    def fit(cls, bits: int, normalized: torch.Tensor) -> torch.Tensor:
        flat = normalized.reshape(-1).float()
        if flat.numel() > WEIGHT_SAMPLE:
            flat = flat[:: -(-flat.numel() // WEIGHT_SAMPLE)]
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


class Dynamic(DataType):
    """Dynamic exponent (dynamic tree) data type, signed, k bits.

    After the sign bit, the number of leading zeros e (0..k-2) is a decimal exponent 10^-e and the
    bits after the first 1 are a linear fraction in [0.1, 1] (midpoints of 2^f bins). Plus 0 and 1.
    The 8-bit one also stores double-quantized block scales (blockwise.py, `dq8`).
    """

    name = "dynamic"

    @classmethod
    def levels(cls, bits: int) -> torch.Tensor:
        max_e = bits - 1  # exponent levels, as bitsandbytes' create_dynamic_map(max_exponent_bits=k-1)
        values = [0.0, 1.0]
        for i in range(max_e):
            n_frac = 2**i  # more fraction bits for larger magnitudes
            bounds = torch.linspace(0.1, 1.0, n_frac + 1, dtype=torch.float64)
            means = (bounds[:-1] + bounds[1:]) / 2
            scale = 10.0 ** (-(max_e - 1) + i)
            values += (scale * means).tolist() + (-scale * means).tolist()
        return torch.tensor(sorted(values), dtype=torch.float64).float()


class Nf(DataType):
    """Normal-float: quantiles of N(0, 1), asymmetric with an exact zero (QLoRA's NF4 for k=4).

    2^(k-1) positive and 2^(k-1) - 1 negative values; the outermost quantile sits at `offset`, the
    mean of 1 - 1/(2(2^k - 1)) and 1 - 1/(2 * 2^k) (0.9677083 for k = 4, as QLoRA).
    """

    name = "nf"

    @classmethod
    def levels(cls, bits: int) -> torch.Tensor:
        n = 2**bits
        offset = 0.5 * ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n)))
        pos = torch.special.ndtri(torch.linspace(offset, 0.5, n // 2 + 1, dtype=torch.float64)[:-1])
        neg = -torch.special.ndtri(torch.linspace(offset, 0.5, n // 2, dtype=torch.float64)[:-1])
        cb = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
        return (cb / cb.max()).float()

    @classmethod
    def codebook_len(cls, config: QuantConfig) -> int:
        # 2^(k-1) positive, 2^(k-1) - 1 negative and zero, counted without computing the quantiles
        # (a model's load checks every linear's codebook length)
        return 2**config.bits


class Lloyd(DataType):
    """Per-tensor 2^k codebook fitted by Lloyd-Max (1-D k-means) to the block-normalised weights,
    starting from the nf and quantile levels; with `--scales mse` it alternates with the scale
    search. The fit (format/lloyd.py) needs whole rows and their scales, so the quantizer calls it
    (format/quantizer.py) instead of `fit`."""

    name = "lloyd"
    fitted = True
    whole_rows = True


def fixed_codebook(config: QuantConfig) -> torch.Tensor | None:
    """The codebook of a data type that does not depend on the weights (None for fitted types)."""
    dt = get(config.dtype)
    return None if dt.fitted else dt.codebook(config)


def codebook_len(config: QuantConfig) -> int:
    return get(config.dtype).codebook_len(config)


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
