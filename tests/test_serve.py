"""The OpenAI-compatible server around a tiny random GPT and the real Engine, over real HTTP."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import uvicorn

from nanofast.detokenize import IncrementalDetokenizer, StopMatcher, answer_parts, display_text, parts_display
from nanofast.engine import Engine, SamplingParams, sample_seed
from nanofast.model import GPT, config_for_depth
from nanofast.serve import ServeLimits, create_app, server_config
from nanofast.tokenizer import Tokenizer

MODEL_ID = "nanofast-tiny"
CONTEXT = 128
LIMITS = ServeLimits(max_messages=8, max_chars=2000, max_tokens=100, default_max_tokens=16, body_timeout_s=1.0)
TEXTS = [f"The number {i} is {'even' if i % 2 == 0 else 'odd'}. Emoji 😀🎉 and 中文字符 test {i}. Café naïve."
         for i in range(300)]


def tiny_tokenizer() -> Tokenizer:
    """A byte-level BPE with a few merges: multi-byte characters span several tokens."""
    return Tokenizer.train(TEXTS, vocab_size=300)


def tiny_model(tokenizer: Tokenizer, seed: int = 3) -> GPT:
    """A random 2-layer GPT whose answers depend on the whole prompt."""
    torch.manual_seed(seed)
    model = GPT(config_for_depth(2, tokenizer.vocab_size, CONTEXT, aspect_ratio=32, head_dim=32))
    model.init_weights()
    with torch.no_grad():
        # init_weights zeroes the output projections, which leaves a model that only sees the
        # last two tokens: every prompt would get the same answer.
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(std=0.5)
            block.mlp.c_proj.weight.normal_(std=0.5)
    return model.eval()


def stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    return (tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_token_id)


def prompt_of(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})


def greedy(model: GPT, tokenizer: Tokenizer, messages: list[dict], max_tokens: int) -> tuple[str, list[int]]:
    """The reference answer: a fresh Engine's greedy tokens, decoded without the stop token."""
    ids = stop_ids(tokenizer)
    out = Engine(model, tokenizer).generate(
        [prompt_of(tokenizer, messages)], SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=ids))[0]
    shown = out[:-1] if out and out[-1] in ids else out
    return display_text(tokenizer, shown), out


