"""More accuracy per bit (issue 15): mse block scales, Lloyd-Max codebooks, GPTQ; same format."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kbitrt.convert import converter as conv_mod
from kbitrt.convert.converter import convert
from kbitrt.format import blockwise, dtypes, lloyd, scales, quantizer
from kbitrt.format.config import KbitFormatError, OutlierSpec, QuantConfig
from kbitrt.format.reader import KbitModel

from conftest import hf_weights


def per_block_error(w: torch.Tensor, q: blockwise.QuantizedWeight, block: int) -> torch.Tensor:
    """float64 (N, n_blocks) squared error of each block, from the dequantized weight."""
    d = (q.dequantize().double() - w.double())
    n, k = d.shape
    nb = -(-k // block)
    d = torch.nn.functional.pad(d, (0, nb * block - k))
    return d.view(n, nb, block).square().sum(-1)


# ------------------------------------------------------------------------------------ mse scales

@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(["int", "fp", "nf", "dynamic", "quantile", "lloyd"]),
       bits=st.integers(3, 8), block=st.sampled_from([32, 64, 128]), n=st.integers(1, 8),
       k=st.integers(1, 300), absmax=st.sampled_from(["fp16", "fp32"]),
       heavy=st.booleans(), seed=st.integers(0, 2**16))
def test_mse_scales_never_increase_a_blocks_error(dtype, bits, block, n, k, absmax, heavy, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    if heavy:  # outliers in some blocks: the case clipping is for
        w = w * torch.distributions.StudentT(2.0).sample((n, k)).abs().clamp(max=50)
    base = QuantConfig(bits=bits, block_size=block, dtype=dtype, absmax_dtype=absmax)
    q_abs = quantizer.quantize_weight(w, base)
    # same codebook for both (quantile and lloyd codebooks depend on the scales otherwise)
    q_mse = quantizer.quantize_weight(w, QuantConfig(**{**base.__dict__, "scales": "mse"}),
                                      codebook=q_abs.codebook)
    e_abs, e_mse = per_block_error(w, q_abs, block), per_block_error(w, q_mse, block)
    assert (e_mse <= e_abs * (1 + 1e-6) + 1e-30).all()
    # the stored scale is what the kernels read: zero exactly for the all-zero blocks, else > 0
    s_abs, s_mse = q_abs.absmax_float(), q_mse.absmax_float()
    assert torch.equal(s_mse == 0, s_abs == 0) and torch.isfinite(s_mse).all()


def test_mse_scales_lower_the_error_of_gaussian_weights():
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0)) * 0.02
    for dtype in ("nf", "int", "fp"):
        cfg = QuantConfig(bits=4, dtype=dtype)
        e_abs = (quantizer.quantize_weight(w, cfg).dequantize() - w).norm()
        e_mse = (quantizer.quantize_weight(w, QuantConfig(bits=4, dtype=dtype, scales="mse"))
                 .dequantize() - w).norm()
        assert e_mse < 0.98 * e_abs, dtype


def test_mse_scales_widen_and_least_squares_steps_help(monkeypatch):
    w = torch.randn(128, 1024, generator=torch.Generator().manual_seed(1)) * 0.02
    cfg = QuantConfig(bits=4, dtype="nf", scales="mse")
    q_abs = quantizer.quantize_weight(w, QuantConfig(bits=4, dtype="nf"))
    err = {}
    for steps in (0, 2):
        monkeypatch.setattr(scales, "LS_STEPS", steps)
        q = quantizer.quantize_weight(w, cfg)
        err[steps] = (q.dequantize() - w).norm().item()
        if steps:  # some blocks are best served by a scale above their absmax (nothing clips)
            assert (q.absmax_float() > q_abs.absmax_float()).any()
    assert err[2] < err[0]


def test_mse_scales_stay_exact_for_zero_blocks_and_fp16_values():
    w = torch.randn(4, 256) * 0.1
    w[1] = 0.0
    w[2, :64] = 0.0
    s = scales.block_scales(w, 64, "mse", dtypes.get("nf").levels(4), "fp16")
    assert torch.equal(s[1], torch.zeros(4)) and s[2, 0] == 0
    assert torch.equal(s, s.half().float())  # fp16 values: stored exactly as chosen


def test_unknown_scales_is_one_clear_error():
    with pytest.raises(KbitFormatError, match="--scales"):
        QuantConfig(scales="l1")


def test_old_config_reads_as_absmax_and_default_json_is_unchanged():
    qc = QuantConfig().to_json()
    assert "scales" not in qc and "method" not in qc  # default output byte-identical
    assert QuantConfig.from_json(qc).scales == "absmax"
    mse = QuantConfig(scales="mse")
    assert mse.to_json()["scales"] == "mse" and QuantConfig.from_json(mse.to_json()) == mse
    assert mse.label == "nf4-b64-mse"


# ------------------------------------------------------------------------------- lloyd codebooks

def tensor_error(w: torch.Tensor, cfg: QuantConfig, codebook: torch.Tensor) -> float:
    return float((quantizer.quantize_weight(w, cfg, codebook=codebook).dequantize().double()
                  - w.double()).square().sum())


@settings(max_examples=15, deadline=None)
@given(bits=st.integers(3, 6), block=st.sampled_from([32, 64]), n=st.integers(1, 40),
       k=st.integers(8, 200), heavy=st.booleans(), sc=st.sampled_from(["absmax", "mse"]),
       seed=st.integers(0, 2**16))
def test_lloyd_never_increases_the_tensor_error_over_its_starting_levels(bits, block, n, k, heavy,
                                                                         sc, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    if heavy:
        w = w * torch.distributions.StudentT(3.0).sample((n, k)).abs().clamp(max=20)
    cfg = QuantConfig(bits=bits, block_size=block, dtype="lloyd", scales=sc)
    fitted = lloyd.fit_codebook(lloyd.sample_rows(w), bits, block, sc)
    assert fitted.numel() == 2**bits and (fitted == 0).any()
    assert (fitted.diff() >= 0).all() and fitted.abs().max() <= 1
    # with absmax scales the fit minimises exactly this error; with mse it alternates
    start = dtypes.get("nf").levels(bits)
    assert tensor_error(w, cfg, fitted) <= tensor_error(w, cfg, start) * (1 + 1e-6)


def test_lloyd_beats_nf_on_real_shaped_weights():
    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(1)) * 0.02
    w = w * torch.distributions.StudentT(5.0).sample((512, 512)).abs()
    nf = QuantConfig(bits=3)
    lc = QuantConfig(bits=3, dtype="lloyd")
    q = quantizer.quantize_weight(w, lc)
    assert tensor_error(w, nf, q.codebook) < 0.97 * tensor_error(w, nf, dtypes.get("nf").levels(3))


def test_lloyd_fit_is_deterministic_and_uses_whole_rows():
    w = torch.randn(3000, 2048, generator=torch.Generator().manual_seed(2))
    assert lloyd.sample_stride(*w.shape) == 2  # 6.1 M values > SAMPLE
    a = lloyd.fit_codebook(lloyd.sample_rows(w), 4, 64)
    b = lloyd.fit_codebook(lloyd.sample_rows(w.clone()), 4, 64)
    assert torch.equal(a, b)


# -------------------------------------------------------------------- converter: the same format

CONFIGS = [
    QuantConfig(bits=4, block_size=64, dtype="nf", scales="mse"),
    QuantConfig(bits=3, block_size=32, dtype="quantile", absmax_dtype="dq8", scales="mse"),
    QuantConfig(bits=4, block_size=32, dtype="lloyd"),
    QuantConfig(bits=3, block_size=64, dtype="lloyd", scales="mse",
                outliers=OutlierSpec.parse("top:5%")),
    QuantConfig(bits=5, block_size=32, dtype="int", absmax_dtype="fp32", scales="mse"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label)
def test_streaming_conversion_equals_in_memory(tiny_models, tmp_path, monkeypatch, config):
    monkeypatch.setattr(conv_mod, "CHUNK_ELEMS", 200)  # many row chunks
    src = tiny_models["llama"]
    convert(src, tmp_path / "out", config)
    km = KbitModel.open(tmp_path / "out")
    assert km.quant == config
    weights = hf_weights(src)
    for module in km.quantized_modules:
        ref = quantizer.quantize_weight(weights[f"{module}.weight"], config, module)
        got = km.quantized(module)
        assert torch.equal(got.codebook, ref.codebook), module
        assert torch.equal(got.absmax, ref.absmax), module
        assert torch.equal(got.qweight, ref.qweight), module
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc.get("scales", "absmax") == config.scales


def test_default_conversion_output_unchanged(tiny_models, tmp_path):
    """The absmax default writes no new key: same bytes as an explicit --scales absmax."""
    convert(tiny_models["gpt2"], tmp_path / "a", QuantConfig())
    convert(tiny_models["gpt2"], tmp_path / "b", QuantConfig(scales="absmax", method="rtn"))
    for f in sorted((tmp_path / "a").iterdir()):
        assert hashlib.sha256(f.read_bytes()).digest() == \
            hashlib.sha256((tmp_path / "b" / f.name).read_bytes()).digest(), f.name
    assert "scales" not in (tmp_path / "a" / "config.json").read_text()


# ---------------------------------------------------------------------------------------- GPTQ

from kbitrt.convert.gptq import Hessian, gptq_quantize  # noqa: E402


def correlated_inputs(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    scale = torch.rand(k, generator=g) * 3 + 0.1  # uneven input channels, as in LLMs
    return (torch.randn(n, k, generator=g) @ mix) * scale


@pytest.mark.parametrize("config,act_order", [
    (QuantConfig(bits=3, block_size=32), False),
    (QuantConfig(bits=4, block_size=64, dtype="int", scales="mse"), False),
    (QuantConfig(bits=3, block_size=32, dtype="lloyd", absmax_dtype="dq8"), False),
    (QuantConfig(bits=4, block_size=32, dtype="fp", absmax_dtype="fp32",
                 outliers=OutlierSpec.parse("top:5%")), True),
], ids=lambda c: c.label if isinstance(c, QuantConfig) else str(c))
def test_gptq_lowers_the_output_error_on_calibration_data(config, act_order):
    x = correlated_inputs(1024, 160, 0)  # 160: a ragged last block at 32 and 64
    w = torch.randn(48, 160, generator=torch.Generator().manual_seed(1)) * 0.05
    h = Hessian(160)
    h.add(x)
    q = gptq_quantize(w, h.matrix(), config, act_order=act_order)
    rtn = quantizer.quantize_weight(w, config)
    ref = x @ w.t()
    e_gptq = (x @ q.dequantize().t() - ref).square().sum()
    e_rtn = (x @ rtn.dequantize().t() - ref).square().sum()
    assert e_gptq < 0.8 * e_rtn
    # the stored result is a valid member of the format: codes are nearest for the stored scales
    if config.outliers is None:
        codes = blockwise.quantize_codes(q.dequantize(), q.absmax_float(), q.codebook, config.block_size)
        assert torch.equal(codes, q.codes())


def reference_gptq(w, h, codebook, block, damp=0.01, act_order=False):
    """GPTQ as Frantar et al. write it (Algorithm 1 without lazy batches), in float64: column by
    column, each rounding error spread through the upper Cholesky factor of H^-1; a block's absmax
    scale taken from the updated weights when its first column comes up (static from W with
    act-order)."""
    w, h = w.double().clone(), h.double().clone()
    n, k = w.shape
    nb = -(-k // block)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    s = torch.zeros(n, nb, dtype=torch.float64)
    if act_order:
        s = scales.round_scale(blockwise.block_absmax(w.float(), block), "fp16").double()
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order \
        else torch.arange(k)
    h += damp * torch.diagonal(h).mean() * torch.eye(k, dtype=torch.float64)
    w, h = w[:, perm], h[perm][:, perm]
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    codes = torch.zeros(n, k, dtype=torch.long)
    for j in range(k):
        col = int(perm[j])
        if not act_order and col % block == 0:
            s[:, col // block] = scales.round_scale(
                w[:, j:j + block].abs().amax(1).float(), "fp16").double()
        sc = s[:, col // block]
        x = (w[:, j] / torch.where(sc > 0, sc, torch.ones_like(sc))).clamp(-1, 1)
        c = dtypes.nearest_index(x.float(), codebook).long()
        codes[:, col] = c
        e = (w[:, j] - codebook.double()[c] * sc) / u[j, j]
        w[:, j:] -= e[:, None] * u[j, j:][None, :]
    return codes, s


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_matches_the_reference_algorithm(act_order):
    x = correlated_inputs(2048, 200, 3)  # 200 columns: two lazy batches, a ragged last block
    x[:, 7] = 0.0  # a dead input column
    w = torch.randn(64, 200, generator=torch.Generator().manual_seed(4)) * 0.05
    h = Hessian(200)
    for part in x.split(500):  # accumulated over chunks, as the driver's hooks do
        h.add(part)
    assert torch.allclose(h.matrix(), 2 * x.double().t() @ x.double() / x.shape[0], rtol=1e-5,
                          atol=1e-6)
    config = QuantConfig(bits=4, block_size=64)
    q = gptq_quantize(w, h.matrix(), config, act_order=act_order)
    codes, s = reference_gptq(w, h.matrix(), q.codebook, 64, act_order=act_order)
    assert (q.codes().long() == codes).float().mean() > 0.995
    assert torch.allclose(q.absmax_float().double(), s, rtol=2e-3)
    assert (q.codes()[:, 7] == dtypes.nearest_index(torch.zeros(1), q.codebook)).all()


def test_gptq_model_lowers_logit_error_vs_rtn(tiny_models):
    from transformers import AutoModelForCausalLM

    from kbitrt.convert.calibrate import gptq_quantize_model

    src = tiny_models["llama"]
    cfg = QuantConfig(bits=3, block_size=32, method="gptq")
    calib = torch.randint(0, 128, (16, 48), generator=torch.Generator().manual_seed(0))
    results = gptq_quantize_model(src, cfg, calib)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        original = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            ref = model(calib).logits

            def error(quantized: dict) -> float:
                model.load_state_dict({**original, **{f"{m}.weight": q for m, q in quantized.items()}})
                return float((model(calib).logits - ref).square().mean())

            assert len(results.keys()) == 14
            e_gptq = error({m: q.dequantize() for m, q in results.items()})
            e_rtn = error({m: quantizer.quantize_weight(original[f"{m}.weight"], cfg).dequantize()
                           for m in results.keys()})
        assert e_gptq < 0.8 * e_rtn
    finally:
        results.close()
    assert not results.folder.exists()


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_gptq_conversion_reloads_with_equal_greedy_tokens(tiny_models, smollm2_dir, tmp_path, family):
    from test_hf_integration import greedy_both

    from kbitrt.convert.calibrate import gptq_quantize_model

    src = tmp_path / "src"
    shutil.copytree(tiny_models[family], src)
    for f in ("tokenizer.json", "tokenizer_config.json"):  # kbitrt's runtime loads a tokenizer
        shutil.copyfile(smollm2_dir / f, src / f)
    cfg = QuantConfig(bits=4, block_size=32, dtype="lloyd" if family == "gpt2" else "nf",
                      scales="mse", method="gptq",
                      outliers=OutlierSpec.parse("top:5%") if family == "opt" else None)
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    results = gptq_quantize_model(src, cfg, calib, act_order=family == "opt")
    record = {"calibration": {"dataset": "random", "samples": 8, "seqlen": 32}}
    report = convert(src, tmp_path / "out", cfg, overrides=results, extra_quantization=record)
    results.close()
    assert report.linears_quantized == len(results.keys())
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["method"] == "gptq" and qc["calibration"] == record["calibration"]
    km = KbitModel.open(tmp_path / "out")
    assert km.quant == cfg
    ours, theirs, _ = greedy_both(tmp_path / "out", [1, 17, 33, 5, 90, 12], 10)
    assert ours == theirs and len(ours) > 0


def test_gptq_cli_end_to_end(tiny_llama_with_tokenizer, tmp_path):
    from click.testing import CliRunner
    from test_hf_integration import greedy_both

    from kbitrt.cli.main import cli

    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["convert", str(tiny_llama_with_tokenizer), "-o", str(out),
                                 "--method", "gptq", "--calib", str(text), "--calib-samples", "4",
                                 "--calib-seqlen", "64", "--act-order", "--json"])
    assert r.exit_code == 0, r.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["method"] == "gptq"
    assert qc["calibration"] == {"dataset": "calib.txt", "samples": 4, "seqlen": 64, "damp": 0.01,
                                 "act_order": True,
                                 "windows": "last non-overlapping windows of the text"}
    assert "calibration" in (out / "README.md").read_text()
    ours, theirs, _ = greedy_both(out, [1, 17, 33, 5, 90, 12], 8)
    assert ours == theirs and len(ours) > 0


def test_gptq_cli_clear_errors(tiny_models, tmp_path):
    from click.testing import CliRunner

    from kbitrt.cli.main import cli

    src = tiny_models["llama"]
    r = CliRunner().invoke(cli, ["convert", str(src), "-o", str(tmp_path / "o"), "--method", "gptq"])
    assert r.exit_code != 0 and "--calib" in r.output
    r = CliRunner().invoke(cli, ["convert", str(src), "-o", str(tmp_path / "o"), "--method", "gptq",
                                 "--calib", str(tmp_path / "missing.txt")])
    assert r.exit_code != 0 and "no such file" in r.output


# --------------------------------------------------------------------------------------- sweep

def test_sweep_grid_takes_scales_method_and_lloyd(tiny_llama_with_tokenizer, tmp_path):
    from kbitrt.sweep.grid import parse_grid
    from kbitrt.sweep.runner import SweepOptions, read_results, run_sweep

    model = str(tiny_llama_with_tokenizer)
    old = parse_grid([model], "4", "64", "nf", "none")
    assert old[0].key == f"{model}|4|64|nf|none"  # results files of before stay valid
    cells = parse_grid([model], "4", "64", "nf,lloyd", "none", "absmax,mse", "rtn,gptq")
    assert len(cells) == 8 and {c.label for c in cells} >= {"lloyd4-b64-mse-gptq", "nf4-b64"}
    assert len({c.key for c in cells}) == 8
    with pytest.raises(KbitFormatError, match="--scales"):
        parse_grid([model], "4", "64", "nf", "none", "l1", "rtn")
    with pytest.raises(KbitFormatError, match="--method"):
        parse_grid([model], "4", "64", "nf", "none", "absmax", "awq")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"Sentence {i} tells of the river, the hills and the town." for i in range(60)))
    pick = [c for c in cells if c.label in ("nf4-b64", "nf4-b64-gptq", "lloyd4-b64-mse")]
    opts = SweepOptions(ppl=[str(text)], seqlen=64, batch_size=4, calib=str(text), calib_samples=4,
                        calib_seqlen=64)
    report = run_sweep(pick, opts, tmp_path / "r.jsonl")
    assert report.done == 3
    rows = {r["label"]: r for r in read_results(tmp_path / "r.jsonl")}
    assert rows["nf4-b64-gptq"]["method"] == "gptq" and "method" not in rows["nf4-b64"]
    assert rows["lloyd4-b64-mse"]["scales"] == "mse" and rows["lloyd4-b64-mse"]["dtype"] == "lloyd"
    assert rows["nf4-b64-gptq"]["mean_rel_weight_error"] != rows["nf4-b64"]["mean_rel_weight_error"]


def test_calibration_windows_are_the_end_of_the_text(tiny_llama_with_tokenizer):
    from transformers import AutoTokenizer

    from kbitrt.convert.calibrate import calibration_windows

    text = " ".join(f"word{i}" for i in range(300))
    ids = AutoTokenizer.from_pretrained(tiny_llama_with_tokenizer)(text).input_ids
    calib = calibration_windows(tiny_llama_with_tokenizer, text, 3, 16)
    assert calib.tolist() == [ids[len(ids) - 48 + 16 * i: len(ids) - 32 + 16 * i] for i in range(3)]
