"""Perplexity over a token stream, two protocols:

- `gptq`: non-overlapping windows of seqlen tokens, the tail that does not fill a window dropped;
  every token of a window but the first is scored (the published GPTQ / k-bit tables' convention:
  the mean of the per-window losses).
- `sliding`: windows of seqlen tokens that advance by `stride`; only the tokens a window adds
  beyond the previous one are scored (all but the first token in the first window), as in the
  Hugging Face perplexity guide. Weighted by scored tokens, so the result is exp(total NLL / N).

Datasets: wikitext2, c4, pile-cc through `datasets` when online, or any local text file
(the shipped sample `wiki-sample` by its short name).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

from kbitrt.eval.data import SAMPLES
from kbitrt.eval.data import resolve as resolve_data
from kbitrt.eval.scoring import score
from kbitrt.errors import KbitFormatError
from kbitrt.runtime.loader import LoadedModel

PROTOCOLS = ("gptq", "sliding")
DATASETS = ("wikitext2", "c4", "pile-cc")


@dataclass
class PerplexityResult:
    dataset: str
    perplexity: float
    protocol: str
    seqlen: int
    stride: int | None
    tokens: int  # tokens of the text used (after --max-tokens)
    scored_tokens: int
    windows: int
    nll: float  # total negative log-likelihood (nats)
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.windows * self.seqlen / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}

    def describe(self) -> str:
        stride = f" stride {self.stride}" if self.protocol == "sliding" else ""
        return (f"{self.protocol} seqlen {self.seqlen}{stride}, {self.scored_tokens} scored of "
                f"{self.tokens} tokens")


# ------------------------------------------------------------------------------------- windows

def windows(n_tokens: int, protocol: str, seqlen: int,
            stride: int | None = None) -> list[tuple[int, int, int]]:
    """(begin, end, scored) per window: tokens[begin:end] are read, the last `scored` scored."""
    if protocol not in PROTOCOLS:
        raise KbitFormatError(f"--protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    if seqlen < 2:
        raise KbitFormatError(f"--seqlen {seqlen}: must be at least 2")
    if protocol == "gptq":
        return [(i * seqlen, (i + 1) * seqlen, seqlen - 1) for i in range(n_tokens // seqlen)]
    stride = stride or seqlen // 2
    if not 1 <= stride <= seqlen:
        raise KbitFormatError(f"--stride {stride}: must be in 1..seqlen ({seqlen})")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seqlen, n_tokens)
        scored = min(end - prev_end, end - begin - 1)  # the first token of a text is never scored
        if end - begin >= 2 and scored > 0:
            out.append((begin, end, scored))
        prev_end = end
        if end == n_tokens:
            break
    return out


def perplexity(lm: LoadedModel, tokens: list[int], protocol: str = "gptq", seqlen: int = 2048,
               stride: int | None = None, batch_size: int = 1, dataset: str = "text",
               on_batch: Callable[[int], None] | None = None) -> PerplexityResult:
    """Perplexity of `tokens` under `lm`; raises KbitFormatError when no window fits."""
    if lm.max_positions and seqlen > lm.max_positions:
        raise KbitFormatError(f"--seqlen {seqlen} exceeds the model's {lm.max_positions} positions")
    if protocol == "sliding":
        stride = stride or seqlen // 2
    wins = windows(len(tokens), protocol, seqlen, stride)
    if not wins or (protocol == "gptq" and len(tokens) < seqlen):
        raise KbitFormatError(f"{dataset}: {len(tokens)} tokens, too short for one window of "
                              f"--seqlen {seqlen}: give a longer text or a smaller --seqlen")
    requests = [(tokens[b:e - s], tokens[e - s:e]) for b, e, s in wins]
    t0 = time.perf_counter()
    scores = score(lm, requests, batch_size=batch_size, max_length=seqlen, on_batch=on_batch)
    seconds = time.perf_counter() - t0
    nll = -sum(lp for lp, _ in scores)
    n = sum(s for _, _, s in wins)
    return PerplexityResult(dataset=dataset, perplexity=math.exp(nll / n), protocol=protocol,
                            seqlen=seqlen, stride=stride if protocol == "sliding" else None,
                            tokens=len(tokens), scored_tokens=n, windows=len(wins),
                            nll=nll, seconds=seconds)


# -------------------------------------------------------------------------------------- texts

def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _offline_error(name: str, why: str) -> KbitFormatError:
    return KbitFormatError(f"dataset {name!r} needs the network ({why}): pass a local text file "
                           "instead, e.g. --ppl ./wiki.txt")


def load_text(name: str) -> tuple[str, str]:
    """(label, text): a local file (or a shipped sample by short name, e.g. wiki-sample), or one
    of DATASETS' test splits joined as GPTQ does."""
    path = resolve_data(name)
    if path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise KbitFormatError(f"{path} is empty: nothing to measure perplexity on")
        return path.name, text
    if name not in DATASETS:
        raise FileNotFoundError(f"--ppl {name}: no such file, and not a known dataset "
                                f"({', '.join(DATASETS + tuple(SAMPLES))})")
    if _offline():
        raise _offline_error(name, "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set")
    try:
        import datasets
    except ImportError:
        raise _offline_error(name, "the `datasets` package is not installed") from None
    try:
        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
            return name, "\n\n".join(ds["text"])
        if name == "c4":  # GPTQ: the first 1100 validation documents of shard 0
            ds = datasets.load_dataset(
                "allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                split="validation")
            return name, " ".join(ds[:1100]["text"])
        # pile-cc: the Common Crawl part of the Pile's validation set (the paper's third corpus)
        ds = datasets.load_dataset("monology/pile-uncopyrighted", data_files="val.jsonl.zst",
                                   split="train", streaming=True)
        docs = [d["text"] for _, d in zip(range(20000), ds)
                if d.get("meta", {}).get("pile_set_name") == "Pile-CC"][:1100]
        return name, "\n\n".join(docs)
    except (OSError, ValueError, ImportError) as e:  # ConnectionError and DatasetNotFound are OSError
        raise _offline_error(name, f"{type(e).__name__}: {str(e)[:120]}") from None


def default_max_tokens(name: str, seqlen: int) -> int | None:
    """GPTQ evaluates c4 on its first 256 windows; everything else in full."""
    return 256 * seqlen if name == "c4" else None


def tokenize(lm: LoadedModel, text: str, max_tokens: int | None = None) -> list[int]:
    if lm.tokenizer is None:
        raise KbitFormatError("the model has no tokenizer: perplexity needs one in its folder")
    ids = lm.tokenizer(text, return_attention_mask=False)["input_ids"]
    return list(ids[:max_tokens] if max_tokens else ids)
