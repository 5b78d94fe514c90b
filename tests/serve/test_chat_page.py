"""The chat page at / in a real headless Chromium (Selenium): what it shows equals what the server answers the
same messages non-streamed (greedy, fp32), rendered as Markdown, piece by piece as it streams; a second
question sends the whole conversation, Stop ends an answer, and a question that failed is not sent again; a
conversation longer than the context leaves its oldest turns out (the system prompt stays) and says so; no HTML in
an answer runs; the -rag model can be chosen.

Needs the Debian packages chromium and chromium-driver (scripts/install_cluster_deps.sh installs them as root).
Without them the tests skip and say why; with ASTRAI_REQUIRE_CLUSTER_TESTS=1 (set by scripts/test.sh where it
can install them) they fail instead. A screenshot of the page is saved to $ASTRAI_TEST_ARTIFACTS (else the
test's tmp_path) and its path printed.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from conftest import unavailable

WAIT_S = 60
# What the page records from the moment it is installed. `partials`: every rendering of an assistant bubble, in order,
# with the bubble's data-done then. The page replaces a bubble's children at each rendering of the answer so far, so
# each one is the nodes added by one mutation (which are never changed afterwards, only replaced). `requests`:
# every request with a body (a chat request) that the page sends, with the status it got.
RECORD = """
window.partials = [];
new MutationObserver(records => {
  for (const r of records) {
    if (!r.target.classList || !r.target.classList.contains("assistant") || !r.addedNodes.length) continue;
    const copy = document.createElement("div");
    for (const n of r.addedNodes) copy.appendChild(n.cloneNode(true));
    window.partials.push({html: copy.innerHTML, done: r.target.dataset.done});
  }
}).observe(document.getElementById("log"), {childList: true, subtree: true});
window.requests = [];
const pageFetch = window.fetch;
window.fetch = async (url, init) => {
  const response = await pageFetch(url, init);
  if (init && init.body) window.requests.push({url, body: JSON.parse(init.body), status: response.status});
  return response;
};
"""
# A bubble: its role, text (as shown), the Markdown it renders (assistant answers), its HTML, and its marks.
BUBBLES = """return Array.from(document.querySelectorAll("#log .msg")).map(
  b => ({role: b.classList.contains("user") ? "user" : "assistant", text: b.textContent,
         markdown: b.dataset.markdown === undefined ? null : b.dataset.markdown, html: b.innerHTML,
         error: b.classList.contains("error"), done: b.dataset.done || null,
         dropped: b.classList.contains("dropped"), unanswered: b.classList.contains("unanswered")}));"""
# The HTML the page shows for Markdown arguments[0] (its own rendering, into an element outside the page).
RENDER = """const d = document.createElement("div"); renderMarkdown(d, arguments[0]); return d.innerHTML;"""
# For each HTML of arguments[1]: the length of the prefix of arguments[0] whose rendering it is (-1: none).
PREFIX_RENDERED = """const [text, htmls] = arguments, seen = new Map();
for (let i = 0; i <= text.length; i++) {
  const d = document.createElement("div"); renderMarkdown(d, text.slice(0, i)); seen.set(d.innerHTML, i);
}
return htmls.map(h => seen.has(h) ? seen.get(h) : -1);"""


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

        from selenium.common.exceptions import JavascriptException, TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        self.b, self.by = browser, By
        browser.get(f"{server.url}/")

        def ready(driver):  # the page's own script has run (once, in CI, right after get() it had not)
            try:
                return driver.execute_script("return typeof MODEL === 'string' ? MODEL : null")
            except JavascriptException:
                return None

        try:
            self.model = WebDriverWait(browser, WAIT_S, poll_frequency=0.05).until(ready)
        except TimeoutException:
            raise AssertionError(f"the page's script never ran; the browser's console: "
                                 f"{browser.get_log('browser')}") from None
        self.field("temperature").clear()
        self.field("temperature").send_keys(temperature)
        if system:
            self.field("system").send_keys(system)
        browser.execute_script(RECORD)

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

    def notes(self) -> list[str]:
        return self.b.execute_script("return Array.from(document.querySelectorAll('#log .note'), n => n.textContent)")

    def partials(self) -> list[dict]:
        return self.b.execute_script("return window.partials")

    def requests(self) -> list[dict]:
        return self.b.execute_script("return window.requests")

    def render(self, markdown: str) -> str:
        return self.b.execute_script(RENDER, markdown)

    def idle(self) -> bool:
        return self.b.execute_script("return !send.disabled && stop.disabled && input.value === ''")

    def assert_shows(self, bubble: dict, status: int, text: str) -> None:
        """`bubble` shows the server's answer `text` (rendered as Markdown), or its error message `text`."""
        if status == 200:
            assert (bubble["markdown"], bubble["error"]) == (text, False), bubble
            assert bubble["html"] == self.render(text), bubble
        else:
            assert (bubble["text"], bubble["error"]) == (f"[{text}]", True), bubble

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


