"""Text generation over a static KV cache: prefill once, then one token per step.

Sampling: greedy, temperature, top-k, top-p, repetition penalty, a seed. Stops at EOS and at stop
strings; streams text through a callback; batches of prompts are left-padded. On CUDA the decode
step of the native decoder runs under torch.compile(mode="reduce-overhead") (CUDA graphs), which
needs the static shapes the cache gives; nothing here touches the GPU unless the model is on one.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from kbitrt.errors import RunError
from kbitrt.runtime.devices import (device_name, is_cuda, peak_memory, reset_peak_memory,
                                    synchronize)
from kbitrt.runtime.loader import LoadedModel

Message = dict  # {"role": ..., "content": ...}
Prompt = str | list[Message] | list[int]  # text, a chat, or token ids


@dataclass
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise RunError(f"--temperature {self.temperature}: must be >= 0 (0 is greedy)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise RunError(f"--top-p {self.top_p}: must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise RunError(f"--top-k {self.top_k}: must be >= 1")
        if self.repetition_penalty <= 0:
            raise RunError(f"--repetition-penalty {self.repetition_penalty}: must be > 0")


@dataclass
class GenerationStats:
    device: str
    backend: str
    batch: int
    prompt_tokens: int  # real tokens, padding not counted
    new_tokens: int
    prompt_seconds: float
    decode_seconds: float
    peak_memory_bytes: int  # CUDA: max allocated; CPU: peak resident set of the process
    compiled: bool
    speculation: dict | None = None  # self-speculative decoding: widths, drafted, accepted, rounds

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def new_tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "prompt_tokens_per_s": self.prompt_tokens_per_s,
                "new_tokens_per_s": self.new_tokens_per_s}


@dataclass
class GenerationResult:
    texts: list[str]
    token_ids: list[list[int]]
    stop_reasons: list[str]  # eos | stop_string | length
    stats: GenerationStats
    prompt_texts: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------- prompts

def encode_prompts(tokenizer, prompts: Sequence[Prompt], chat: bool = False) -> list[list[int]]:
    out = []
    for p in prompts:
        if isinstance(p, list) and (not p or isinstance(p[0], int)):
            out.append(list(p))
        elif chat or isinstance(p, list):
            if not getattr(tokenizer, "chat_template", None):
                raise RunError("--chat: this model's tokenizer has no chat template")
            messages = p if isinstance(p, list) else [{"role": "user", "content": p}]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
                ids = ids["input_ids"]
            out.append(list(ids))
        else:
            out.append(tokenizer(p)["input_ids"])
    if any(len(ids) == 0 for ids in out):
        raise RunError("a prompt is empty (no tokens): give some text")
    return out


def eos_ids(lm: LoadedModel) -> set[int]:
    ids: set[int] = set()

    def add(value):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))

    add(lm.config.get("eos_token_id"))
    if lm.path is not None and (lm.path / "generation_config.json").exists():
        add(json.loads((lm.path / "generation_config.json").read_text()).get("eos_token_id"))
    if lm.tokenizer is not None:
        add(lm.tokenizer.eos_token_id)
    return ids


# ------------------------------------------------------------------------------------ sampling

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """As transformers (CTRL): divide positive logits of seen tokens by the penalty, multiply
    negative ones. logits (B, V) float, seen (B, V) bool."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) float -> next token ids (B,)."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    probs = sampling_probs(logits, cfg)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sampling_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The distribution `sample` draws from (temperature > 0): temperature, top-k, top-p applied.
    logits (..., V) float -> probabilities (..., V)."""
    logits = logits / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= cfg.top_p  # mass before this token already >= p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(-1)


# ----------------------------------------------------------------------------------- streaming

class TextRow:
    """One sequence's generated tokens, its text so far and what was already streamed."""

    def __init__(self, tokenizer, stops: Sequence[str], live: bool):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.live = live or bool(self.stops)  # decode text every token only when someone looks
        self.ids: list[int] = []
        self.text, self.emitted = "", 0
        self.done: str | None = None

    def push(self, token: int) -> None:
        self.ids.append(token)
        if self.live:
            self.decode()

    def take(self, token: int, stops_at: set[int], b: int, on_text) -> bool:
        """Add a sampled token (an EOS id ends the row) and stream what became ready; True when
        the row is done."""
        if token in stops_at:
            self.done = "eos"
        else:
            self.push(token)
        self.stream(b, on_text)
        return self.done is not None

    def stream(self, b: int, on_text) -> None:
        if on_text is not None:
            piece = self.ready()
            if piece:
                on_text(b, piece)

    def decode(self) -> None:
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stops:
            at = self.text.find(s)
            if at >= 0:
                self.text, self.done = self.text[:at], "stop_string"

    def ready(self) -> str:
        """New text safe to show: held back while it may be a stop string's beginning or while the
        last token ends mid-character."""
        end = len(self.text)
        if self.done is None:
            if self.text.endswith("\ufffd"):
                return ""
            for s in self.stops:
                for n in range(min(len(s) - 1, end), 0, -1):
                    if self.text.endswith(s[:n]):
                        end = min(end, len(self.text) - n)
                        break
        out, self.emitted = self.text[self.emitted:end], max(self.emitted, end)
        return out


