"""Data types: pinned values, invariants, and exact nearest rounding (table == binary search)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kbitrt.format import dtypes
from kbitrt.errors import KbitFormatError
from kbitrt.format.config import QuantConfig

NF4_QLORA = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
             0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
FIXED = [(dt, k) for dt in ("int", "fp", "nf", "dynamic") for k in range(3, 9)]


def test_int4_is_sevenths_with_exact_zero():
    cb = dtypes.Int.levels(4)
    assert torch.equal(cb, (torch.arange(-7, 8, dtype=torch.float64) / 7).float())
    assert (cb == 0).sum() == 1


def test_fp4_e2m1():
    pos = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6]) / 6
    assert torch.equal(dtypes.Fp.levels(4), torch.cat([-pos.flip(0)[:-1], pos]))


def test_fp_exponent_bits_selectable():
    e3m0 = dtypes.fixed_codebook(QuantConfig(bits=4, dtype="fp", exponent_bits=3))
    # E3M0, bias 3: subnormal 0, then 2^-2 .. 2^4, normalised by 16
    pos = torch.tensor([0.0] + [2.0**e for e in range(-2, 5)]) / 16
    assert torch.equal(e3m0, torch.cat([-pos.flip(0)[:-1], pos]))
    assert not torch.equal(e3m0, dtypes.Fp.levels(4))


def test_nf4_is_qlora_table():
    torch.testing.assert_close(dtypes.Nf.levels(4), torch.tensor(NF4_QLORA), atol=1e-6, rtol=0)


@pytest.mark.parametrize("k", range(3, 9))
def test_dynamic_matches_bitsandbytes(k):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    ref = bnbf.create_dynamic_map(signed=True, max_exponent_bits=k - 1, total_bits=k).float()
    # bnb pads its 256-entry map with zeros; the distinct values are the codebook
    torch.testing.assert_close(dtypes.Dynamic.levels(k), ref.unique(), atol=1e-7, rtol=0)


@pytest.mark.parametrize("dtype,k", FIXED)
def test_codebook_invariants(dtype, k):
    cb = dtypes.fixed_codebook(QuantConfig(bits=k, dtype=dtype))
    assert cb.dtype == torch.float32 and cb.numel() <= 2**k
    assert torch.all(cb[1:] > cb[:-1]), "sorted, no repeats"
    assert cb.min() >= -1 and cb.max() == 1 and (cb == 0).any()
    assert dtypes.codebook_len(QuantConfig(bits=k, dtype=dtype)) == cb.numel()


@pytest.mark.parametrize("k", range(3, 9))
def test_quantile_codebook_invariants(k):
    x = torch.randn(50_000)
    x = x / x.abs().max()
    cb = dtypes.Quantile.fit(k, x)
    assert cb.numel() == 2**k and torch.all(cb[1:] >= cb[:-1])
    assert cb.abs().max() == 1 and (cb == 0).any()
    assert dtypes.codebook_len(QuantConfig(bits=k, dtype="quantile")) == 2**k


def brute_force_values(x: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """The codebook value nearest to each x in exact (float64) arithmetic."""
    d = (x.double()[:, None] - cb.double()[None, :]).abs()
    return cb[d.argmin(dim=1)]


def hard_values(cb: torch.Tensor) -> torch.Tensor:
    """Codebook values, real midpoints and their float32 neighbours, zeros, and beyond +-1."""
    t = dtypes.thresholds(cb)
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    return torch.cat([cb, t, torch.nextafter(t, down), torch.nextafter(t, up),
                      ((cb[:-1].double() + cb[1:].double()) / 2).float(),
                      torch.tensor([0.0, -0.0, 1.0, -1.0, 1.5, -1.5, 1e-30, -1e-30])])


@pytest.mark.parametrize("dtype,k", FIXED)
def test_nearest_is_exact(dtype, k):
    cb = dtypes.fixed_codebook(QuantConfig(bits=k, dtype=dtype))
    x = torch.cat([hard_values(cb), torch.rand(20_000) * 2 - 1, torch.randn(20_000) * 1e-3])
    ref = dtypes.nearest_index_reference(x, cb)
    table = dtypes.NearestTable(cb)
    assert table.table is not None
    assert torch.equal(table.lookup(x.contiguous()), ref)
    assert torch.equal(dtypes.nearest_index(x, cb), ref)
    got, best = cb[ref.long()], brute_force_values(x, cb)
    # no other value is strictly closer (at an exact tie either neighbour is nearest)
    assert torch.all((got.double() - x.double()).abs() <= (best.double() - x.double()).abs())
    # ties go up: a value at a real midpoint gets the upper entry
    mids = ((cb[:-1].double() + cb[1:].double()) / 2)
    exact = mids == mids.float().double()
    if exact.any():
        i = torch.nonzero(exact).flatten()
        assert torch.equal(dtypes.nearest_index_reference(mids[i].float(), cb).long(), i + 1)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-1, 1, width=32), min_size=2, max_size=40, unique=True),
       st.lists(st.floats(-1.5, 1.5, width=32), min_size=1, max_size=200))
def test_nearest_arbitrary_codebook(values, xs):
    cb = torch.tensor(sorted(values + [0.0]), dtype=torch.float32).unique()
    cb = cb / cb.abs().max()
    x = torch.cat([torch.tensor(xs, dtype=torch.float32), hard_values(cb)])
    ref = dtypes.nearest_index_reference(x, cb)
    assert torch.equal(dtypes.NearestTable(cb).lookup(x.contiguous()), ref)
    got, best = cb[ref.long()], brute_force_values(x, cb)
    assert torch.all((got.double() - x.double()).abs() <= (best.double() - x.double()).abs())


def test_degenerate_quantile_codebook_falls_back():
    # many zeros: repeated quantiles give repeated thresholds, which no table cell can hold
    x = torch.cat([torch.zeros(10_000), torch.randn(100)])
    cb = dtypes.Quantile.fit(4, x / x.abs().max())
    table = dtypes.NearestTable(cb)
    v = torch.cat([torch.randn(5000) * 0.3, hard_values(cb)]).clamp(-1, 1)
    assert torch.equal(table.lookup(v.contiguous()), dtypes.nearest_index_reference(v, cb))


def test_registry_names_and_lookup():
    assert dtypes.names() == ("int", "fp", "quantile", "dynamic", "nf", "lloyd")
    assert dtypes.get("nf") is dtypes.Nf and dtypes.get("quantile").fitted
    with pytest.raises(KbitFormatError, match="--dtype 'nf5' is unknown: use one of int, fp"):
        dtypes.get("nf5")
    with pytest.raises(KbitFormatError, match="unknown"):
        QuantConfig(dtype="nf5")


def test_type_specific_options_are_checked_through_the_registry():
    with pytest.raises(KbitFormatError, match="--exponent-bits only applies to --dtype fp"):
        QuantConfig(dtype="int", exponent_bits=2)
    with pytest.raises(KbitFormatError, match="--exponent-bits 4 with 4 bits: use 1..3"):
        QuantConfig(bits=4, dtype="fp", exponent_bits=4)
    cfg = QuantConfig(bits=5, dtype="fp")
    assert cfg.to_json()["exponent_bits"] == 3 and cfg.label == "fp5(E3M1)-b64"
    assert QuantConfig(bits=4, dtype="nf").to_json()["exponent_bits"] is None
    assert QuantConfig.from_json(cfg.to_json()).to_json() == cfg.to_json()


@pytest.fixture
def restore_registry():
    before = dict(dtypes._REGISTRY)
    yield
    dtypes._REGISTRY.clear()
    dtypes._REGISTRY.update(before)


def test_a_new_type_is_one_class(restore_registry):
    from kbitrt.format.quantizer import quantize_weight

    class Halves(dtypes.DataType):
        """k-bit grid of halves: {-1, -.5, 0, .5, 1} whatever k (a toy)."""

        name = "halves"

        @classmethod
        def levels(cls, bits: int) -> torch.Tensor:
            return torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])

    cfg = QuantConfig(bits=3, block_size=32, dtype="halves")
    assert cfg.label == "halves3-b32" and dtypes.codebook_len(cfg) == 5
    q = quantize_weight(torch.randn(4, 64), cfg)
    assert set(q.dequantize().div(q.absmax_float().repeat_interleave(32, 1)).unique().tolist()) \
        <= {-1.0, -0.5, 0.0, 0.5, 1.0}
    with pytest.raises(TypeError, match="registered twice"):
        type("Again", (dtypes.DataType,), {"name": "halves"})


def test_quantize_dequantize_round_trip_codes():
    cb = dtypes.Nf.levels(4)
    codes = dtypes.Nf.quantize(cb, cb)
    assert torch.equal(codes.long(), torch.arange(16))
    assert torch.equal(dtypes.Nf.dequantize(codes, cb), cb)
