"""Any-precision models (Park et al., ICML 2024): packing `bitplane-v1` and its validating reader.

One stored n-bit parent serves every width k in [min_bits, bits]: the k-bit code of a weight is the
top k bits of its parent code, and each width has its own 2^k-entry codebook; the block scales are
shared. Codes are stored as bit planes, most significant first, so reading the first k planes
reads exactly k bits per weight (docs/format.md, "Packing bitplane-v1"):

    <m>.qweight   U8  (P, N, ceil(K/8))      P = bits planes; plane 0 holds bit P-1 of every code
    <m>.codebook  F32 (2^(P+1) - 2^min_bits,) width k's 2^k values start at 2^k - 2^min_bits
    <m>.absmax ... (as bitslice-v1: one set of block scales for all widths)

Within a plane, the bit of code i sits in bit (i mod 8) of byte i div 8 of its row (rows padded to
a multiple of 8 codes with 0). A plane is contiguous, so the first k planes are one contiguous
prefix of the tensor: one read, k bits per weight.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from kbitrt.format import packing
from kbitrt.format.blockwise import QuantizedWeight
from kbitrt.format.config import (ABSMAX, ABSMAX_OFFSET, ABSMAX_SCALE, CODEBOOK, MAX_BITS, MIN_BITS,
                                  OUTLIER_IDX, OUTLIER_WEIGHT, PACKING, QWEIGHT,
                                  KbitFormatError, LinearLayout, QuantConfig)
from kbitrt.format.model_check import check_against_model
from kbitrt.format.safetensors_io import SafetensorsFile
from kbitrt.format.stored_model import StoredModel, open_shards

BITPLANE = "bitplane-v1"
FORMAT_VERSION = 1
_KNOWN_KEYS = {"quant_method", "format_version", "packing", "bits", "min_bits", "block_size",
               "dtype", "exponent_bits", "absmax_dtype", "outliers", "quantize_head",
               "modules_not_quantized", "transposed_modules"}


@dataclass(frozen=True)
class AnyPrecisionConfig(QuantConfig):
    """QuantConfig of an any-precision model: `bits` is the width in use (the parent's, max_bits,
    when converting), `min_bits`..`max_bits` the widths the file serves. `exponent_bits` (fp) is the
    seed's: the data type seeds the codebook at min_bits."""

    min_bits: int = 3
    max_bits: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if not MIN_BITS <= self.min_bits <= self.max_bits <= MAX_BITS:
            raise KbitFormatError(f"--any-precision {self.min_bits}-{self.max_bits}: give a range "
                                  f"LO-HI with {MIN_BITS} <= LO <= HI <= {MAX_BITS}")
        if not self.min_bits <= self.bits <= self.max_bits:
            raise KbitFormatError(f"--bits {self.bits}: this any-precision model serves "
                                  f"{self.min_bits}..{self.max_bits} bits")
        if self.exponent_bits is not None and self.exponent_bits > self.min_bits - 1:
            raise KbitFormatError(f"--exponent-bits {self.exponent_bits}: the fp seed has "
                                  f"{self.min_bits} bits, so use 1..{self.min_bits - 1}")

    @property
    def widths(self) -> range:
        return range(self.min_bits, self.max_bits + 1)

    def seed(self) -> QuantConfig:
        """The plain config of the lowest width: its data type's levels seed the codebook."""
        return QuantConfig(bits=self.min_bits, block_size=self.block_size, dtype=self.dtype,
                           exponent_bits=self.exponent_bits, absmax_dtype=self.absmax_dtype,
                           outliers=self.outliers, quantize_head=self.quantize_head)

    def at(self, bits: int) -> AnyPrecisionConfig:
        return dataclasses.replace(self, bits=bits)

    @property
    def label(self) -> str:
        """e.g. `nf5-b64-ap3-8`: width 5 of an nf any-precision model spanning 3..8 bits."""
        return f"{self.dtype}{self.bits}-b{self.block_size}-ap{self.min_bits}-{self.max_bits}"

    def to_json(self) -> dict:
        qc = self.seed().to_json()
        qc.update(packing=BITPLANE, format_version=FORMAT_VERSION, bits=self.max_bits,
                  min_bits=self.min_bits)
        return qc

    @classmethod
    def from_json(cls, qc: dict) -> AnyPrecisionConfig:
        if qc.get("packing") != BITPLANE:
            raise KbitFormatError(f"kbit packing {qc.get('packing')!r} is not {BITPLANE}")
        if qc.get("format_version") != FORMAT_VERSION:
            raise KbitFormatError(f"kbit format_version {qc.get('format_version')!r} with packing "
                                  f"{BITPLANE} is not known to this kbitrt: upgrade kbitrt")
        unknown = sorted(set(qc) - _KNOWN_KEYS)
        if unknown:
            raise KbitFormatError(f"quantization_config has keys this kbitrt does not know "
                                  f"({', '.join(unknown)}): upgrade kbitrt")
        for key in ("min_bits", "bits"):  # exact ints: "3", 8.5, [3] or null are not widths
            if key not in qc:
                raise KbitFormatError(f"quantization_config lacks {key!r}: convert the model again")
            if not isinstance(qc[key], int) or isinstance(qc[key], bool):
                raise KbitFormatError(f"quantization_config.{key} is {qc[key]!r}: it must be int")
        lo, hi = qc["min_bits"], qc["bits"]
        if not MIN_BITS <= lo <= hi <= MAX_BITS:
            raise KbitFormatError(f"quantization_config: widths {lo}..{hi} are outside "
                                  f"{MIN_BITS}..{MAX_BITS}")
        seed = QuantConfig.from_json({**{k: v for k, v in qc.items() if k != "min_bits"},
                                      "packing": PACKING, "bits": lo})
        return cls(bits=hi, block_size=seed.block_size, dtype=seed.dtype,
                   exponent_bits=seed.exponent_bits,
                   absmax_dtype=seed.absmax_dtype, outliers=seed.outliers,
                   quantize_head=seed.quantize_head, min_bits=lo, max_bits=hi)


