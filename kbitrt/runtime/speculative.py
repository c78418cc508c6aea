"""Self-speculative decoding of an any-precision model: a low width drafts, the parent verifies.

`kbit run OUT --bits 8 --draft-bits 3 --draft-tokens 4`. Both widths come from the one resident
copy: every linear holds the parent's planes, one set of scales and the codebooks
(runtime/any_precision.py), and each call runs the plane kernels on the first D (draft) or P
(parent) planes; switching width swaps a codebook, no weight is copied and there is no second
model. One round:

1. **Draft.** At the draft width, `k` single-token steps from the last accepted token propose
   d1..dk (greedy: argmax; sampling: drawn from the draft's distribution q).
2. **Verify.** At the parent width, ONE forward over [last, d1..dk] gives the parent's logits at
   the k+1 positions. Greedy: d_i is accepted while it is the parent's argmax; the first mismatch
   is replaced by the parent's token, and when all k are accepted the parent's next token is a
   bonus. Sampling (standard speculative sampling, Leviathan et al. 2023 / Chen et al. 2023):
   accept d_i with probability min(1, p(d_i)/q(d_i)); on the first rejection draw from the
   normalised max(0, p - q); all accepted: draw the bonus from p. The output then has the parent's
   distribution exactly (tests/test_speculative.py checks it on a small vocabulary).

**One KV cache.** The draft writes its keys and values into the slots the verify forward then
overwrites with the parent's, and reads the parent's for every accepted token before them (the
draft sees the parent's context; its own keys exist only for the tokens of the current round). The
native decoder's cache is static and masks by position, so rolling back a rejection is only moving
the position back: slots past it are overwritten before they are read. The parent's computation is
exactly its own, so greedy output equals the parent alone (tested on every native family),
up to the rounding of a (k+1)-token forward against single-token forwards, which no test has
shown to flip a token.

Prompts are decoded one after another (batch 1): rows of a batch would accept different lengths.
The decode step runs eagerly (no CUDA graphs: the width changes between calls).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from kbitrt.errors import KbitFormatError, RunError
from kbitrt.runtime.devices import device_name, peak_memory, reset_peak_memory, synchronize
from kbitrt.runtime.generate import (GenerationResult, GenerationStats, SamplingConfig, TextRow,
                                     apply_repetition_penalty, encode_prompts, finish_rows,
                                     eos_ids, sampling_probs)
from kbitrt.runtime.loader import LoadedModel

DEFAULT_DRAFT_TOKENS = 4


# ---------------------------------------------------------------------------------- options

def check_draft_widths(source, bits: int | str | None, draft_bits: int,
                       draft_tokens: int = DEFAULT_DRAFT_TOKENS) -> tuple[int, int]:
    """(parent, draft) widths for `--bits BITS --draft-bits DRAFT` on an opened model (a
    KbitModel.open result: headers only, nothing heavy read); one clear error when they cannot
    serve. BITS None: the file's top width."""
    from kbitrt.format.bitplane import BitplaneModel

    where = getattr(source, "path", None) or "this model"
    if draft_tokens < 1:
        raise RunError(f"--draft-tokens {draft_tokens}: must be >= 1")
    if not isinstance(source, BitplaneModel):
        raise KbitFormatError(f"--draft-bits {draft_bits}: {where} is a plain "
                              f"{source.quant.label} model; self-speculative decoding needs an "
                              "any-precision model (kbit convert --any-precision)")
    spec = source.spec
    if bits is None:
        parent = spec.max_bits
    else:
        text = str(bits)
        if not text.isdigit():
            raise RunError(f"--bits {bits} with --draft-bits: give the parent as one width K "
                           "(e.g. --bits 8 --draft-bits 3)")
        parent = int(text)
    for name, k in (("--bits", parent), ("--draft-bits", draft_bits)):
        if not spec.min_bits <= k <= spec.max_bits:
            raise KbitFormatError(f"{name} {k}: {where} serves {spec.min_bits}..{spec.max_bits} "
                                  "bits")
    if draft_bits >= parent:
        raise RunError(f"--draft-bits {draft_bits}: the draft must be narrower than the parent "
                       f"(--bits {parent})")
    return parent, draft_bits


