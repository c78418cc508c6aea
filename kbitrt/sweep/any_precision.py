"""`kbit sweep --models AP_FOLDER --bits 3,4,5,6,8`: the widths of one any-precision model
(packing bitplane-v1) are swept without converting again: the model is loaded once with every
plane resident and switched from width to width (kbitrt/runtime/any_precision.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from kbitrt.errors import KbitFormatError
from kbitrt.sweep.grid import UNQUANTIZED, Cell


def any_precision_range(name: str) -> tuple[int, int, dict] | None:
    """(min_bits, max_bits, quantization_config) of a local any-precision folder, else None."""
    cfg = Path(name).expanduser() / "config.json"
    if not cfg.is_file():
        return None
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (json.JSONDecodeError, OSError):
        return None
    if qc.get("packing") != "bitplane-v1":
        return None
    return int(qc["min_bits"]), int(qc["bits"]), qc


def adapt_cells(cells: list[Cell]) -> list[Cell]:
    """An any-precision model's cells: one per width, block and data type taken from the file."""
    out, seen = [], set()
    for c in cells:
        span = any_precision_range(c.model)
        if span is None:
            out.append(c)
            continue
        lo, hi, qc = span
        if c.bits == UNQUANTIZED or not lo <= c.bits <= hi:
            raise KbitFormatError(f"--bits {c.bits}: {c.model} is an any-precision model serving "
                                  f"{lo}..{hi} bits")
        cell = replace(c, block=int(qc["block_size"]), dtype=str(qc["dtype"]),
                       outliers=str(qc.get("outliers") or "none"))
        if cell.key not in seen:
            seen.add(cell.key)
            out.append(cell)
    return out


class AnyPrecisionUnderTest:
    """ModelUnderTest's interface (lm, params, apply) over one any-precision folder."""

    def __init__(self, name: str, device: str):
        from kbitrt.eval.model_open import count_params
        from kbitrt.format.reader import KbitModel
        from kbitrt.runtime.loader import load_model

        lo, hi, _ = any_precision_range(name)
        self.lm = load_model(name, device=device, bits=f"{lo}-{hi}")
        self.reader = KbitModel.open(name)
        self.params = count_params(self.lm.model)
        self.linear_params = self.reader.params_quantized()

    def apply(self, cell: Cell) -> tuple[int, float | None]:
        """Switch to the cell's width; (total model bits as read at that width, None: the
        original weights are not at hand, so no weight error)."""
        from kbitrt.runtime.any_precision import set_width

        set_width(self.lm, cell.bits)
        rest = 16 * (self.params - self.linear_params)
        return 8 * self.reader.width_bytes(cell.bits) + rest, None


def model_under_test(name: str, device: str, default):
    """AnyPrecisionUnderTest for an any-precision folder, else `default(name, device)`."""
    if any_precision_range(name) is not None:
        return AnyPrecisionUnderTest(name, device)
    return default(name, device)