class ServerThread:
    """uvicorn serving `app` from a background thread on a free 127.0.0.1 port."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(server_config(app, log_level="warning"))  # the product's settings
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer) -> GPT:
    return tiny_model(tokenizer)


@pytest.fixture(scope="module")
def server(model, tokenizer):
    engine = Engine(model, tokenizer, page_size=16, max_num_seqs=8)
    app = create_app(engine, tokenizer, MODEL_ID, LIMITS)
    with ServerThread(app) as srv:
        srv.app, srv.engine = app, engine
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            srv.client = client
            yield srv


def chat(server, **body) -> httpx.Response:
    body.setdefault("model", MODEL_ID)
    return server.client.post("/v1/chat/completions", json=body)


def sse_events(text: str) -> list[str]:
    """The data fields of a Server-Sent Events body, in order."""
    blocks = [b for b in text.split("\n\n") if b.strip()]
    assert all(b.startswith("data: ") for b in blocks), blocks
    return [b[len("data: "):] for b in blocks]


def check_completion(obj: dict) -> None:
    """Every field OpenAI's chat.completion object requires, with the right types."""
    assert obj["object"] == "chat.completion"
    assert isinstance(obj["id"], str) and obj["id"].startswith("chatcmpl-")
    assert isinstance(obj["created"], int) and abs(obj["created"] - time.time()) < 600
    assert obj["model"] == MODEL_ID
    [choice] = obj["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length") and "logprobs" in choice
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert parts_display(choice["message"]["parts"]) == choice["message"]["content"]
    assert "<|" not in choice["message"]["content"]  # no special token where a person reads
    usage = obj["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert all(isinstance(v, int) for v in usage.values())


def check_chunk(obj: dict, cid: str, created: int) -> None:
    assert obj["object"] == "chat.completion.chunk"
    assert obj["id"] == cid and obj["created"] == created and obj["model"] == MODEL_ID
    assert isinstance(obj["choices"], list)
    for choice in obj["choices"]:
        assert choice["index"] == 0 and isinstance(choice["delta"], dict) and "finish_reason" in choice


def stream_chat(server, **body) -> tuple[str, list[dict]]:
    """POST a streaming request; (concatenated content, parsed chunks), with the framing checked."""
    r = chat(server, stream=True, **body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    data = sse_events(r.text)
    assert data[-1] == "[DONE]" and "[DONE]" not in data[:-1]
    chunks = [json.loads(d) for d in data[:-1]]
    cid, created = chunks[0]["id"], chunks[0]["created"]
    for c in chunks:
        check_chunk(c, cid, created)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content_chunks = [c for c in chunks if c["choices"]]
    final = content_chunks[-1]["choices"][0]
    assert set(final["delta"]) == {"parts"} and final["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in content_chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in content_chunks)
    assert parts_display(final["delta"]["parts"]) == text  # the parts show what the content says
    return text, chunks


HELLO = [{"role": "user", "content": "Hello there"}]


def test_models_health_and_index(server):
    models = server.client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in models["data"]] == [(MODEL_ID, "model", "nanofast")]
    # the context and the default chat answer budget: a quarter of the context, within the limit
    assert (models["data"][0]["max_model_len"], models["data"][0]["default_max_tokens"]) == (CONTEXT, 16)
    health = server.client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL_ID and health["pages_total"] > 0
    page = server.client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<meta name="viewport"' in page.text and "/v1/chat/completions" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no external resources


def test_non_stream_is_greedy_engine_output_with_exact_usage(server, model, tokenizer):
    static = server.engine.stats["static_steps"]
    r = chat(server, messages=HELLO, temperature=0, max_tokens=12)
    assert r.status_code == 200, r.text
    obj = r.json()
    check_completion(obj)
    text, tokens = greedy(model, tokenizer, HELLO, 12)
    assert obj["choices"][0]["message"]["content"] == text
    assert obj["usage"]["prompt_tokens"] == len(prompt_of(tokenizer, HELLO))
    assert obj["usage"]["completion_tokens"] == len(tokens)
    expected_reason = "stop" if tokens[-1] in stop_ids(tokenizer) else "length"
    assert obj["choices"][0]["finish_reason"] == expected_reason
    # greedy is deterministic: the same request again gives the same text
    again = chat(server, messages=HELLO, temperature=0, max_tokens=12).json()
    assert again["choices"][0]["message"]["content"] == text and again["id"] != obj["id"]
    # the server's decode steps ran the engine's static decode step (nanofast.decode_graph)
    assert server.engine.stats["static_steps"] > static


def test_stream_matches_non_stream_and_reports_usage(server, tokenizer):
    body = dict(messages=HELLO, temperature=0, max_tokens=10)
    full = chat(server, **body).json()
    text, chunks = stream_chat(server, stream_options={"include_usage": True}, **body)
    assert text == full["choices"][0]["message"]["content"]
    assert len([c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]) >= 2  # streamed
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == full["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])
    # without include_usage there is no usage chunk and no usage field
    text2, chunks2 = stream_chat(server, **body)
    assert text2 == text and all("usage" not in c and c["choices"] for c in chunks2)


def test_max_tokens_gives_length(server):
    obj = chat(server, messages=HELLO, temperature=0, max_tokens=3).json()
    check_completion(obj)
    assert obj["choices"][0]["finish_reason"] == "length" and obj["usage"]["completion_tokens"] == 3
    # the default max_tokens (the server's limit) applies when none is given
    obj = chat(server, messages=HELLO, temperature=0).json()
    assert obj["usage"]["completion_tokens"] == LIMITS.default_max_tokens


def test_stop_sequences_cut_the_text(server):
    text = chat(server, messages=HELLO, temperature=0, max_tokens=24).json()["choices"][0]["message"]["content"]
    assert len(text) >= 6, text
    stop = text[3:5]
    expected = text[:text.find(stop)]
    for form in (stop, [stop], ["never-appears-zz", stop]):
        obj = chat(server, messages=HELLO, temperature=0, max_tokens=24, stop=form).json()
        assert obj["choices"][0]["message"]["content"] == expected
        assert obj["choices"][0]["finish_reason"] == "stop"
        assert obj["usage"]["completion_tokens"] < 24
    streamed, chunks = stream_chat(server, messages=HELLO, temperature=0, max_tokens=24, stop=stop)
    assert streamed == expected and chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_seeded_sampling_is_reproducible(server):
    body = dict(messages=HELLO, temperature=1.0, top_k=50, top_p=0.9, seed=1234, max_tokens=12)
    a, b = (chat(server, **body).json()["choices"][0]["message"]["content"] for _ in range(2))
    assert a == b


def test_concurrent_requests_all_complete_correctly(server, model, tokenizer):
    convs = [[{"role": "user", "content": f"Question number {i}: {'why ' * i}?"}] for i in range(6)]
    expected = [greedy(model, tokenizer, c, 14)[0] for c in convs]

    def one(i: int) -> str:
        body = dict(messages=convs[i], temperature=0, max_tokens=14)
        if i % 2:
            return stream_chat(server, **body)[0]
        return chat(server, **body).json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(len(convs)) as pool:
        got = list(pool.map(one, range(len(convs))))
    assert got == expected


def test_concurrent_requests_with_async_client(server):
    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            rs = await asyncio.gather(*[
                client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 5 + i, "temperature": 0})
                for i in range(5)])
        return [r.json()["choices"][0]["message"]["content"] for r in rs]

    full = chat(server, messages=HELLO, max_tokens=9, temperature=0).json()["choices"][0]["message"]["content"]
    texts = asyncio.run(run())
    assert texts[-1] == full and all(full.startswith(t) for t in texts)


LONG = "word " * 200  # far more than the 128-token context


@pytest.mark.parametrize("body, status, param, code", [
    (b"{not json", 400, None, "invalid_json"),
    (b"[1, 2]", 400, None, "invalid_json"),
    ({}, 400, "messages", "missing_required_parameter"),
    ({"messages": []}, 400, "messages", "invalid_value"),
    ({"messages": "hi"}, 400, "messages", "invalid_value"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "invalid_content"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "invalid_role"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages[0].role", "invalid_role_order"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400,
     "messages[1].role", "invalid_role_order"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, 400,
     "messages[1].role", "invalid_role_order"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, 400,
     "messages[1].role", "invalid_role_order"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}] * 4
     + [{"role": "user", "content": "hi"}]}, 400, "messages", "too_many_messages"),
    ({"messages": [{"role": "user", "content": "x" * 2001}]}, 400, "messages", "too_many_characters"),
    ({"messages": [{"role": "user", "content": "x" * 1_100_000}]}, 413, None, "request_too_large"),
    ({"messages": [{"role": "user", "content": LONG}]}, 400, "messages", "context_length_exceeded"),
    ({"messages": HELLO, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({"messages": HELLO, "max_tokens": 101}, 400, "max_tokens", "invalid_value"),
    ({"messages": HELLO, "max_tokens": "5"}, 400, "max_tokens", "invalid_value"),
    ({"messages": HELLO, "max_completion_tokens": -1}, 400, "max_completion_tokens", "invalid_value"),
    ({"messages": HELLO, "max_tokens": 5, "max_completion_tokens": 6}, 400, "max_tokens", "invalid_value"),
    ({"messages": [{"role": "user", "content": "word " * 10}], "max_tokens": 100}, 400, "max_tokens",
     "context_length_exceeded"),
    ({"messages": HELLO, "temperature": 2.5}, 400, "temperature", "invalid_value"),
    ({"messages": HELLO, "temperature": -0.1}, 400, "temperature", "invalid_value"),
    ({"messages": HELLO, "top_p": 0}, 400, "top_p", "invalid_value"),
    ({"messages": HELLO, "top_p": 1.5}, 400, "top_p", "invalid_value"),
    ({"messages": HELLO, "top_k": 0}, 400, "top_k", "invalid_value"),
    ({"messages": HELLO, "seed": "x"}, 400, "seed", "invalid_type"),
    ({"messages": HELLO, "stop": ""}, 400, "stop", "invalid_value"),
    ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    ({"messages": HELLO, "stream": "yes"}, 400, "stream", "invalid_type"),
    ({"messages": HELLO, "stream_options": {"include_usage": True}}, 400, "stream_options", "invalid_value"),
    ({"messages": HELLO, "n": 0}, 400, "n", "invalid_value"),
    ({"messages": HELLO, "n": 9}, 400, "n", "invalid_value"),
    ({"messages": HELLO, "n": 2.0}, 400, "n", "invalid_value"),
    ({"messages": HELLO, "logprobs": 0}, 400, "logprobs", "invalid_type"),  # chat's logprobs is a boolean
    ({"messages": HELLO, "top_logprobs": 3}, 400, "top_logprobs", "invalid_value"),  # needs logprobs: true
    ({"messages": HELLO, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "invalid_value"),
    ({"messages": HELLO, "presence_penalty": 2.5}, 400, "presence_penalty", "invalid_value"),
    ({"messages": HELLO, "frequency_penalty": "1"}, 400, "frequency_penalty", "invalid_value"),
    # not implemented: refused by name rather than ignored (issue 30), unless the value asks for nothing
    ({"messages": HELLO, "logit_bias": {"5": 10}}, 400, "logit_bias", "unsupported_parameter"),
    ({"messages": HELLO, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools",
     "unsupported_parameter"),
    ({"messages": HELLO, "tool_choice": "auto"}, 400, "tool_choice", "unsupported_parameter"),
    ({"messages": HELLO, "response_format": {"type": "json_object"}}, 400, "response_format",
     "unsupported_parameter"),
    ({"messages": HELLO, "user": "bob"}, 400, "user", "unsupported_parameter"),
    ({"messages": HELLO, "temprature": 0.5}, 400, "temprature", "unknown_parameter"),
    ({"messages": HELLO, "model": "gpt-4"}, 404, "model", "model_not_found"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, body, status, param, code):
    if isinstance(body, bytes):
        r = server.client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = server.client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    if param and param != "messages":
        assert param.split("[")[0].split(".")[0] in error["message"]  # the message names the parameter
    ok = chat(server, messages=HELLO, max_tokens=2, temperature=0)  # greedy: two tokens, whatever the draws
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def raw_request(server, head: bytes, body: bytes = b"", wait: float = 10.0) -> tuple[bytes, float]:
    """Send `head` (request line and headers, without the blank line) and `body` on a fresh
    connection, keep it open, and return (the response bytes, seconds until they came)."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        start = time.monotonic()
        sock.sendall(head + b"\r\n\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + int(
                (data.split(b"content-length: ")[1].split(b"\r\n")[0]) if b"content-length: " in data else 0):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data, time.monotonic() - start


POST = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"


def error_of(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)["error"]


def test_an_oversized_body_is_refused_before_it_is_read(server):
    """300 MB declared, nothing sent: the 413 comes at once, so the server never buffers it."""
    response, seconds = raw_request(server, POST + b"\r\ncontent-length: 300000000")
    status, error = error_of(response)
    assert status == 413 and error["code"] == "request_too_large" and "300000000" in error["message"]
    assert seconds < 5


def test_an_idle_keep_alive_connection_is_closed(server):
    """After a response, a keep-alive connection the client leaves idle is closed after 5 s."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        data = b""
        while b"}" not in data:
            data += sock.recv(65536)
        start = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server
        assert 4 < time.monotonic() - start < 15


def test_a_chunked_body_is_cut_off_at_the_cap(server):
    def body():
        for _ in range(20):
            yield b"x" * 100_000  # 2 MB in all, no Content-Length: a streaming cap is the only bound

    r = server.client.post("/v1/chat/completions", content=body(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_a_body_shorter_than_its_content_length_times_out(server):
    """A client that stops sending holds the connection for body_timeout_s (1 s here), no longer."""
    response, seconds = raw_request(server, POST + b"\r\ncontent-length: 100", b'{"messages": ')
    status, error = error_of(response)
    assert status == 408 and error["code"] == "request_timeout" and "13 bytes received" in error["message"]
    assert seconds < 5


@pytest.mark.parametrize("raw", [
    b"[" * 100_000 + b"]" * 100_000,                                       # past the parser's recursion
    b'{"messages": [{"role": "user", "content": "hi"}], "metadata": ' + b"[" * 40 + b"]" * 40 + b"}",  # 41 levels
])
def test_deeply_nested_json_is_a_400(server, raw):
    r = server.client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
    assert "levels deep" in r.json()["error"]["message"]
    assert chat(server, messages=HELLO, max_tokens=2).status_code == 200


@pytest.mark.parametrize("seed", [2 ** 70, -2 ** 63 - 1, 2 ** 64])
def test_an_out_of_range_seed_is_a_400_in_the_apis_words(server, seed):
    r = chat(server, messages=HELLO, seed=seed)
    error = r.json()["error"]
    assert r.status_code == 400 and (error["param"], error["code"]) == ("seed", "invalid_value")
    assert error["message"].startswith("'seed' must be in [-2**63, 2**64)")
    assert chat(server, messages=HELLO, seed=2 ** 64 - 1, max_tokens=2).status_code == 200  # the edge is fine


def test_a_hundred_concurrent_streams_among_malformed_traffic(server):
    """A bounded load test on loopback: 100 streaming clients at once, interleaved with malformed
    requests; every stream ends with [DONE], every bad request gets its 4xx, and afterwards the
    engine holds no request and no KV page."""
    bad = [b"{", b"[" * 5000, b'{"messages": 1}', b'{"messages": [], "seed": 1e999}']

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                     limits=httpx.Limits(max_connections=200)) as client:
            async def stream(i):
                body = {"messages": [{"role": "user", "content": f"Hello {i}"}], "max_tokens": 3, "stream": True}
                async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                    return r.status_code, (await r.aread()).decode()

            async def malformed(i):
                r = await client.post("/v1/chat/completions", content=bad[i % len(bad)],
                                      headers={"content-type": "application/json"})
                return r.status_code, r.text

            return await asyncio.gather(*[stream(i) for i in range(100)], *[malformed(i) for i in range(20)])

    results = asyncio.run(run())
    streams, errors = results[:100], results[100:]
    assert all(status == 200 and text.rstrip().endswith("data: [DONE]") for status, text in streams)
    assert all(status == 400 and json.loads(text)["error"]["code"] for status, text in errors), errors
    health = server.client.get("/health").json()
    assert health["running_requests"] == 0 and health["pages_in_use"] == 0 and not health["engine_unfinished"]


def test_system_message_is_merged_into_the_first_user_turn(server, model, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "More?"}]
    obj = chat(server, messages=messages, temperature=0, max_tokens=6).json()
    assert obj["usage"]["prompt_tokens"] == len(prompt_of(tokenizer, messages))
    assert obj["choices"][0]["message"]["content"] == greedy(model, tokenizer, messages, 6)[0]
    # list-of-parts content, as OpenAI clients send it, is the same text
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
    same = chat(server, messages=parts, temperature=0, max_tokens=6).json()
    assert same["choices"][0]["message"]["content"] == greedy(model, tokenizer, HELLO, 6)[0]


def test_parameters_that_ask_for_nothing_are_accepted_and_change_nothing(server):
    """The OpenAI parameters the server does not implement, sent with their "off" values (as some
    client libraries do), give exactly the answer of the request without them."""
    plain = chat(server, messages=HELLO, temperature=0, max_tokens=6).json()["choices"][0]["message"]["content"]
    off = dict(logprobs=False, top_logprobs=0, presence_penalty=0.0, frequency_penalty=0, n=1, logit_bias={}, tools=[],
               tool_choice="none", response_format={"type": "text"}, user=None, store=False)
    r = chat(server, messages=HELLO, temperature=0, max_tokens=6, **off)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == plain


def test_developer_role_and_empty_content_are_valid(server, model, tokenizer):
    """OpenAI's "developer" role is the system role; an empty message is valid."""
    as_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    as_developer = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    want = greedy(model, tokenizer, as_system, 6)[0]
    obj = chat(server, messages=as_developer, temperature=0, max_tokens=6).json()
    assert obj["choices"][0]["message"]["content"] == want
    assert obj["usage"]["prompt_tokens"] == len(prompt_of(tokenizer, as_system))
    for content in ("", "   "):
        messages = [{"role": "user", "content": content}]
        r = chat(server, messages=messages, temperature=0, max_tokens=4)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == greedy(model, tokenizer, messages, 4)[0]


def _scripted_answer(tokenizer) -> list[int]:
    """An answer that calls the calculator, as the engine emits it (the result forced in)."""
    sp, enc = tokenizer.encode_special, tokenizer.encode
    return [*enc("The sum is "), sp("<|python_start|>"), *enc("19*2"), sp("<|python_end|>"), sp("<|output_start|>"),
            *enc("38"), sp("<|output_end|>"), *enc(". Done 😀"), sp("<|assistant_end|>")]


@pytest.mark.parametrize("stops, shown", [((), "The sum is [calculator: 19*2 = 38]. Done 😀"),
                                           ((". Done",), "The sum is [calculator: 19*2 = 38]"),
                                           (("= 38",), "The sum is [calculator: 19*2 "),
                                           (("lator",), "The sum is [calcu"),
                                           (("sum",), "The ")])
def test_an_answer_with_a_calculator_call_reads_cleanly_and_its_parts_round_trip(tokenizer, stops, shown):
    """What the server makes of the engine's tokens: content without special tokens (the call as a
    readable block), parts that render back to the model's own tokens, and log-probabilities for
    the sampled tokens whose text was returned, all cut where a stop sequence cut the content."""
    from nanofast.detokenize import display_text, special_display
    from nanofast.engine import TokenEvent
    from nanofast.serve import Choice, GenerationRequest, RequestHandle

    answer = _scripted_answer(tokenizer)
    params = SamplingParams(max_tokens=100, stop_token_ids=stop_ids(tokenizer))
    request = GenerationRequest([prompt_of(tokenizer, HELLO)], [params], stops, False, False, 0, logprobs=0)
    out_start, out_end = tokenizer.encode_special("<|output_start|>"), tokenizer.encode_special("<|output_end|>")
    forced = [answer.index(out_start) <= i <= answer.index(out_end) for i in range(len(answer))]

    class Worker:  # the engine thread's side, its events scripted
        def submit(self, prompt, params):
            handle = RequestHandle(asyncio.get_running_loop())
            for i, token in enumerate(answer):
                last = i == len(answer) - 1
                handle.events.put_nowait(TokenEvent(0, token, last, "stop" if last else None, forced[i],
                                                    None if forced[i] else -0.5 - i))
            return handle

        def abort(self, handle):
            handle.finished = True

    async def run():
        choice = Choice(Worker(), tokenizer, request.prompts[0], params, request, special_display(tokenizer), 0)
        await choice.start()
        return "".join([p async for p in choice.pieces()]), choice.parts(), choice.take_logprobs()

    text, parts, logprobs = asyncio.run(run())
    # listed: the sampled tokens (not the forced result, not the stop token); with a stop sequence,
    # only those that start inside the returned text
    starts = [len(display_text(tokenizer, answer[:i])) for i in range(len(answer))]
    want = [i for i in range(len(answer) - 1) if not forced[i] and (not stops or starts[i] < len(shown))]
    assert [(t, lp) for t, lp, _, _ in logprobs] == [(answer[i], -0.5 - i) for i in want]
    assert text == shown and parts_display(parts) == shown and "<|" not in text
    if not stops:
        assert parts == answer_parts(tokenizer, answer[:-1]) == [
            {"type": "text", "text": "The sum is "}, {"type": "python", "text": "19*2"},
            {"type": "python_output", "text": "38"}, {"type": "text", "text": ". Done 😀"}]
        # sent back as history, the parts are the model's own tokens again
        history = HELLO + [{"role": "assistant", "content": parts}, {"role": "user", "content": "and?"}]
        ids, n = prompt_of(tokenizer, history), len(answer)  # the answer, its assistant_end included
        assert any(ids[i:i + n] == answer for i in range(len(ids)))


def test_assistant_parts_sent_back_reach_the_model_as_its_tokens(server, tokenizer):
    """A client that sends an answer back with its parts (as this server returns them; the
    official openai client keeps the extra field) continues the conversation on the exact tokens;
    the content alone would be plain text, and parts that disagree with the content are refused."""
    parts = answer_parts(tokenizer, _scripted_answer(tokenizer)[:-1])
    content = parts_display(parts)
    base = [*HELLO, None, {"role": "user", "content": "and?"}]
    with_parts = [*HELLO, {"role": "assistant", "content": content, "parts": parts}, base[-1]]
    exact = prompt_of(tokenizer, [*HELLO, {"role": "assistant", "content": parts}, base[-1]])
    r = chat(server, messages=with_parts, temperature=0, max_tokens=2)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(exact)
    only_parts = [*HELLO, {"role": "assistant", "parts": parts}, base[-1]]
    assert chat(server, messages=only_parts, temperature=0, max_tokens=2).json()["usage"]["prompt_tokens"] == len(exact)
    as_text = [*HELLO, {"role": "assistant", "content": content}, base[-1]]
    assert chat(server, messages=as_text, max_tokens=2).json()["usage"]["prompt_tokens"] != len(exact)
    for bad, param in (([*HELLO, {"role": "assistant", "content": "edited", "parts": parts}, base[-1]], "messages[1].parts"),
                       ([{"role": "user", "content": "hi", "parts": parts}], "messages[0].parts"),
                       ([*HELLO, {"role": "assistant", "parts": [{"type": "tool", "text": "x"}]}, base[-1]],
                        "messages[1].parts")):
        r = chat(server, messages=bad, max_tokens=2)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_model_retrieve(server):
    r = server.client.get(f"/v1/models/{MODEL_ID}")
    assert r.status_code == 200 and r.json() == server.client.get("/v1/models").json()["data"][0]
    r = server.client.get("/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert r.json()["error"]["param"] == "model"


def test_unknown_route_and_method_are_json_errors(server):
    r = server.client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = server.client.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_client_disconnect_aborts_the_request_and_frees_its_pages(server, monkeypatch):
    aborted = []
    original = server.engine.abort
    monkeypatch.setattr(server.engine, "abort", lambda rid: (aborted.append(rid), original(rid)))
    body = {"model": MODEL_ID, "messages": HELLO, "max_tokens": 100, "stream": True, "temperature": 0}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            seen = 0
            for line in lines:
                if line.startswith("data: ") and '"content"' in line:
                    seen += 1
                    if seen == 3:
                        break
            busy = server.client.get("/health").json()
            assert busy["running_requests"] == 1 and busy["pages_in_use"] > 0
        # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        health = server.client.get("/health").json()
        if aborted and health["running_requests"] == 0:
            break
        time.sleep(0.05)
    assert len(aborted) == 1, "the disconnect did not abort the request"
    assert health["running_requests"] == 0 and health["pages_in_use"] == 0 and not health["engine_unfinished"]
    ok = chat(server, messages=HELLO, max_tokens=2)
    assert ok.status_code == 200


def test_stop_token_ends_with_stop_and_is_not_shown(tokenizer):
    """A model that always says <|assistant_end|>: empty content, finish_reason "stop", 1 token."""
    model = tiny_model(tokenizer)
    with torch.no_grad():
        # Equal embedding rows and zero output projections make the final hidden state the
        # all-ones vector for every input, so this head row wins every argmax.
        model.transformer.wte.weight.fill_(1.0)
        for block in model.transformer.h:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        for ve in model.value_embeds.values():
            ve.weight.zero_()
        model.lm_head.weight[tokenizer.encode_special("<|assistant_end|>")] = 0.5
    app = create_app(Engine(model, tokenizer), tokenizer, MODEL_ID, LIMITS)

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            full = await client.post("/v1/chat/completions", json={"messages": HELLO, "temperature": 0})
            stream = await client.post("/v1/chat/completions", json={"messages": HELLO, "stream": True})
        return full, stream

    try:
        full, stream = asyncio.run(run())
    finally:
        app.state.worker.close()
    obj = full.json()
    check_completion(obj)
    assert obj["choices"][0]["message"]["content"] == "" and obj["choices"][0]["finish_reason"] == "stop"
    assert obj["usage"]["completion_tokens"] == 1
    data = sse_events(stream.text)
    chunks = [json.loads(d) for d in data[:-1]]
    assert data[-1] == "[DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == ""


# ---- detokenisation and stop matching ----------------------------------------------------------

def split_char_tokens(tokenizer: Tokenizer, ids: list[int]) -> int:
    """How many tokens are not valid UTF-8 on their own (they hold part of a character)."""
    count = 0
    for t in ids:
        try:
            tokenizer.enc.decode_single_token_bytes(t).decode("utf-8")
        except UnicodeDecodeError:
            count += 1
    return count


@pytest.mark.parametrize("text", ["Emoji 😀🎉 and 中文字符", "naïve café 👩‍👩‍👧 日本語のテキスト", "🎉"])
def test_detokenizer_never_splits_a_character(tokenizer, text):
    merged = tokenizer.encode(text)
    raw_bytes = list(text.encode("utf-8"))  # ids 0..255 are the single bytes: every character split
    for ids in (merged, raw_bytes):
        detok = IncrementalDetokenizer(tokenizer)
        pieces = [detok.add(t) for t in ids] + [detok.flush()]
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) == tokenizer.decode(ids) == text
    assert split_char_tokens(tokenizer, raw_bytes) > 0
    # pieces appear as soon as a character is complete, not only at the end
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.add(b) for b in "a😀".encode()] == ["a", "", "", "", "😀"]


def test_detokenizer_matches_decode_on_invalid_utf8(tokenizer):
    # A stray continuation byte, a truncated 3-byte character mid-stream, a truncated one at the end.
    ids = [ord("x"), 0x80, ord("y"), 0xE4, 0xB8, ord("z"), *list("中".encode())[:2]]
    detok = IncrementalDetokenizer(tokenizer)
    text = "".join(detok.add(t) for t in ids) + detok.flush()
    assert text == tokenizer.decode(ids)
    assert "\ufffd" in text
    with pytest.raises(ValueError, match="token must be an id"):
        detok.add(tokenizer.vocab_size)


def test_detokenizer_on_random_token_streams(tokenizer):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = torch.randint(0, tokenizer.vocab_size, (40,), generator=g).tolist()
        detok = IncrementalDetokenizer(tokenizer)
        assert detok.add_many(ids) + detok.flush() == tokenizer.decode(ids)


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(["STOP", "xyz"])
    assert m.push("hello S") == ("hello ", False)
    assert m.push("T") == ("", False)
    assert m.push("AR") == ("STAR", False)
    assert m.push(" x") == (" ", False)
    assert m.push("yzzz STOP") == ("", True)
    assert m.push("more") == ("", True) and m.flush() == ""
    m = StopMatcher(["END"])
    assert m.push("the E") == ("the ", False) and m.flush() == "E"
    m = StopMatcher([])
    assert m.push("anything") == ("anything", False)
    with pytest.raises(ValueError, match="stop sequences"):
        StopMatcher([""])


def test_health_reports_a_stopped_engine_thread(model, tokenizer):
    app = create_app(Engine(model, tokenizer), tokenizer, MODEL_ID, LIMITS)
    app.state.worker.close()

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.get("/health")

    r = asyncio.run(run())
    assert r.status_code == 503 and r.json()["status"] == "engine thread stopped"
    with pytest.raises(ValueError, match="model_id"):
        create_app(Engine(model, tokenizer), tokenizer, "", LIMITS)


def test_api_key_and_cors_origin(model, tokenizer):
    """--api-key: /v1/ needs 'Authorization: Bearer KEY' (401 in OpenAI's shape otherwise), the page
    and /health stay open; --cors-origin: a page on that origin may call the API, others may not.
    Defaults (no key, no CORS) are what every other test here runs."""
    engine = Engine(model, tokenizer, page_size=16, max_num_seqs=2)
    app = create_app(engine, tokenizer, MODEL_ID, LIMITS, api_key="s3cret", cors_origins=("http://localhost:5173",))
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        body = {"messages": HELLO, "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for r in (client.post("/v1/chat/completions", json=body, headers=headers),
                      client.get("/v1/models", headers=headers)):
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
        good = {"Authorization": "Bearer s3cret"}
        assert client.post("/v1/chat/completions", json=body, headers=good).status_code == 200
        assert client.get("/health").status_code == 200 and client.get("/").status_code == 200
        preflight = {"Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization,content-type"}
        r = client.options("/v1/chat/completions", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:5173"
        r = client.post("/v1/chat/completions", json=body, headers={**good, "Origin": "http://localhost:5173"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:5173"
        r = client.options("/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers
    with pytest.raises(ValueError, match="api_key"):
        create_app(engine, tokenizer, MODEL_ID, api_key=" ")


def test_the_official_openai_client(server, model, tokenizer):
    """The openai package against the live server: chat completions (plain and streamed), model
    retrieval, and an unimplemented parameter refused as a BadRequestError naming it."""
    import openai  # the dev extra installs it
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model=MODEL_ID, messages=HELLO, temperature=0, max_tokens=8)
    want = greedy(model, tokenizer, HELLO, 8)[0]
    assert reply.choices[0].message.content == want and reply.usage.completion_tokens >= 1
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL_ID, messages=HELLO, temperature=0, max_tokens=8, stream=True) if c.choices)
    assert streamed == want
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL_ID, messages=HELLO, response_format={"type": "json_object"})
    assert err.value.body["param"] == "response_format"
    # the reply sent back as history, as the client returns it (parts kept): the model's own tokens
    history = [*HELLO, reply.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "and?"}]
    again = client.chat.completions.create(model=MODEL_ID, messages=history, temperature=0, max_tokens=2)
    parts = reply.choices[0].message.model_dump()["parts"]
    exact = prompt_of(tokenizer, [*HELLO, {"role": "assistant", "content": parts}, {"role": "user", "content": "and?"}])
    assert again.usage.prompt_tokens == len(exact)


def _engine_answer(model, tokenizer, prompt: list[int], stops: tuple[int, ...], **params) -> list[int]:
    """A fresh engine's tokens for `prompt`, the stop token dropped: the reference for the server."""
    out = Engine(model, tokenizer).generate([prompt], SamplingParams(stop_token_ids=stops, **params))[0]
    return out[:-1] if out and out[-1] in stops else out


def _model_logprobs(model, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """log p of every answer token under a full forward of the model: (len(answer), V)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + answer[:-1]]))[0, len(prompt) - 1:]
    return torch.log_softmax(logits.float(), -1)


def test_logprobs_n_and_penalties_through_the_official_client(server, model, tokenizer):
    """Each chat parameter the server takes does what OpenAI documents, checked with the openai
    package against the engine and a full forward of the model."""
    import openai
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    prompt, stops = prompt_of(tokenizer, HELLO), stop_ids(tokenizer)
    answer = _engine_answer(model, tokenizer, prompt, stops, max_tokens=10, temperature=0.0)

    # logprobs / top_logprobs: the model's own log p of each token and its 3 most likely tokens
    reply = client.chat.completions.create(model=MODEL_ID, messages=HELLO, temperature=0, max_tokens=10,
                                           logprobs=True, top_logprobs=3)
    entries = reply.choices[0].logprobs.content
    full = _model_logprobs(model, prompt, answer)
    assert len(entries) == len(answer)
    for e, token, row in zip(entries, answer, full):
        assert e.logprob == pytest.approx(row[token].item(), abs=1e-4)
        top = torch.topk(row, 3)
        assert [a.logprob for a in e.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert e.top_logprobs[0].token == e.token  # greedy: the chosen token is the most likely
    assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8", "replace") == reply.choices[0].message.content
    chunks = client.chat.completions.create(model=MODEL_ID, messages=HELLO, temperature=0, max_tokens=10,
                                            logprobs=True, top_logprobs=3, stream=True)
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in entries]
    plain = client.chat.completions.create(model=MODEL_ID, messages=HELLO, temperature=0, max_tokens=10)
    assert plain.choices[0].logprobs is None

    # n: different samples from one seed; sample 0 is the n=1 answer; the prompt counted once
    many = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=8, seed=11, n=3)
    one = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=8, seed=11)
    texts = [c.message.content for c in sorted(many.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(many.choices, key=lambda c: c.index)] == [0, 1, 2]
    assert texts[0] == one.choices[0].message.content and len(set(texts)) == 3
    assert many.usage.prompt_tokens == len(prompt)
    samples = [Engine(model, tokenizer).generate([prompt], SamplingParams(
        max_tokens=8, seed=sample_seed(11, i), stop_token_ids=stops))[0] for i in range(3)]
    assert texts == [display_text(tokenizer, o[:-1] if o[-1] in stops else o) for o in samples]
    assert many.usage.completion_tokens == sum(map(len, samples))
    again = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=8, seed=11, n=3, stream=True)
    streamed_texts = ["", "", ""]
    for c in again:
        for choice in c.choices:
            streamed_texts[choice.index] += choice.delta.content or ""
    assert streamed_texts == texts

    # presence / frequency penalties: exactly the engine's penalised greedy answer
    changed = False
    for presence, frequency in ((2.0, 0.0), (0.0, 2.0), (-1.0, 0.5)):
        want = _engine_answer(model, tokenizer, prompt, stops, max_tokens=12, temperature=0.0,
                              presence_penalty=presence, frequency_penalty=frequency)
        got = client.chat.completions.create(model=MODEL_ID, messages=HELLO, temperature=0, max_tokens=12,
                                             presence_penalty=presence, frequency_penalty=frequency)
        assert got.choices[0].message.content == display_text(tokenizer, want)
        changed |= want != _engine_answer(model, tokenizer, prompt, stops, max_tokens=12, temperature=0.0)
    assert changed  # the penalties were not all without effect on this model


def test_text_completions_through_the_official_client(server, model, tokenizer):
    """/v1/completions: a plain continuation of text or token ids (no chat template), with n,
    logprobs in the legacy shape, echo, streaming and stop sequences."""
    import openai
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    text = "The number 7 is"
    prompt = [tokenizer.bos_token_id, *tokenizer.encode(text)]
    bos = (tokenizer.bos_token_id,)
    answer = _engine_answer(model, tokenizer, prompt, bos, max_tokens=8, temperature=0.0)
    want = display_text(tokenizer, answer)
    reply = client.completions.create(model=MODEL_ID, prompt=text, max_tokens=8, temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].text == want
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == len(answer)
    assert client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=8, temperature=0).choices[0].text == want
    assert client.completions.create(model=MODEL_ID, prompt=text, max_tokens=8, temperature=0,
                                     echo=True).choices[0].text == text + want
    default = client.completions.create(model=MODEL_ID, prompt=text, temperature=0)  # OpenAI's default: 16 tokens
    assert default.usage.completion_tokens <= 16

    scored = client.completions.create(model=MODEL_ID, prompt=text, max_tokens=8, temperature=0, logprobs=2)
    lp = scored.choices[0].logprobs
    full = _model_logprobs(model, prompt, answer)
    assert lp.token_logprobs == pytest.approx([row[t].item() for row, t in zip(full, answer)], abs=1e-4)
    assert all(len(top) in (2, 3) and tok in top for top, tok in zip(lp.top_logprobs, lp.tokens))  # top 2 + the chosen
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0

    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL_ID, prompt=text, max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == want
    cut = client.completions.create(model=MODEL_ID, prompt=text, max_tokens=8, temperature=0, stop=[want[3:5]])
    assert cut.choices[0].text == want[:want.index(want[3:5])] and cut.choices[0].finish_reason == "stop"

    # two prompts, two samples each: four choices, prompt p's samples at 2p and 2p + 1
    two = client.completions.create(model=MODEL_ID, prompt=[text, "Café"], max_tokens=6, n=2, seed=4)
    assert sorted(c.index for c in two.choices) == [0, 1, 2, 3]
    assert two.usage.prompt_tokens == len(prompt) + 1 + len(tokenizer.encode("Café"))
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL_ID, prompt=text, suffix="!")
    assert err.value.body["param"] == "suffix"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL_ID, prompt=text, echo=True, logprobs=1)
    assert err.value.body["param"] == "echo"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL_ID, prompt=[[]])
    assert err.value.body["param"] == "prompt"


def test_the_documented_openai_client_example_runs(server, capsys):
    """docs/serving.md's client example, as written, against a live server (its URL swapped in)."""
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "serving.md"
    [block] = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert "http://127.0.0.1:8000/v1" in block
    exec(compile(block.replace("http://127.0.0.1:8000", server.url), str(doc), "exec"), {"__name__": "__doc__"})
    out = capsys.readouterr().out  # the tiny model's answers are random bytes, newlines included
    assert "CompletionUsage(prompt_tokens" in out or "CompletionUsage(completion_tokens" in out
    assert all(re.search(rf"^{i} ['\"]", out, re.M) for i in range(3))  # the n=3 choices
