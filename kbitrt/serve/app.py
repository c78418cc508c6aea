"""The HTTP side of `kbit serve`: OpenAI-compatible routes over a scheduler (scheduler.py).

Requests are validated and tokenized here, then queued; the scheduler's thread hands text back
through an asyncio queue per request. A stream is Server-Sent Events (`data: {json}` ... `data:
[DONE]`); a client that goes away (a closed stream, the page's stop button) cancels its request,
which the scheduler retires before its next step.
"""

from __future__ import annotations

import asyncio
import json
import time
from importlib import resources
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from kbitrt.errors import KbitError
from kbitrt.runtime.generate import SamplingConfig, encode_prompts
from kbitrt.serve import protocol as P
from kbitrt.serve.scheduler import Engine, Finish, Request

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI API's default for /v1/completions
CLOSE_SECONDS = 3.0  # at shutdown, after uvicorn's grace: the scheduler's thread is waited for


class Session:
    """What the routes share: the engine, the model's name, the key."""

    def __init__(self, engine: Engine, model_id: str, api_key: str | None = None):
        self.engine, self.model_id, self.api_key = engine, model_id, api_key
        self.tokenizer = engine.lm.tokenizer
        self.started = int(time.time())

    # ------------------------------------------------------------------------- validation

    def authorize(self, http: HTTPRequest) -> None:
        """With --api-key: the request's bearer key, else a 401."""
        if self.api_key is None:
            return
        scheme, _, key = http.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or key.strip() != self.api_key:
            raise P.APIError(401, "Incorrect or missing API key: send Authorization: Bearer KEY",
                             code="invalid_api_key")

    def check_model(self, body: P.Sampling) -> None:
        if body.model != self.model_id:
            raise P.APIError(404, f"The model `{body.model}` does not exist: this server serves "
                             f"`{self.model_id}`", "model", "model_not_found")
        if body.n != 1:
            raise P.APIError(400, f"n={body.n}: this server returns one choice per request", "n")

    def budget(self, L: int, asked: int | None, default: int | None) -> int:
        """The request's max_tokens: prompt + new tokens must fit the context."""
        ctx = self.engine.ctx
        if L >= ctx:
            raise P.APIError(400, f"This model's context holds {ctx} tokens; the prompt has {L}: "
                             "shorten it", "messages", "context_length_exceeded")
        room = ctx - L
        if asked is None:
            return room if default is None else min(default, room)
        if asked < 1:
            raise P.APIError(400, f"max_tokens {asked}: must be at least 1", "max_tokens")
        if asked > room:
            raise P.APIError(400, f"max_tokens {asked} + the prompt's {L} tokens exceed this "
                             f"model's context of {ctx} tokens: ask for at most {room}",
                             "max_tokens", "context_length_exceeded")
        return asked

    def sampling(self, body: P.Sampling) -> SamplingConfig:
        top_k = body.top_k if body.top_k and body.top_k > 0 else None
        return SamplingConfig(temperature=1.0 if body.temperature is None else body.temperature,
                              top_p=body.top_p, top_k=top_k, seed=body.seed)

    def chat_ids(self, body: P.ChatRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            return encode_prompts(self.tokenizer, [messages], chat=True)[0]
        except KbitError as e:
            raise P.APIError(400, str(e), "messages") from None

    def completion_ids(self, body: P.CompletionRequest) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise P.APIError(400, "prompt: this server takes one prompt per request", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, list):
            vocab = len(self.tokenizer)
            if any(not 0 <= t < vocab for t in prompt):
                raise P.APIError(400, f"prompt: token ids must be in 0..{vocab - 1}", "prompt")
            ids = list(prompt)
        else:
            ids = self.tokenizer(prompt)["input_ids"]
        if not ids:
            raise P.APIError(400, "prompt: it is empty (no tokens)", "prompt")
        return ids

    # ---------------------------------------------------------------------------- running

    def submit(self, ids: list[int], max_tokens: int, body: P.Sampling) -> tuple[Request, asyncio.Queue]:
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def emit(kind: str, value: object) -> None:  # on the scheduler's thread
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        req = Request(ids, max_tokens, self.sampling(body), emit, body.stops(),
                      ignore_eos=body.ignore_eos)
        if not self.engine.submit(req):
            raise P.APIError(503, "The server is shutting down: it takes no new requests",
                             code="shutting_down")
        return req, queue


async def events(req: Request, queue: asyncio.Queue) -> AsyncIterator[tuple[str, object]]:
    """The request's ("text", piece) events, then ("done", Finish); its cancellation if the
    consumer stops early (a client gone). A failure is an APIError (500)."""
    try:
        while True:
            kind, value = await queue.get()
            if kind == "error":
                raise P.APIError(500, f"generation failed: {value}", code="internal_error")
            yield kind, value
            if kind == "done":
                return
    finally:
        req.cancel()


async def collect(http: HTTPRequest, req: Request, queue: asyncio.Queue) -> tuple[str, Finish]:
    """The whole text of a request that does not stream; cancelled if its client disconnects."""
    pieces: list[str] = []
    stream = events(req, queue)
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(anext(stream), timeout=0.5)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    req.cancel()
                continue
            if kind == "done":
                return "".join(pieces), value
            pieces.append(value)
    finally:
        await stream.aclose()


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def event_stream(session: Session, req: Request, queue: asyncio.Queue, rid: str,
                       include_usage: bool, chat: bool) -> AsyncIterator[str]:
    """A request's SSE events: chat.completion.chunk or text_completion chunks, then [DONE]."""
    model = session.model_id

    def chunk(text: str | None, reason: str | None = None) -> dict:
        if chat:
            return P.chat_chunk(rid, model, {} if text is None else {"content": text}, reason)
        return P.completion_chunk(rid, model, text or "", reason)

    if chat:
        yield sse(P.chat_chunk(rid, model, {"role": "assistant", "content": ""}))
    async for kind, value in events(req, queue):
        if kind == "text":
            yield sse(chunk(value))
            continue
        yield sse(chunk(None, value.reason))
        if include_usage:
            obj = "chat.completion.chunk" if chat else "text_completion"
            yield sse(P.usage_chunk(rid, model, obj, value.prompt_tokens, value.completion_tokens))
    yield sse("[DONE]")


async def answer(session: Session, http: HTTPRequest, body: P.Sampling, ids: list[int],
                 max_tokens: int, chat: bool):
    """Queue the request; its stream, or (not streaming) its whole response."""
    req, queue = session.submit(ids, max_tokens, body)
    rid = P.completion_id("chatcmpl" if chat else "cmpl")
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return streaming(req, event_stream(session, req, queue, rid, usage, chat))
    text, fin = await collect(http, req, queue)
    build = P.chat_response if chat else P.completion_response
    return build(rid, session.model_id, text, fin.reason, fin.prompt_tokens, fin.completion_tokens)


async def guarded(req: Request, body: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream whose failure ends it with an error event (the status line was sent already),
    and whose end, however it comes (a client gone), cancels its request."""
    try:
        async for piece in body:
            yield piece
    except P.APIError as e:
        yield sse(e.body())
        yield sse("[DONE]")
    finally:
        req.cancel()
        await body.aclose()


def streaming(req: Request, body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(guarded(req, body), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def error_response(e: P.APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def validation_message(e: RequestValidationError) -> tuple[str, str | None]:
    errors = e.errors()
    if any(err.get("type") == "json_invalid" for err in errors):
        return "The body is not valid JSON", None
    err = errors[0] if errors else {}
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    return f"{param or 'body'}: {err.get('msg', 'invalid')}", param


def create_app(session: Session) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(session.engine.close, CLOSE_SECONDS)

    app = FastAPI(title="kbit serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_exception_handler(P.APIError, lambda r, e: error_response(e))
    app.add_exception_handler(
        RequestValidationError,
        lambda r, e: error_response(P.APIError(400, *validation_message(e))))
    app.add_exception_handler(
        HTTPException, lambda r, e: error_response(P.APIError(e.status_code, str(e.detail))))

    api = [Depends(session.authorize)]

    @app.post("/v1/chat/completions", dependencies=api)
    async def chat(body: P.ChatRequest, http: HTTPRequest):
        session.check_model(body)
        ids = session.chat_ids(body)
        asked = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
        return await answer(session, http, body, ids, session.budget(len(ids), asked, None), True)

    @app.post("/v1/completions", dependencies=api)
    async def completions(body: P.CompletionRequest, http: HTTPRequest):
        session.check_model(body)
        ids = session.completion_ids(body)
        max_tokens = session.budget(len(ids), body.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS)
        return await answer(session, http, body, ids, max_tokens, False)

    @app.get("/v1/models", dependencies=api)
    async def models():
        return {"object": "list", "data": [{"id": session.model_id, "object": "model",
                                            "created": session.started, "owned_by": "kbitrt"}]}

    @app.get("/health", dependencies=api)
    async def health():
        e = session.engine
        body = {"status": "draining" if e.draining else "ok", "model": session.model_id,
                "batching": e.batching, "running": e.metrics.batch_size,
                "waiting": e.metrics.queue_depth,
                "cpu_layers": getattr(e.lm.model, "cpu_layers", None)}  # native: stack or why not
        return JSONResponse(body, status_code=503 if e.draining else 200)

    @app.get("/metrics", dependencies=api)
    async def metrics():
        return PlainTextResponse(session.engine.metrics.render(),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse(resources.files("kbitrt.serve").joinpath("chat.html").read_text())

    return app
