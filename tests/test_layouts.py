"""Real checkpoint layouts: tiny models saved by each transformers class's own save_pretrained,
then renamed to the historic names the Hub's repositories use and transformers still loads
(GPT-2 without `transformer.` and with attn.bias buffers, OPT with `decoder.`, BLOOM without
`transformer.`, Pythia's `embed_out`, Llama/Mistral/Qwen2 tied and untied, sharded with an index).
Each converts whole, and its logits match transformers' on the same (dequantized) weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from kbitrt.convert.converter import convert
from kbitrt.convert.dequantize import dequantize_model
from kbitrt.errors import KbitFormatError
from kbitrt.format.config import QuantConfig
from kbitrt.format.reader import KbitModel
from kbitrt.runtime.loader import build_model

V = 96
QUANT = QuantConfig(bits=4, block_size=32, dtype="nf")


def _tril(n: int) -> torch.Tensor:
    return torch.tril(torch.ones(n, n)).view(1, 1, n, n)


def _strip(prefix: str):
    return lambda k: k[len(prefix):] if k.startswith(prefix) else k


def gpt2_hub(sd, cfg):  # the `gpt2` repository: no prefix, tied head absent, mask buffers saved
    out = {_strip("transformer.")(k): v for k, v in sd.items() if k != "lm_head.weight"}
    for i in range(cfg.n_layer):
        out[f"h.{i}.attn.bias"] = _tril(cfg.n_positions)
        out[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return out


def opt_hub(sd, cfg):  # facebook/opt-*: `decoder.` keys, no `model.`, tied head absent
    return {_strip("model.")(k): v for k, v in sd.items() if k != "lm_head.weight"}


def bloom_hub(sd, cfg):  # bigscience/bloom-*: no `transformer.` prefix, tied head absent
    return {_strip("transformer.")(k): v for k, v in sd.items() if k != "lm_head.weight"}


def pythia_hub(sd, cfg):  # EleutherAI/pythia-*: head saved as embed_out, old attention buffers
    out = {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in sd.items()}
    rot = cfg.hidden_size // cfg.num_attention_heads // 4  # rotary_pct 0.25
    for i in range(cfg.num_hidden_layers):
        out[f"gpt_neox.layers.{i}.attention.bias"] = _tril(cfg.max_position_embeddings).bool()
        out[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        out[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(rot // 2)
    return out


def llama_old(sd, cfg):  # Llama checkpoints of 2023 saved the rotary inv_freq of every layer
    out = dict(sd)
    half = cfg.hidden_size // cfg.num_attention_heads // 2
    for i in range(cfg.num_hidden_layers):
        out[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(half)
    return out


def as_saved(sd, cfg):
    return sd


LLAMA = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48)
LAYOUTS = {
    "gpt2-hub": ("gpt2", dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=48), gpt2_hub),
    "opt-hub": ("opt", dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                            num_attention_heads=4, max_position_embeddings=48,
                            word_embed_proj_dim=64), opt_hub),
    "bloom-hub": ("bloom", dict(vocab_size=V, hidden_size=96, n_layer=2, n_head=6), bloom_hub),
    "pythia-hub": ("gpt_neox", dict(vocab_size=V, hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=128,
                                    max_position_embeddings=48, rotary_pct=0.25,
                                    tie_word_embeddings=False), pythia_hub),
    "llama-tied": ("llama", dict(LLAMA, tie_word_embeddings=True), as_saved),
    "llama-untied-old": ("llama", dict(LLAMA, tie_word_embeddings=False), llama_old),
    "mistral-untied": ("mistral", dict(LLAMA, tie_word_embeddings=False, sliding_window=None), as_saved),
    "qwen2-tied": ("qwen2", dict(LLAMA, tie_word_embeddings=True), as_saved),
    "qwen2-untied": ("qwen2", dict(LLAMA, tie_word_embeddings=False), as_saved),
}


def make_layout(name: str, folder: Path, shard: str | None = None) -> Path:
    """save_pretrained of the family's own class, then tensors renamed to the historic layout."""
    model_type, kw, rename = LAYOUTS[name]
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **kw)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kwargs)
    index = folder / "model.safetensors.index.json"
    files = sorted(folder.glob("*.safetensors"))
    sd = {}
    for f in files:
        sd.update(load_file(f))
        f.unlink()
    sd = rename(sd, cfg)
    if shard:  # keep it sharded: two files and an index naming the renamed tensors
        names = sorted(sd)
        half = len(names) // 2
        parts = {"model-00001-of-00002.safetensors": names[:half],
                 "model-00002-of-00002.safetensors": names[half:]}
        for fname, keys in parts.items():
            save_file({k: sd[k].contiguous() for k in keys}, folder / fname, {"format": "pt"})
        index.write_text(json.dumps({"metadata": {}, "weight_map": {
            k: f for f, keys in parts.items() for k in keys}}))
    else:
        index.unlink(missing_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, folder / "model.safetensors",
                  {"format": "pt"})
    return folder