def parse_range(text: str, what: str = "--bits") -> tuple[int, int]:
    """`3-8` -> (3, 8); `5` -> (5, 5). One clear line on anything else."""
    parts = str(text).strip().split("-")
    try:
        lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (None, None)
    except ValueError:
        lo = hi = None
    if lo is None or not MIN_BITS <= lo <= hi <= MAX_BITS:
        raise KbitFormatError(f"{what} {text}: give K or LO-HI with "
                              f"{MIN_BITS} <= LO <= HI <= {MAX_BITS}, e.g. 3-8")
    return lo, hi


# ------------------------------------------------------------------------------------- packing

def plane_bytes(k: int) -> int:
    """Bytes of one row of one plane: ceil(K/8)."""
    return -(-k // 8)


def codebook_offset(bits: int, min_bits: int) -> int:
    return 2**bits - 2**min_bits


def codebooks_len(min_bits: int, max_bits: int) -> int:
    return 2 ** (max_bits + 1) - 2**min_bits


def pack_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 (N, K) codes < 2^bits -> uint8 (bits, N, ceil(K/8)), most significant plane first.

    On int64 words of 8 codes: each plane's bit is masked to bit 0 of every byte, then OR-ing the
    word with itself shifted right by 7, 14 and 28 bits gathers the 8 bits into its first byte
    (as a 1-bit slice of packing.pack_padded); a strided copy keeps every 8th byte.
    """
    n, k = codes.shape
    kp = packing.padded_len(k)
    c = codes.to(torch.uint8)
    if kp != k:
        c = torch.nn.functional.pad(c, (0, kp - k))
    words = c.contiguous().view(torch.int64)  # (N, Kp/8), code j of a word in its byte j
    out = torch.empty(bits, n, kp // 8, dtype=torch.uint8, device=codes.device)
    for j in range(bits):
        v = (words >> (bits - 1 - j)) & 0x0101010101010101
        v |= v >> 7
        v |= v >> 14
        v |= v >> 28
        out[j] = v.view(torch.uint8).view(n, kp // 8, 8)[:, :, 0]
    return out


def unpack_planes(planes: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 (P, N, ceil(K/8)) -> uint8 (N, K) codes of P bits (the top P bits of the parent)."""
    p, n, nb = planes.shape
    if nb != plane_bytes(k):
        raise ValueError(f"planes hold {nb} bytes per row; {plane_bytes(k)} expected for K={k}")
    shifts = torch.arange(8, dtype=torch.uint8, device=planes.device)
    codes = torch.zeros(n, nb * 8, dtype=torch.uint8, device=planes.device)
    for j in range(p):
        bit = ((planes[j][..., None] >> shifts) & 1).reshape(n, nb * 8)
        codes |= bit << (p - 1 - j)
    return codes[:, :k]


def to_bitslice(planes: torch.Tensor, k: int) -> torch.Tensor:
    """The first P planes repacked into bitslice-v1 at P bits (what every kernel reads)."""
    return packing.pack(unpack_planes(planes, k), planes.shape[0])


def tensor_specs(n: int, k: int, config: AnyPrecisionConfig, n_outliers: int,
                 dtype16: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """suffix -> (safetensors dtype, shape) of every stored tensor of one (N, K) linear."""
    base = LinearLayout(n, k, config.seed(), n_outliers=n_outliers).tensor_specs(dtype16)
    base[QWEIGHT] = ("U8", (config.max_bits, n, plane_bytes(k)))
    base[CODEBOOK] = ("F32", (codebooks_len(config.min_bits, config.max_bits),))
    return base


# -------------------------------------------------------------------------------------- reader

@dataclass
class PlaneEntry:
    name: str
    out_features: int
    in_features: int
    n_outliers: int


class BitplaneModel(StoredModel):
    """The KbitModel interface over an any-precision folder, at one width (`bits`, default the
    parent's). `quantized(m)` reads only the first `bits` planes and returns them repacked in
    bitslice-v1 with that width's codebook, so every kernel and CPU path serves it unchanged."""

    def __init__(self, path: Path, config: dict, quant: AnyPrecisionConfig,
                 files: dict[str, SafetensorsFile], check_model: bool = True):
        super().__init__(path, config, quant, files)  # quant: the width in use
        self.spec = quant  # the file: widths min_bits..max_bits
        with torch.device("cpu"):
            self._validate()
            if check_model:
                check_against_model(self)

    @classmethod
    def open(cls, path: Path, config: dict, check_model: bool = True) -> BitplaneModel:
        """Called by KbitModel.open for packing bitplane-v1 (config.json already read)."""
        try:
            quant = AnyPrecisionConfig.from_json(config["quantization_config"])
        except KbitFormatError as e:
            raise KbitFormatError(f"{path / 'config.json'}: {e}") from None
        files = open_shards(path, quant, AnyPrecisionConfig.from_json)
        return cls(path, config, quant, files, check_model)

    def at_bits(self, bits: int | None) -> BitplaneModel:
        """The same files at another width (validated once; no weight is read here)."""
        if bits is None:
            return self
        if not self.spec.min_bits <= bits <= self.spec.max_bits:
            raise KbitFormatError(f"--bits {bits}: {self.path} serves {self.spec.min_bits}.."
                                  f"{self.spec.max_bits} bits")
        view = object.__new__(BitplaneModel)
        view.__dict__.update(self.__dict__)
        view.quant = self.spec.at(bits)
        return view

    @property
    def bits(self) -> int:
        return self.quant.bits

    def _validate(self) -> None:
        """The checks of the bitslice reader (stored_model.py, shared), for this packing's tensors:
        every width's codebook sorted, finite and in [-1, 1] (duplicates allowed: a seed codebook
        with fewer levels than codes repeats its top value)."""
        spec = self.spec
        for module, has in self.quantized_groups().items():
            n, k = self.linear_shape(module)
            n_out = self.outlier_count(module, k)
            self.check_specs(module, has, tensor_specs(n, k, spec, n_out, self.dtype16),
                             f"a ({n}, {k}) {spec.label} linear"
                             f"{' without outliers' if not n_out else ''}")
            values = self.read(f"{module}.{CODEBOOK}").tolist()
            for bits in spec.widths:
                off = codebook_offset(bits, spec.min_bits)
                self.check_codebook(f"{module}.{CODEBOOK}", values[off: off + 2**bits], distinct=False)
            if n_out:
                self.check_outlier_idx(module, k)
            self.modules[module] = PlaneEntry(module, n, k, n_out)
        self.check_plain_dtypes()
        self.check_module_lists()

    def planes(self, module: str, bits: int | None = None) -> torch.Tensor:
        """uint8 (bits, N, ceil(K/8)): the first `bits` planes, read as one contiguous prefix."""
        return self.read(f"{module}.{QWEIGHT}", (0, bits or self.bits))

    def codebook(self, module: str, bits: int | None = None) -> torch.Tensor:
        bits = bits or self.bits
        off = codebook_offset(bits, self.spec.min_bits)
        return self.read(f"{module}.{CODEBOOK}")[off: off + 2**bits].clone()

    def tensor_codebooks(self, module: str) -> torch.Tensor:
        """The stored codebook tensor of `module`: every width's codebook, lowest width first."""
        return self.read(f"{module}.{CODEBOOK}")

    def quantized(self, module: str, bits: int | None = None) -> QuantizedWeight:
        """Width `bits` (default: this view's) of `module`, repacked in bitslice-v1."""
        e, has, bits = self.modules[module], self.suffixes(module), bits or self.bits
        scales = self.scales(module)  # checked: finite, non-negative
        return QuantizedWeight(
            qweight=to_bitslice(self.planes(module, bits), e.in_features),
            absmax=scales[ABSMAX], codebook=self.codebook(module, bits),
            shape=(e.out_features, e.in_features), bits=bits, block_size=self.spec.block_size,
            absmax_scale=scales.get(ABSMAX_SCALE), absmax_offset=scales.get(ABSMAX_OFFSET),
            outlier_idx=self.read(f"{module}.{OUTLIER_IDX}") if OUTLIER_IDX in has else None,
            outlier_weight=self.read(f"{module}.{OUTLIER_WEIGHT}") if OUTLIER_WEIGHT in has else None)

    # -- accounting ---------------------------------------------------------------------------
    def width_bytes(self, bits: int) -> int:
        """Bytes of the quantized linears as read at `bits`: k planes, scales, width-k codebook."""
        total = 0
        for m in self.modules:
            for s in self.suffixes(m):
                nbytes = self.info(f"{m}.{s}").nbytes
                if s == QWEIGHT:
                    nbytes = nbytes // self.spec.max_bits * bits
                elif s == CODEBOOK:
                    nbytes = 4 * 2**bits
                total += nbytes
        return total

    def summary(self) -> dict:
        """As KbitModel.summary, plus bits/param of every width (from the bytes each width reads)."""
        summary = super().summary()
        modules = summary.pop("modules")
        pq, pt = summary["params_quantized"], summary["params_total"]
        plain = self.tensor_bytes() - self.quantized_bytes()
        summary["widths"] = [
            {"bits": b, "bytes_quantized": self.width_bytes(b),
             "bits_per_param_quantized": round(8 * self.width_bytes(b) / max(pq, 1), 6),
             "bits_per_param_model": round(8 * (self.width_bytes(b) + plain) / max(pt, 1), 6)}
            for b in self.spec.widths]
        summary["modules"] = modules
        return summary