# ------------------------------------------------------------------------------------ decoding

def decode_step(lm: LoadedModel, compile: bool | str):
    """The function one decode step calls (native backend): compiled with CUDA graphs on CUDA by
    default; on the CPU only when asked (compile=True: inductor's C++ code, traced through the
    Python layers). "auto" leaves the CPU eager, where the decoder's C++ layer stack runs every
    layer in one call (runtime/layer_stack.py): faster than the compiled step, with no
    compile time (benchmarks/results/cpu_decode-2threads.json, docs/cpu.md)."""
    model = lm.model
    cuda = is_cuda(lm.device)  # CUDA graphs need a GPU: the CUDA twin decodes eagerly
    want = compile is True or (compile == "auto" and cuda)
    if not want or lm.backend != "native" \
            or getattr(model, "device_map", None):  # hooks hand activations over: no CUDA graphs
        return model, False
    if cuda:  # pragma: no cover - needs a GPU
        return torch.compile(model, mode="reduce-overhead", fullgraph=False, dynamic=False), True
    return torch.compile(model, fullgraph=False, dynamic=False), True


def token_budget(lm: LoadedModel, prompt_tokens: int, max_new_tokens: int) -> int:
    """How many tokens may follow a prompt of `prompt_tokens` within the model's positions."""
    limit = lm.max_positions
    if limit is not None and prompt_tokens >= limit:
        raise RunError(f"the prompt is {prompt_tokens} tokens but the model holds at most {limit} "
                       "positions (prompt + new tokens): shorten the prompt")
    return min(max_new_tokens, limit - prompt_tokens) if limit is not None else max_new_tokens


def seen_tokens(lm: LoadedModel, encoded: list[list[int]], max_id: int,
                sampling: SamplingConfig, device: torch.device) -> torch.Tensor:
    """(B, vocab) bool: the tokens each row holds, for the repetition penalty (prompt tokens count
    only when the penalty is on; generated ones are added as they come)."""
    vocab = lm.config.get("vocab_size") or lm.tokenizer.vocab_size
    seen = torch.zeros(len(encoded), max(vocab, max_id + 1), dtype=torch.bool, device=device)
    if sampling.repetition_penalty != 1.0:
        for b, e in enumerate(encoded):
            seen[b, torch.tensor(e, device=device)] = True
    return seen


