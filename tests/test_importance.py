"""Importance-weighted mse scales and Lloyd fits (issue 15): --importance norm (zero-shot, the gain of
the norm a linear reads) and --importance hessian (GPTQ's Hessian diagonal); same format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kbitrt.convert.converter import convert
from kbitrt.format import blockwise, dtypes, lloyd, quantizer, scales
from kbitrt.format.config import KbitFormatError, QuantConfig
from kbitrt.format.reader import KbitModel

from conftest import assert_one_line_error, hf_weights, run_cli


def weighted_block_error(w: torch.Tensor, q: blockwise.QuantizedWeight, v: torch.Tensor,
                         block: int) -> torch.Tensor:
    """float64 (N, n_blocks) sum over each block of v_j (w - deq)^2."""
    d = (q.dequantize().double() - w.double()).square() * v.double()
    n, k = d.shape
    nb = -(-k // block)
    return torch.nn.functional.pad(d, (0, nb * block - k)).view(n, nb, block).sum(-1)


# ------------------------------------------------------------------------------ weighted scales

@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(["int", "fp", "nf", "lloyd"]), bits=st.integers(3, 8),
       block=st.sampled_from([32, 64]), n=st.integers(1, 6), k=st.integers(1, 200),
       absmax=st.sampled_from(["fp16", "fp32"]), heavy=st.booleans(), zeros=st.booleans(),
       seed=st.integers(0, 2**16))
def test_weighted_mse_scales_never_increase_a_blocks_weighted_error(dtype, bits, block, n, k, absmax,
                                                                     heavy, zeros, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    if heavy:
        w = w * torch.distributions.StudentT(2.0).sample((n, k)).abs().clamp(max=50)
    v = torch.rand(k, generator=g) ** 4 * 100  # very uneven importance
    if zeros:
        v[::3] = 0.0  # columns that do not count at all
    base = QuantConfig(bits=bits, block_size=block, dtype=dtype, absmax_dtype=absmax)
    q_abs = quantizer.quantize_weight(w, base)
    mse = QuantConfig(bits=bits, block_size=block, dtype=dtype, absmax_dtype=absmax, scales="mse",
                      importance="norm")
    q_mse = quantizer.quantize_weight(w, mse, codebook=q_abs.codebook, importance=v)
    e_abs = weighted_block_error(w, q_abs, v, block)
    e_mse = weighted_block_error(w, q_mse, v, block)
    assert (e_mse <= e_abs * (1 + 1e-6) + 1e-30).all()
    s_abs, s_mse = q_abs.absmax_float(), q_mse.absmax_float()
    assert torch.equal(s_mse == 0, s_abs == 0) and torch.isfinite(s_mse).all()


def test_weighting_lowers_the_weighted_error_it_targets():
    """The weighted search is not the unweighted one: with uneven importance it finds scales with a
    lower weighted error than the unweighted search (and the unweighted one a lower plain error)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(128, 512, generator=g) * 0.02
    v = torch.rand(512, generator=g) ** 6 * 50
    cfg = QuantConfig(bits=4, scales="mse")
    plain = quantizer.quantize_weight(w, cfg)
    weighted = quantizer.quantize_weight(w, QuantConfig(bits=4, scales="mse", importance="norm"),
                                         importance=v)
    assert weighted_block_error(w, weighted, v, 64).sum() < 0.97 * weighted_block_error(w, plain, v, 64).sum()
    assert (plain.dequantize() - w).norm() < (weighted.dequantize() - w).norm()


def test_uniform_importance_gives_the_unweighted_scales():
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(4)) * 0.1
    cb = dtypes.get("nf").levels(4)
    a = scales.block_scales(w, 64, "mse", cb, "fp16")
    b = scales.block_scales(w, 64, "mse", cb, "fp16", torch.full((256,), 2.5))
    assert torch.equal(a, b)


def test_keep_max_never_clips():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(5)) * 0.1
    cb = dtypes.get("nf").levels(4)
    s = scales.block_scales(w, 64, "mse", cb, "fp16", keep_max=True)
    absmax = scales.round_scale(blockwise.block_absmax(w, 64), "fp16")
    assert (s >= absmax).all() and (s > absmax).any()


