"""The chat page at / in a real headless Chromium (Selenium): what it shows equals what the server answers the
same messages non-streamed (greedy, fp32), it renders the answer piece by piece as it streams, a second
question sends the whole conversation, Stop ends an answer, and a question that failed is not sent again.

Needs the Debian packages chromium and chromium-driver (scripts/install_cluster_deps.sh installs them as root).
Without them the tests skip and say why; with ASTRAI_REQUIRE_CLUSTER_TESTS=1 (set by scripts/test.sh where it
can install them) they fail instead. A screenshot of the page is saved to $ASTRAI_TEST_ARTIFACTS (else the
test's tmp_path) and its path printed.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from conftest import unavailable

WAIT_S = 60
# What the page records from the moment it is installed: every text the assistant bubbles were given, in order,
# with the bubble's data-done then. `answer.textContent = text` replaces the bubble's text node, so each partial
# answer is one added text node (whose data never changes afterwards) on the bubble.
RECORD_PARTIALS = """
window.partials = [];
new MutationObserver(records => {
  for (const r of records) {
    if (!r.target.classList || !r.target.classList.contains("assistant")) continue;
    for (const n of r.addedNodes)
      if (n.nodeType === Node.TEXT_NODE) window.partials.push({text: n.data, done: r.target.dataset.done});
  }
}).observe(document.getElementById("log"), {childList: true, subtree: true});
"""
BUBBLES = """return Array.from(document.querySelectorAll("#log .msg")).map(
  b => ({role: b.classList.contains("user") ? "user" : "assistant", text: b.textContent,
         error: b.classList.contains("error"), done: b.dataset.done || null}));"""


@pytest.fixture(scope="module")
def browser():
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", chromedriver)) if not path]
    if missing:
        unavailable(f"not installed: {', '.join(missing)} (the Debian packages chromium and chromium-driver; "
                    f"run scripts/install_cluster_deps.sh as root)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        unavailable("the selenium package is not installed (pip install -e '.[test]')")
    options = Options()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield driver
    driver.quit()


class Page:
    def __init__(self, browser, server, temperature: str = "0", system: str = ""):
        from selenium.webdriver.common.by import By

        self.b, self.by = browser, By
        browser.get(f"{server.url}/")
        self.model = browser.execute_script("return MODEL")
        self.field("temperature").clear()
        self.field("temperature").send_keys(temperature)
        if system:
            self.field("system").send_keys(system)
        browser.execute_script(RECORD_PARTIALS)

    def field(self, element_id: str):
        return self.b.find_element(self.by.ID, element_id)

    def ask(self, question: str) -> dict:
        """Type the question, press Enter, and wait for the answer's data-done; the answer's bubble."""
        from selenium.webdriver.common.keys import Keys

        n = sum(m["role"] == "assistant" for m in self.bubbles()) + 1
        self.field("input").send_keys(question + Keys.ENTER)
        return self.wait_done(n)

    def wait_done(self, n: int) -> dict:
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(self.b, WAIT_S, poll_frequency=0.05).until(lambda d: d.execute_script(
            "const a = document.querySelectorAll('#log .assistant'); "
            "return a.length >= arguments[0] && a[arguments[0] - 1].dataset.done === 'true'", n))
        return [m for m in self.bubbles() if m["role"] == "assistant"][n - 1]

    def bubbles(self) -> list[dict]:
        return self.b.execute_script(BUBBLES)

    def partials(self) -> list[dict]:
        return self.b.execute_script("return window.partials")

    def idle(self) -> bool:
        return self.b.execute_script("return !send.disabled && stop.disabled && input.value === ''")

    def screenshot(self, name: str, tmp_path: Path) -> Path:
        folder = Path(os.environ.get("ASTRAI_TEST_ARTIFACTS") or tmp_path)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        assert self.b.save_screenshot(str(path)), f"no screenshot written to {path}"
        print(f"chat page screenshot: {path}")
        return path


def server_answer(server, model: str, messages: list[dict]) -> tuple[int, str]:
    """What the server answers the page's request non-streamed: (status, the answer's text or the error's message)."""
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=WAIT_S,
                   json={"model": model, "messages": messages, "temperature": 0})
    body = r.json()
    if r.status_code == 200:
        return 200, body["choices"][0]["message"]["content"]
    return r.status_code, body["error"]["message"]


def shown(status: int, text: str) -> tuple[str, bool]:
    """What the page shows for a server's answer: (the bubble's text, whether it is marked as an error)."""
    return (text, False) if status == 200 else (f"[{text}]", True)


def test_an_answer_streams_into_the_page_and_equals_the_servers(browser, server, tmp_path):
    system, question = "You are a helpful assistant.", "What is the capital of France?"
    page = Page(browser, server, system=system)
    assert page.model in browser.title
    answer = page.ask(question)

    status, expected = server_answer(server, page.model, [{"role": "system", "content": system},
                                                          {"role": "user", "content": question}])
    assert status == 200 and expected
    assert answer["text"] == expected and not answer["error"]
    assert [m["role"] for m in page.bubbles()] == ["user", "assistant"]
    assert page.bubbles()[0]["text"] == question
    assert page.idle()  # input cleared, Send enabled again, Stop disabled
    # Rendered piece by piece while it streamed: several partial answers before the end, each a prefix of it.
    partials = [p for p in page.partials() if p["text"]]
    growing = {len(p["text"]) for p in partials if p["done"] == "false"}
    assert len(growing) >= 2, f"the answer was not rendered as it streamed: {partials}"
    assert all(expected.startswith(p["text"]) for p in partials), partials
    assert partials[-1]["text"] == expected
    page.screenshot("chat_page.png", tmp_path)