def prompt_tokens(server, model: str, messages: list[dict]) -> int:
    """The length in tokens of the prompt the server makes of `messages` (also of one too long for the model)."""
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=WAIT_S,
                   json={"model": model, "messages": messages, "temperature": 0, "max_tokens": 1})
    if r.status_code == 200:
        return r.json()["usage"]["prompt_tokens"]
    found = re.match(r"the prompt is (\d+) tokens", r.json()["error"]["message"])
    assert r.status_code == 400 and found, r.text
    return int(found[1])


def turns(pairs) -> list[dict]:
    return [{"role": role, "content": text} for pair in pairs for role, text in zip(("user", "assistant"), pair)]


def test_an_answer_streams_into_the_page_and_equals_the_servers(browser, server, tmp_path):
    system, question = "You are a helpful assistant.", "What is the capital of France?"
    page = Page(browser, server, system=system)
    assert page.model in browser.title
    answer = page.ask(question)

    status, expected = server_answer(server, page.model, [{"role": "system", "content": system},
                                                          {"role": "user", "content": question}])
    assert status == 200 and expected
    page.assert_shows(answer, status, expected)
    assert [m["role"] for m in page.bubbles()] == ["user", "assistant"]
    assert page.bubbles()[0]["text"] == question
    assert page.idle()  # input cleared, Send enabled again, Stop disabled
    # Rendered piece by piece while it streamed: several partial answers before the end, each the rendering of a
    # prefix of it.
    partials = [p for p in page.partials() if p["html"]]
    prefixes = browser.execute_script(PREFIX_RENDERED, expected, [p["html"] for p in partials])
    assert -1 not in prefixes, [p for p, n in zip(partials, prefixes) if n < 0]
    growing = {n for p, n in zip(partials, prefixes) if p["done"] == "false"}
    assert len(growing) >= 2, f"the answer was not rendered as it streamed: {partials}"
    assert prefixes[-1] == len(expected)
    page.screenshot("chat_page.png", tmp_path)


