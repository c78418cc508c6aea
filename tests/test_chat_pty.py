"""`kbit run --chat` in a real terminal, driven through a pseudo-terminal: streamed answers, the
conversation kept between turns, /reset, /exit, Ctrl-C (stops an answer, never the session) and
Ctrl-D (quits)."""

from __future__ import annotations

import os
import re
import select
import sys
import time
from pathlib import Path

import pytest

pty = pytest.importorskip("pty")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, smollm2_dir):
    from conftest import make_tiny_llama

    from kbitrt.convert.converter import convert
    from kbitrt.format.config import QuantConfig

    root = tmp_path_factory.mktemp("chatpty")
    make_tiny_llama(root / "hf", smollm2_dir, max_positions=8192)
    convert(root / "hf", root / "k4", QuantConfig(bits=4, block_size=64))
    return root / "k4"


class Terminal:
    """A child process on a pseudo-terminal, with expect-style reads."""

    def __init__(self, args: list[str]):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "dumb", "COLUMNS": "120"}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal
            os.execvpe(sys.executable, [sys.executable, "-m", "kbitrt.cli", *args], env)
        self.buf = b""

    def read(self, timeout: float) -> bytes:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return b""
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # the child is gone
            return b""
        self.buf += data
        return data

    def expect(self, pattern: str, timeout: float = 120) -> str:
        """Wait for `pattern` (regex) in the output since the last match; consume up to it."""
        end = time.monotonic() + timeout
        rx = re.compile(pattern.encode())
        while True:
            m = rx.search(self.buf)
            if m:
                seen, self.buf = self.buf[:m.end()], self.buf[m.end():]
                return seen.decode(errors="replace")
            if time.monotonic() > end:
                raise AssertionError(f"no {pattern!r} in {self.buf[-2000:]!r}")
            self.read(0.2)

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 60) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.read(0.1)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, 9)
        raise AssertionError(f"still running: {self.buf[-2000:]!r}")


PROMPT = r"\n> "


def test_chat_history_reset_and_exit(chat_model):
    t = Terminal(["run", str(chat_model), "--chat", "-n", "4", "--cpu-weights", "fp16"])
    t.expect(PROMPT)
    t.send("Hello\r")
    t.expect(r"1 turn in context")
    t.expect(PROMPT)
    t.send("And again\r")
    t.expect(r"2 turns in context")  # the first exchange is still in the conversation
    t.expect(PROMPT)
    time.sleep(1.0)  # let the prompt's line editor take the terminal (a key before it is a race)
    t.send("\x03")  # Ctrl-C at the prompt: a fresh prompt, the session goes on
    t.expect(r"\^C")
    t.send("/reset\r")
    t.expect(r"conversation reset")
    t.send("Once more\r")
    t.expect(r"1 turn in context")  # forgotten
    t.expect(PROMPT)
    t.send("/exit\r")
    assert t.wait() == 0
    assert b"generation" in t.buf  # the stats table at the end


def test_ctrl_c_stops_the_answer_and_ctrl_d_quits(chat_model):
    t = Terminal(["run", str(chat_model), "--chat", "-n", "8000", "--temperature", "1",
                  "--seed", "0"])
    t.expect(PROMPT)
    t.send("Tell me a long story\r")
    t.expect(r"story\r?\n")  # the echo of the line
    deadline = time.monotonic() + 60
    while not t.buf.strip() and time.monotonic() < deadline:
        t.read(0.2)  # wait for the answer to start streaming
    assert t.buf.strip(), "no streamed text"
    time.sleep(0.5)
    t.send("\x03")  # Ctrl-C while answering
    t.expect(r"\[stopped\]", timeout=60)
    t.expect(PROMPT)
    t.send("Short one\r")  # the session is alive and answers again
    t.expect(r"Short one\r?\n")
    deadline = time.monotonic() + 60
    while not t.buf.strip() and time.monotonic() < deadline:
        t.read(0.2)  # the second answer streams too
    time.sleep(0.5)
    t.send("\x03")
    t.expect(r"\[stopped\]", timeout=60)
    t.expect(PROMPT)
    t.send("\x04")  # Ctrl-D quits
    assert t.wait() == 0