def test_a_second_question_sends_the_conversation(browser, server):
    # The first answer must leave room in the model's 128-token context for a second question: take the first
    # of these whose greedy answer stops early (on this model "请用中文介绍一下北京。" does). If none does, the
    # second request is over-long, and the page must show the server's error for the whole conversation.
    page = Page(browser, server)
    model = page.model
    follow_up = "Why?"
    candidates = ["请用中文介绍一下北京。", "Hello", "Tell me a story."]
    for first in candidates:
        status, first_answer = server_answer(server, model, [{"role": "user", "content": first}])
        assert status == 200
        conversation = [{"role": "user", "content": first}, {"role": "assistant", "content": first_answer},
                         {"role": "user", "content": follow_up}]
        expected = server_answer(server, model, conversation)
        if expected[0] == 200:
            break
    else:
        first, first_answer = candidates[0], server_answer(server, model, [{"role": "user", "content": first}])[1]
        conversation[:2] = [{"role": "user", "content": first}, {"role": "assistant", "content": first_answer}]
        expected = server_answer(server, model, conversation)

    assert page.ask(first)["text"] == first_answer
    second = page.ask(follow_up)
    assert (second["text"], second["error"]) == shown(*expected)
    # ... and not the answer to the follow-up alone
    assert server_answer(server, model, [{"role": "user", "content": follow_up}]) != expected
    assert [m["role"] for m in page.bubbles()] == ["user", "assistant"] * 2
    assert page.idle()


def test_stop_ends_the_answer_and_keeps_what_came(browser, server):
    page = Page(browser, server)
    question = "Tell me a story."
    status, full = server_answer(server, page.model, [{"role": "user", "content": question}])
    assert status == 200 and len(full) > 20
    # Throttle the browser's downloads (a few tokens a second) so that Stop lands while the answer streams.
    browser.set_network_conditions(offline=False, latency=0, download_throughput=1500, upload_throughput=1 << 20)
    try:
        from selenium.webdriver.common.keys import Keys
        from selenium.webdriver.support.ui import WebDriverWait

        page.field("input").send_keys(question + Keys.ENTER)
        WebDriverWait(browser, WAIT_S, poll_frequency=0.02).until(
            lambda d: d.execute_script("const a = document.querySelector('#log .assistant'); "
                                       "return a !== null && a.textContent.length > 0"))
        assert browser.execute_script("return send.disabled && !stop.disabled")
        page.field("stop").click()
        stopped = page.wait_done(1)
    finally:
        browser.delete_network_conditions()
    assert stopped["text"] and full.startswith(stopped["text"]) and len(stopped["text"]) < len(full), \
        (stopped, full)
    assert not stopped["error"]
    assert page.idle()
    time.sleep(0.5)
    assert page.bubbles()[1]["text"] == stopped["text"]  # nothing more arrived after Stop

    # What came before Stop is part of the conversation that the next question sends.
    follow_up = "Why?"
    expected = server_answer(server, page.model, [{"role": "user", "content": question},
                                                  {"role": "assistant", "content": stopped["text"]},
                                                  {"role": "user", "content": follow_up}])
    answer = page.ask(follow_up)
    assert (answer["text"], answer["error"]) == shown(*expected)


def test_a_failed_question_is_not_sent_again(browser, server):
    page = Page(browser, server)
    too_long = "word " * 200  # longer than the model's 128-token context: the server answers 400
    status, message = server_answer(server, page.model, [{"role": "user", "content": too_long.strip()}])
    assert status == 400
    failed = page.ask(too_long)
    assert (failed["text"], failed["error"]) == shown(status, message)
    assert page.idle()

    # The next question is sent alone (not after the failed one, which would overflow the context again).
    question = "Hello"
    expected = server_answer(server, page.model, [{"role": "user", "content": question}])
    assert expected[0] == 200
    answer = page.ask(question)
    assert (answer["text"], answer["error"]) == shown(*expected)


def test_new_chat_during_an_answer_starts_afresh(browser, server):
    page = Page(browser, server)
    browser.set_network_conditions(offline=False, latency=0, download_throughput=1500, upload_throughput=1 << 20)
    try:
        from selenium.webdriver.common.keys import Keys
        from selenium.webdriver.support.ui import WebDriverWait

        page.field("input").send_keys("Tell me a story." + Keys.ENTER)
        WebDriverWait(browser, WAIT_S, poll_frequency=0.02).until(
            lambda d: d.execute_script("const a = document.querySelector('#log .assistant'); "
                                       "return a !== null && a.textContent.length > 0"))
        page.field("clear").click()
        WebDriverWait(browser, WAIT_S, poll_frequency=0.05).until(lambda d: page.idle())
    finally:
        browser.delete_network_conditions()
    assert page.bubbles() == []

    # The old answer is neither shown nor sent: the next question starts the conversation.
    question = "Hello"
    expected = server_answer(server, page.model, [{"role": "user", "content": question}])
    answer = page.ask(question)
    assert (answer["text"], answer["error"]) == shown(*expected)
    assert [m["role"] for m in page.bubbles()] == ["user", "assistant"]
