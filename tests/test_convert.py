"""The streaming converter, the reader and `kbit dequantize`, end to end on tiny checkpoints."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kbitrt.convert import converter as conv_mod
from kbitrt.format.quantizer import quantize_weight
from kbitrt.convert.converter import convert
from kbitrt.convert.dequantize import dequantize_model
from kbitrt.format.reader import KbitModel
from kbitrt.format.config import KbitFormatError, OutlierSpec, QuantConfig

from conftest import hf_weights, make_tiny_model


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


CONFIGS = [
    QuantConfig(bits=4, block_size=64, dtype="nf"),
    QuantConfig(bits=3, block_size=32, dtype="quantile", absmax_dtype="dq8"),
    QuantConfig(bits=5, block_size=32, dtype="fp", exponent_bits=3, absmax_dtype="fp32"),
    QuantConfig(bits=7, block_size=128, dtype="dynamic", outliers=OutlierSpec.parse("top:5%")),
    QuantConfig(bits=6, block_size=32, dtype="int", outliers=OutlierSpec.parse("zscore:1.5")),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label + (f"-{c.outliers}" if c.outliers else ""))
def test_streaming_equals_in_memory_reference(tiny_models, tmp_path, monkeypatch, config):
    """Chunked conversion (tiny chunks force many) stores exactly what quantize_weight computes."""
    monkeypatch.setattr(conv_mod, "CHUNK_ELEMS", 200)  # a few rows per chunk, ragged last chunk
    src = tiny_models["llama"]
    report = convert(src, tmp_path / "out", config)
    km = KbitModel.open(tmp_path / "out")
    assert km.quant == config
    weights = hf_weights(src)
    assert len(km.modules) == report.linears_quantized == 2 * 7
    for module in km.quantized_modules:
        ref = quantize_weight(weights[f"{module}.weight"], config, module)
        got = km.quantized(module)
        assert torch.equal(got.qweight, ref.qweight), module
        assert torch.equal(got.absmax, ref.absmax), module
        assert torch.equal(got.codebook, ref.codebook), module
        if config.outliers:
            assert torch.equal(got.outlier_idx, ref.outlier_idx)
            assert torch.equal(got.outlier_weight, ref.outlier_weight)
    # bits/param is counted from the bytes: k + 16/B (+ codebook, shape, outliers)
    base = config.bits + {"fp16": 16, "fp32": 32, "dq8": 8}[config.absmax_dtype] / config.block_size
    assert report.bits_per_param_quantized >= base
    if not config.outliers:
        assert report.bits_per_param_quantized < base + 0.5


def test_output_is_deterministic_and_loadable_by_safetensors(tiny_models, tmp_path):
    cfg = QuantConfig(bits=4, block_size=32, dtype="quantile")
    convert(tiny_models["llama"], tmp_path / "a", cfg)
    convert(tiny_models["llama"], tmp_path / "b", cfg)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    with safe_open(tmp_path / "a" / "model.safetensors", "pt") as f:
        meta = f.metadata()
        assert json.loads(meta["kbit"])["format_version"] == 1
        assert f.get_tensor("model.layers.0.mlp.up_proj.qweight").dtype == torch.uint8
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "kbit"
    assert config["quantization_config"]["modules_not_quantized"] == ["lm_head"]
    card = (tmp_path / "a" / "README.md").read_text()
    assert "base_model_relation: quantized" in card and "4-bit" in card


def test_sharding_and_index(tiny_models, tmp_path):
    convert(tiny_models["llama"], tmp_path / "out", QuantConfig(), max_shard_bytes=20_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0].startswith("model-00001-of-")
    assert len(KbitModel.open(tmp_path / "out").modules) == 14


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
def test_dequantized_model_runs_in_transformers(tiny_models, tmp_path, family):
    """8-bit round trip: transformers loads the dequantized folder and its logits barely move."""
    from transformers import AutoModelForCausalLM

    src = tiny_models[family]
    convert(src, tmp_path / "q", QuantConfig(bits=8, block_size=32, dtype="int"), dtype16="fp16")
    dequantize_model(tmp_path / "q", tmp_path / "dq", "fp32")
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "dq", dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(ids).logits, got(ids).logits
    assert (a - b).abs().max() / a.abs().max() < 0.03


def test_gpt2_conv1d_is_transposed(tiny_models, tmp_path):
    src = tiny_models["gpt2"]
    convert(src, tmp_path / "q", QuantConfig(bits=8, block_size=32, dtype="int"))
    km = KbitModel.open(tmp_path / "q")
    w = hf_weights(src)["transformer.h.0.mlp.c_fc.weight"]  # Conv1D: (in=64, out=256)
    got = km.quantized("transformer.h.0.mlp.c_fc")
    assert got.shape == (256, 64)
    assert (got.dequantize() - w.t()).abs().max() < 0.01 * w.abs().max()
    assert "transformer.h.0.mlp.c_fc" in km.transposed


def test_bin_checkpoint_and_quantize_head(tmp_path):
    src = make_tiny_model("llama", tmp_path / "bin", safe=False)
    convert(src, tmp_path / "q", QuantConfig(bits=4, block_size=32, quantize_head=True))
    km = KbitModel.open(tmp_path / "q")
    assert "lm_head" in km.modules  # tied head quantized from the embedding
    assert "model.embed_tokens.weight" in km.plain_names
    assert km.config["tie_word_embeddings"] is False


def test_refuses_overwrite_then_force_replaces(tiny_models, tmp_path):
    out = tmp_path / "out"
    convert(tiny_models["llama"], out, QuantConfig())
    with pytest.raises(KbitFormatError, match="already exists"):
        convert(tiny_models["llama"], out, QuantConfig(bits=3))
    convert(tiny_models["llama"], out, QuantConfig(bits=3), force=True)
    assert KbitModel.open(out).quant.bits == 3
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_interrupted_conversion_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    calls = []

    def boom(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    original = conv_mod.Converter._write_linear
    monkeypatch.setattr(conv_mod.Converter, "_write_linear", boom)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_models["llama"], tmp_path / "out", QuantConfig())
    assert list(tmp_path.iterdir()) == []


def test_disk_full_is_one_clear_error(tiny_models, tmp_path, monkeypatch):
    import kbitrt.format.safetensors_io as sio

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sio.os, "pwrite", full)
    with pytest.raises(KbitFormatError, match="disk full"):
        convert(tiny_models["llama"], tmp_path / "out", QuantConfig())
    assert list(tmp_path.iterdir()) == []


def test_nan_weight_is_refused_with_its_name(tmp_path):
    from safetensors.torch import load_file, save_file

    src = make_tiny_model("llama", tmp_path / "src")
    sd = load_file(src / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KbitFormatError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*NaN"):
        convert(src, tmp_path / "out", QuantConfig())
    assert not (tmp_path / "out").exists()


def test_bad_sources(tmp_path):
    with pytest.raises(KbitFormatError, match="no such folder"):
        convert(tmp_path / "missing", tmp_path / "o", QuantConfig())
    (tmp_path / "empty").mkdir()
    with pytest.raises(KbitFormatError, match="no config.json"):
        convert(tmp_path / "empty", tmp_path / "o", QuantConfig())
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(KbitFormatError, match="holds no weights"):
        convert(tmp_path / "noweights", tmp_path / "o", QuantConfig())


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KbitFormatError, match="cannot download|no such repository"):
        convert("someone/surely-not-cached-model", tmp_path / "o", QuantConfig())


def test_already_quantized_source_is_refused(tiny_models, tmp_path):
    convert(tiny_models["llama"], tmp_path / "q", QuantConfig())
    with pytest.raises(KbitFormatError, match="already quantized"):
        convert(tmp_path / "q", tmp_path / "qq", QuantConfig())


# -- nothing lost: outputs that would delete the source, tensors nothing uses ------------------------

def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_output_ancestor_inside_or_symlinked_source_is_refused_source_intact(tmp_path):
    src = make_tiny_model("llama", tmp_path / "dir" / "model")
    before = _tree(tmp_path)
    (tmp_path / "link").symlink_to(tmp_path / "dir")
    (tmp_path / "srclink").symlink_to(src)
    cases = [(src, tmp_path / "dir", "contains the source"),  # the ancestor --force case
             (src, tmp_path, "contains the source"),
             (src, tmp_path / "link", "contains the source"),  # the ancestor through a symlink
             (src, src / "sub", "lies inside the source"),
             (src, tmp_path / "link" / "model" / "q", "lies inside the source"),
             (tmp_path / "srclink", src, "is the source"),
             (src, tmp_path / "srclink", "is the source")]
    for source, out, why in cases:
        with pytest.raises(KbitFormatError, match=why):
            convert(source, out, QuantConfig(), force=True)
    (tmp_path / "link").unlink()
    (tmp_path / "srclink").unlink()
    assert _tree(tmp_path) == before  # nothing written, nothing deleted


def _add_tensor(src: Path, name: str, t: torch.Tensor) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(src / "model.safetensors")
    sd[name] = t
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})


def test_tensor_nothing_uses_stops_the_conversion_by_name(tmp_path):
    src = make_tiny_model("llama", tmp_path / "src")
    _add_tensor(src, "model.layers.0.mlp.extra_proj.weight", torch.ones(4, 4))
    with pytest.raises(KbitFormatError, match=r"model\.layers\.0\.mlp\.extra_proj\.weight.*--drop-unused"):
        convert(src, tmp_path / "out", QuantConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # not even a partial folder
    report = convert(src, tmp_path / "out", QuantConfig(), drop_unused=True)
    assert report.dropped == ["model.layers.0.mlp.extra_proj.weight"]
    assert report.to_json()["dropped_tensors"] == report.dropped
    card = (tmp_path / "out" / "README.md").read_text()
    assert "--drop-unused" in card and "model.layers.0.mlp.extra_proj.weight" in card


def test_known_buffers_are_skipped_and_counted(tmp_path):
    src = make_tiny_model("llama", tmp_path / "src")
    _add_tensor(src, "model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8))
    report = convert(src, tmp_path / "out", QuantConfig())
    assert report.skipped == ["model.layers.0.self_attn.rotary_emb.inv_freq"] and report.dropped == []


def test_missing_weight_stops_the_conversion_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    src = make_tiny_model("gpt2", tmp_path / "src")
    sd = load_file(src / "model.safetensors")
    del sd["transformer.h.1.mlp.c_fc.weight"]
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KbitFormatError, match=r"lacks 1 weights.*transformer\.h\.1\.mlp\.c_fc\.weight"):
        convert(src, tmp_path / "out", QuantConfig())


def test_two_names_for_one_tensor_are_refused(tmp_path):
    from safetensors.torch import load_file

    src = make_tiny_model("gpt2", tmp_path / "src")
    wte = load_file(src / "model.safetensors")["transformer.wte.weight"]
    _add_tensor(src, "wte.weight", wte.clone())  # the unprefixed historic name beside the new one
    with pytest.raises(KbitFormatError, match="are both transformer.wte.weight"):
        convert(src, tmp_path / "out", QuantConfig())


# -- the reader refuses what is broken ------------------------------------------------------------

@pytest.fixture()
def converted(tiny_models, tmp_path) -> Path:
    convert(tiny_models["llama"], tmp_path / "q", QuantConfig())
    return tmp_path / "q"


def test_reader_refuses_unknown_format_version(converted):
    cfg = json.loads((converted / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (converted / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KbitFormatError, match="format_version 99 is not known.*upgrade"):
        KbitModel.open(converted)


def test_reader_refuses_truncated_file(converted):
    f = converted / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(KbitFormatError, match="truncated"):
        KbitModel.open(converted)


def test_reader_refuses_missing_and_misshaped_tensors(converted):
    from safetensors.torch import load_file, save_file

    f = converted / "model.safetensors"
    meta = safe_open(f, "pt").metadata()
    sd = load_file(f)
    broken = dict(sd)
    del broken["model.layers.0.self_attn.q_proj.absmax"]
    save_file(broken, f, metadata=meta)
    with pytest.raises(KbitFormatError, match="q_proj.absmax is missing"):
        KbitModel.open(converted)
    broken = dict(sd)
    broken["model.layers.0.self_attn.q_proj.qweight"] = sd["model.layers.0.self_attn.q_proj.qweight"][:, :-1].contiguous()
    save_file(broken, f, metadata=meta)
    with pytest.raises(KbitFormatError, match="q_proj.qweight is U8"):
        KbitModel.open(converted)


def test_reader_refuses_plain_model(tiny_models):
    with pytest.raises(KbitFormatError, match="not a kbit model"):
        KbitModel.open(tiny_models["llama"])


def test_quantization_config_validation():
    with pytest.raises(KbitFormatError, match="--bits 2"):
        QuantConfig(bits=2)
    with pytest.raises(KbitFormatError, match="--block 48"):
        QuantConfig(block_size=48)
    with pytest.raises(KbitFormatError, match="--exponent-bits only"):
        QuantConfig(dtype="int", exponent_bits=2)
    with pytest.raises(KbitFormatError, match="use 1..3"):
        QuantConfig(bits=4, dtype="fp", exponent_bits=4)
    with pytest.raises(KbitFormatError, match="not understood"):
        OutlierSpec.parse("top2")
    assert str(OutlierSpec.parse("top:2%")) == "top:2%"
    assert OutlierSpec.parse("none") is None


@pytest.mark.slow
def test_smollm2_conversion_fidelity(smollm2_dir, tmp_path):
    """The real model: nf4 block 64 has the expected weight error and ~4.25 bits/param."""
    report = convert(smollm2_dir, tmp_path / "smol", QuantConfig(bits=4, block_size=64, dtype="nf"))
    assert report.linears_quantized == 30 * 7
    assert 4.25 <= report.bits_per_param_quantized < 4.26
    assert 0.07 < report.rel_error_mean < 0.11  # Gaussian-like weights: ~0.09 at nf4/64
    assert os.path.getsize(tmp_path / "smol" / "model.safetensors") < 0.25 * 538e6


# -- nothing half-written: values in range, signals ----------------------------------------------

@pytest.mark.parametrize("key,value,says", [
    ("model.norm.weight", float("nan"), r"model\.norm\.weight holds 1 NaN/Inf"),
    ("model.embed_tokens.weight", float("inf"), r"model\.embed_tokens\.weight holds 1 NaN/Inf"),
    ("model.layers.0.input_layernorm.weight", 1e6, r"input_layernorm\.weight: \|value\| up to 1e\+06 overflows F16.*--dtype16 bf16"),
])
def test_plain_tensors_are_checked_finite_in_their_written_dtype(tmp_path, key, value, says):
    from safetensors.torch import load_file, save_file

    src = make_tiny_model("llama", tmp_path / "src")
    sd = load_file(src / "model.safetensors")
    sd[key].view(-1)[3] = value
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KbitFormatError, match=says):
        convert(src, tmp_path / "out", QuantConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    if value == 1e6:  # bf16 holds it
        convert(src, tmp_path / "out", QuantConfig(), dtype16="bf16")


def test_outlier_columns_overflowing_fp16_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    src = make_tiny_model("llama", tmp_path / "src")
    sd = load_file(src / "model.safetensors")
    w = sd["model.layers.0.mlp.down_proj.weight"]
    w[:, 7] = 1e6 * torch.linspace(-1, 1, w.shape[0])  # an outlier column beyond fp16
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KbitFormatError, match=r"down_proj\.(outlier_weight|absmax).*Inf.*F16"):
        convert(src, tmp_path / "out", QuantConfig(outliers=OutlierSpec.parse("top:5%")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


SLOW_CONVERT = """
import sys, time
from kbitrt.convert import converter
from kbitrt.format.config import QuantConfig
orig = converter.Converter._write_linear
def slow(self, *a, **k):
    print("writing", flush=True)
    time.sleep(0.5)
    return orig(self, *a, **k)
converter.Converter._write_linear = slow
converter.convert(sys.argv[1], sys.argv[2], QuantConfig())
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_during_convert_removes_the_partial_folder(tiny_models, tmp_path, sig):
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    p = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, str(tiny_models["llama"]), str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        assert p.stdout.readline().strip() == "writing"  # inside the staged folder now
        assert [x.name for x in tmp_path.iterdir() if "kbit-partial" in x.name]
        p.send_signal(getattr(signal, sig))
        p.wait(timeout=60)
    finally:
        p.kill()
    assert p.returncode != 0
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())
