"""The sweep grid (model x bits x block x dtype x outliers [x scales x method]) and the exact bit
count of each cell."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from kbitrt.format import dtypes as data_types
from kbitrt.format.config import METHODS, SCALES, KbitFormatError, LinearLayout, OutlierSpec, QuantConfig

SCHEMA = "kbit-sweep/1"  # a results line from another schema is refused, not silently mixed
UNQUANTIZED = 16


@dataclass(frozen=True)
class Cell:
    model: str
    bits: int  # 16 = the unquantized model (stored 16-bit)
    block: int | None
    dtype: str | None
    outliers: str  # "none" or the OutlierSpec text
    scales: str = "absmax"
    method: str = "rtn"

    @property
    def key(self) -> str:
        if self.bits == UNQUANTIZED:
            return f"{self.model}|16"
        extra = "" if (self.scales, self.method) == ("absmax", "rtn") else f"|{self.scales}|{self.method}"
        return f"{self.model}|{self.bits}|{self.block}|{self.dtype}|{self.outliers}{extra}"

    def config(self) -> QuantConfig:
        return QuantConfig(bits=self.bits, block_size=self.block, dtype=self.dtype,
                           outliers=OutlierSpec.parse(self.outliers), scales=self.scales,
                           method=self.method)

    @property
    def label(self) -> str:
        if self.bits == UNQUANTIZED:
            return "16-bit"
        out = f"{self.dtype}{self.bits}-b{self.block}"
        out += "".join(f"-{x}" for x in (self.scales, self.method) if x not in ("absmax", "rtn"))
        return out if self.outliers == "none" else f"{out}+{self.outliers}"


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KbitFormatError(f"--{what} {text!r}: give comma-separated integers") from None


def parse_grid(models: list[str], bits: str, blocks: str, dtypes: str, outliers: str,
               scales: str = "absmax", methods: str = "rtn") -> list[Cell]:
    """All cells, each setting checked up front: a typo fails before hours of work, not during."""
    bit_list, block_list = _ints(bits, "bits"), _ints(blocks, "block")
    dtype_list = [d.strip() for d in dtypes.split(",") if d.strip()]
    outlier_list = [o.strip() or "none" for o in outliers.split(",")]
    for d in dtype_list:
        data_types.get(d)  # an unknown name raises
    for o in outlier_list:
        OutlierSpec.parse(o)
    scale_list = [s.strip() for s in scales.split(",") if s.strip()] or ["absmax"]
    method_list = [m.strip() for m in methods.split(",") if m.strip()] or ["rtn"]
    for s in scale_list:
        if s not in SCALES:
            raise KbitFormatError(f"--scales {s!r} is unknown: use {', '.join(SCALES)}")
    for m in method_list:
        if m not in METHODS:
            raise KbitFormatError(f"--method {m!r} is unknown: use {', '.join(METHODS)}")
    for b in bit_list:
        if b != UNQUANTIZED:
            for block in block_list:
                QuantConfig(bits=b, block_size=block)  # raises the CLI's message for bad values
    if not models:
        raise KbitFormatError("--models: give at least one model folder or Hub id")
    cells = []
    for model in models:
        for b in bit_list:
            if b == UNQUANTIZED:
                cells.append(Cell(model, b, None, None, "none"))
                continue
            for block, dtype, out, sc, me in itertools.product(block_list, dtype_list, outlier_list,
                                                               scale_list, method_list):
                o = OutlierSpec.parse(out)
                cells.append(Cell(model, b, block, dtype, str(o) if o else "none", sc, me))
    return cells


def linear_bytes(n: int, k: int, config: QuantConfig, n_outliers: int, dtype16: str = "F16") -> int:
    """Bytes the format stores for one quantized (n, k) linear (codes, scales, codebook, outliers)."""
    layout = LinearLayout(n, k, config, n_outliers=n_outliers, codebook_len=data_types.codebook_len(config))
    total = 0
    for dtype, shape in layout.tensor_specs(dtype16).values():
        size = {"U8": 1, "F16": 2, "BF16": 2, "F32": 4, "I64": 8}[dtype]
        total += size * math.prod(shape)
    return total