def test_a_second_question_sends_the_conversation(browser, server):
    # The first answer must leave room in the model's 128-token context for a second question and its answer (as
    # much as the page keeps free before it leaves turns out): take the first of these whose greedy answer stops
    # early (on this model "请用中文介绍一下北京。" does).
    page = Page(browser, server)
    model = page.model
    room, context = browser.execute_script("return [ROOM, CONTEXT]")
    follow_up = "Why?"
    for first in ["请用中文介绍一下北京。", "Hello", "Tell me a story."]:
        status, first_answer = server_answer(server, model, [{"role": "user", "content": first}])
        assert status == 200
        conversation = turns([(first, first_answer)]) + [{"role": "user", "content": follow_up}]
        if prompt_tokens(server, model, conversation) + room <= context:
            break
    else:
        pytest.fail("no first question leaves room for a second one in the model's context")
    expected = server_answer(server, model, conversation)

    page.assert_shows(page.ask(first), 200, first_answer)
    second = page.ask(follow_up)
    page.assert_shows(second, *expected)
    assert page.requests()[-1]["body"]["messages"] == conversation
    # ... and not the answer to the follow-up alone
    assert server_answer(server, model, [{"role": "user", "content": follow_up}]) != expected
    assert [m["role"] for m in page.bubbles()] == ["user", "assistant"] * 2
    assert page.notes() == [] and not any(b["dropped"] for b in page.bubbles())
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
    shown = stopped["markdown"]
    assert shown and full.startswith(shown) and len(shown) < len(full), (stopped, full)
    assert stopped["html"] == page.render(shown) and not stopped["error"]
    assert page.idle()
    time.sleep(0.5)
    assert page.bubbles()[1] == stopped  # nothing more arrived after Stop

    # What came before Stop is part of the conversation that the next question sends.
    follow_up = "Why?"
    expected = server_answer(server, page.model, turns([(question, shown)]) + [{"role": "user", "content": follow_up}])
    answer = page.ask(follow_up)
    page.assert_shows(answer, *expected)


def test_a_failed_question_is_not_sent_again(browser, server):
    page = Page(browser, server)
    too_long = "word " * 200  # longer than the model's 128-token context: the server answers 400
    status, message = server_answer(server, page.model, [{"role": "user", "content": too_long.strip()}])
    assert status == 400
    failed = page.ask(too_long)
    page.assert_shows(failed, status, message)
    assert page.idle()

    # The next question is sent alone (not after the failed one, which would overflow the context again).
    question = "Hello"
    expected = server_answer(server, page.model, [{"role": "user", "content": question}])
    assert expected[0] == 200
    answer = page.ask(question)
    page.assert_shows(answer, *expected)


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
    page.assert_shows(answer, *expected)
    assert [m["role"] for m in page.bubbles()] == ["user", "assistant"]


TEN_QUESTIONS = ["请用中文介绍一下北京。", "Hi", "What is 2+2?", "No", "Tell me a story.", "Name a color.", "谢谢",
                 "Why?", "Who are you?", "Hello"]


@pytest.mark.multiproc  # slow: ten questions typed into the page, each answer compared with the server's
def test_ten_turns_leave_out_the_oldest_turns_and_keep_the_system_prompt(browser, server, tmp_path):
    # The model's context (128 tokens) holds a turn or two: the page leaves the oldest turns out of what it sends
    # (the system prompt stays), says so, and every answer is the server's answer to what the page sent.
    system = "Be brief."
    page = Page(browser, server, system=system)
    model = page.model
    room, context = browser.execute_script("return [ROOM, CONTEXT]")
    assert context == httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["max_model_len"]
    shown, oldest, leaves = [], 0, []  # (question, answer) of every turn; the oldest turn sent; when turns left
    for i, question in enumerate(TEN_QUESTIONS):
        before = len(page.requests())
        answer = page.ask(question)
        sent = page.requests()[before:]
        assert sent and sent[-1]["status"] == 200, sent
        messages = sent[-1]["body"]["messages"]
        # What the page sent: the system prompt, the most recent turns as shown, the question.
        assert messages[0] == {"role": "system", "content": system}
        assert messages[-1] == {"role": "user", "content": question}
        first = len(shown) - (len(messages) - 2) // 2
        assert first >= oldest, f"turn {i}: a turn left out came back: {messages}"
        assert messages[1:-1] == turns(shown[first:]), f"turn {i}: {messages}"
        status, expected = server_answer(server, model, messages)
        assert status == 200
        page.assert_shows(answer, status, expected)
        if first > oldest:  # left out only as it had to: with one more turn, too little room for the answer
            leaves.append(i)
            fuller = messages[:1] + turns(shown[first - 1:]) + messages[-1:]
            assert prompt_tokens(server, model, fuller) + room > context, f"turn {i}: left out too much"
        oldest = first
        shown.append((question, expected))
    assert leaves, "the conversation never outgrew the context"
    bubbles = page.bubbles()
    assert [b["role"] for b in bubbles] == ["user", "assistant"] * len(TEN_QUESTIONS)
    assert not any(b["error"] or b["unanswered"] for b in bubbles)
    assert [b["dropped"] for b in bubbles] == [i < oldest for i in range(len(TEN_QUESTIONS)) for _ in "qa"]
    notes = page.notes()
    assert len(notes) == len(leaves) and all("left out" in n and f"({context} tokens)" in n for n in notes), notes
    assert page.idle()
    page.screenshot("chat_page_ten_turns.png", tmp_path)




