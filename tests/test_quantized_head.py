"""A k-bit output head and input embedding (convert --head-bits/--embedding-bits): stored at their
own width (quantization_config.module_bits), a tied pair at one width stored once and read by
both, the embedding dequantizing only looked-up rows, logits near the 16-bit head's, on the CPU
path and under the CUDA twin; bad widths refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_one_line_error, run_cli
from kbitrt.convert.converter import convert
from kbitrt.format.config import KbitFormatError, QuantConfig
from kbitrt.format.packing import packed_row_bytes
from kbitrt.format.quantizer import quantize_weight
from kbitrt.format.reader import KbitModel
from kbitrt.runtime.devices import cuda_twin
from kbitrt.runtime.embedding import QuantizedEmbedding, gather_dequantize, gather_dequantize_torch
from kbitrt.runtime.linear import KbitLinear
from kbitrt.runtime.loader import build_model

V, H = 512, 64
# relative logits error (norm) against the 16-bit head and embedding over an nf4 body, measured
# on this tiny random model: 0.014-0.019 at 8 bits, ~0.095 at 4 bits; bounds with headroom
BOUND = {8: 0.05, 4: 0.25}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = {}
    for tied in (True, False):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
        folder = tmp_path_factory.mktemp("qhead") / f"tied{tied}"
        AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folder)
        out[tied] = folder
    return out


def converted(src, tmp_path, name, **widths):
    out = tmp_path / name
    convert(src, out, QuantConfig(bits=4, block_size=64, **widths))
    return out


def logits(folder, ids, device="cpu", **kw):
    lm = build_model(KbitModel.open(folder, check_model=False), device, **kw)
    with torch.no_grad():
        return lm, lm.model(ids).float()


IDS = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tied", [True, False])
def test_head_and_embedding_bits_store_their_width_and_stay_near_the_16_bit_head(sources, tmp_path, tied):
    src = sources[tied]
    _, base = logits(converted(src, tmp_path, "base"), IDS)
    errors = {}
    for bits in (8, 4):
        folder = converted(src, tmp_path, f"h{bits}", head_bits=bits, embedding_bits=bits)
        km = KbitModel.open(folder)
        cfg = json.loads((folder / "config.json").read_text())
        qc = cfg["quantization_config"]
        assert (qc["head_bits"], qc["embedding_bits"]) == (bits, bits)
        emb = km.quantized("model.embed_tokens")
        assert emb.bits == bits and emb.qweight.shape == (V, packed_row_bytes(H, bits))
        # tied at one width: stored once, as the embedding, and the model stays tied
        assert ("lm_head" in km.modules) is not tied and cfg["tie_word_embeddings"] is tied
        assert "model.embed_tokens.weight" not in km.plain_names
        lm, got = logits(folder, IDS)
        assert isinstance(lm.model.tok_emb, QuantizedEmbedding)
        assert isinstance(lm.model.lm_head, KbitLinear) and lm.model.lm_head.bits == bits
        assert (lm.model.lm_head is lm.model.tok_emb.table) is tied
        errors[bits] = float((got - base).norm() / base.norm())
        assert 0 < errors[bits] < BOUND[bits], errors
    assert errors[8] < errors[4]


def test_tied_pair_at_two_widths_is_two_tensors_and_the_head_alone_keeps_the_embedding(sources, tmp_path):
    src = sources[True]
    folder = converted(src, tmp_path, "h8e4", head_bits=8, embedding_bits=4)
    km = KbitModel.open(folder)
    assert km.quantized("lm_head").bits == 8 and km.quantized("model.embed_tokens").bits == 4
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False
    head_only = KbitModel.open(converted(src, tmp_path, "h6", head_bits=6))
    assert head_only.quantized("lm_head").bits == 6 and "model.embed_tokens.weight" in head_only.plain_names
    lm, _ = logits(folder, IDS)
    table = lm.model.tok_emb.table
    ids = torch.tensor([0, 7, 7, V - 1])
    assert torch.equal(gather_dequantize(table, ids), gather_dequantize_torch(table, ids))


@pytest.mark.parametrize("bits", [3, 5, 8])
def test_gather_dequantize_matches_its_twin(bits):
    w = torch.randn(40, 100)
    cfg = QuantConfig(bits=bits, block_size=32, outliers=None)
    table = KbitLinear.from_quantized(quantize_weight(w, cfg), cpu_cache=False)
    ids = torch.tensor([3, 0, 39, 3])
    torch.testing.assert_close(gather_dequantize(table, ids), gather_dequantize_torch(table, ids))
    emb = QuantizedEmbedding(table, torch.float32)
    assert emb(ids.view(2, 2)).shape == (2, 2, 100)


def test_the_gpu_path_reads_the_quantized_head_and_embedding_under_the_cuda_twin(sources, tmp_path):
    folder = converted(sources[True], tmp_path, "twin", head_bits=8, embedding_bits=8)
    _, cpu = logits(folder, IDS)
    with cuda_twin():
        lm, gpu = logits(folder, IDS, dtype=torch.float16)
    assert isinstance(lm.model.tok_emb, QuantizedEmbedding) and lm.model.lm_head is lm.model.tok_emb.table
    assert float((gpu - cpu).abs().max() / cpu.abs().max()) < 1e-2


def test_bad_widths_are_one_line(sources, tmp_path):
    for flag, value in (("--head-bits", "9"), ("--embedding-bits", "2"), ("--head-bits", "x")):
        r = run_cli("convert", sources[False], "-o", tmp_path / "bad", flag, value)
        assert_one_line_error(r, flag)
        assert not (tmp_path / "bad").exists()
    with pytest.raises(KbitFormatError, match="--head-bits"):
        QuantConfig(head_bits=12)
    cfg = QuantConfig(bits=4, head_bits=8, module_bits=(("lm_head", 8),))
    assert QuantConfig.from_json(cfg.to_json()) == cfg and cfg.for_module("lm_head").bits == 8


def test_head_dtype_is_recorded_per_module_and_drops_the_linears_own_options():
    cfg = QuantConfig(bits=5, dtype="fp", exponent_bits=3, head_bits=8, embedding_bits=8,
                      head_dtype="int", module_bits=(("lm_head", 8),),
                      module_dtypes=(("lm_head", "int"),))
    assert QuantConfig.from_json(cfg.to_json()) == cfg
    head = cfg.for_module("lm_head")
    assert (head.bits, head.dtype, head.exponent_bits, head.module_dtypes) == (8, "int", None, ())
    assert cfg.for_module("model.layers.0.mlp.up_proj") is cfg
    with pytest.raises(KbitFormatError, match="module_dtypes"):
        QuantConfig.from_json({**cfg.to_json(), "module_dtypes": {"lm_head": 8}})
    with pytest.raises(KbitFormatError):
        QuantConfig(head_bits=8, head_dtype="nonesuch")


# --- the default of `kbit convert` (8-bit head and embedding) in every family and every loader ---

def _dequantized_pair(name: str, config, tmp_path):
    """(kbit folder of the tiny `name` with an 8-bit head and embedding, transformers on its
    dequantized weights)."""
    from transformers import AutoModelForCausalLM

    from kbitrt.convert.dequantize import dequantize_model

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for p in hf.parameters():  # larger than the default init, so a lost scale is not hidden
        p.data.normal_(0, 0.2)
    hf.save_pretrained(tmp_path / "src")
    folder = tmp_path / "q"
    convert(tmp_path / "src", folder, QuantConfig(bits=4, block_size=32, head_bits=8, embedding_bits=8,
                                                  head_dtype="int"))  # kbit convert's default
    dequantize_model(folder, tmp_path / "dq", "fp32", force=True)
    return folder, AutoModelForCausalLM.from_pretrained(tmp_path / "dq", dtype=torch.float32).eval()


def _gemma():
    from transformers import GemmaConfig

    return GemmaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=16)


def _families():
    from test_models import PYTHON_LAYERS, TINY

    return {**TINY, **PYTHON_LAYERS, "gemma": _gemma}


@pytest.mark.parametrize("name", sorted(_families()))
def test_every_family_with_an_8_bit_head_and_embedding_matches_transformers(name, tmp_path):
    from test_models import ATOL, batch, hf_logits

    folder, ref_model = _dequantized_pair(name, _families()[name](), tmp_path)
    ids, mask, _ = batch(pads=(0, 0))
    ref = hf_logits(ref_model, ids, mask)
    # gemma has no native spec: the transformers backend, which keeps its scaled embedding
    lm = build_model(KbitModel.open(folder), "cpu", cpu_weights="fp32")
    assert isinstance(lm.model.model.get_input_embeddings() if lm.backend == "transformers"
                      else lm.model.tok_emb, QuantizedEmbedding)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).float(), ref, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "gemma", "gpt2", "neox"])
def test_from_pretrained_and_save_pretrained_keep_the_8_bit_head_and_embedding(name, tmp_path):
    """transformers loads the k-bit embedding into its own embedding class (Gemma's scale), a tied
    pair as one table, the head at its own width, computes in the dtype asked for, and saves the
    same tensors back."""
    import kbitrt  # noqa: F401  (registers the "kbit" quantizer)
    from test_models import batch, hf_logits
    from transformers import AutoModelForCausalLM

    from conftest import hf_weights

    folder, ref_model = _dequantized_pair(name, _families()[name](), tmp_path)
    ids, mask, _ = batch(pads=(0, 0))
    ref = hf_logits(ref_model, ids, mask)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    emb = model.get_input_embeddings()
    assert isinstance(emb, QuantizedEmbedding) and isinstance(emb, type(ref_model.get_input_embeddings()))
    assert emb.table.bits == 8 and model.get_output_embeddings().bits == 8
    tied = bool(ref_model.config.tie_word_embeddings)
    assert (model.get_output_embeddings() is emb.table) is tied
    got = hf_logits(model, ids, mask)
    assert got.dtype == torch.float32  # the weights' compute dtype is the one asked for
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-2  # int8 activations on the CPU
    model.save_pretrained(tmp_path / "again")
    a, b = hf_weights(folder), hf_weights(tmp_path / "again")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    model.dequantize()
    dense = model.get_input_embeddings()
    assert type(dense) is type(ref_model.get_input_embeddings()) and not list(dense.children())
    torch.testing.assert_close(dense.weight, ref_model.get_input_embeddings().weight)
    assert not any(isinstance(m, KbitLinear) for m in model.modules())
    torch.testing.assert_close(hf_logits(model, ids, mask), ref, atol=1e-4, rtol=1e-4)
