"""bitslice-v1 packing: exact k bits per weight, bit-exact round trip, the layout as documented."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kbitrt.format import packing


def pack_by_spec(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The packing docstring, literally, one code at a time (the reference for the fast pack)."""
    n, k = codes.shape
    kp = packing.padded_len(k)
    out = torch.zeros(n, kp * bits // 8, dtype=torch.uint8)
    for width, shift, offset in packing.slices(bits):
        per_byte = 8 // width
        for row in range(n):
            for i in range(kp):
                code = int(codes[row, i]) if i < k else 0
                part = (code >> shift) & ((1 << width) - 1)
                out[row, offset * kp // 8 + i // per_byte] |= part << ((i % per_byte) * width)
    return out


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(3, 8), n=st.integers(1, 6), k=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_round_trip_bit_exact(bits, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    packed = packing.pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == n * -(-k // 8) * bits, "exactly k bits per weight (rows padded to 8)"
    assert packed.shape == (n, packing.packed_row_bytes(k, bits))
    assert torch.equal(packing.unpack(packed, k, bits), codes)


@pytest.mark.parametrize("bits", range(3, 9))
def test_matches_written_layout(bits):
    codes = torch.randint(0, 2**bits, (3, 21), dtype=torch.uint8)
    assert torch.equal(packing.pack(codes, bits), pack_by_spec(codes, bits))


@pytest.mark.parametrize("bits", range(3, 9))
def test_extreme_codes(bits):
    codes = torch.tensor([[2**bits - 1] * 16 + [0] * 8 + [2**bits - 1, 0] * 4], dtype=torch.uint8)
    assert torch.equal(packing.pack(codes, bits), pack_by_spec(codes, bits))
    assert torch.equal(packing.unpack(packing.pack(codes, bits), codes.shape[1], bits), codes)


def test_slices_are_power_of_two_and_sum_to_k():
    for bits in range(3, 9):
        widths = [w for w, _, _ in packing.slices(bits)]
        assert sum(widths) == bits and all(w in (1, 2, 4, 8) for w in widths)


def test_golden_bytes_int4_and_3bit():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    assert packing.pack(codes, 4).tolist() == [[0x21, 0x43, 0x65, 0x07]]
    # 3 = 2 + 1: low 2 bits four per byte, then the high bit eight per byte
    assert packing.pack(codes, 3).tolist() == [[0b00111001, 0b00111001, 0b01111000]]


def test_pack_in_row_chunks_equals_whole():
    codes = torch.randint(0, 32, (10, 77), dtype=torch.uint8)
    whole = packing.pack(codes, 5)
    assert torch.equal(torch.cat([packing.pack(codes[:4], 5), packing.pack(codes[4:], 5)]), whole)


def test_unpack_refuses_wrong_row_bytes():
    with pytest.raises(ValueError, match="bytes"):
        packing.unpack(torch.zeros(2, 5, dtype=torch.uint8), 16, 3)


@pytest.mark.parametrize("bits", range(3, 9))
def test_unpack_keep_padding_is_the_padded_row(bits):
    """The torch twin of the kernels reads whole padded rows: the same codes, then the 0 padding."""
    codes = torch.randint(0, 2**bits, (4, 21), dtype=torch.uint8)
    padded = packing.unpack(packing.pack(codes, bits), 21, bits, keep_padding=True)
    assert padded.shape == (4, packing.padded_len(21))
    assert torch.equal(padded[:, :21], codes) and not padded[:, 21:].any()


def test_reference_kernel_uses_the_one_unpacker():
    from kbitrt.runtime.kernels import reference

    assert not hasattr(reference, "unpack_codes")
    cb = torch.linspace(-1, 1, 8)
    codes = torch.randint(0, 8, (3, 40), dtype=torch.uint8)
    absmax = torch.rand(3, 2) + 0.5
    w = reference.dequantize_packed(packing.pack(codes, 3), absmax, cb, 3, 32, 40)
    expected = cb[codes.long()] * absmax.repeat_interleave(32, 1)[:, :40]
    assert torch.equal(w, expected)
