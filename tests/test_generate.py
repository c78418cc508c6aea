"""Generation: sampling pieces, stop conditions, batching with left padding, and SmolLM2 greedy."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from kbitrt.format.config import QuantConfig
from kbitrt.runtime.generate import SamplingConfig, apply_repetition_penalty, generate, sample
from kbitrt.errors import RunError
from kbitrt.runtime.in_memory import InMemoryKbit
from kbitrt.runtime.loader import build_model


@pytest.fixture(scope="module")
def tiny(smollm2_dir):
    """A tiny random Llama with SmolLM2's tokenizer (vocab 49152), quantized in memory."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, eos_token_id=2)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    lm = build_model(InMemoryKbit(hf, QuantConfig(bits=4, block_size=64)), "cpu", tokenizer=tok)
    return lm


def test_greedy_batch_equals_one_by_one(tiny):
    prompts = ["The capital of France is", "Hi", "1, 2, 3, 4, 5, 6, 7"]
    batch = generate(tiny, prompts, max_new_tokens=8, sampling=SamplingConfig())
    for p, text, ids in zip(prompts, batch.texts, batch.token_ids):
        one = generate(tiny, [p], max_new_tokens=8)
        assert one.token_ids[0] == ids and one.texts[0] == text
    assert batch.stats.batch == 3 and batch.stats.new_tokens > 0
    assert batch.stats.prompt_tokens_per_s > 0 and batch.stats.peak_memory_bytes > 0


def test_seed_reproducible_and_sampling_differs(tiny):
    cfg = SamplingConfig(temperature=1.0, top_p=0.95, top_k=50, seed=0)
    a = generate(tiny, ["Once upon a time"], 12, cfg)
    b = generate(tiny, ["Once upon a time"], 12, cfg)
    c = generate(tiny, ["Once upon a time"], 12, SamplingConfig(temperature=1.0, seed=1))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_sample_top_k_top_p_limits():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    got = sample(logits, SamplingConfig(temperature=1.0, top_k=2), g)
    assert set(got.tolist()) <= {0, 1}
    got = sample(logits, SamplingConfig(temperature=1.0, top_p=0.5), g)
    assert set(got.tolist()) == {0}  # token 0 alone holds > 50% of the mass
    assert sample(logits[:1], SamplingConfig(), None).item() == 0


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(2, 10)
    prev = torch.tensor([[1, 3, 3], [0, 9, 2]])
    seen = torch.zeros(2, 10, dtype=torch.bool).scatter(1, prev, True)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(prev, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.3), ref)


def test_stop_string_and_streaming(tiny):
    full = generate(tiny, ["The capital of France is"], 16)
    text = full.texts[0]
    stop = text[5:8]
    pieces = []
    cut = generate(tiny, ["The capital of France is"], 16, stop=[stop],
                   on_text=lambda row, t: pieces.append(t))
    assert cut.stop_reasons == ["stop_string"]
    assert cut.texts[0] == text[:text.find(stop)]
    assert "".join(pieces) == cut.texts[0]  # streamed text is exactly the final text


def test_eos_stops(tiny):
    full = generate(tiny, ["Hello"], 6)
    first = full.token_ids[0][0]
    tiny.config["eos_token_id"] = first  # the first generated token now ends generation
    try:
        out = generate(tiny, ["Hello"], 6)
    finally:
        tiny.config["eos_token_id"] = 2
    assert out.stop_reasons == ["eos"] and out.token_ids == [[]]


def test_prompt_too_long(tiny):
    with pytest.raises(RunError, match="at most 64 positions"):
        generate(tiny, ["word " * 100], 4)


def test_max_new_tokens_capped_by_positions(tiny):
    out = generate(tiny, ["word " * 60], 50)
    assert len(out.token_ids[0]) <= 64 - 60


def test_chat_template(tiny):
    out = generate(tiny, ["What is 2+2?"], 4, chat=True)
    assert "<|im_start|>assistant" in out.prompt_texts[0]


@pytest.mark.slow
def test_smollm2_4bit_says_paris(smollm2_nf4):
    from kbitrt.runtime.loader import load_model

    lm = load_model(smollm2_nf4, device="cpu")
    assert lm.backend == "native"
    out = generate(lm, ["The capital of France is"], 8)
    assert "Paris" in out.texts[0]
    assert out.stats.new_tokens_per_s > 0


@pytest.mark.parametrize("kw,says", [(dict(temperature=-1.0), "--temperature -1.0"),
                                     (dict(top_p=0.0), "--top-p 0.0"),
                                     (dict(top_k=0), "--top-k 0"),
                                     (dict(repetition_penalty=0.0), "--repetition-penalty 0.0")])
def test_sampling_settings_are_checked(kw, says):
    with pytest.raises(RunError, match=says):
        SamplingConfig(**kw)


def test_bad_requests_are_one_line_errors(tiny):
    with pytest.raises(RunError, match="--max-new-tokens 0: must be >= 1"):
        generate(tiny, ["Hi"], max_new_tokens=0)
    with pytest.raises(RunError, match="a prompt is empty"):
        generate(tiny, [[]], max_new_tokens=2)
    with pytest.raises(RunError, match="shorten the prompt"):
        generate(tiny, [list(range(3, 70))], max_new_tokens=2)  # the model holds 64 positions


def test_repetition_penalty_counts_the_prompt(tiny):
    """With a penalty the prompt's tokens count as seen: the output differs from greedy's."""
    prompt = [[5, 6, 7, 5, 6, 7, 5, 6, 7]]
    plain = generate(tiny, prompt, 6, SamplingConfig(temperature=0.0)).token_ids
    again = generate(tiny, prompt, 6, SamplingConfig(temperature=0.0)).token_ids
    penalized = generate(tiny, prompt, 6, SamplingConfig(temperature=0.0,
                                                         repetition_penalty=50.0)).token_ids
    assert plain == again
    assert not set(penalized[0]) & set(prompt[0])  # a huge penalty avoids every seen token
