"""The chat page in a real headless Chromium (Debian's chromium + chromedriver, via Selenium)."""
from __future__ import annotations

import struct
from pathlib import Path

import httpx
import pytest

from nanofast.engine import Engine
from nanofast.serve import create_app
from nanofast.tokenizer import SPECIAL_TOKENS
import browser as browser_tools
from test_serve import LIMITS, MODEL_ID, ServerThread, tiny_model, tiny_tokenizer

if not browser_tools.available():
    print(f"SKIP tests/test_web_ui.py: {browser_tools.MISSING}")
    pytest.skip(browser_tools.MISSING, allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402  (after the skip: only needed with a browser)
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def serving(engine_class=Engine, api_key: str | None = None, **engine_options):
    """The tiny model served on a free loopback port, on an engine of `engine_class`."""
    tokenizer = tiny_tokenizer()
    engine = engine_class(tiny_model(tokenizer), tokenizer, max_num_seqs=4, **engine_options)
    return ServerThread(create_app(engine, tokenizer, MODEL_ID, LIMITS, api_key=api_key))


@pytest.fixture(scope="module")
def server():
    with serving() as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    with browser_tools.chromium() as driver:
        yield driver


def greedy_request(server, messages: list[dict], headers: dict | None = None) -> httpx.Response:
    """The server's own non-streaming greedy answer, asked for the default answer budget its model
    card names, as the page asks for it."""
    budget = httpx.get(f"{server.url}/v1/models", headers=headers).json()["data"][0]["default_max_tokens"]
    return httpx.post(f"{server.url}/v1/chat/completions", timeout=60, headers=headers,
                      json={"model": MODEL_ID, "messages": messages, "temperature": 0, "max_tokens": budget})


def greedy_choice(server, messages: list[dict], headers: dict | None = None) -> dict:
    r = greedy_request(server, messages, headers)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def greedy_answer(server, messages: list[dict], headers: dict | None = None) -> str:
    return greedy_choice(server, messages, headers)["message"]["content"]


def assistant_texts(driver) -> list[str]:
    """The answers as the server sent them (the raw text the bubble renders as markdown: the tiny
    model's random characters include * and `, so the text shown may differ)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('.msg.assistant')].map(e => e.dataset.raw)")


def wait_answers(driver, n: int) -> list[str]:
    """Wait until `n` assistant messages have finished streaming (failing at once when the page
    shows an error instead); their texts."""
    WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(
        By.CSS_SELECTOR, ".msg.assistant[data-state='done']")) == n or d.find_elements(By.CSS_SELECTOR, ".msg.error"))
    errors = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg.error")]
    assert len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-state='done']")) == n, errors
    return assistant_texts(driver)


def no_horizontal_overflow(driver) -> bool:
    """Nothing wider than the window: not the page, not the scrolling message list, no bubble."""
    return driver.execute_script("""
        const w = window.innerWidth, list = document.getElementById('messages');
        return document.documentElement.scrollWidth <= w && list.scrollWidth <= list.clientWidth
            && [...document.querySelectorAll('.msg, header, form')].every(e => e.getBoundingClientRect().right <= w);
    """)


def test_chat_page_streams_answers_over_two_turns(server, browser):
    open_page(browser, server)

    box = browser.find_element(By.ID, "input")
    box.send_keys("Hello there", Keys.ENTER)  # Enter sends
    [first] = wait_answers(browser, 1)
    expected_first = greedy_answer(server, [{"role": "user", "content": "Hello there"}])
    assert first and first == expected_first
    assert browser.execute_script(
        "return [...document.querySelectorAll('.msg.user')].map(e => e.textContent)") == ["Hello there"]

    box.send_keys("Tell me more")
    browser.find_element(By.ID, "send").click()
    texts = wait_answers(browser, 2)
    history = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "Tell me more"}]
    assert texts[1] and texts[1] == greedy_answer(server, history)  # the page sent the first turn along
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")

    browser.find_element(By.ID, "new-chat").click()
    assert browser.find_elements(By.CSS_SELECTOR, "#messages > *") == []
    box.send_keys("Hello there", Keys.ENTER)
    assert wait_answers(browser, 1) == [expected_first]  # a fresh conversation: no old turns sent


def controls_problems(driver) -> list[str]:
    """What keeps the message box, Send, Stop or New chat from being used: not shown, not wholly in
    the window, too small to tap, overlapping another, or covered at its centre."""
    return driver.execute_script("""
        const ids = ['input', 'send', 'stop', 'new-chat'], w = innerWidth, h = innerHeight, problems = [];
        const rects = ids.map(id => document.getElementById(id).getBoundingClientRect());
        ids.forEach((id, i) => {
            const r = rects[i], x = r.left + r.width / 2, y = r.top + r.height / 2;
            if (r.left < 0 || r.top < 0 || r.right > w || r.bottom > h) problems.push(id + ' is not in the window');
            if (r.width < (id === 'input' ? 150 : 40) || r.height < 28) problems.push(id + ' is too small');
            const hit = document.elementFromPoint(x, y);
            if (!hit || !hit.closest('#' + id)) problems.push(id + ' is covered');
            ids.forEach((other, j) => {
                const o = rects[j];
                if (j > i && r.left < o.right && o.left < r.right && r.top < o.bottom && o.top < r.bottom)
                    problems.push(id + ' overlaps ' + other);
            });
        });
        return problems;
    """)


def test_chat_page_fits_a_phone_screen(server, browser):
    browser.set_window_size(390, 844)
    browser.get(server.url + "/")
    assert browser.execute_script("return window.innerWidth") <= 400
    assert browser.find_element(By.CSS_SELECTOR, "meta[name='viewport']")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").text == MODEL_ID)
    assert no_horizontal_overflow(browser)
    # a long unbroken word must wrap inside its bubble, not widen the page
    browser.find_element(By.ID, "input").send_keys("x" * 100, Keys.ENTER)
    wait_answers(browser, 1)
    assert no_horizontal_overflow(browser)
    # a long code line scrolls inside its block, a long link wraps: neither widens the page
    browser.execute_script("showAnswer(bubble('assistant', ''), arguments[0])",
                           "```\n" + "let x = 1; " * 30 + "\n```\n[link](https://example.com/" + "a" * 150 + ")")
    for width in (390, 360):
        browser.set_window_size(width, 844)
        assert browser.execute_script("return window.innerWidth") <= width
        assert no_horizontal_overflow(browser)
        browser.execute_script("setBusy(true)")  # as while an answer streams: Stop shown
        try:
            assert browser.find_element(By.ID, "stop").is_displayed()
            assert controls_problems(browser) == []
        finally:
            browser.execute_script("setBusy(false)")
        assert not browser.find_element(By.ID, "stop").is_displayed()


class SlowEngine(Engine):
    """The tiny model, a decode step every 0.4 s: an answer of 16 tokens streams for 6 s, so Stop
    lands in the middle of it even on a loaded machine."""

    def step(self):
        import time

        time.sleep(0.4)
        return super().step()


@pytest.fixture(scope="module")
def slow_server():
    with serving(SlowEngine) as srv:
        yield srv


def test_stop_keeps_what_came_and_frees_the_request(slow_server, server, browser):
    browser.set_window_size(1200, 900)
    browser.get(slow_server.url + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").text == MODEL_ID)
    stop = browser.find_element(By.ID, "stop")
    assert not stop.is_displayed()  # only while an answer streams
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")
    browser.find_element(By.ID, "input").send_keys("Hello there", Keys.ENTER)
    WebDriverWait(browser, 30).until(lambda d: assistant_texts(d) and assistant_texts(d)[0])  # the first piece
    assert stop.is_displayed()
    stop.click()
    [partial] = wait_answers(browser, 1)
    full = greedy_answer(server, [{"role": "user", "content": "Hello there"}])  # the same model, not slowed
    assert partial and full.startswith(partial) and partial != full  # stopped in the middle
    assert not stop.is_displayed() and not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
    notes = browser.execute_script("return [...document.querySelectorAll('.msg.assistant .note')].map(e => e.className)")
    assert notes == ["note stopped"]  # the bubble says it was stopped (not cut by the length limit)
    WebDriverWait(browser, 10).until(lambda d: httpx.get(f"{slow_server.url}/health").json()["running_requests"] == 0)


def test_temperature_is_clamped_a_failed_turn_leaves_no_empty_bubble_and_there_is_a_favicon(server, browser):
    browser.set_window_size(1200, 900)
    browser.get(server.url + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").text == MODEL_ID)
    assert browser.execute_script("return document.querySelector('link[rel=icon]').href").startswith("data:")
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("5")  # the server takes [0, 2]: the page sends 2 and shows it
    box = browser.find_element(By.ID, "input")
    box.send_keys("Hello there", Keys.ENTER)
    assert wait_answers(browser, 1)[0]
    assert temperature.get_attribute("value") == "2" and not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
    box.send_keys("x" * (LIMITS.max_chars + 1), Keys.ENTER)  # the server refuses it (too many characters)
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.error"))
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 1  # no empty bubble for it
    assert "characters" in browser.find_element(By.CSS_SELECTOR, ".msg.error").text


def test_a_calculator_call_shows_as_a_tool_block(server, browser):
    """The page renders an answer's parts: text as text, the calculator call and its result as one
    small block (what renderParts does with the parts the server streams last)."""
    browser.get(server.url + "/")
    shown = browser.execute_script("""
        const div = document.createElement('div');
        renderParts(div, [{type: 'text', text: 'The sum is '}, {type: 'python', text: '19*2'},
                          {type: 'python_output', text: '38'}, {type: 'text', text: '.'}]);
        return [div.textContent, [...div.querySelectorAll('.tool')].map(e => e.textContent)];
    """)
    assert shown == ["The sum is [calculator: 19*2 = 38].", ["[calculator: 19*2 = 38]"]]


def test_a_calculator_call_in_a_list_and_in_code_stays_a_tool_block(server, browser):
    browser.get(server.url + "/")
    shown = browser.execute_script("""
        const div = document.createElement('div');
        renderParts(div, [{type: 'text', text: '- **sum** '}, {type: 'python', text: '1+1'},
                          {type: 'python_output', text: '2'}, {type: 'text', text: ' done\\n```\\nx = '},
                          {type: 'python', text: '3*3'}, {type: 'python_output', text: '9'}, {type: 'text', text: '\\n```'}]);
        return [div.querySelector('li').textContent, div.querySelector('li .tool').textContent,
                div.querySelector('pre code').textContent, div.querySelector('pre code .tool').textContent];
    """)
    assert shown == ["sum [calculator: 1+1 = 2] done", "[calculator: 1+1 = 2]", "x = [calculator: 3*3 = 9]",
                     "[calculator: 3*3 = 9]"]


MARKDOWN = "\n".join([
    "## Title",
    "Some **bold**, *it*, _it2_ and `x < y` in a snake_case_name.",
    "- one",
    "* two",
    "1. first",
    "2. second",
    "[site](https://example.com/a?b=1) [bad](javascript:alert(1)) [here](/v1/models) [data](data:text/html,hi)",
    '<img src=x onerror="window.pwned=1"> <script>window.pwned=2</script> <b>no</b> <a href="javascript:1">no</a>',
    "```python",
    "print('<b>' * 2)",
    "```",
    "after",
    "a second line",
])


def external_references(driver) -> list[str]:
    """Every URL the page loads, or could load, from anywhere but its own server (data: URLs are
    inline): resources fetched so far, URL attributes, and url() in its CSS. A link in an answer is
    allowed only as a plain web link that opens in a new tab without access to the page."""
    return driver.execute_script("""
        const own = (u) => u.startsWith('data:') || new URL(u, location.href).origin === location.origin;
        const out = performance.getEntriesByType('resource').map(e => e.name).filter(u => !own(u));
        for (const e of document.querySelectorAll('*')) {
            for (const name of ['src', 'href', 'srcset', 'action', 'formaction', 'poster', 'data', 'background']) {
                const v = e.getAttribute(name);
                if (v === null || own(v)) continue;
                const link = e.tagName === 'A' && e.closest('.msg.assistant') && /^https?:$/.test(new URL(v).protocol)
                    && e.rel === 'noopener noreferrer' && e.target === '_blank';
                if (!link) out.push(e.tagName + ' ' + name + '=' + v);
            }
        }
        for (const sheet of document.styleSheets) {
            if (sheet.href && !own(sheet.href)) out.push('stylesheet ' + sheet.href);
            for (const rule of sheet.cssRules)
                for (const m of rule.cssText.matchAll(/url\\(["']?([^"')]*)/g)) if (!own(m[1])) out.push('css ' + m[1]);
        }
        return out;
    """)


def test_answers_render_as_safe_markdown(server, browser):
    browser.set_window_size(1200, 900)
    browser.get(server.url + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").text == MODEL_ID)
    found = browser.execute_script("""
        const div = bubble('assistant', '');
        showAnswer(div, arguments[0]);
        const all = (sel) => [...div.querySelectorAll(sel)].map(e => e.textContent);
        return {raw: div.dataset.raw, text: div.textContent, h2: all('h2'), strong: all('strong'), em: all('em'),
                code: all(':not(pre) > code'), pre: all('pre > code'), lang: div.querySelector('pre > code').dataset.lang,
                ul: all('ul > li'), ol: all('ol > li'), p: all('p'), br: div.querySelectorAll('p:last-of-type br').length,
                links: [...div.querySelectorAll('a')].map(a => [a.textContent, a.href, a.rel, a.target]),
                elements: [...new Set([...div.querySelectorAll('*')].map(e => e.tagName.toLowerCase()))].sort(),
                pwned: window.pwned === undefined ? null : window.pwned};
    """, MARKDOWN)
    assert found["raw"] == MARKDOWN  # what the server sent stays available as it was
    assert found["h2"] == ["Title"] and found["strong"] == ["bold"] and found["em"] == ["it", "it2"]
    assert found["code"] == ["x < y"] and "snake_case_name" in found["text"]  # no italics inside a word
    assert found["ul"] == ["one", "two"] and found["ol"] == ["first", "second"]
    assert found["pre"] == ["print('<b>' * 2)"] and found["lang"] == "python"
    assert found["p"][-1] == "aftera second line" and found["br"] == 1  # a line break inside a paragraph
    assert found["links"] == [["site", "https://example.com/a?b=1", "noopener noreferrer", "_blank"]]
    # model text is text: no element from it, shown literally; only http(s) links are links
    assert found["elements"] == ["a", "br", "code", "em", "h2", "li", "ol", "p", "pre", "strong", "ul"]
    for literal in ('<img src=x onerror="window.pwned=1">', "<script>window.pwned=2</script>", "<b>no</b>",
                    '<a href="javascript:1">no</a>', "[bad](javascript:alert(1))", "[here](/v1/models)",
                    "[data](data:text/html,hi)"):
        assert literal in found["text"]
    assert found["pwned"] is None
    assert external_references(browser) == []

    # an answer still streaming: the ``` opened so far is already a code block
    unfinished = browser.execute_script("""
        const div = bubble('assistant', '');
        showAnswer(div, 'so far:\\n```js\\nlet a = 1;\\nlet b');
        return [div.querySelector('p').textContent, div.querySelector('pre > code').textContent];
    """)
    assert unfinished == ["so far:", "let a = 1;\nlet b"]


def open_page(driver, server) -> None:
    browser_tools.open_page(driver, server.url, MODEL_ID)


@pytest.fixture(scope="module")
def small_server():
    """A 64-token context (4 KV pages of 16): full after a couple of exchanges."""
    with serving(num_pages=4, page_size=16) as srv:
        yield srv


def context_full(server, messages: list[dict]) -> bool:
    r = greedy_request(server, messages)
    return r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_a_full_context_drops_the_oldest_exchanges_and_the_chat_goes_on(small_server, browser):
    open_page(browser, small_server)
    system = {"role": "system", "content": "Be brief."}
    browser.execute_script("chat.messages.push(arguments[0])", system)  # the page has no box for one
    box = browser.find_element(By.ID, "input")
    drops = []
    for turn, question in enumerate(["Hi", "Go on", "More"], 1):
        box.send_keys(question, Keys.ENTER)
        answers = wait_answers(browser, turn)
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
        messages, dropped = browser.execute_script("return [chat.messages, chat.dropped]")
        assert messages[0] == system and len(messages) == 1 + 2 * turn and messages[-2]["content"] == question
        # The page sent the system message and the newest exchanges: the answer is the server's own to
        # exactly those; one exchange more would not have fitted.
        assert answers[-1] and answers[-1] == greedy_answer(small_server, [system, *messages[1 + 2 * dropped:-1]])
        assert dropped == 0 or context_full(small_server, [system, *messages[1 + 2 * (dropped - 1):-1]])
        drops.append(dropped)
        # the dropped bubbles are dimmed, not deleted: the oldest ones, and only those
        marks = browser.execute_script(
            "return [...document.querySelectorAll('.msg.user, .msg.assistant')].map(e => e.classList.contains('dropped'))")
        assert marks == [True] * (2 * dropped) + [False] * (2 * (turn - dropped))
        if dropped:
            assert float(browser.execute_script(
                "return getComputedStyle(document.querySelector('.msg.dropped')).opacity")) < 1
        notice = browser.find_element(By.ID, "notice")
        assert notice.is_displayed() == (dropped > 0)
        if dropped:
            assert notice.text == ("context full: the oldest exchange is no longer sent" if dropped == 1 else
                                   f"context full: the {dropped} oldest exchanges are no longer sent")
    # the chat filled up over the turns (drops are kept)
    assert drops[0] == 0 and drops == sorted(drops) and drops[-1] > 0, drops

    # three short exchanges, then a long question: several exchanges must go at once
    for _ in range(3):
        browser.execute_script("addMessage(chat, {role: 'user', content: 'a'}); "
                               "addMessage(chat, {role: 'assistant', content: 'b'})")
    box.send_keys("Now a much longer question", Keys.ENTER)
    answers = wait_answers(browser, 7)
    messages, dropped = browser.execute_script("return [chat.messages, chat.dropped]")
    assert dropped - drops[-1] >= 2, (drops, dropped)
    assert answers[-1] == greedy_answer(small_server, [system, *messages[1 + 2 * dropped:-1]])
    assert context_full(small_server, [system, *messages[1 + 2 * (dropped - 1):-1]])
    drops.append(dropped)

    # a question that does not fit even alone: the error, and nothing more is dropped for it
    box.send_keys("x" * 80, Keys.ENTER)
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.error"))
    assert "context" in browser.find_element(By.CSS_SELECTOR, ".msg.error").text
    assert browser.execute_script("return [chat.dropped, chat.messages.length]") == [drops[-1], 15]
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.dropped")) == 2 * drops[-1]

    browser.find_element(By.ID, "new-chat").click()  # a fresh conversation: nothing dropped
    assert not browser.find_element(By.ID, "notice").is_displayed()


def test_an_answer_cut_by_the_length_limit_is_marked(server, browser):
    replies = {q: greedy_choice(server, [{"role": "user", "content": q}]) for q in ("Hello there", "test")}
    # the tiny model runs into the default max_tokens on one, ends by itself on the other
    assert {q: c["finish_reason"] for q, c in replies.items()} == {"Hello there": "length", "test": "stop"}
    open_page(browser, server)
    box = browser.find_element(By.ID, "input")
    for question, reply in replies.items():
        browser.find_element(By.ID, "new-chat").click()
        box.send_keys(question, Keys.ENTER)
        assert wait_answers(browser, 1) == [reply["message"]["content"]]
        notes = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .note")]
        cut = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .note.cut")
        if reply["finish_reason"] == "length":
            assert notes == ["[answer cut: length limit]"] and len(cut) == 1 and cut[0].is_displayed()
        else:
            assert notes == []


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


SPECIAL_NAMES = [name.strip("<|>") for name in SPECIAL_TOKENS]


def test_screenshots_show_a_tool_block_and_no_special_token(server, browser, tmp_path):
    open_page(browser, server)
    # an earlier exchange with a calculator call, as the server returns one (content and parts)
    browser.execute_script("""
        addMessage(chat, {role: 'user', content: 'What is 19*2?'});
        addMessage(chat, {role: 'assistant', content: 'The sum is [calculator: 19*2 = 38].', parts: [
            {type: 'text', text: 'The sum is '}, {type: 'python', text: '19*2'},
            {type: 'python_output', text: '38'}, {type: 'text', text: '.'}]});
    """)
    browser.find_element(By.ID, "input").send_keys("Thanks", Keys.ENTER)
    answers = wait_answers(browser, 2)
    assert answers[1] and not browser.find_elements(By.CSS_SELECTOR, ".msg.error")  # the server took it back
    for name, (width, height) in {"desktop": (1200, 900), "phone": (390, 844)}.items():
        browser.set_window_size(width, height)
        tool = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .tool")
        assert tool.is_displayed() and tool.text == "[calculator: 19*2 = 38]"
        shown = browser.execute_script("return document.body.innerText")
        assert "<|" not in shown and not [n for n in SPECIAL_NAMES if n in shown], shown
        assert no_horizontal_overflow(browser)
        path = tmp_path / f"{name}.png"
        assert browser.save_screenshot(str(path))
        assert path.stat().st_size > 5_000  # a rendered page, not a blank image
        inner = browser.execute_script("return [innerWidth * devicePixelRatio, innerHeight * devicePixelRatio]")
        w, h = png_size(path)
        assert abs(w - inner[0]) <= 2 and abs(h - inner[1]) <= 2 and w <= width + 2, (name, w, h, inner)


def answer_prompt(driver, key: str) -> str:
    """Type `key` into the page's window.prompt; the prompt's question."""
    alert = WebDriverWait(driver, 30).until(EC.alert_is_present())
    question = alert.text
    alert.send_keys(key)
    alert.accept()
    return question


def test_the_page_asks_for_the_api_key_and_again_when_it_is_refused(browser):
    with serving(api_key="sekrit") as srv:
        browser.set_window_size(1200, 900)
        browser.get(srv.url + "/")
        assert "API key" in answer_prompt(browser, "wrong")  # GET /v1/models was refused: asked
        assert "refused" in answer_prompt(browser, "sekrit")  # a wrong key: asked again
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").text == MODEL_ID)
        browser_tools.set_greedy(browser)
        box = browser.find_element(By.ID, "input")
        box.send_keys("Hello there", Keys.ENTER)
        good = {"Authorization": "Bearer sekrit"}
        first = greedy_answer(srv, [{"role": "user", "content": "Hello there"}], good)
        assert wait_answers(browser, 1) == [first]
        # a key that stops working mid-chat: the send is refused, the page asks, the turn goes through
        browser.execute_script("sessionStorage.setItem('apiKey', 'stale')")
        box.send_keys("Tell me more", Keys.ENTER)
        assert "refused" in answer_prompt(browser, "sekrit")
        answers = wait_answers(browser, 2)
        assert answers[1] and not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
        # no key given: the error says so, no empty bubble
        browser.execute_script("sessionStorage.setItem('apiKey', 'stale')")
        box.send_keys("And then?", Keys.ENTER)
        WebDriverWait(browser, 30).until(EC.alert_is_present()).dismiss()
        WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.error"))
        assert "API key" in browser.find_element(By.CSS_SELECTOR, ".msg.error").text
        assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2
