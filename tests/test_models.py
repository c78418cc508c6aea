"""One runner for every family: a tiny random transformers model, its linears quantized in memory,
and the native decoder's logits checked against transformers' own forward on the same dequantized
weights (fp32, CPU): full forward, prefill + token-by-token decode, batch 2 with left padding."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import (AutoModelForCausalLM, BloomConfig, Gemma2Config, Gemma3TextConfig,
                          GemmaConfig, GPT2Config,
                          GPTNeoXConfig, GraniteConfig, LlamaConfig, MistralConfig, Olmo2Config,
                          OPTConfig, Phi3Config, Qwen2Config, Qwen3Config, SmolLM3Config)

from kbitrt.format.config import KbitFormatError, QuantConfig
from kbitrt.runtime.in_memory import InMemoryKbit
from kbitrt.runtime.loader import build_model

V = 96  # vocab
TINY = dict(
    gpt2=lambda: GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=48),
    opt=lambda: OPTConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                          num_attention_heads=4, max_position_embeddings=48, word_embed_proj_dim=64),
    # OPT-350m's variant: post-norm, narrower embeddings with project_in/out, no final norm
    opt_postnorm=lambda: OPTConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                                   num_attention_heads=4, max_position_embeddings=48,
                                   word_embed_proj_dim=32, do_layer_norm_before=False),
    bloom=lambda: BloomConfig(vocab_size=V, hidden_size=96, n_layer=2, n_head=6),  # 6: odd ALiBi
    neox=lambda: GPTNeoXConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=128,
                               max_position_embeddings=48, rotary_pct=0.25),
    neox_serial=lambda: GPTNeoXConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=128,
                                      max_position_embeddings=48, use_parallel_residual=False),
    llama=lambda: LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=48, tie_word_embeddings=True),
    llama3_rope=lambda: LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=16)),
    llama_linear_rope=lambda: LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=48,
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)),
    mistral_window=lambda: MistralConfig(vocab_size=V, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=1, max_position_embeddings=48,
                                         sliding_window=5),
    qwen2=lambda: Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=48),
    # fused qkv and gate_up projections, longrope (short factors below 32 positions)
    phi3=lambda: Phi3Config(vocab_size=V, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=64, pad_token_id=0,
                            original_max_position_embeddings=32,
                            rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                                 short_factor=[1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0],
                                                 long_factor=[2.0] * 8)),
)
# native families whose features the C++ layer stack lacks: decoding runs the Python layers
# (tests/test_layer_stack.py covers TINY)
PYTHON_LAYERS = dict(
    # q/k norms; attention biases; the second layer a sliding-window one
    qwen3=lambda: Qwen3Config(vocab_size=V, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=24, max_position_embeddings=48, attention_bias=True,
                              use_sliding_window=True, sliding_window=4, max_window_layers=1),
    # the second layer without rotary (NoPE)
    smollm3=lambda: SmolLM3Config(vocab_size=V, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=48, no_rope_layers=[1, 0],
                                  pad_token_id=0),
    # embedding, residual and attention multipliers, logits scaling
    granite=lambda: GraniteConfig(vocab_size=V, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=48, embedding_multiplier=3.0,
                                  residual_multiplier=0.5, attention_multiplier=0.3,
                                  logits_scaling=2.0),
    # norms on the branch outputs only, q/k norms over all heads
    olmo2=lambda: Olmo2Config(vocab_size=V, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=48),
    # sandwich norms (1 + weight), scaled embeddings, gelu-tanh, attention and final softcapping,
    # a query scale of its own, sliding-window and full layers, tied head
    gemma2=lambda: Gemma2Config(vocab_size=V, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                head_dim=16, max_position_embeddings=48, query_pre_attn_scalar=24,
                                attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                sliding_window=4),
    # Gemma 2's features with q/k norms, and a rotary table per layer type: local layers at
    # their own base frequency, global ones linearly scaled
    gemma3=lambda: Gemma3TextConfig(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=48,
        query_pre_attn_scalar=24, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        final_logit_softcapping=3.0,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0,
                                            "rope_theta": 10000.0}}),
)
WHY_PYTHON = dict(qwen3="q/k norms (Qwen3, OLMo 2)", smollm3="layers without rotary (NoPE)",
                  granite="a residual multiplier (Granite)", olmo2="q/k norms (Qwen3, OLMo 2)",
                  gemma2="norms on the branch outputs (OLMo 2, Gemma 2)",
                  gemma3="q/k norms (Qwen3, OLMo 2)")
QUANT = QuantConfig(bits=4, block_size=32, dtype="nf")
ATOL = 2e-4


def tiny_pair(name: str, quant: QuantConfig = QUANT, backend: str = "native"):
    """(transformers model on the dequantized weights, kbit model built from the same quantization)."""
    torch.manual_seed(0)
    config = {**TINY, **PYTHON_LAYERS}[name]()
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    for p in hf.parameters():  # larger than the default init, so errors are not hidden in noise
        p.data.normal_(0, 0.2)
    src = InMemoryKbit(hf, quant)
    hf.load_state_dict(src.dequantized_state_dict(), strict=False)
    lm = build_model(src, "cpu", backend=backend, cpu_weights="fp32")  # exact: vs fp32
    assert lm.backend == backend
    return hf, lm


def hf_logits(hf, ids, mask):
    kwargs = dict(input_ids=ids, attention_mask=mask)
    if "position_ids" in inspect.signature(hf.forward).parameters:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(**kwargs).logits


def batch(T: int = 11, pads=(4, 0)):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (len(pads), T), generator=g)
    mask = torch.ones_like(ids)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
        ids[b, :p] = 0
    return ids, mask, torch.tensor(pads)


def check(hf, lm):
    model = lm.model
    # full forward, no padding
    ids, mask, _ = batch(pads=(0, 0))
    with torch.no_grad():
        ours = model(ids)
    torch.testing.assert_close(ours, hf_logits(hf, ids, mask), atol=ATOL, rtol=1e-4)

    # batch 2, left padding + attention mask: compare the real tokens
    ids, mask, pad = batch()
    ref = hf_logits(hf, ids, mask)
    with torch.no_grad():
        full = model(ids, torch.arange(ids.shape[1]), pad)
    keep = mask.bool()
    torch.testing.assert_close(full[keep], ref[keep], atol=ATOL, rtol=1e-4)

    # prefill 6 tokens, then one token at a time through the static cache == full forward
    torch.testing.assert_close(cached_steps(model, ids, pad, 6)[keep], ref[keep], atol=ATOL,
                               rtol=1e-4)


def cached_steps(model, ids: torch.Tensor, pad: torch.Tensor, T0: int) -> torch.Tensor:
    """Prefill T0 tokens into a static cache, then one token at a time: every position's logits."""
    T = ids.shape[1]
    model.setup_caches(ids.shape[0], T + 3)
    try:
        with torch.no_grad():
            steps = [model(ids[:, :T0], torch.arange(T0), pad)]
            for t in range(T0, T):
                steps.append(model(ids[:, t:t + 1], torch.tensor([t]), pad))
    finally:
        model.drop_caches()
    return torch.cat(steps, 1)