def load_speculative(name, bits: int | str | None, draft_bits: int,
                     draft_tokens: int = DEFAULT_DRAFT_TOKENS, keep_planes: bool = False,
                     **load_kwargs) -> tuple[LoadedModel, int]:
    """Load an any-precision model for self-speculative decoding: widths checked from the headers
    first, then the planes up to the parent read once (the one resident copy both widths run
    from). Returns (model at the parent width, parent)."""
    from kbitrt.convert.source import resolve_model
    from kbitrt.format.reader import KbitModel
    from kbitrt.runtime.any_precision import hold_widths
    from kbitrt.runtime.loader import load_model

    path = resolve_model(name)
    parent, draft = check_draft_widths(KbitModel.open(path), bits, draft_bits, draft_tokens)
    lm = load_model(path, bits=f"{draft}-{parent}", **load_kwargs)
    if lm.backend != "native":
        raise RunError("--draft-bits runs on the native decoder (its static KV cache rolls back "
                       "by position); this model runs through transformers")
    hold_widths(lm, (draft, parent), keep_planes=keep_planes)
    return lm, parent


# --------------------------------------------------------------------------------- decoding

@dataclass
class Counts:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    def to_json(self, parent: int, draft: int, k: int) -> dict:
        return {"bits": parent, "draft_bits": draft, "draft_tokens": k, "rounds": self.rounds,
                "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": self.accepted / self.drafted if self.drafted else None,
                "tokens_per_round": None}


class Widths:
    """Switches the MultiWidthLinears of a model between held widths (a buffer swap each)."""

    def __init__(self, model: torch.nn.Module, parent: int, draft: int):
        from kbitrt.runtime.any_precision import MultiWidthLinear

        self.model = model
        self.mods = [m for m in model.modules() if isinstance(m, MultiWidthLinear)]
        if not self.mods:
            raise RunError("--draft-bits: this model was loaded at one width; load it with "
                           "bits='LO-HI' covering both widths")
        for k in (parent, draft):
            self.set(k)  # one clear error for a width the model does not hold

    def set(self, bits: int) -> None:
        for m in self.mods:
            m.set_bits(bits)
        refresh = getattr(self.model, "refresh_layer_stack", None)
        if refresh is not None:  # a held width swaps the same tensors in: keep a stack per width
            held = all(bits in (getattr(m, "held", None) or {}) for m in self.mods)
            refresh(bits if held else None)


def _pick(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor | None,
          generator) -> tuple[int, torch.Tensor | None]:
    """(token, distribution or None when greedy) from one position's logits (V,)."""
    if seen is not None:
        logits = apply_repetition_penalty(logits[None], seen[None, :logits.shape[-1]],
                                          cfg.repetition_penalty)[0]
    if cfg.temperature == 0:
        return int(logits.argmax()), None
    probs = sampling_probs(logits, cfg)
    return int(torch.multinomial(probs, 1, generator=generator)), probs


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, token: int, generator) -> int | None:
    """Standard speculative sampling for one drafted token: None when it is accepted (probability
    min(1, p/q)), else a token drawn from the normalised max(0, p - q)."""
    u = torch.rand((), generator=generator, device=p.device)
    if float(u) * float(q[token]) < float(p[token]):  # u < p/q, q(token) > 0 since it was drawn
        return None
    residual = (p - q).clamp(min=0)
    total = residual.sum()
    if float(total) <= 0:  # p == q: unreachable after a rejection, kept for rounding
        residual, total = p, p.sum()
    return int(torch.multinomial(residual / total, 1, generator=generator))


