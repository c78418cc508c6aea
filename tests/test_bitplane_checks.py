"""One validating reader for both packings (issue 28): every check of the bitslice reader holds
for bitplane-v1 too, and both refuse NaN, infinite or negative block scales when they are read."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import shutil
import torch

from kbitrt.convert.any_precision import convert_any_precision
from kbitrt.convert.converter import convert
from kbitrt.errors import KbitFormatError
from kbitrt.format.bitplane import AnyPrecisionConfig
from kbitrt.format.config import OutlierSpec, QuantConfig
from kbitrt.format.reader import KbitModel
from kbitrt.format.safetensors_io import SAFETENSORS_TORCH_DTYPES

LINEAR = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def folders(tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checks")
    outliers = OutlierSpec.parse("top:5%")
    ap = root / "ap"
    convert_any_precision(tiny_models["llama"], ap, AnyPrecisionConfig(bits=6, min_bits=3, max_bits=6,
                                                                       outliers=outliers))
    plain = root / "plain"
    convert(tiny_models["llama"], plain, QuantConfig(bits=4, outliers=outliers))
    return {"bitplane": ap, "bitslice": plain}


def _copy(folders, packing, tmp_path) -> Path:
    out = tmp_path / packing
    shutil.copytree(folders[packing], out)
    return out


def _header(path: Path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), 8 + n, raw


def _shard_of(folder: Path, name: str) -> Path:
    return next(p for p in sorted(folder.glob("*.safetensors")) if name in _header(p)[0])


def set_tensor(folder: Path, name: str, values: torch.Tensor) -> None:
    """Overwrite a tensor's bytes in place (same dtype and byte size)."""
    path = _shard_of(folder, name)
    h, start, raw = _header(path)
    b, e = h[name]["data_offsets"]
    t = values.to(SAFETENSORS_TORCH_DTYPES[h[name]["dtype"]]).contiguous()
    data = t.view(torch.uint8).numpy().tobytes()
    assert len(data) == e - b, (len(data), e - b)
    path.write_bytes(raw[:start + b] + data + raw[start + e:])


def get_tensor(folder: Path, name: str) -> torch.Tensor:
    km = KbitModel.open(folder, check_model=False)
    return km.read(name)


def edit_header(folder: Path, name: str, **changes) -> None:
    path = _shard_of(folder, name)
    h, start, raw = _header(path)
    h[name].update(changes)
    blob = json.dumps(h).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[start:])