def _ids():
    return torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name,shard", [(n, None) for n in sorted(LAYOUTS)] + [("llama-untied-old", "20KB")])
def test_layout_converts_whole_and_matches_transformers(name, shard, tmp_path):
    src = make_layout(name, tmp_path / "src", shard)
    if shard:
        assert (src / "model.safetensors.index.json").exists()
    # the layout is one transformers itself loads: nothing missing
    ref_src, info = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32,
                                                         output_loading_info=True)
    assert not info["missing_keys"], info

    out = tmp_path / "kbit"
    report = convert(src, out, QUANT)
    assert report.dropped == []
    km = KbitModel.open(out)
    assert km.modules, "no quantized linears"

    # transformers on the dequantized folder: every weight in its place, none random
    deq = tmp_path / "deq"
    dequantize_model(out, deq, "fp32")
    ref, info = AutoModelForCausalLM.from_pretrained(deq, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    a, b = ref_src.state_dict(), ref.state_dict()
    for k, v in a.items():
        if not v.is_floating_point() or k not in b:
            continue
        err = (b[k] - v).norm() / v.norm().clamp(min=1e-6)
        assert err < 0.15, f"{name}: {k} differs from the source by {err:.3f}"
    ref.eval()

    ids = _ids()
    with torch.no_grad():
        want = ref(input_ids=ids).logits
    for backend in ("native", "transformers"):
        lm = build_model(km, "cpu", backend=backend, dtype=torch.float32, cpu_weights="fp32")
        with torch.no_grad():
            got = lm.model(ids)
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4,
                                   msg=lambda m: f"{name} ({backend}): {m}")


def test_pythia_head_is_converted(tmp_path):
    src = make_layout("pythia-hub", tmp_path / "src")
    report = convert(src, tmp_path / "kbit", QUANT)
    km = KbitModel.open(tmp_path / "kbit")
    assert "lm_head.weight" in km.plain_names and "embed_out.weight" not in km.plain_names
    assert sorted(report.skipped) == sorted(k for k in load_file(src / "model.safetensors")
                                            if ".attention.bias" in k or "masked_bias" in k
                                            or "inv_freq" in k)
    torch.testing.assert_close(km.tensor("lm_head.weight").float(),
                               load_file(src / "model.safetensors")["embed_out.weight"].half().float())


MOE = {"mixtral": dict(num_local_experts=4),
       "qwen2_moe": dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32)}


@pytest.mark.parametrize("model_type", sorted(MOE))
def test_moe_expert_missing_a_part_is_refused_up_front_with_one_line(tmp_path, model_type):
    """MoE models convert (tests/test_moe.py); an expert whose up projection is missing is named."""
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=V, hidden_size=64, intermediate_size=32,
                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=48, **MOE[model_type])
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "src")
    state = load_file(tmp_path / "src" / "model.safetensors")
    gone = next(k for k in sorted(state) if k.endswith(("experts.3.w3.weight", "experts.3.up_proj.weight")))
    save_file({k: v for k, v in state.items() if k != gone}, tmp_path / "src" / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(KbitFormatError, match="experts.gate_up_proj.3 gets 32 rows") as e:
        convert(tmp_path / "src", tmp_path / "kbit", QUANT)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "kbit").exists() and not list(tmp_path.glob(".kbit*"))
