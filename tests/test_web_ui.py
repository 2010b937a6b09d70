"""The chat page in a real headless Chromium (Debian's chromium + chromedriver, via Selenium)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import httpx
import pytest

from nanofast.engine import Engine
from nanofast.serve import create_app
from test_serve import LIMITS, MODEL_ID, ServerThread, tiny_model, tiny_tokenizer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
    reason = (f"chromium or chromedriver is missing ({CHROMIUM}, {CHROMEDRIVER}) and could not be installed: "
              "`make test` installs them with apt-get (packages chromium chromium-driver)")
    print(f"SKIP tests/test_web_ui.py: {reason}")
    pytest.skip(reason, allow_module_level=True)

from selenium import webdriver  # noqa: E402  (after the skip: only needed with a browser)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def serving(engine_class=Engine):
    """The tiny model served on a free loopback port, on an engine of `engine_class`."""
    tokenizer = tiny_tokenizer()
    return ServerThread(create_app(engine_class(tiny_model(tokenizer), tokenizer, max_num_seqs=4), tokenizer,
                                   MODEL_ID, LIMITS))


@pytest.fixture(scope="module")
def server():
    with serving() as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="nanofast-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Runs as root with no network: no sandbox, no GPU, nothing that phones home.
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def greedy_answer(server, messages: list[dict]) -> str:
    """The server's own non-streaming greedy answer (default max_tokens, as the page sends none)."""
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                   json={"model": MODEL_ID, "messages": messages, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def assistant_texts(driver) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('.msg.assistant')].map(e => e.textContent)")


def wait_answers(driver, n: int) -> list[str]:
    """Wait until `n` assistant messages have finished streaming; their texts."""
    WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(
        By.CSS_SELECTOR, ".msg.assistant[data-state='done']")) == n)
    return assistant_texts(driver)


def no_horizontal_overflow(driver) -> bool:
    """Nothing wider than the window: not the page, not the scrolling message list, no bubble."""
    return driver.execute_script("""
        const w = window.innerWidth, list = document.getElementById('messages');
        return document.documentElement.scrollWidth <= w && list.scrollWidth <= list.clientWidth
            && [...document.querySelectorAll('.msg, header, form')].every(e => e.getBoundingClientRect().right <= w);
    """)


def test_chat_page_streams_answers_over_two_turns(server, browser):
    browser.get(server.url + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").text == MODEL_ID)
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")

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
    send = browser.find_element(By.ID, "send").rect
    assert send["x"] + send["width"] <= browser.execute_script("return window.innerWidth")


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
