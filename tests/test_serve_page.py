"""kbit serve's chat page in a real browser: Debian's chromium driven by the `playwright` package.

Type, see the answer stream in, a second turn that keeps the conversation, stop, clear. Skipped,
with the reason, where playwright or a chromium binary is missing (playwright cannot download its
own browsers here: `apt-get install chromium`).
"""

from __future__ import annotations

import os
import shutil

import httpx
import pytest

from test_serve_api import ServerProcess, folder  # noqa: F401  (folder: the module's fixture)

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
CHROMIUM = next((p for p in (os.environ.get("KBIT_CHROMIUM"), "/usr/bin/chromium",
                             shutil.which("chromium"), shutil.which("chromium-browser")) if p and
                 os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install "
                                "chromium, or set KBIT_CHROMIUM)")


@pytest.fixture(scope="module")
def server(folder):  # noqa: F811
    srv = ServerProcess(folder, "--ctx", "256", "--max-batch", "2", key=None)
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.set_default_timeout(60_000)  # a hang guard on a busy machine
        page.goto(server.url + "/")
        yield page
        browser.close()


def answer_of(page) -> str:
    return page.locator(".assistant").last.evaluate("e => e.firstChild ? e.firstChild.textContent : ''")


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def test_chat_streams_keeps_the_conversation_stops_and_clears(page, server):
    sync_api.expect(page.locator("#model")).to_have_text("tiny")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "24")
    # count the answer's updates: a streamed answer grows in several steps
    page.evaluate("""() => { window.updates = 0; new MutationObserver(() => window.updates++)
        .observe(document.getElementById('log'), {subtree: true, childList: true,
                                                 characterData: true}); }""")
    send(page, "Hello there")
    sync_api.expect(page.locator("#send")).to_be_enabled()  # the answer finished
    first = answer_of(page)
    want = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": "Hello there"}],
        "temperature": 0, "max_tokens": 24}).json()["choices"][0]["message"]["content"]
    assert first == want and first
    assert page.evaluate("window.updates") > 3

    send(page, "Tell me more")
    sync_api.expect(page.locator("#send")).to_be_enabled()
    assert page.evaluate("messages.map(m => m.role)") == ["user", "assistant", "user", "assistant"]
    second = page.evaluate("messages[3].content")
    want = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": page.evaluate("messages.slice(0, 3)"),
        "temperature": 0, "max_tokens": 24}).json()["choices"][0]["message"]["content"]
    assert second == want  # the second turn was sent with the first one's conversation

    # stop: a slow network keeps the stream going while the button is pressed
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0,
                                                  "downloadThroughput": 1500,
                                                  "uploadThroughput": -1})
    page.fill("#max_tokens", "150")
    send(page, "And a long story")
    sync_api.expect(page.locator("#stop")).to_be_enabled()
    page.wait_for_function("() => document.querySelectorAll('.assistant')[2]?.textContent")
    page.click("#stop")
    sync_api.expect(page.locator(".assistant").last.locator(".note")).to_have_text("[stopped]")
    sync_api.expect(page.locator("#send")).to_be_enabled()
    assert len(page.evaluate("messages")) == 6  # the stopped answer stays, as far as it got
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0,
                                                  "downloadThroughput": -1,
                                                  "uploadThroughput": -1})

    page.click("#clear")
    assert page.evaluate("messages.length") == 0
    assert page.locator("#log .msg").count() == 0