@torch.no_grad()
def speculate(model, widths: Widths, prompt: list[int], new: int, parent: int, draft: int,
              k: int, cfg: SamplingConfig, generator, on_token: Callable[[int], bool],
              counts: Counts) -> float:
    """Decode up to `new` tokens after `prompt` (batch 1) into on_token(token) -> done; returns
    the prefill seconds. The caller sets up and drops the KV cache (len(prompt) + new slots)."""
    device = next(model.buffers()).device
    penalty = cfg.repetition_penalty != 1.0
    vocab = model.lm_head.out_features if hasattr(model, "lm_head") else None
    seen = None
    if penalty:
        seen = torch.zeros(max(vocab or 0, max(prompt) + 1), dtype=torch.bool, device=device)
        seen[torch.tensor(prompt, device=device)] = True
    T0 = len(prompt)
    widths.set(parent)
    synchronize(device)
    t0 = time.perf_counter()
    logits = model(torch.tensor([prompt], device=device), torch.arange(T0, device=device),
                   last_only=True)[0, -1].float()
    synchronize(device)
    prefill = time.perf_counter() - t0
    tok, _ = _pick(logits, cfg, seen, generator)
    produced, pos = 1, T0  # `tok` is produced, not yet in the cache; it goes to slot `pos`
    if on_token(tok) or new == 1:
        return prefill
    if penalty:
        seen[tok] = True
    while produced < new:
        kr = min(k, new - produced - 1)
        drafts: list[int] = []
        qs: list[torch.Tensor | None] = []
        if kr:
            widths.set(draft)
            x = tok
            for j in range(kr):
                out = model(torch.tensor([[x]], device=device),
                            torch.tensor([pos + j], device=device))[0, -1].float()
                x, q = _pick(out, cfg, _seen_with(seen, drafts), generator)
                drafts.append(x)
                qs.append(q)
            widths.set(parent)
        seq = [tok] + drafts
        logits = model(torch.tensor([seq], device=device),
                       torch.arange(pos, pos + len(seq), device=device))[0].float()  # (1+kr, V)
        n_acc, fix = 0, None
        for i, d in enumerate(drafts):
            target, p = _pick_target(logits[i], cfg, _seen_with(seen, drafts[:i]))
            if cfg.temperature == 0:
                fix = target if target != d else None
            else:
                fix = accept_or_resample(p, qs[i], d, generator)
            if fix is not None:
                break
            n_acc += 1
        if fix is None:  # every draft accepted (or none drafted): the parent's next token
            fix, _ = _pick(logits[n_acc], cfg, _seen_with(seen, drafts), generator)
        emitted = drafts[:n_acc] + [fix]
        counts.rounds += 1
        counts.drafted += len(drafts)
        counts.accepted += n_acc
        for t in emitted:
            produced += 1
            if penalty:
                seen[t] = True
            if on_token(t) or produced >= new:
                return prefill
        tok, pos = emitted[-1], pos + len(emitted)
    return prefill


def _seen_with(seen: torch.Tensor | None, tokens: list[int]) -> torch.Tensor | None:
    """The repetition penalty's seen-set with `tokens` added (None: no penalty)."""
    if seen is None or not tokens:
        return seen
    s = seen.clone()
    s[torch.tensor(tokens, device=s.device)] = True
    return s


def _pick_target(logits: torch.Tensor, cfg: SamplingConfig, seen) -> tuple[int, torch.Tensor | None]:
    """The parent's greedy token, or its distribution (no draw), at one verified position."""
    if seen is not None:
        logits = apply_repetition_penalty(logits[None], seen[None, :logits.shape[-1]],
                                          cfg.repetition_penalty)[0]
    if cfg.temperature == 0:
        return int(logits.argmax()), None
    return -1, sampling_probs(logits, cfg)