@torch.no_grad()
def generate(lm: LoadedModel, prompts: Sequence[Prompt], max_new_tokens: int = 64,
             sampling: SamplingConfig | None = None, stop: Sequence[str] = (), chat: bool = False,
             on_text: Callable[[int, str], None] | None = None,
             compile: bool | str = "auto", bits: int | None = None) -> GenerationResult:
    """Generate up to max_new_tokens for each prompt (left-padded into one batch).

    on_text(row, text) receives each piece of new text as soon as it is final (for streaming).
    bits: the width of an any-precision model loaded with bits='LO-HI' (runtime/any_precision.py).
    Self-speculative decoding of an any-precision model: runtime/speculative.generate_speculative.
    """
    sampling = sampling or SamplingConfig()
    if max_new_tokens < 1:
        raise RunError(f"--max-new-tokens {max_new_tokens}: must be >= 1")
    if bits is not None:
        from kbitrt.runtime.any_precision import set_width
        set_width(lm, bits)
    tok, device, model = lm.tokenizer, lm.device, lm.model
    encoded = encode_prompts(tok, prompts, chat)
    lengths = [len(ids) for ids in encoded]
    B, T0 = len(encoded), max(lengths)
    new = token_budget(lm, T0, max_new_tokens)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    ids = torch.tensor([[pad_id] * (T0 - len(e)) + e for e in encoded], device=device)
    pad = torch.tensor([T0 - n for n in lengths], device=device)
    stops_at = eos_ids(lm)
    rows = [TextRow(tok, stop, on_text is not None) for _ in range(B)]
    seen = seen_tokens(lm, encoded, int(ids.max()), sampling, device)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    step, compiled = decode_step(lm, compile)
    reset_peak_memory(device)

    model.setup_caches(B, T0 + new)
    try:
        synchronize(device)
        t0 = time.perf_counter()
        logits = model(ids, torch.arange(T0, device=device), pad, last_only=True)[:, -1].float()
        synchronize(device)
        t1 = time.perf_counter()
        input_pos = torch.tensor([T0], device=device)
        for i in range(new):
            logits = apply_repetition_penalty(logits, seen[:, :logits.shape[-1]],
                                              sampling.repetition_penalty)
            nxt = sample(logits, sampling, generator)  # (B,)
            seen[torch.arange(B, device=device), nxt] = True
            for b, token in enumerate(nxt.tolist()):
                if not rows[b].done:
                    rows[b].take(token, stops_at, b, on_text)
            if all(r.done for r in rows) or i == new - 1:
                break
            input_pos.fill_(T0 + i)
            try:
                out = step(nxt[:, None], input_pos, pad)
            except (RuntimeError, torch._dynamo.exc.TorchDynamoException) as e:
                if not compiled:
                    raise
                warnings.warn(f"compiled decode failed ({type(e).__name__}: {str(e)[:200]}); "
                              "continuing without torch.compile")
                step, compiled = model, False
                out = step(nxt[:, None], input_pos, pad)
            logits = out[:, -1].float().clone()  # CUDA graphs reuse their output buffer
        synchronize(device)
        t2 = time.perf_counter()
    finally:
        model.drop_caches()
    finish_rows(rows, on_text)
    stats = GenerationStats(
        device=device_name(device), backend=lm.backend, batch=B, prompt_tokens=sum(lengths),
        new_tokens=sum(len(r.ids) + (r.done == "eos") for r in rows),
        prompt_seconds=t1 - t0, decode_seconds=t2 - t1, peak_memory_bytes=peak_memory(device),
        compiled=compiled)
    return GenerationResult(texts=[r.text for r in rows], token_ids=[r.ids for r in rows],
                            stop_reasons=[r.done for r in rows], stats=stats,
                            prompt_texts=[tok.decode(e) for e in encoded])


def finish_rows(rows: Sequence[TextRow], on_text) -> None:
    """Every row ends ("length" unless it stopped earlier) and streams the text it still held."""
    for b, row in enumerate(rows):
        row.done = row.done or "length"
        if not row.live:
            row.decode()
        row.stream(b, on_text)