def test_bad_importance_is_one_clear_error():
    w = torch.randn(4, 64)
    cb = dtypes.get("nf").levels(4)
    with pytest.raises(KbitFormatError, match="input columns"):
        scales.block_scales(w, 64, "mse", cb, importance=torch.ones(63))
    with pytest.raises(KbitFormatError, match="finite"):
        scales.block_scales(w, 64, "mse", cb, importance=torch.full((64,), float("nan")))


def test_importance_config_checks_and_json():
    with pytest.raises(KbitFormatError, match="--importance"):
        QuantConfig(importance="act")
    with pytest.raises(KbitFormatError, match="--scales mse or --dtype lloyd"):
        QuantConfig(importance="norm")  # absmax nf: nothing is fitted, nothing to weight
    with pytest.raises(KbitFormatError, match="--importance hessian"):
        QuantConfig(scales="mse", method="gptq", importance="norm")
    with pytest.raises(KbitFormatError, match="--importance hessian"):
        QuantConfig(scales="mse", method="gptq", importance="random")
    cfg = QuantConfig(scales="mse", importance="norm")
    assert cfg.label == "nf4-b64-mse-norm" and cfg.to_json()["importance"] == "norm"
    assert QuantConfig.from_json(cfg.to_json()) == cfg
    assert "importance" not in QuantConfig(scales="mse").to_json()  # default: no new key
    assert QuantConfig(dtype="lloyd", importance="norm").label == "lloyd4-b64-norm"


# --------------------------------------------------------------------------------- weighted Lloyd

def test_weighted_lloyd_never_increases_the_weighted_error_of_its_start():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(64, 512, generator=g) * torch.rand(512, generator=g) * 0.1
    v = torch.rand(512, generator=g) ** 3 * 10
    cfg = QuantConfig(bits=3, dtype="lloyd", importance="norm")
    fitted = quantizer.quantize_weight(w, cfg, importance=v)
    nf = quantizer.quantize_weight(w, QuantConfig(bits=3, dtype="nf"))
    unweighted = lloyd.fit_codebook(lloyd.sample_rows(w), 3, 64)
    plain = quantizer.quantize_weight(w, QuantConfig(bits=3, dtype="lloyd"), codebook=unweighted)
    e_fit = weighted_block_error(w, fitted, v, 64).sum()
    assert e_fit <= weighted_block_error(w, nf, v, 64).sum()
    assert e_fit < weighted_block_error(w, plain, v, 64).sum()  # the weights change the fit


def test_lloyd_with_mse_and_importance_fits_the_plain_codebook_then_weights_the_scales():
    """With --scales mse the importance weights the scale search only: the codebook is the plain
    (absmax, unweighted) Lloyd fit, and the scales are the weighted search's for it."""
    g = torch.Generator().manual_seed(9)
    w = torch.randn(64, 256, generator=g) * 0.05
    v = torch.rand(256, generator=g) ** 4 * 30
    q = quantizer.quantize_weight(w, QuantConfig(bits=3, dtype="lloyd", scales="mse",
                                                 importance="norm"), importance=v)
    plain = quantizer.quantize_weight(w, QuantConfig(bits=3, dtype="lloyd"))
    assert torch.equal(q.codebook, plain.codebook)
    s = scales.round_scale(scales.block_scales(w, 64, "mse", plain.codebook, "fp16", v), "fp16")
    assert torch.equal(q.absmax_float(), s)


# ------------------------------------------------------------------------------- norm lookup rule

def test_norm_lookup_picks_the_norm_each_linear_reads(tiny_models):
    from transformers import AutoConfig

    from kbitrt.convert.importance import norm_inputs

    llama = norm_inputs(AutoConfig.from_pretrained(tiny_models["llama"]))
    for i in range(2):
        p = f"model.layers.{i}."
        for lin in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            assert llama[p + lin] == p + "input_layernorm"
        for lin in ("mlp.gate_proj", "mlp.up_proj"):
            assert llama[p + lin] == p + "post_attention_layernorm"
    assert len(llama) == 10  # o_proj and down_proj read no norm: uniform
    gpt2 = norm_inputs(AutoConfig.from_pretrained(tiny_models["gpt2"]))
    assert gpt2 == {f"transformer.h.{i}.{lin}": f"transformer.h.{i}.{norm}"
                    for i in range(2) for lin, norm in (("attn.c_attn", "ln_1"), ("mlp.c_fc", "ln_2"))}
    opt = norm_inputs(AutoConfig.from_pretrained(tiny_models["opt"]))
    assert opt["model.decoder.layers.1.self_attn.v_proj"] == "model.decoder.layers.1.self_attn_layer_norm"
    assert opt["model.decoder.layers.0.fc1"] == "model.decoder.layers.0.final_layer_norm"
    assert "model.decoder.layers.0.fc2" not in opt and len(opt) == 8
    post = AutoConfig.from_pretrained(tiny_models["opt"])
    post.do_layer_norm_before = False  # OPT-350m: the norms come after the residual add
    assert norm_inputs(post) == {}


