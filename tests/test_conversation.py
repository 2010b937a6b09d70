"""One conversation, three ways in: the chat CLI's code path, the server through the official
openai client, and the web page in headless Chromium. A model that knows a six-turn conversation
by heart (tests/conversation.py, a calculator call in turn 2) must be given exactly the same prompt
tokens at every turn by all three, and answer the same."""
from __future__ import annotations

import io

import pytest

from nanofast import chat
from nanofast.checkpoint import save_checkpoint
from nanofast.detokenize import parts_display
from nanofast.engine import Engine
from nanofast.serve import create_app
import browser as chromium_browser
from conversation import ANSWERS, USER, memorized_model, messages
from test_serve import ServerThread, tiny_tokenizer

MODEL_ID = "nanofast-memorized"


class RecordingEngine(Engine):
    """An Engine that keeps every prompt it is given."""
    prompts: list[list[int]] = []

    def add_request(self, prompt, params=None):
        self.prompts.append(list(prompt))
        return super().add_request(prompt, params)


@pytest.fixture(scope="module")
def memorized(tmp_path_factory):
    """(tokenizer, model, base dir with tokenizer/ and checkpoints/sft/ as training writes them)."""
    tokenizer = tiny_tokenizer()
    model = memorized_model(tokenizer)
    root = tmp_path_factory.mktemp("memorized")
    tokenizer.save(root / "tokenizer")
    save_checkpoint(root / "checkpoints" / "sft", 1, model, None, meta={})
    return tokenizer, model, root


def expected_prompts(tokenizer) -> list[list[int]]:
    """Turn k's prompt: the first k exchanges exactly as the model produced them, then user turn k."""
    return [tokenizer.render_for_completion({"messages": messages(k) + [
        {"role": "user", "content": USER[k]}, {"role": "assistant", "content": ""}]}) for k in range(len(USER))]


@pytest.fixture
def recording(monkeypatch):
    monkeypatch.setattr(RecordingEngine, "prompts", [])
    return RecordingEngine


def test_the_chat_cli_holds_the_conversation(memorized, recording, monkeypatch):
    tokenizer, _, root = memorized
    monkeypatch.setattr(chat, "Engine", recording)
    out, err = io.StringIO(), io.StringIO()
    code = chat.main(["--base-dir", str(root), "--temperature", "0"], stdin=io.StringIO("\n".join(USER) + "\n"),
                     stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    assert recording.prompts == expected_prompts(tokenizer)
    assert out.getvalue().split("\n")[:-1] == [parts_display(a) for a in ANSWERS]
    assert "<|" not in out.getvalue() and "cut" not in err.getvalue()


def test_the_server_holds_the_conversation_with_the_openai_client(memorized, recording):
    import openai

    tokenizer, model, _ = memorized
    with ServerThread(create_app(recording(model, tokenizer), tokenizer, MODEL_ID)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        history: list[dict] = []
        for k, user in enumerate(USER):
            history.append({"role": "user", "content": user})
            reply = client.chat.completions.create(model=MODEL_ID, messages=history, temperature=0)
            message = reply.choices[0].message
            assert reply.choices[0].finish_reason == "stop"
            assert message.content == parts_display(ANSWERS[k]) and "<|" not in message.content
            assert message.model_dump()["parts"] == ANSWERS[k]
            history.append(message.model_dump(exclude_none=True))  # sent back as the client returns it
    assert recording.prompts == expected_prompts(tokenizer)


@pytest.mark.skipif(not chromium_browser.available(), reason=chromium_browser.MISSING)
def test_the_web_page_holds_the_conversation(memorized, recording):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    tokenizer, model, _ = memorized
    with ServerThread(create_app(recording(model, tokenizer), tokenizer, MODEL_ID)) as server, \
            chromium_browser.chromium() as driver:
        chromium_browser.open_page(driver, server.url, MODEL_ID)
        box = driver.find_element(By.ID, "input")
        for k, user in enumerate(USER):
            box.send_keys(user, Keys.ENTER)
            WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(
                By.CSS_SELECTOR, ".msg.assistant[data-state='done']")) == k + 1)
        shown = driver.execute_script(
            "return [...document.querySelectorAll('.msg.assistant')].map(e => e.textContent)")
        visible = driver.execute_script("return document.body.innerText")
    assert recording.prompts == expected_prompts(tokenizer)
    assert shown == [parts_display(a) for a in ANSWERS]
    assert "<|" not in visible and "python_start" not in visible
