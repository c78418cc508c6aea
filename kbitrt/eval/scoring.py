"""Batched log-likelihood of continuations: the one scoring routine behind perplexity, local
multiple choice and the lm-eval model.

A request is (context tokens, continuation tokens). The model reads (context + continuation)[:-1]
and the log-probabilities of the continuation come from its last len(continuation) positions.
Requests are sorted by length and right-padded into batches: the model is causal, so padding after
a row's last real token changes nothing before it, and no attention mask is needed.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from kbitrt.errors import RunError
from kbitrt.runtime.loader import LoadedModel

Request = tuple[Sequence[int], Sequence[int]]
MAX_BATCH_TOKENS = 16384  # padded tokens per forward: bounds the (B, T, V) logits' memory


def _inputs(req: Request, max_length: int) -> tuple[list[int], int]:
    ctx, cont = list(req[0]), list(req[1])
    if not cont:
        raise RunError("a continuation has no tokens: nothing to score")
    if not ctx:
        raise RunError("a request has no context token: give a prefix (BOS/EOS) to condition on")
    whole = (ctx + cont)[-(max_length + 1):]  # left-truncate like lm-eval
    return whole[:-1], min(len(cont), len(whole) - 1)


@torch.no_grad()
def score(lm: LoadedModel, requests: Sequence[Request], batch_size: int = 8,
          max_length: int | None = None,
          on_batch: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), continuation is the greedy one) per request."""
    max_length = max_length or lm.max_positions or 2048
    prepared = [_inputs(r, max_length) for r in requests]
    conts = [list(r[1])[-n:] for r, (_, n) in zip(requests, prepared)]
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
    out: list[tuple[float, bool] | None] = [None] * len(prepared)
    start = 0
    while start < len(order):
        longest = len(prepared[order[start]][0])
        size = max(1, min(batch_size, MAX_BATCH_TOKENS // longest))
        chunk = order[start:start + size]
        start += len(chunk)
        ids = torch.zeros(len(chunk), longest, dtype=torch.long)  # right padding (token 0)
        for row, i in enumerate(chunk):
            inp = prepared[i][0]
            ids[row, :len(inp)] = torch.tensor(inp)
        logits = lm.model(ids.to(lm.device))  # (B, T, V)
        for row, i in enumerate(chunk):
            inp, n = prepared[i]
            part = logits[row, len(inp) - n:len(inp)].float().log_softmax(-1)  # (n, V)
            target = torch.tensor(conts[i], device=part.device)
            lp = part.gather(-1, target[:, None]).squeeze(-1)
            greedy = bool((part.argmax(-1) == target).all())
            out[i] = (float(lp.double().sum()), greedy)
        del logits
        if on_batch is not None:
            on_batch(len(chunk))
    return out  # type: ignore[return-value]