def with_random_gains(src: Path, dst: Path) -> Path:
    """A copy of a tiny model whose norm gains are uneven (random init leaves them all 1)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(7)
    for f in dst.glob("*.safetensors"):
        t = load_file(f)
        for k in t:
            if "norm" in k and k.endswith(".weight"):
                t[k] = torch.rand(t[k].shape, generator=g) ** 3 * 4
        save_file(t, f, metadata={"format": "pt"})
    return dst


def test_conversion_with_norm_importance_streams_as_in_memory_and_reloads(tiny_models, smollm2_dir,
                                                                          tmp_path):
    from test_hf_integration import greedy_both

    from kbitrt.convert.importance import norm_inputs_of_folder

    src = with_random_gains(tiny_models["llama"], tmp_path / "src")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(smollm2_dir / f, src / f)
    cfg = QuantConfig(bits=4, block_size=32, scales="mse", importance="norm")
    reads = norm_inputs_of_folder(src)
    convert(src, tmp_path / "out", cfg, norm_inputs=reads)
    convert(src, tmp_path / "plain", QuantConfig(bits=4, block_size=32, scales="mse"))
    km, plain = KbitModel.open(tmp_path / "out"), KbitModel.open(tmp_path / "plain")
    assert km.quant == cfg
    weights = hf_weights(src)
    differ = 0
    for module in km.quantized_modules:
        imp = weights[f"{reads[module]}.weight"].square() if module in reads else None
        ref = quantizer.quantize_weight(weights[f"{module}.weight"], cfg, module, importance=imp)
        got = km.quantized(module)
        assert torch.equal(got.absmax, ref.absmax) and torch.equal(got.qweight, ref.qweight), module
        same = torch.equal(got.absmax, plain.quantized(module).absmax)
        assert same == (module not in reads), module  # weighted exactly where a norm is read
        differ += not same
    assert differ == len(reads)
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["importance"] == "norm" and qc["scales"] == "mse"
    assert "importance" in (tmp_path / "out" / "README.md").read_text()
    ours, theirs, _ = greedy_both(tmp_path / "out", [1, 17, 33, 5, 90, 12], 10)
    assert ours == theirs and len(ours) > 0


def test_cli_importance_norm_end_to_end_and_errors(tiny_models, tmp_path):
    src = with_random_gains(tiny_models["gpt2"], tmp_path / "src")
    r = run_cli("convert", src, "-o", tmp_path / "out", "--dtype", "lloyd", "--importance", "norm",
                "--json")
    assert r.exit_code == 0, r.output
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["importance"] == "norm" and qc["dtype"] == "lloyd"
    assert_one_line_error(run_cli("convert", src, "-o", tmp_path / "o2", "--importance", "norm"),
                          "--scales mse or --dtype lloyd")
    r = run_cli("convert", src, "-o", tmp_path / "o3", "--scales", "mse", "--importance", "hessian")
    assert r.exit_code != 0 and "--importance hessian needs --calib" in r.output
    with pytest.raises(KbitFormatError, match="needs the model.s forward"):  # the Python API too
        convert(src, tmp_path / "o4", QuantConfig(scales="mse", importance="hessian"))


# ------------------------------------------------------------------ calibrated: rtn and GPTQ

def test_calibrated_rtn_cli_end_to_end(tiny_llama_with_tokenizer, tmp_path):
    """--importance hessian with round-to-nearest: one calibration pass, then the weighted search;
    recorded in config.json, reloads with equal greedy tokens through kbit run and transformers."""
    from test_hf_integration import greedy_both

    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    out = tmp_path / "out"
    r = run_cli("convert", tiny_llama_with_tokenizer, "-o", out, "--scales", "mse", "--importance",
                "hessian", "--calib", text, "--calib-samples", "4", "--calib-seqlen", "64", "--json")
    assert r.exit_code == 0, r.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["importance"] == "hessian" and "method" not in qc
    assert qc["calibration"] == {"dataset": "calib.txt", "samples": 4, "seqlen": 64,
                                 "windows": "last non-overlapping windows of the text"}
    plain = tmp_path / "plain"
    assert run_cli("convert", tiny_llama_with_tokenizer, "-o", plain, "--scales", "mse").exit_code == 0
    a, b = KbitModel.open(out), KbitModel.open(plain)
    assert any(not torch.equal(a.quantized(m).absmax, b.quantized(m).absmax)
               for m in a.quantized_modules)  # the calibration changed the scales
    ours, theirs, _ = greedy_both(out, [1, 17, 33, 5, 90, 12], 8)
    assert ours == theirs and len(ours) > 0


def test_random_importance_cli_end_to_end(tiny_llama_with_tokenizer, tmp_path):
    """--importance random: no data, the model reads seeded random tokens; deterministic, recorded,
    reloads with equal greedy tokens; --calib with it is refused."""
    from test_hf_integration import greedy_both

    from kbitrt.convert.calibrate import random_windows

    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        r = run_cli("convert", tiny_llama_with_tokenizer, "-o", out, "--scales", "mse", "--importance",
                    "random", "--calib-samples", "3", "--calib-seqlen", "32", "--json")
        assert r.exit_code == 0, r.output
    for f in sorted(a.glob("*.safetensors")):  # same seed, same bytes
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name
    qc = json.loads((a / "config.json").read_text())["quantization_config"]
    assert qc["importance"] == "random"
    assert qc["calibration"] == {"dataset": "random tokens", "samples": 3, "seqlen": 32,
                                 "windows": "uniform over the vocabulary, seed 0"}
    ids = random_windows(tiny_llama_with_tokenizer, 3, 32)
    assert ids.shape == (3, 32) and torch.equal(ids, random_windows(tiny_llama_with_tokenizer, 3, 32))
    ours, theirs, _ = greedy_both(a, [1, 17, 33, 5, 90, 12], 8)
    assert ours == theirs and len(ours) > 0
    r = run_cli("convert", tiny_llama_with_tokenizer, "-o", tmp_path / "c", "--scales", "mse",
                "--importance", "random", "--calib", "wiki-sample")
    assert r.exit_code != 0 and "drop --calib" in r.output


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_random_importance_converts_each_native_family(tiny_models, tmp_path, family):
    from kbitrt.convert.calibrate import Calibration

    cfg = QuantConfig(bits=4, block_size=32, dtype="lloyd", scales="mse", importance="random")
    report = convert(tiny_models[family], tmp_path / "out", cfg,
                     calibration=Calibration(samples=2, seqlen=16))
    km = KbitModel.open(tmp_path / "out")
    assert km.quant == cfg and report.linears_quantized == len(km.quantized_modules) > 0
    plain = tmp_path / "plain"
    convert(tiny_models[family], plain, QuantConfig(bits=4, block_size=32, dtype="lloyd", scales="mse"))
    other = KbitModel.open(plain)
    assert any(not torch.equal(km.quantized(m).absmax, other.quantized(m).absmax)
               for m in km.quantized_modules)


def test_gptq_hessian_importance_lowers_the_output_error_of_static_scales():
    """With --act-order (static scales) the Hessian-weighted mse scales give a lower layer-output
    error on the calibration inputs than unweighted ones, on inputs with uneven channels."""
    from kbitrt.convert.gptq import Hessian, gptq_quantize

    g = torch.Generator().manual_seed(8)
    k, n = 256, 96
    x = torch.randn(2048, k, generator=g) * (torch.rand(k, generator=g) ** 4 * 20 + 0.05)
    w = torch.randn(n, k, generator=g) * 0.05
    hs = Hessian(k)
    hs.add(x)
    h = hs.matrix()
    err = {}
    for imp in ("none", "hessian"):
        cfg = QuantConfig(bits=3, block_size=32, scales="mse", method="gptq", importance=imp)
        q = gptq_quantize(w, h, cfg, act_order=True)
        err[imp] = (x @ (q.dequantize() - w).t()).square().mean().item()
    assert err["hessian"] < err["none"]
