"""The paper's data types (Dettmers & Zettlemoyer 2023, Appendix A), each a codebook in [-1, 1].

A codebook is a sorted float32 tensor of at most 2^k values that contains 0. A block of weights is
divided by its absmax and every weight becomes the index of its nearest codebook value.
"""

from __future__ import annotations

import math

import torch

from kbitrt.formats.spec import KbitFormatError, QuantConfig

# Values per block-normalised tensor that the quantile data type looks at (a strided subsample),
# the analogue of SRAM-quantiles' estimate; enough for 2^8 quantiles to 1e-3.
QUANTILE_SAMPLE = 1 << 22


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


def nearest_index(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook entry for each value (uint8); ties go to the upper entry.

    Exact for any sorted codebook: a value goes to entry i when it lies between the midpoints
    (cb[i-1]+cb[i])/2 and (cb[i]+cb[i+1])/2.
    """
    mids = (codebook[:-1] + codebook[1:]) * 0.5
    return torch.bucketize(values, mids, right=True).to(torch.uint8)