@pytest.mark.parametrize("name", sorted(TINY) + sorted(PYTHON_LAYERS))
def test_native_matches_transformers(name):
    hf, lm = tiny_pair(name)
    check(hf, lm)


@pytest.mark.parametrize("name,why", sorted(WHY_PYTHON.items()))
def test_native_says_why_the_python_layers_run(name, why):
    from kbitrt.runtime.kernels import cpu

    if not cpu.available():
        pytest.skip("no fused CPU kernels: the Python layers run anyway")
    _, lm = tiny_pair(name)
    lm.model.setup_caches(1, 4)
    try:
        assert lm.model.cpu_layers == f"python (no loops for: {why})"
    finally:
        lm.model.drop_caches()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_transformers_backend_matches(name):
    hf, lm = tiny_pair(name, backend="transformers")
    check(hf, lm)


def test_unknown_family_falls_back_to_transformers():
    torch.manual_seed(0)
    cfg = GemmaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                      max_position_embeddings=48)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    src = InMemoryKbit(hf, QUANT)
    hf.load_state_dict(src.dequantized_state_dict(), strict=False)
    lm = build_model(src, "cpu", cpu_weights="fp32")  # exact: compared with fp32
    assert lm.backend == "transformers" and "gemma" in lm.note
    check(hf, lm)


