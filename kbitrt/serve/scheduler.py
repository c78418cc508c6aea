"""Continuous batching on the native decoder: one static KV cache of `max_batch` rows, shared slots.

The decoder's batches are left-padded (model/decoder.py): cache slots are shared by the rows, row
b's slots below `pad[b]` are masked and a token's position is `slot - pad[b]`. The scheduler keeps
one shared slot `s` (the next one every live row writes) and the live rows at the top of the
cache (rows 0..n-1), and between decoding steps:

- retires finished or cancelled rows: the last live row's slots move into the freed row;
- admits waiting requests: a prompt of L tokens is prefilled alone into slots s-L..s-1 of row n
  with pad[n] = s-L (what an earlier occupant left below is masked); when s < L every live row
  shifts right first, so that s = L;
- decodes one token for rows 0..n-1 at slot s (`Decoder.use_cache_rows` runs them on views);
- when s reaches the cache's end, shifts every live row left by the smallest pad (a request's
  prompt + tokens never exceed the cache, so that pad is > 0 once finished rows are retired).

A request sees what it would alone: its slots, positions and mask hold only its own tokens, and it
samples with its own generator (seeded by `seed`), as `generate()` samples a batch of one.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from kbitrt.runtime.generate import SamplingConfig, TextRow, eos_ids, finish_rows, sample
from kbitrt.runtime.loader import LoadedModel
from kbitrt.serve.metrics import Metrics

Emit = Callable[[str, object], None]  # ("text", piece) ... then ("done", Finish) or ("error", str)


@dataclass
class Finish:
    reason: str  # eos | stop_string | length | cancelled
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)  # what was sampled, EOS left out


@dataclass
class Request:
    """One generation: token ids in, text pieces and then one Finish out through `emit` (called
    on the scheduler's thread)."""
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingConfig
    emit: Emit
    stop: list[str] = field(default_factory=list)
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    cancelled: bool = False  # set by the client's side (a disconnect, the stop button)
    ignore_eos: bool = False  # run to max_tokens (vLLM's extra field; benchmarks use it)

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    """A queue of requests and the thread that serves them; subclasses say how (`serve_round`)."""

    batching = False

    def __init__(self, lm: LoadedModel, ctx: int):
        self.lm, self.ctx = lm, ctx
        self.metrics = Metrics()
        self.waiting: deque[Request] = deque()
        self.cv = threading.Condition()
        self.draining = self.closed = False
        self.thread = threading.Thread(target=self.loop, name="kbit-serve", daemon=True)

    def start(self) -> Engine:
        self.thread.start()
        return self

    def submit(self, req: Request) -> bool:
        """Queue a request; False once the server drains (SIGTERM) and admits nothing new."""
        with self.cv:
            if self.draining or self.closed:
                return False
            self.waiting.append(req)
            self.metrics.queue_depth = len(self.waiting)
            self.cv.notify()
        return True

    def drain(self) -> None:
        with self.cv:
            self.draining = True

    def close(self, timeout: float = 5.0) -> None:
        """Cancel what still runs or waits and stop the thread."""
        with self.cv:
            self.draining = self.closed = True
            for req in self.waiting:
                req.cancel()
            self.cv.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def busy(self) -> bool:
        return bool(self.waiting)

    def loop(self) -> None:
        while True:
            with self.cv:
                while not self.closed and not self.busy():
                    self.cv.wait()
                if self.closed and not self.busy():
                    return
            try:
                self.serve_round()
            except Exception as e:  # a bug must not take the server down: fail what ran
                self.fail_all(f"{type(e).__name__}: {e}")
            if self.closed:
                self.cancel_all()

    def next_waiting(self) -> Request | None:
        with self.cv:
            req = self.waiting.popleft() if self.waiting else None
            self.metrics.queue_depth = len(self.waiting)
        return req

    def serve_round(self) -> None:
        raise NotImplementedError

    def fail_all(self, message: str) -> None:
        raise NotImplementedError

    def cancel_all(self) -> None:
        while (req := self.next_waiting()) is not None:
            self.end(req, Finish("cancelled", len(req.prompt_ids), 0))

    def end(self, req: Request, fin: Finish) -> None:
        self.metrics.finished(fin.reason, fin)
        req.emit("done", fin)

    def note_first_token(self, req: Request) -> None:
        if req.first_token is None:
            req.first_token = time.perf_counter()
            self.metrics.first_token(req.first_token - req.submitted)


class Live:
    """A request in a cache row: its text, tokens sampled, the token to feed next."""

    def __init__(self, req: Request, tokenizer, generator: torch.Generator | None):
        self.req, self.generator = req, generator
        self.text = TextRow(tokenizer, req.stop, live=True)
        self.sampled = 0
        self.next_token = 0

    def take(self, token: int, stops_at: set[int]) -> bool:
        """A sampled token; True when the request is done (EOS, a stop string, its budget)."""
        self.sampled += 1
        self.next_token = token
        done = self.text.take(token, stops_at, 0, self.on_text)
        return done or self.sampled >= self.req.max_tokens

    def on_text(self, row: int, piece: str) -> None:
        self.req.emit("text", piece)

    def finish(self, reason: str | None = None) -> Finish:
        """Flush the held-back text; the request's Finish."""
        if reason is not None:
            self.text.done = reason
        finish_rows([self.text], self.on_text)
        return Finish(self.text.done, len(self.req.prompt_ids), self.sampled, self.text.ids)


class BatchEngine(Engine):
    """Continuous batching on the native decoder (the module's docstring)."""

    batching = True

    def __init__(self, lm: LoadedModel, ctx: int, max_batch: int):
        super().__init__(lm, ctx)
        self.max_batch = max_batch
        self.model, self.device = lm.model, lm.device
        self.stops_at = eos_ids(lm)
        self.model.setup_caches(max_batch, ctx)
        self.caches = [layer.attn.kv_cache.whole for layer in self.model.layers]
        self.rows: list[Live] = []  # live rows 0..n-1
        self.pad = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.s = 0  # the next shared slot

    def busy(self) -> bool:
        return bool(self.waiting or self.rows)

    @torch.no_grad()
    def serve_round(self) -> None:
        for i in reversed(range(len(self.rows))):
            if self.rows[i].req.cancelled:
                self.retire(i, "cancelled")
        while len(self.rows) < self.max_batch and not self.closed:
            req = self.next_waiting()
            if req is None:
                break
            if req.cancelled:
                self.end(req, Finish("cancelled", len(req.prompt_ids), 0))
                continue
            self.admit(req)
        if self.rows:
            self.decode()
        self.metrics.batch_size = len(self.rows)

    def admit(self, req: Request) -> None:
        L = len(req.prompt_ids)
        if L >= self.ctx:  # the server checks first; a direct caller gets the error here
            self.metrics.finished("error")
            req.emit("error", f"the prompt's {L} tokens fill the {self.ctx}-token context")
            return
        req.max_tokens = min(req.max_tokens, self.ctx - L)  # so the cache never overflows
        if not self.rows:
            self.s = L
        elif self.s < L:
            self.shift(L - self.s)
        b, s = len(self.rows), self.s
        generator = None
        if req.sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(req.sampling.seed)
        live = Live(req, self.lm.tokenizer, generator)
        self.pad[b] = s - L
        self.model.use_cache_rows(b, b + 1)
        ids = torch.tensor([req.prompt_ids], device=self.device)
        logits = self.model(ids, torch.arange(s - L, s, device=self.device), self.pad[b:b + 1],
                            last_only=True)[:, -1].float()
        self.rows.append(live)
        self.sample_rows(logits, [b])

    def decode(self) -> None:
        n = len(self.rows)
        if self.s == self.ctx:  # the cache is full: every live row moves left by the least pad
            self.shift(-int(self.pad[:n].min()))
            if self.s == self.ctx:
                raise RuntimeError("a live row fills the whole cache")
        ids = torch.tensor([[r.next_token] for r in self.rows], device=self.device)  # (n, 1)
        self.model.use_cache_rows(0, n)
        logits = self.model(ids, torch.tensor([self.s], device=self.device), self.pad[:n])
        self.s += 1
        self.sample_rows(logits[:, -1].float(), list(range(n)))

    def sample_rows(self, logits: torch.Tensor, rows: list[int]) -> None:
        """logits (len(rows), V): each row samples with its own settings and generator."""
        done = []
        for j, b in enumerate(rows):
            live = self.rows[b]
            token = int(sample(logits[j:j + 1], live.req.sampling, live.generator)[0])
            self.note_first_token(live.req)
            if live.take(token, set() if live.req.ignore_eos else self.stops_at):
                done.append(b)
        for b in reversed(done):
            self.retire(b)

    def retire(self, b: int, reason: str | None = None) -> None:
        """End row b's request and move the last live row into its place."""
        live = self.rows[b]
        self.end(live.req, live.finish(reason))
        last = len(self.rows) - 1
        if b != last:
            lo = int(self.pad[last])
            for c in self.caches:
                c.k[b, :, lo:self.s] = c.k[last, :, lo:self.s]
                c.v[b, :, lo:self.s] = c.v[last, :, lo:self.s]
            self.pad[b] = self.pad[last]
            self.rows[b] = self.rows[last]
        self.rows.pop()

    def shift(self, d: int) -> None:
        """Move every live row's slots by d (positions stay: slot and pad move together)."""
        n = len(self.rows)
        lo = int(self.pad[:n].min())
        if lo + d < 0 or self.s + d > self.ctx:
            raise RuntimeError(f"cannot shift the cache by {d} (slots {lo}..{self.s})")
        for c in self.caches:
            for t in (c.k, c.v):
                t[:n, :, lo + d:self.s + d] = t[:n, :, lo:self.s].clone()
        self.pad[:n] += d
        self.s += d

    def fail_all(self, message: str) -> None:
        for live in self.rows:
            self.metrics.finished("error")
            live.req.emit("error", message)
        self.rows, self.s = [], 0

    def cancel_all(self) -> None:
        for i in reversed(range(len(self.rows))):
            self.retire(i, "cancelled")
        super().cancel_all()

    def close(self, timeout: float = 5.0) -> None:
        super().close(timeout)
        if not self.thread.is_alive():
            self.model.drop_caches()


class Cancelled(Exception):
    """Raised from a streaming callback to stop generate() for a cancelled request."""


class SerialEngine(Engine):
    """One request at a time through `generate` (the transformers backend, or self-speculative
    decoding): what `kbit run` does, request after request."""

    def __init__(self, lm: LoadedModel, ctx: int, generate: Callable):
        super().__init__(lm, ctx)
        self.generate = generate  # generate(lm, prompts, max_new, sampling, stop, on_text=...)
        self.current: Request | None = None

    def serve_round(self) -> None:
        req = self.current = self.next_waiting()
        if req is None:
            return
        self.metrics.batch_size = 1

        def on_text(row: int, piece: str) -> None:
            if req.cancelled or self.closed:
                raise Cancelled
            self.note_first_token(req)
            req.emit("text", piece)

        try:
            result = self.generate(self.lm, [req.prompt_ids], req.max_tokens, req.sampling,
                                   req.stop, on_text=on_text)
            fin = Finish(result.stop_reasons[0], len(req.prompt_ids), result.stats.new_tokens,
                         result.token_ids[0])
        except Cancelled:
            fin = Finish("cancelled", len(req.prompt_ids), 0)
        finally:
            self.metrics.batch_size = 0
        self.current = None
        self.end(req, fin)

    def fail_all(self, message: str) -> None:
        if self.current is not None:  # the request that failed ran alone
            self.metrics.finished("error")
            self.current.emit("error", message)
            self.current = None
