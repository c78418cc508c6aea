"""The on-disk layout, pinned: bit-slice packing bytes and one quantized matrix (docs/format.md).

A change here is a format change: bump FORMAT_VERSION and regenerate with
`python tests/test_format_golden.py --regenerate` only after updating docs/format.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from kbitrt.format import packing
from kbitrt.format.quantizer import quantize_weight
from kbitrt.format.config import FORMAT_VERSION, PACKING, QuantConfig

GOLDEN = Path(__file__).parent / "golden" / "format_v1.json"
SLICE_WIDTHS = {3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1), 8: (8,)}


def codes_for(bits: int) -> torch.Tensor:
    return ((torch.arange(2 * 19) * 7 + 3) % 2**bits).to(torch.uint8).view(2, 19)


def spec_pack(codes: list[list[int]], bits: int) -> bytes:
    """docs/format.md, written independently in plain Python: rows padded to a multiple of 8
    codes with 0; per row, slices (widest first, lowest code bits first) concatenated; a slice of
    width s puts code i in bits [(i % (8/s)) * s, +s) of its byte i // (8/s)."""
    out = bytearray()
    for row in codes:
        row = row + [0] * (-len(row) % 8)
        shift = 0
        for s in SLICE_WIDTHS[bits]:
            per = 8 // s
            for b in range(len(row) // per):
                byte = 0
                for j in range(per):
                    byte |= ((row[b * per + j] >> shift) & ((1 << s) - 1)) << (j * s)
                out.append(byte)
            shift += s
    return bytes(out)


def quantized_example() -> dict[str, str]:
    w = (torch.arange(2 * 40, dtype=torch.float32).view(2, 40) - 37) / 10  # ragged: 40 = 32 + 8
    w[1, 32:] = 0  # an all-zero (tail) block
    q = quantize_weight(w, QuantConfig(bits=4, block_size=32, dtype="int"))
    return {"qweight": q.qweight.numpy().tobytes().hex(), "absmax": q.absmax.numpy().tobytes().hex()}


def current() -> dict:
    return {
        "format_version": FORMAT_VERSION, "packing": PACKING,
        "pack": {str(k): packing.pack(codes_for(k), k).numpy().tobytes().hex() for k in range(3, 9)},
        "int4_b32": quantized_example(),
    }


def test_packing_matches_spec_written_independently():
    for k in range(3, 9):
        c = codes_for(k)
        assert packing.pack(c, k).numpy().tobytes() == spec_pack(c.tolist(), k), k


def test_layout_matches_golden_file():
    golden = json.loads(GOLDEN.read_text())
    assert golden == current(), "on-disk layout changed: bump format_version (see module docstring)"


def test_golden_bytes_are_exactly_k_bits():
    golden = json.loads(GOLDEN.read_text())
    for k, hexbytes in golden["pack"].items():
        assert len(hexbytes) // 2 == 2 * 24 * int(k) // 8  # 2 rows, 19 codes padded to 24


if __name__ == "__main__" and "--regenerate" in sys.argv:
    GOLDEN.write_text(json.dumps(current(), indent=1) + "\n")