@pytest.mark.parametrize("bits,dtype", [(3, "int"), (5, "fp"), (8, "quantile")])
def test_other_bit_widths(bits, dtype):
    hf, lm = tiny_pair("llama", QuantConfig(bits=bits, block_size=64, dtype=dtype))
    check(hf, lm)


def test_missing_tensor_is_named():
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(TINY["llama"](), dtype=torch.float32)
    src = InMemoryKbit(hf, QUANT)
    del src._plain["model.layers.1.post_attention_layernorm.weight"]
    with pytest.raises(KbitFormatError, match="post_attention_layernorm"):
        build_model(src, "cpu")


def test_wrong_shape_is_named():
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(TINY["gpt2"](), dtype=torch.float32)
    src = InMemoryKbit(hf, QUANT)
    src._plain["transformer.wpe.weight"] = torch.zeros(10, 64)
    with pytest.raises(KbitFormatError, match=r"transformer.wpe.weight has shape \(10, 64\)"):
        build_model(src, "cpu")


@pytest.mark.slow
def test_smollm2_native_matches_transformers(smollm2_dir, smollm2_nf4):
    from kbitrt.format.reader import KbitModel

    src = KbitModel.open(smollm2_nf4)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    weights = {n: src.tensor(n).float() for n in src.plain_names}  # 16-bit on disk
    weights.update({f"{n}.weight": src.quantized(n).dequantize() for n in src.quantized_modules})
    hf.load_state_dict(weights, strict=False)
    lm = build_model(src, "cpu", cpu_weights="fp32")  # exact: compared with fp32
    assert lm.backend == "native"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    pad = torch.tensor([3, 0])
    ref = hf_logits(hf, ids, mask)
    model = lm.model
    model.setup_caches(2, 9)
    try:
        with torch.no_grad():
            steps = [model(ids[:, :6], torch.arange(6), pad)]
            steps += [model(ids[:, t:t + 1], torch.tensor([t]), pad) for t in range(6, 9)]
    finally:
        model.drop_caches()
    keep = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[keep], ref[keep], atol=2e-3, rtol=1e-3)


def test_phi3_longrope_switches_to_long_factors_past_the_original_length():
    """Positions past original_max_position_embeddings (8 here, 11 tokens) use the long factors,
    as transformers' dynamic update does for such a forward."""
    torch.manual_seed(0)
    cfg = TINY["phi3"]()
    cfg.rope_parameters["original_max_position_embeddings"] = 8
    cfg.original_max_position_embeddings = 8
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    for p in hf.parameters():
        p.data.normal_(0, 0.2)
    src = InMemoryKbit(hf, QUANT)
    hf.load_state_dict(src.dequantized_state_dict(), strict=False)
    lm = build_model(src, "cpu", backend="native", cpu_weights="fp32")
    ids, mask, _ = batch(pads=(0, 0))
    with torch.no_grad():
        ours, short = lm.model(ids), lm.model(ids[:, :8])
    torch.testing.assert_close(ours, hf_logits(hf, ids, mask), atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(short, hf_logits(hf, ids[:, :8], mask[:, :8]), atol=ATOL, rtol=1e-4)
    assert not torch.allclose(ours[:, :8], short, atol=1e-3)  # the long factors changed them