def test_the_page_retries_without_the_oldest_turns_when_the_server_says_too_long(browser, server):
    # A system prompt set in the middle of a conversation: the page's estimate of the prompt knows nothing of it,
    # the server answers 400 (the prompt is longer than the context), and the page sends the conversation again
    # without its oldest turn until it fits.
    page = Page(browser, server)
    model = page.model
    context = browser.execute_script("return CONTEXT")
    first, second, question = "请用中文介绍一下北京。", "Why?", "OK"
    for q in (first, second):
        assert not page.ask(q)["error"]
    shown = [(b["text"], a["markdown"]) for b, a in zip(page.bubbles()[::2], page.bubbles()[1::2])]
    # The shortest system prompt with which the last turn and the question are too long, and the question alone
    # still fits.
    words = ("Answer every question in one short sentence, and say nothing else. " * 20).split()
    for n in range(1, len(words) + 1):
        system = " ".join(words[:n])
        if prompt_tokens(server, model, [{"role": "system", "content": system}] + turns(shown[1:]) +
                         [{"role": "user", "content": question}]) >= context:
            break
    alone = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    assert prompt_tokens(server, model, alone) < context
    page.field("system").send_keys(system)
    before = len(page.requests())
    answer = page.ask(question)
    sent = page.requests()[before:]
    # Each 400 is followed by the same conversation less its oldest turn, until the server takes it.
    assert [r["status"] for r in sent] == [400] * (len(sent) - 1) + [200] and len(sent) >= 2, sent
    for earlier, later in zip(sent, sent[1:]):
        assert later["body"]["messages"] == earlier["body"]["messages"][:1] + earlier["body"]["messages"][3:]
    assert sent[0]["body"]["messages"][1:-1] == turns(shown[len(shown) - (len(sent) - 1):])
    assert sent[-1]["body"]["messages"] == alone
    page.assert_shows(answer, *server_answer(server, model, alone))
    assert [b["dropped"] for b in page.bubbles()] == [True] * 4 + [False] * 2
    assert len(page.notes()) == 1 and "turns were left out" in page.notes()[0]
    assert page.idle()


# A stand-in for the server in the page: it answers every chat request with arguments[0], streamed a few
# characters per event.
FAKE_SERVER = """
const [answer, size] = arguments, encoder = new TextEncoder();
window.fetch = async () => {
  const events = [];
  for (let i = 0; i < answer.length; i += size)
    events.push({choices: [{index: 0, delta: {content: answer.slice(i, i + size)}, finish_reason: null}]});
  const body = new ReadableStream({async pull(controller) {
    await new Promise(resolve => setTimeout(resolve, 2));
    if (!events.length) { controller.enqueue(encoder.encode("data: [DONE]\\n\\n")); controller.close(); return; }
    controller.enqueue(encoder.encode("data: " + JSON.stringify(events.shift()) + "\\n\\n"));
  }});
  return new Response(body, {status: 200, headers: {"Content-Type": "text/event-stream"}});
};
"""
MARKDOWN_ANSWER = """**Avoiding Electronic Devices Before Bed:**

1. Put the phone away an hour before sleep.
2. Read a *paper* book instead.

- dim the lights
- keep the room `cool`

```python
print("<b>not bold</b>")
```
"""
# What an element shows: its tag names (descendants, in order) and the text of some of them.
STRUCTURE = """const e = arguments[0];
const texts = sel => Array.from(e.querySelectorAll(sel), n => n.textContent);
return {tags: Array.from(e.querySelectorAll("*"), n => n.tagName.toLowerCase()), strong: texts("strong"),
        em: texts("em"), ol: texts("ol > li"), ul: texts("ul > li"), code: texts(":not(pre) > code"),
        pre: texts("pre > code")};"""


