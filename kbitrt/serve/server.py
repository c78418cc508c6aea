"""`kbit serve`'s library side: load a model, pick its scheduler, run uvicorn until SIGTERM."""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from kbitrt.errors import KbitError, RunError
from kbitrt.runtime.loader import LoadedModel

DEFAULT_CTX = 2048
GRACE_SECONDS = 4.0  # SIGTERM: running requests may finish this long, then are cancelled


def check_installed() -> None:
    """The serve extra's packages, or one line that says how to get them."""
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise KbitError(f"kbit serve needs {' and '.join(missing)}: "
                        "pip install 'kbitrt[serve]'")


@dataclass
class Served:
    engine: object  # scheduler.Engine
    model_id: str
    how: str  # one line: how requests are served


def open_engine(lm: LoadedModel, model_id: str, max_batch: int = 16, ctx: int | None = None,
                spec: dict | None = None) -> Served:
    """The scheduler for a loaded model: continuous batching on the native decoder, one request
    at a time on the transformers backend (or with self-speculative decoding, `spec`)."""
    from kbitrt.serve.scheduler import BatchEngine, SerialEngine

    if max_batch < 1:
        raise RunError(f"--max-batch {max_batch}: must be >= 1")
    limit = lm.max_positions
    if ctx is None:
        ctx = min(DEFAULT_CTX, limit) if limit else DEFAULT_CTX
    if ctx < 2 or (limit is not None and ctx > limit):
        raise RunError(f"--ctx {ctx}: must be in 2..{limit or 'the model positions'}")
    if spec:
        from kbitrt.runtime.speculative import generate_speculative

        engine = SerialEngine(lm, ctx, functools.partial(generate_speculative, **spec))
        how = (f"one request at a time (self-speculative: {spec['draft_bits']}-bit drafts for "
               f"{spec['bits']} bits)")
    elif lm.backend != "native" or getattr(lm.model, "device_map", None):
        from kbitrt.runtime.generate import generate

        engine = SerialEngine(lm, ctx, generate)
        why = "the transformers backend" if lm.backend != "native" else "a device map"
        how = f"one request at a time ({why}: no continuous batching)"
    else:
        engine = BatchEngine(lm, ctx, max_batch)
        how = f"continuous batching, up to {max_batch} requests at once"
    return Served(engine.start(), model_id, f"{how}; context {ctx} tokens")


def model_id_for(name: str, lm: LoadedModel) -> str:
    """The name clients send as `model`: the folder's name, or the Hub repo id."""
    return lm.path.name if lm.path is not None and Path(name).exists() else str(name)


def run_server(served: Served, host: str = "127.0.0.1", port: int = 8000,
               api_key: str | None = None, log_level: str = "warning") -> None:
    """Serve until SIGTERM or Ctrl-C: then nothing new is admitted, running requests get
    GRACE_SECONDS to finish, the rest are cancelled, and the process exits."""
    import uvicorn

    from kbitrt.serve.app import Session, create_app

    engine = served.engine
    app = create_app(Session(engine, served.model_id, api_key))

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            engine.drain()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=GRACE_SECONDS, access_log=False)
    Server(config).run()
