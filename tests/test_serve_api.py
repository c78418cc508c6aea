"""`kbit serve` as a real process on 127.0.0.1, spoken to by the official `openai` client.

One server (a tiny Llama with SmolLM2's tokenizer, 4 rows, 128 tokens of context, an API key) for
the module; a second one for SIGTERM. Every server is killed in teardown.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "test-key"
HOST = "127.0.0.1"  # only ever this machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServerProcess:
    """`kbit serve FOLDER ARGS` in a subprocess, up once /health answers."""

    def __init__(self, folder: Path, *args: str, key: str | None = KEY):
        self.port, self.key = free_port(), key
        self.url = f"http://{HOST}:{self.port}"
        cmd = [sys.executable, "-m", "kbitrt.cli", "serve", str(folder), "--host", HOST,
               "--port", str(self.port), *args] + (["--api-key", key] if key else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        deadline = time.monotonic() + 300  # a hang guard: loading on a busy machine
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kbit serve exited: {self.proc.communicate()[1][-2000:]}")
            try:
                if httpx.get(self.url + "/health", headers=self.headers(), timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.kill()
        raise RuntimeError("kbit serve did not answer /health")

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def client(self, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.key or "none",
                             max_retries=0, timeout=120, **kw)

    def get(self, path: str, **kw):
        return httpx.get(self.url + path, headers=self.headers(), timeout=30, **kw)

    def metric(self, name: str) -> float:
        for line in self.get("/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=30)


@pytest.fixture(scope="module")
def folder(smollm2_dir, tmp_path_factory) -> Path:
    from kbitrt.convert.converter import convert
    from kbitrt.format.config import QuantConfig

    from conftest import make_tiny_llama

    root = tmp_path_factory.mktemp("serve")
    make_tiny_llama(root / "hf", smollm2_dir, max_positions=256, bos_token_id=1)
    convert(root / "hf", root / "tiny", QuantConfig(bits=4, block_size=64))
    return root / "tiny"


@pytest.fixture(scope="module")
def server(folder):
    srv = ServerProcess(folder, "--ctx", "128", "--max-batch", "4")
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def local(folder):
    """The same model in this process: what generate() gives one request alone."""
    from kbitrt.runtime.loader import load_model

    return load_model(folder, device="cpu")


def alone(lm, ids, n, **kw):
    from kbitrt.runtime.generate import SamplingConfig, generate

    return generate(lm, [ids], n, SamplingConfig(**kw))


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list().data] == ["tiny"]
    body = server.get("/health").json()
    assert body["status"] == "ok" and body["batching"] is True


def test_chat_stream_and_not_equal_generate_alone(server, local):
    client = server.client()
    messages = [{"role": "user", "content": "Say hello"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12,
                                          temperature=0)
    ids = local.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    ref = alone(local, ids, 12)
    assert full.choices[0].message.content == ref.texts[0]
    assert full.usage.prompt_tokens == len(ids)
    assert full.usage.completion_tokens == ref.stats.new_tokens
    assert full.usage.total_tokens == len(ids) + ref.stats.new_tokens
    assert full.choices[0].finish_reason == {"length": "length"}.get(ref.stop_reasons[0], "stop")
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.texts[0]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # streamed
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completions_concurrent_equal_generate_alone(server, local):
    client = server.client()
    prompts = ["The capital of France is", "Hi", "1, 2, 3, 4, 5, 6, 7, 8",
               "Once upon a time in a land far away there lived", "def f(x):", "Dear"]
    budgets = [20, 9, 30, 14, 25, 11]
    out: dict[int, str] = {}

    def ask(i):
        stream = i % 2 == 0
        r = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=budgets[i],
                                      temperature=0, stream=stream)
        out[i] = "".join(c.choices[0].text for c in r) if stream else r.choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for i, p in enumerate(prompts):
        ids = local.tokenizer(p)["input_ids"]
        assert out[i] == alone(local, ids, budgets[i]).texts[0], p


def test_seeded_sampling_and_stop(server, local):
    client = server.client()
    ids = local.tokenizer("Once upon a time")["input_ids"]
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=15, temperature=0.9,
                                  top_p=0.95, seed=7, extra_body={"top_k": 40})
    ref = alone(local, ids, 15, temperature=0.9, top_p=0.95, top_k=40, seed=7)
    assert r.choices[0].text == ref.texts[0]
    text = ref.texts[0]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = client.completions.create(model="tiny", prompt=ids, max_tokens=15, temperature=0.9,
                                    top_p=0.95, seed=7, extra_body={"top_k": 40}, stop=[stop])
    assert cut.choices[0].text == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def raw_post(server, path, content, headers=None):
    h = {"Content-Type": "application/json", **server.headers(), **(headers or {})}
    return httpx.post(server.url + path, content=content, headers=h, timeout=30)


def test_errors_are_openai_style_and_the_server_goes_on(server):
    client = server.client()
    with pytest.raises(openai.AuthenticationError) as e:
        server.client().with_options(api_key="wrong").models.list()
    assert e.value.status_code == 401
    assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 401  # no key at all
    r = raw_post(server, "/v1/chat/completions", b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="word " * 200)
    assert e.value.body["code"] == "context_length_exceeded"
    for n in (0, 10**9):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt="Hi", max_tokens=n)
        assert e.value.body["param"] == "max_tokens"
    r = raw_post(server, "/v1/chat/completions", json.dumps({"model": "tiny"}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    ok = client.completions.create(model="tiny", prompt="Hi", max_tokens=3, temperature=0)
    assert ok.usage.completion_tokens == 3 and server.get("/health").status_code == 200


def test_disconnect_cancels_the_request(server):
    before = server.metric('kbit_requests_total{reason="cancelled"}')
    body = {"model": "tiny", "prompt": "Tell me a story", "max_tokens": 120, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=server.headers(),
                      timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # it runs; then the client goes away
    deadline = time.monotonic() + 60  # a hang guard, not a timing
    while server.metric('kbit_requests_total{reason="cancelled"}') == before \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.metric('kbit_requests_total{reason="cancelled"}') == before + 1
    assert server.metric("kbit_batch_size") == 0
    text = server.get("/metrics").text
    assert "kbit_time_to_first_token_seconds_count" in text and "kbit_queue_depth" in text


def test_sigterm_stops_admitting_and_exits(folder):
    from kbitrt.serve.app import CLOSE_SECONDS
    from kbitrt.serve.server import GRACE_SECONDS

    srv = ServerProcess(folder, "--ctx", "256", "--max-batch", "2", key=None)
    try:
        got: list = []

        def long_stream():
            try:
                r = srv.client().completions.create(model="tiny", prompt="Go", max_tokens=250,
                                                    temperature=0, stream=True)
                for c in r:
                    got.append(c)
            except Exception as e:  # cancelled by the shutdown: the stream ends early
                got.append(e)

        t = threading.Thread(target=long_stream)
        t.start()
        while not got and t.is_alive():  # the stream runs (or already ended)
            time.sleep(0.05)
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(timeout=60)  # a hang guard; the bound by design is checked below
        t.join(60)
        assert not t.is_alive() and got
        with pytest.raises(httpx.TransportError):  # nothing is admitted any more
            httpx.get(srv.url + "/health", timeout=5)
        assert "Traceback" not in srv.proc.stderr.read()
    finally:
        srv.kill()
    # running requests get GRACE_SECONDS, the scheduler's thread CLOSE_SECONDS: under 10 s
    assert GRACE_SECONDS + CLOSE_SECONDS < 10


def test_cli_without_the_extra_says_which_to_install(monkeypatch, folder):
    from conftest import assert_one_line_error, run_cli

    monkeypatch.setitem(sys.modules, "fastapi", None)  # find_spec: not installed
    assert_one_line_error(run_cli("serve", folder), "pip install 'kbitrt[serve]'")
