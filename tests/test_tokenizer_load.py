"""load_tokenizer's shortcut (no Python parse of tokenizer.json) gives the tokenizer transformers'
AutoTokenizer gives: the same ids, special tokens, chat template and decoding."""

from __future__ import annotations

import json
import shutil

import pytest

from kbitrt.runtime.tokenizer import load_tokenizer, tokenizer_shortcut

TEXTS = ["Hello <|im_end|> world<|endoftext|>", "  spaces\tand\nnewlines  ", "Paris, 1889: ünïcødé ✓",
         "<|im_start|>user\nhi<|im_end|>"]


def test_same_tokenizer_as_transformers(smollm2_dir):
    from transformers import AutoTokenizer

    assert tokenizer_shortcut(smollm2_dir) == {"added_tokens_decoder": {}}  # the shortcut is taken
    ours, theirs = load_tokenizer(smollm2_dir), AutoTokenizer.from_pretrained(smollm2_dir)
    for text in TEXTS:
        assert ours(text).input_ids == theirs(text).input_ids
    for name in ("all_special_ids", "all_special_tokens", "bos_token_id", "eos_token_id",
                 "pad_token_id", "unk_token_id", "vocab_size", "chat_template"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert len(ours) == len(theirs)
    assert {i: str(t) for i, t in ours.added_tokens_decoder.items()} == \
        {i: str(t) for i, t in theirs.added_tokens_decoder.items()}
    assert {i: t.special for i, t in ours.added_tokens_decoder.items()} == \
        {i: t.special for i, t in theirs.added_tokens_decoder.items()}
    chat = [{"role": "user", "content": "Hi <|im_start|> there"}]
    assert ours.apply_chat_template(chat, add_generation_prompt=True) == \
        theirs.apply_chat_template(chat, add_generation_prompt=True)
    ids = ours("Hello <|im_end|> world").input_ids + [0, 1, 2]
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("extra", ["special_tokens_map.json", "added_tokens.json", "decoder_in_config"])
def test_shortcut_only_without_other_added_token_sources(tmp_path, smollm2_dir, extra):
    """Where transformers' legacy branch reads more than tokenizer.json, it keeps running."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, tmp_path / name)
    if extra == "decoder_in_config":
        config = json.loads((tmp_path / "tokenizer_config.json").read_text())
        config["added_tokens_decoder"] = {}
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    else:
        (tmp_path / extra).write_text("{}")
    assert tokenizer_shortcut(tmp_path) == {}