def test_answers_render_as_markdown_as_they_stream(browser, server, tmp_path):
    page = Page(browser, server)
    browser.execute_script(FAKE_SERVER, MARKDOWN_ANSWER, 4)
    question = "**How** do I <b>sleep</b> better? `code`"
    answer = page.ask(question)
    assert (answer["markdown"], answer["error"]) == (MARKDOWN_ANSWER, False)
    got = browser.execute_script(STRUCTURE, page.b.find_elements(page.by.CSS_SELECTOR, "#log .assistant")[0])
    assert got["strong"] == ["Avoiding Electronic Devices Before Bed:"]
    assert got["ol"] == ["Put the phone away an hour before sleep.", "Read a paper book instead."]
    assert got["em"] == ["paper"] and got["ul"] == ["dim the lights", "keep the room cool"]
    assert got["code"] == ["cool"] and got["pre"] == ['print("<b>not bold</b>")\n']
    assert "b" not in got["tags"]  # the HTML in the code block is shown, not rendered
    # The question is shown as typed: plain text, neither Markdown nor HTML.
    user = page.bubbles()[0]
    assert user["text"] == question and "<" not in user["html"].replace("&lt;", "")
    # Rendered as it streamed: each rendering is that of a prefix of the answer.
    partials = [p for p in page.partials() if p["html"]]
    prefixes = browser.execute_script(PREFIX_RENDERED, MARKDOWN_ANSWER, [p["html"] for p in partials])
    assert -1 not in prefixes and len({n for n, p in zip(prefixes, partials) if p["done"] == "false"}) >= 5
    assert prefixes[-1] == len(MARKDOWN_ANSWER)
    page.screenshot("chat_page_markdown.png", tmp_path)


HOSTILE_ANSWER = """Here is **bold** text, [a link](javascript:window.pwned='md') and [a safe one](https://example.com/).

<img src=x onerror="window.pwned = 'img'">
<script>window.pwned = 'script'</script>
<svg><g onload="window.pwned = 'svg'"></g></svg>
<iframe srcdoc="<script>parent.pwned = 'iframe'</script>"></iframe>
<a href="javascript:window.pwned = 'href'">click</a>
<details open ontoggle="window.pwned = 'details'"><summary>x</summary>y</details>
<form action="https://example.com/"><input name="key" value="paste your API key"><button>go</button></form>
<style>body { display: none }</style><p style="position: fixed; inset: 0">cover</p>
<object data="javascript:window.pwned = 'object'"></object><embed src="javascript:window.pwned = 'embed'">
"""


