"""The chat page of ``chatlm serve`` in a real browser: Debian's Chromium, headless, driven by Playwright (the
system browser, no browser download), against the real server and the bundled model. The replies the page shows
are checked against greedy ``generate``. ``CHATLM_REQUIRE_BROWSER=1`` (set by CI) turns a missing Chromium into a
failure instead of a skip. A screenshot of the chat lands in ``test-output/web-chat.png``."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

from test_server import NAME, greedy_reply, running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
OUTPUT = Path(__file__).resolve().parents[1] / "test-output"

if CHROMIUM is None and os.environ.get("CHATLM_REQUIRE_BROWSER") != "1":
    pytest.skip("no Chromium on this machine (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

# as a headless browser on a machine with no network wants them: no background calls home, no GPU, no sandbox
# (tests run as root in CI)
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM is not None, (
        "CHATLM_REQUIRE_BROWSER=1 but there is no chromium (apt-get install chromium)"
    )
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(bundled_model):
    with running_server(bundled_model) as (url, _app):
        yield url


@pytest.fixture
def page(browser):
    context = browser.new_context()  # its own localStorage
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"the page raised: {errors}"


def stored_chat(page) -> list[dict]:
    return json.loads(page.evaluate("localStorage.getItem('chatlm.chat')"))


def settings(page, *, temperature: str = "", max_tokens: str = "", system: str = "") -> None:
    page.click("#toggle-settings")
    page.fill("#temperature", temperature)
    page.fill("#max-tokens", max_tokens)
    page.fill("#system", system)
    page.click("#toggle-settings")
    sync_api.expect(page.locator("#settings")).to_be_hidden()


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def test_page_streams_replies_that_are_the_models_own(page, server, bundled_model):
    page.goto(server + "/")
    sync_api.expect(page.locator("#model")).to_have_text(NAME)
    settings(page, temperature="0", max_tokens="40", system="Answer briefly.")
    # record every length the reply's text had on screen: a streamed reply grows in steps
    page.evaluate(
        """() => {
        window.lengths = new Set();
        new MutationObserver(() => {
            const reply = document.querySelector('.message.assistant .content');
            if (reply) window.lengths.add(reply.textContent.length);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }"""
    )
    question = "What is the capital of France?"
    send(page, question)
    stats = page.locator(".message.assistant .stats")
    sync_api.expect(stats).to_contain_text("tok/s", timeout=60_000)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": question}]
    text, prompt_tokens, reply_tokens = greedy_reply(bundled_model, messages, 40)
    chat = stored_chat(page)
    assert [m["role"] for m in chat] == ["user", "assistant"] and chat[1]["content"] == text
    assert f"{prompt_tokens} prompt tokens, {reply_tokens} reply tokens" in stats.inner_text()
    shown = page.locator(".message.assistant .content").inner_text()
    assert shown.split() == text.replace("**", "").split()  # markdown rendered: the words stay
    assert len([n for n in page.evaluate("[...window.lengths]") if n > 0]) > 1, "the reply did not stream"
    sync_api.expect(page.locator("#send")).to_be_visible()

    # the second turn sends the whole chat
    follow_up = "And of Spain?"
    send(page, follow_up)
    sync_api.expect(page.locator(".message.assistant .stats").nth(1)).to_contain_text("tok/s", timeout=60_000)
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": follow_up}]
    assert stored_chat(page)[3]["content"] == greedy_reply(bundled_model, messages, 40)[0]
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "web-chat.png"), full_page=True)

    # kept in the browser: a reload shows the same chat; New chat clears it
    page.reload()
    sync_api.expect(page.locator(".message")).to_have_count(4)
    page.click("#new-chat")
    sync_api.expect(page.locator(".message")).to_have_count(0)
    assert stored_chat(page) == []


def test_stop_ends_the_reply_and_keeps_what_came(page, server):
    page.goto(server + "/")
    settings(page, temperature="1", max_tokens="2000")
    send(page, "Write a very long story about a dragon and a knight.")
    reply = page.locator(".message.assistant .content")
    sync_api.expect(reply).not_to_have_text("", timeout=60_000)
    page.click("#stop")
    sync_api.expect(page.locator(".message.assistant .stats")).to_contain_text("stopped")
    sync_api.expect(page.locator("#send")).to_be_visible()
    chat = stored_chat(page)
    assert chat[1]["stopped"] and chat[1]["content"]
    # the server let the request go: its batch empties, well before 2,000 tokens (generous: a loaded machine)
    for _ in range(600):
        if metric(server, "running_sequences") == 0:
            break
        time.sleep(0.1)
    assert metric(server, "running_sequences") == 0
    assert metric(server, "generation_tokens_total") < 2000


def metric(server: str, name: str) -> float:
    text = httpx.get(server + "/metrics").text
    return float(re.search(rf"^chatlm_{name} (\S+)$", text, re.M).group(1))


def test_replies_render_markdown_and_no_html_from_the_model(page, server):
    """A stored reply with a code block, raw HTML, a javascript: link and reasoning: the code is a code block, the
    HTML is shown as text (its handler never runs), the link is refused, the reasoning is folded."""
    page.goto(server + "/")
    reply = (
        "Here:\n\n```python\nprint('hi')\n```\n\n"
        '<img src="x" onerror="window.pwned = 1"> and [click](javascript:window.pwned=2) and **bold**'
    )
    chat = [
        {"role": "user", "content": "<b>not bold</b>"},
        {"role": "assistant", "content": reply, "reasoning": "Let me think."},
    ]
    page.evaluate("chat => localStorage.setItem('chatlm.chat', JSON.stringify(chat))", chat)
    page.reload()
    content = page.locator(".message.assistant .content")
    sync_api.expect(content.locator("pre code")).to_have_text("print('hi')\n")
    sync_api.expect(content.locator("strong")).to_have_text("bold")
    assert content.locator("img").count() == 0 and "<img" in content.inner_text()
    assert content.locator("a[href^='javascript']").count() == 0
    assert page.evaluate("window.pwned") is None
    assert page.locator(".message.user b").count() == 0
    reasoning = page.locator(".message.assistant details.reasoning")
    sync_api.expect(reasoning).to_contain_text("Let me think.")
    assert reasoning.get_attribute("open") is None


def test_api_key_and_errors_are_shown(browser, bundled_model):
    with running_server(bundled_model, api_key="sesame") as (url, _app):
        context = browser.new_context()
        page = context.new_page()
        page.goto(url + "/")  # the page itself needs no key
        sync_api.expect(page.locator("#model")).to_contain_text("API key")
        send(page, "Hi")
        sync_api.expect(page.locator(".message.assistant .error")).to_contain_text("401")
        page.click("#toggle-settings")
        page.fill("#api-key", "sesame")
        sync_api.expect(page.locator("#model")).to_have_text(NAME)
        context.close()


def test_the_page_can_be_turned_off(bundled_model):
    with running_server(bundled_model, web_page=False) as (url, _app):
        page = httpx.get(url + "/")
        assert page.status_code == 404 and page.json()["error"]["type"] == "not_found_error"
    with running_server(bundled_model) as (url, _app):
        page = httpx.get(url + "/")
        assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
        assert httpx.get(url + "/web/chat.js").headers["content-type"].startswith("text/javascript")
        assert httpx.get(url + "/web/other.js").status_code == 404
