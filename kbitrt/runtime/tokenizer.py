"""A kbit folder's tokenizer, with the shortcut that skips transformers' second parse of
tokenizer.json where nothing needs it."""

from __future__ import annotations

import json
from pathlib import Path


from kbitrt.errors import RunError



def load_tokenizer(path: str | Path):
    """The folder's tokenizer; a folder without usable tokenizer files is one clear line."""
    from transformers import AutoTokenizer

    try:
        if _generic_tokenizer(Path(path)):
            # the class AutoTokenizer would pick, without its class lookup (which imports ~700
            # modules, ~50 MB of RSS, that a run does not need)
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(path, **tokenizer_shortcut(Path(path)))
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise RunError(f"{path} has no usable tokenizer ({str(e).splitlines()[0][:120]}): copy the "
                       "source model's tokenizer files (tokenizer.json, tokenizer_config.json) into "
                       "it") from None


def tokenizer_shortcut(path: Path) -> dict:
    """Without `added_tokens_decoder` in tokenizer_config.json (and no legacy special_tokens_map.json
    or added_tokens.json), transformers parses the whole tokenizer.json in Python only to list its
    added tokens, which the Rust tokenizer it builds from the same file holds anyway (SmolLM2: 0.2 s
    and 2 MB resident after the parse). Saying there are none to add skips that parse; every token,
    id and special flag still comes from tokenizer.json (tests/test_tokenizer_load.py). Only for
    transformers 5, whose tokenizer takes special tokens from the Rust side (4.x re-adds named
    special tokens from that parse)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return {}
    if (path / "special_tokens_map.json").exists() or (path / "added_tokens.json").exists():
        return {}
    try:
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {} if "added_tokens_decoder" in config else {"added_tokens_decoder": {}}


def _generic_tokenizer(path: Path) -> bool:
    """Whether the folder's tokenizer is transformers' generic fast one (tokenizer.json alone)."""
    cfg = path / "tokenizer_config.json"
    if not (path / "tokenizer.json").is_file() or not cfg.is_file():
        return False
    try:
        name = json.loads(cfg.read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return False
    return name in ("TokenizersBackend", "PreTrainedTokenizerFast")