def test_html_in_an_answer_does_not_run(browser, server):
    page = Page(browser, server)
    browser.execute_script(FAKE_SERVER, HOSTILE_ANSWER, 3)  # in pieces: half-written tags along the way too
    answer = page.ask("Say something dangerous.")
    assert answer["markdown"] == HOSTILE_ANSWER and not answer["error"]
    time.sleep(0.5)  # an image's error handler fires after the image failed to load
    assert browser.execute_script("return window.pwned") is None
    bubble = page.b.find_elements(page.by.CSS_SELECTOR, "#log .assistant")[0]
    got = browser.execute_script(STRUCTURE, bubble)
    assert got["strong"] == ["bold"]  # the Markdown around it is rendered
    assert not {"script", "iframe", "object", "embed", "form", "input", "button", "style"} & set(got["tags"]), got
    attributes = browser.execute_script(
        "return Array.from(arguments[0].querySelectorAll('*'), e => Array.from(e.attributes, a => [a.name, a.value]))"
        ".flat()", bubble)
    assert not [a for a in attributes if a[0].startswith("on") or a[0] == "style" or "javascript:" in a[1]], attributes
    links = browser.execute_script(
        "return Array.from(arguments[0].querySelectorAll('a'), a => [a.textContent, a.getAttribute('href'), "
        "a.target, a.rel])", bubble)
    assert ["a safe one", "https://example.com/", "_blank", "noopener noreferrer"] in links
    # Even HTML put into the page without the sanitiser runs no script: the page's content security policy.
    browser.execute_script("log.insertAdjacentHTML('beforeend', '<img src=\"data:,\" onerror=\"window.pwned = 1\">"
                           "<script>window.pwned = 2</script>')")
    time.sleep(0.5)
    assert browser.execute_script("return window.pwned") is None


def test_the_page_ships_its_libraries_and_a_content_security_policy(server):
    page = httpx.get(f"{server.url}/", timeout=10)
    assert page.status_code == 200
    policy = dict(p.strip().split(" ", 1) for p in page.headers["content-security-policy"].split(";"))
    assert policy["script-src"] == "'self'" and policy["connect-src"] == "'self'" and policy["default-src"] == "'none'"
    scripts = re.findall(r'<script src="([^"]+)"', page.text)
    assert scripts == ["static/vendor/marked.umd.js", "static/vendor/purify.min.js", "static/chat.js"]
    static = Path(__file__).resolve().parents[2] / "astrai_ds" / "serve" / "static"
    for name in [*scripts, *re.findall(r'<link rel="stylesheet" href="([^"]+)"', page.text)]:
        r = httpx.get(f"{server.url}/{name}", timeout=10)
        assert r.status_code == 200 and r.content == (static / name.removeprefix("static/")).read_bytes(), name
        assert r.headers["content-type"].startswith("text/css" if name.endswith(".css") else "text/javascript")
    for name in ("static/vendor/README.md", "static/chat.html", "static/nothing.js"):
        r = httpx.get(f"{server.url}/{name}", timeout=10)
        assert r.status_code == 404 and r.json()["error"]["message"], name



def test_the_page_offers_the_rag_model_and_shows_its_sources(browser, rag_server):
    rag_server = rag_server[0]  # (server, index): the package's server with a document index
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    page = Page(browser, rag_server)
    rag = f"{page.model}-rag"
    WebDriverWait(browser, WAIT_S, poll_frequency=0.05).until(lambda d: d.execute_script(
        "return Array.from(document.querySelectorAll('#model option'), o => o.value)") == [page.model, rag])
    assert browser.execute_script("return document.getElementById('model').value") == page.model
    Select(page.field("model")).select_by_value(rag)
    question = "What is the capital of Vela?"
    answer = page.ask(question)
    sent = page.requests()[-1]
    assert sent["body"]["model"] == rag and sent["body"]["messages"] == [{"role": "user", "content": question}]
    r = httpx.post(f"{rag_server.url}/v1/chat/completions", timeout=WAIT_S,
                   json={"model": rag, "messages": sent["body"]["messages"], "temperature": 0})
    assert r.status_code == 200 and r.json()["sources"]
    page.assert_shows(answer, 200, r.json()["choices"][0]["message"]["content"])
    shown = browser.execute_script("return Array.from(document.querySelectorAll('#log .sources'), s => s.textContent)")
    assert shown == ["Sources: " + "; ".join(f"[{s['index']}] " + " › ".join([s["source"], *s["headings"]])
                                            for s in r.json()["sources"])]