@torch.no_grad()
def generate_speculative(lm: LoadedModel, prompts: Sequence, max_new_tokens: int = 64,
                         sampling: SamplingConfig | None = None, stop: Sequence[str] = (),
                         chat: bool = False, on_text: Callable[[int, str], None] | None = None,
                         bits: int | None = None, draft_bits: int = 3,
                         draft_tokens: int = DEFAULT_DRAFT_TOKENS) -> GenerationResult:
    """generate() (runtime/generate.py, same arguments and result) with self-speculative decoding:
    width `draft_bits` drafts `draft_tokens` tokens per round for the parent width (`bits`, else
    the active one) to verify; prompts one by one. `stats.speculation` holds the counts."""
    from kbitrt.runtime.any_precision import MultiWidthLinear, hold_widths, relabel

    sampling = sampling or SamplingConfig()
    if max_new_tokens < 1:
        raise RunError(f"--max-new-tokens {max_new_tokens}: must be >= 1")

    if draft_tokens < 1:
        raise RunError(f"--draft-tokens {draft_tokens}: must be >= 1")
    if lm.backend != "native":
        raise RunError("--draft-bits runs on the native decoder; this model runs through "
                       "transformers")
    mods = [m for m in lm.model.modules() if isinstance(m, MultiWidthLinear)]
    if not mods:
        raise RunError(f"--draft-bits {draft_bits}: this model was loaded at one width; load it "
                       "with bits='LO-HI' covering both widths (or kbit run --bits K --draft-bits D)")
    parent = bits if bits is not None else mods[0].bits
    if draft_bits >= parent:
        raise RunError(f"--draft-bits {draft_bits}: the draft must be narrower than the parent "
                       f"(--bits {parent})")
    held = getattr(mods[0], "held", None) or {}
    if not {parent, draft_bits} <= set(held):
        hold_widths(lm, (draft_bits, parent))
    widths = Widths(lm.model, parent, draft_bits)
    relabel(lm, parent)
    tok, device, model = lm.tokenizer, lm.device, lm.model
    encoded = encode_prompts(tok, prompts, chat)
    stops_at = eos_ids(lm)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    reset_peak_memory(device)
    rows = [TextRow(tok, stop, on_text is not None) for _ in encoded]
    counts = Counts()
    prompt_s = total_s = 0.0
    for b, ids in enumerate(encoded):
        T0, limit = len(ids), lm.max_positions
        if limit is not None and T0 >= limit:
            raise RunError(f"the prompt is {T0} tokens but the model holds at most {limit} "
                           "positions (prompt + new tokens): shorten the prompt")
        new = min(max_new_tokens, limit - T0) if limit is not None else max_new_tokens
        row = rows[b]

        def on_token(token: int, row=row, b=b) -> bool:
            return row.take(token, stops_at, b, on_text)

        model.setup_caches(1, T0 + new)
        try:
            synchronize(device)
            t0 = time.perf_counter()
            prompt_s += speculate(model, widths, ids, new, parent, draft_bits, draft_tokens,
                                  sampling, generator, on_token, counts)
            synchronize(device)
            total_s += time.perf_counter() - t0
        finally:
            model.drop_caches()
    finish_rows(rows, on_text)
    spec = counts.to_json(parent, draft_bits, draft_tokens)
    new_tokens = sum(len(r.ids) + (r.done == "eos") for r in rows)
    if counts.rounds:
        spec["tokens_per_round"] = (new_tokens - len(rows)) / counts.rounds  # first token: prefill
    stats = GenerationStats(
        device=device_name(device), backend=lm.backend, batch=1,
        prompt_tokens=sum(len(e) for e in encoded), new_tokens=new_tokens,
        prompt_seconds=prompt_s, decode_seconds=total_s - prompt_s,
        peak_memory_bytes=peak_memory(device), compiled=False, speculation=spec)
    return GenerationResult(texts=[r.text for r in rows], token_ids=[r.ids for r in rows],
                            stop_reasons=[r.done for r in rows], stats=stats,
                            prompt_texts=[tok.decode(e) for e in encoded])