def edit_qc(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is ...:
            cfg["quantization_config"].pop(k, None)
        else:
            cfg["quantization_config"][k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


def refused(folder: Path, match: str) -> None:
    with pytest.raises(KbitFormatError, match=match) as e:
        KbitModel.open(folder)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("value", ["3", [3], None, 3.0, True])
def test_bitplane_min_bits_types(folders, tmp_path, value):
    f = _copy(folders, "bitplane", tmp_path)
    edit_qc(f, min_bits=value)
    refused(f, "min_bits")


@pytest.mark.parametrize("value", [8.5, "6", None])
def test_bitplane_bits_types(folders, tmp_path, value):
    f = _copy(folders, "bitplane", tmp_path)
    edit_qc(f, bits=value if value is not None else ...)
    refused(f, "bits")


@pytest.mark.parametrize("packing", ["bitplane", "bitslice"])
def test_unknown_transposed_module_is_named(folders, tmp_path, packing):
    f = _copy(folders, packing, tmp_path)
    edit_qc(f, transposed_modules=["model.layers.9.nope"])
    refused(f, r"transposed_modules names model\.layers\.9\.nope")
    edit_qc(f, transposed_modules="x")
    refused(f, "transposed_modules is 'x'")


@pytest.mark.parametrize("packing", ["bitplane", "bitslice"])
@pytest.mark.parametrize("bad", [float("nan"), 2.0, "unsorted"])
def test_codebooks_sorted_finite_in_range(folders, tmp_path, packing, bad):
    f = _copy(folders, packing, tmp_path)
    name = f"{LINEAR}.codebook"
    cb = get_tensor(f, name).clone()
    if bad == "unsorted":
        cb[1], cb[2] = cb[2].item(), cb[1].item()
        cb[1] += 0.01
    else:
        cb[3] = bad
    set_tensor(f, name, cb)
    refused(f, "not a sorted codebook")


@pytest.mark.parametrize("packing", ["bitplane", "bitslice"])
def test_plain_and_outlier_dtype_relabels_are_refused(folders, tmp_path, packing):
    f = _copy(folders, packing, tmp_path)
    edit_header(f, "model.norm.weight", dtype="BF16")
    refused(f, r"model\.norm\.weight is BF16")
    f = _copy(folders, packing, tmp_path / "b")
    edit_header(f, f"{LINEAR}.outlier_weight", dtype="BF16")
    refused(f, r"outlier_weight is BF16")


@pytest.mark.parametrize("packing", ["bitplane", "bitslice"])
def test_weight_shape_and_outlier_idx(folders, tmp_path, packing):
    f = _copy(folders, packing, tmp_path)
    edit_header(f, f"{LINEAR}.weight_shape", shape=[1, 2])
    refused(f, r"weight_shape is I64\[1, 2\], expected I64\[2\]")
    for i, change in enumerate(("range", "order")):
        f = _copy(folders, packing, tmp_path / str(i))
        name = f"{LINEAR}.outlier_idx"
        idx = get_tensor(f, name).clone()
        if change == "range":
            idx[-1] = 10_000
        else:
            idx[0], idx[1] = idx[1].item(), idx[0].item()
        set_tensor(f, name, idx)
        refused(f, "strictly increasing column indices")


@pytest.mark.parametrize("packing", ["bitplane", "bitslice"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_block_scales_finite_and_non_negative(folders, tmp_path, packing, bad):
    f = _copy(folders, packing, tmp_path)
    name = f"{LINEAR}.absmax"
    a = get_tensor(f, name).clone()
    a[0, 0] = bad
    set_tensor(f, name, a)
    km = KbitModel.open(f)  # header checks pass: the scales are checked where they are read
    with pytest.raises(KbitFormatError, match=r"down_proj\.absmax holds 1 block scale"):
        km.quantized(LINEAR)
    assert km.quantized("model.layers.0.mlp.up_proj") is not None


def test_unknown_model_type_is_refused_without_auto_map(folders, tmp_path):
    f = _copy(folders, "bitslice", tmp_path)
    cfg = json.loads((f / "config.json").read_text())
    cfg["model_type"] = "no-such-model"
    (f / "config.json").write_text(json.dumps(cfg))
    refused(f, "model_type 'no-such-model' is not an architecture")


@pytest.mark.parametrize("packing", ["bitplane", "bitslice"])
def test_checksums_catch_flipped_bytes_and_swapped_planes(folders, tmp_path, packing, monkeypatch):
    from click.testing import CliRunner

    from kbitrt.cli.main import cli

    f = _copy(folders, packing, tmp_path)
    assert KbitModel.open(f, verify=True).verify()["tensors_checksummed"] > 0
    name = f"{LINEAR}.qweight"
    q = get_tensor(f, name).clone()
    if packing == "bitplane":  # two planes exchanged: every structural check still passes
        q[[0, 1]] = q[[1, 0]]
    else:
        q.view(-1)[7] ^= 0x10
    set_tensor(f, name, q)
    KbitModel.open(f)  # without verification the change is invisible
    with pytest.raises(KbitFormatError, match=rf"tensor {name} does not match its CRC-32"):
        KbitModel.open(f, verify=True)
    monkeypatch.setenv("KBIT_VERIFY", "1")  # on request at every load
    with pytest.raises(KbitFormatError, match="CRC-32"):
        KbitModel.open(f)
    monkeypatch.delenv("KBIT_VERIFY")
    r = CliRunner().invoke(cli, ["inspect", str(f), "--verify"])
    assert r.exit_code == 2 and "does not match its CRC-32" in r.stderr
    assert CliRunner().invoke(cli, ["inspect", str(f)]).exit_code == 0
