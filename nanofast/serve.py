"""An OpenAI-compatible chat server with a built-in web UI: `python -m nanofast.serve`.

Threads: the Engine is not thread-safe, so ONE background thread (`EngineWorker`) owns it. HTTP
handlers run on uvicorn's asyncio loop and talk to that thread only through a thread-safe command
queue ("add" a request, "abort" one); the thread loops `engine.step()` while any request is
unfinished, blocks on the queue when idle, and hands each token event back to the request's
asyncio.Queue with `loop.call_soon_threadsafe`. A client that disconnects mid-stream gets an
"abort" command, which frees its KV-cache pages.

Endpoints: POST /v1/chat/completions and POST /v1/completions (streaming or not, n samples per
prompt, log-probabilities), GET /v1/models, GET /v1/models/{id}, GET /health, GET / (UI).

Answers: `content` is what a person reads: a calculator call and its result show as
"[calculator: 19*2 = 38]", and no special token appears. Beside it, `parts` (in a streamed answer,
the last chunk's delta) gives the answer in nanochat's assistant format (text / python /
python_output); an assistant message sent back with its `parts` reaches the model as the very tokens
it produced, so a conversation with tool calls continues exactly (detokenize.answer_parts).

Parameters: the ones in PARAMETERS (COMPLETION_PARAMETERS) are honoured; every other one is refused
with a 400 naming it (OpenAI parameters nanofast does not implement, unless their value asks for
nothing: NEUTRAL; and unknown names, a typo included), so a client never gets an answer that silently ignored what it
asked for. Log-probabilities are the model's own distribution (before penalties and temperature),
listed for the tokens the model chose; calculator output, forced in, has none and is not listed.
n samples of one seeded request use engine.sample_seed: sample 0 is the plain seeded answer.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import math
import queue
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanofast.chat import add_runtime_args, default_answer_tokens
from nanofast.detokenize import (IncrementalDetokenizer, StopMatcher, answer_parts, parts_display,
                                 special_display, token_piece, truncate_parts)
from nanofast.engine import Engine, SamplingParams, TokenEvent, sample_seed
from nanofast.tokenizer import Tokenizer

STATIC_DIR = Path(__file__).parent / "static"
ROLES = ("system", "developer", "user", "assistant")  # "developer": OpenAI's newer name for system
SAMPLING = ("model", "stream", "stream_options", "n", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
            "presence_penalty", "frequency_penalty", "logprobs")
PARAMETERS = SAMPLING + ("messages", "max_completion_tokens", "top_logprobs")
COMPLETION_PARAMETERS = SAMPLING + ("prompt", "echo")
# OpenAI parameters not implemented here, with the values that ask for nothing (accepted: a
# client library may send them explicitly).
NEUTRAL = {"logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"),
           "parallel_tool_calls": (None,), "functions": (None, []), "function_call": (None, "none"),
           "response_format": (None, {"type": "text"}), "modalities": (None, ["text"]), "audio": (None,),
           "prediction": (None,), "reasoning_effort": (None,), "service_tier": (None, "auto", "default"),
           "store": (None, False), "metadata": (None,), "user": (None,), "web_search_options": (None,)}
COMPLETION_NEUTRAL = {"logit_bias": (None, {}), "user": (None,), "suffix": (None, ""), "best_of": (None, 1)}


@dataclass
class ServeLimits:
    """What one request may ask for; anything beyond is answered with a 4xx."""
    max_messages: int = 64
    max_chars: int = 32_000           # all message contents together
    max_body_bytes: int = 1_000_000   # the raw request body
    max_tokens: int = 4096            # the largest max_tokens a request may ask for
    default_max_tokens: int = 512     # a chat answer's most tokens when the request gives none (also at most
                                      # a quarter of the context, and cut to what fits)
    default_completion_tokens: int = 16  # /v1/completions' default, OpenAI's
    max_choices: int = 8              # n (times the prompts of a /v1/completions request)
    max_stop: int = 4                 # stop sequences per request, as OpenAI allows
    max_json_depth: int = 32          # nesting of arrays/objects (a request needs 4)
    body_timeout_s: float = 30.0      # the whole body must arrive within this (a stalled client is cut off)


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {message, type, param, code}}` with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# ---- the engine thread --------------------------------------------------------------------------
@dataclass(eq=False)
class RequestHandle:
    """One request's link between the engine thread and its HTTP handler."""
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # TokenEvent or an exception
    request_id: int | None = None   # set by the engine thread once added
    finished: bool = False          # the handler saw the last event (or gave up)


class EngineWorker:
    """Owns an Engine on a background thread; see the module docstring."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._active: dict[int, RequestHandle] = {}
        self._stats = self._snapshot()
        self._thread = threading.Thread(target=self._run, name="nanofast-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt: list[int], params: SamplingParams) -> RequestHandle:
        """Queue a request; call from the event loop that will read the handle's events."""
        handle = RequestHandle(asyncio.get_running_loop())
        self._commands.put(("add", handle, prompt, params))
        return handle

    def abort(self, handle: RequestHandle) -> None:
        """Stop a request and free its pages (a no-op when it already finished)."""
        handle.finished = True
        self._commands.put(("abort", handle))

    def stats(self) -> dict:
        """Running requests and KV pages in use, as of the engine thread's last iteration."""
        return dict(self._stats)

    @property
    def alive(self) -> bool:
        """Whether the engine thread is running (requests are only served while it is)."""
        return self._thread.is_alive()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread (running requests are dropped)."""
        self._commands.put(("stop",))
        self._thread.join(timeout)

    def _snapshot(self) -> dict:
        blocks = getattr(self.engine, "blocks", None)
        return {"running_requests": len(self._active), "engine_unfinished": self.engine.has_unfinished(),
                "pages_in_use": getattr(blocks, "in_use", None), "pages_total": getattr(blocks, "num_pages", None)}

    def _deliver(self, handle: RequestHandle, item: TokenEvent | BaseException) -> bool:
        """Hand `item` to the request's event loop; False when that loop is gone (request dropped)."""
        try:
            handle.loop.call_soon_threadsafe(handle.events.put_nowait, item)
            return True
        except RuntimeError:  # its event loop is closed: nobody will read this request any more
            if handle.request_id in self._active:
                self.engine.abort(handle.request_id)
                del self._active[handle.request_id]
            return False

    def _handle(self, command: tuple) -> bool:
        """Apply one command; False on "stop"."""
        kind = command[0]
        if kind == "stop":
            for rid, handle in list(self._active.items()):
                self._deliver(handle, RuntimeError("the server is shutting down"))
                self.engine.abort(rid)
            self._active.clear()
            return False
        handle = command[1]
        if kind == "add":
            if handle.finished:  # aborted before it was even added
                return True
            try:
                handle.request_id = self.engine.add_request(command[2], command[3])
            except Exception as e:
                self._deliver(handle, e)
                return True
            self._active[handle.request_id] = handle
        elif kind == "abort" and handle.request_id in self._active:
            self.engine.abort(handle.request_id)
            del self._active[handle.request_id]
        return True

    def _run(self) -> None:
        running = True
        while running:
            # Block only when idle; otherwise take whatever arrived and keep stepping.
            commands = [self._commands.get()] if not self.engine.has_unfinished() else []
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            for command in commands:
                running = self._handle(command) and running
            outbox: list[tuple[RequestHandle, TokenEvent | BaseException]] = []
            if running and self.engine.has_unfinished():
                try:
                    events = self.engine.step()
                except Exception as e:  # a failed step fails its requests, not the server
                    error = RuntimeError(f"engine step failed: {type(e).__name__}: {e}")
                    for rid, handle in list(self._active.items()):
                        outbox.append((handle, error))
                        self.engine.abort(rid)
                    self._active.clear()
                    events = []
                for event in events:
                    handle = self._active.get(event.request_id)
                    if handle is None:
                        continue
                    if event.finished:
                        del self._active[event.request_id]
                    outbox.append((handle, event))
            # Stats first: a client that saw its last token then finds them up to date.
            self._stats = self._snapshot()
            if not all([self._deliver(handle, item) for handle, item in outbox]):
                self._stats = self._snapshot()


# ---- request parsing ----------------------------------------------------------------------------
@dataclass
class GenerationRequest:
    """A validated request: the prompt and sampling settings of every choice (n samples of each
    prompt: choice p * n + i is sample i of prompt p) and how to answer."""
    prompts: list[list[int]]
    params: list[SamplingParams]
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    prompt_tokens: int               # usage: each prompt counted once, however many samples it has
    logprobs: int | None = None      # None: none; k: every token's log-prob and its k most likely alternatives
    echo: list[str] | None = None    # /v1/completions echo: the prompt text each choice's text starts with


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _neutral(value: Any, allowed: tuple) -> bool:
    """`value` is one of `allowed` (None and booleans by identity, so 0 is not False; else ==, so
    0.0 is 0 and [] is [])."""
    return any(value is v if v is None or isinstance(v, bool) or isinstance(value, bool) else value == v
               for v in allowed)


def _message_text(content: Any, i: int) -> str:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{i}].content[{j}] must be {{\"type\": \"text\", \"text\": str}}: "
                                    "only text content is supported", f"messages[{i}].content", "invalid_content")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise APIError(400, f"messages[{i}].content must be a string, got {type(content).__name__}",
                       f"messages[{i}].content", "invalid_content")
    return content  # empty is valid (OpenAI accepts it): an empty turn


def _assistant_parts(parts: Any, content: Any, role: str, i: int) -> list[dict]:
    """An assistant message's `parts` (what this server returns beside `content`: nanochat's text /
    python / python_output parts, so a calculator call goes back to the model as the tokens it
    produced). `content`, when also sent, must be what the parts show."""
    where = f"messages[{i}].parts"
    if role != "assistant":
        raise APIError(400, f"{where}: only assistant messages carry parts", where, "invalid_value")
    if not isinstance(parts, list) or not all(
            isinstance(p, dict) and p.get("type") in ("text", "python", "python_output") and isinstance(p.get("text"), str)
            and set(p) == {"type", "text"} for p in parts):
        raise APIError(400, f"{where} must be a list of {{\"type\": \"text\" | \"python\" | \"python_output\", "
                            "\"text\": str}", where, "invalid_value")
    if content is not None and _message_text(content, i) != parts_display(parts):
        raise APIError(400, f"messages[{i}].content is not what its parts show: send the parts the server returned "
                            "with the content it returned, or only one of them", where, "invalid_value")
    return [{"type": p["type"], "text": p["text"]} for p in parts]


def parse_messages(messages: Any, limits: ServeLimits) -> list[dict]:
    """Validate OpenAI messages into nanochat's conversation format (ending with a user turn)."""
    if messages is None:
        raise APIError(400, "missing required parameter 'messages'", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages",
                       "invalid_value")
    if len(messages) > limits.max_messages:
        raise APIError(400, f"too many messages: {len(messages)}, at most {limits.max_messages}", "messages",
                       "too_many_messages")
    out, chars = [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]",
                           "invalid_value")
        role = m.get("role")
        if role not in ROLES:
            raise APIError(400, f"messages[{i}].role is {role!r}: expected one of {', '.join(ROLES)}",
                           f"messages[{i}].role", "invalid_role")
        role = "system" if role == "developer" else role
        # nanochat has no system turn: a leading one is merged into the first user message.
        k = i - (messages[0].get("role") in ("system", "developer"))
        expected = "system" if role == "system" and i == 0 else ("user" if k % 2 == 0 else "assistant")
        if role != expected:
            raise APIError(400, f"messages[{i}].role is {role!r}, expected {expected!r}: after an optional "
                                "leading system message, turns must alternate user/assistant starting with user",
                           f"messages[{i}].role", "invalid_role_order")
        parts = m.get("parts")
        if parts is not None:
            content = _assistant_parts(parts, m.get("content"), role, i)
            chars += sum(len(p["text"]) for p in content)
        else:
            content = _message_text(m.get("content"), i)
            chars += len(content)
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise APIError(400, f"the last message (messages[{len(out) - 1}]) must be from the user",
                       f"messages[{len(out) - 1}].role", "invalid_role_order")
    if chars > limits.max_chars:
        raise APIError(400, f"messages hold {chars} characters, at most {limits.max_chars}", "messages",
                       "too_many_characters")
    return out


def check_parameters(body: Any, parameters: tuple[str, ...], neutral: dict[str, tuple]) -> dict:
    """The body as a dict whose every key is honoured: a key of `neutral` with a value that asks
    for nothing passes; anything else not in `parameters` is a 400 naming it."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
    for key, value in body.items():
        if key in parameters or (key in neutral and _neutral(value, neutral[key])):
            continue
        if key in neutral:
            asks = " or ".join(repr(v) for v in neutral[key] if v is not None)
            raise APIError(400, f"'{key}' is not supported by this server: leave it out{' or send ' + asks if asks else ''} "
                                f"(an answer that ignored it would not be what you asked for)", key,
                           "unsupported_parameter")
        raise APIError(400, f"unknown parameter '{key}': this server takes {', '.join(parameters)}", key,
                       "unknown_parameter")
    return body


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    value = default if value is None else value
    if not _is_number(value) or not (low < value if low_open else low <= value) or not value <= high:
        span = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
        raise APIError(400, f"'{name}' must be a number in {span}, got {value!r}", name, "invalid_value")
    return float(value)


def _sampling(body: dict, limits: ServeLimits) -> dict:
    """The sampling and streaming parameters both endpoints share, validated."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise APIError(400, f"'stream' must be a boolean, got {stream!r}", "stream", "invalid_type")
    stream = bool(stream)
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool)):
        raise APIError(400, "'stream_options' must be an object like {\"include_usage\": true}", "stream_options",
                       "invalid_type")
    if options is not None and not stream:
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true", "stream_options",
                       "invalid_value")
    n = body.get("n")
    n = 1 if n is None else n
    if not _is_int(n) or not 1 <= n <= limits.max_choices:
        raise APIError(400, f"'n' must be an integer in [1, {limits.max_choices}], got {n!r}", "n", "invalid_value")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") not in (None, body["max_tokens"]):
        raise APIError(400, "'max_tokens' and 'max_completion_tokens' disagree: send one of them (OpenAI's newer name "
                            "is max_completion_tokens)", "max_tokens", "invalid_value")
    if max_tokens is not None and (not _is_int(max_tokens) or not 1 <= max_tokens <= limits.max_tokens):
        raise APIError(400, f"'{param}' must be an integer in [1, {limits.max_tokens}], got {max_tokens!r}",
                       param, "invalid_value")
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise APIError(400, f"'top_k' must be an integer >= 1, got {top_k!r}", "top_k", "invalid_value")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise APIError(400, f"'seed' must be an integer, got {seed!r}", "seed", "invalid_type")
    if seed is not None and not -2 ** 63 <= seed < 2 ** 64:  # what a torch.Generator takes
        raise APIError(400, f"'seed' must be in [-2**63, 2**64), got {seed if abs(seed) < 10 ** 30 else 'a larger number'}",
                       "seed", "invalid_value")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else ([] if stop is None else stop)
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > limits.max_stop:
        raise APIError(400, f"'stop' must be a non-empty string or a list of at most {limits.max_stop} non-empty "
                            f"strings, got {stop!r}", "stop", "invalid_value")
    return {"stream": stream, "include_usage": bool(options and options.get("include_usage")), "n": n,
            "max_tokens": max_tokens, "max_tokens_param": param, "top_k": top_k, "seed": seed, "stops": tuple(stops),
            "temperature": _number(body, "temperature", 1.0, 0, 2), "top_p": _number(body, "top_p", 1.0, 0, 1, True),
            "presence_penalty": _number(body, "presence_penalty", 0.0, -2, 2),
            "frequency_penalty": _number(body, "frequency_penalty", 0.0, -2, 2)}


def _choices(prompts: list[list[int]], where: str, sampling: dict, context: int, default_tokens: int,
             stop_ids: tuple[int, ...], top_logprobs: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """n (prompt, params) pairs per prompt, each sample with its own seed (engine.sample_seed); a
    prompt that leaves no room for its answer is a 400 naming `where`."""
    out_prompts, out_params = [], []
    max_tokens, param = sampling["max_tokens"], sampling["max_tokens_param"]
    for prompt in prompts:
        if len(prompt) >= context:
            raise APIError(400, f"the prompt is {len(prompt)} tokens; the model's context is {context} tokens, "
                                f"which must also leave room for the answer: shorten the {where}", where,
                           "context_length_exceeded")
        room = context - len(prompt)
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"the prompt ({len(prompt)} tokens) + '{param}' ({max_tokens}) exceed the model's "
                                f"context of {context} tokens: ask for at most {room}", param,
                           "context_length_exceeded")
        for _ in range(sampling["n"]):
            out_prompts.append(prompt)
            out_params.append(SamplingParams(
                max_tokens=max_tokens if max_tokens is not None else min(default_tokens, room),
                temperature=sampling["temperature"], top_k=sampling["top_k"], top_p=sampling["top_p"],
                seed=sample_seed(sampling["seed"], len(out_params)), stop_token_ids=stop_ids,
                presence_penalty=sampling["presence_penalty"], frequency_penalty=sampling["frequency_penalty"],
                top_logprobs=top_logprobs))
    return out_prompts, out_params


def _model_check(body: dict, model_id: str) -> None:
    model = body.get("model")
    if model is not None and model != model_id:
        raise APIError(404, f"the model {model!r} does not exist: this server serves {model_id!r}", "model",
                       "model_not_found")


def parse_request(body: Any, tokenizer: Tokenizer, model_id: str, context: int, limits: ServeLimits,
                  stop_ids: tuple[int, ...]) -> GenerationRequest:
    """Validate a chat-completions body; raises APIError naming the offending parameter."""
    body = check_parameters(body, PARAMETERS, NEUTRAL)
    _model_check(body, model_id)
    messages = parse_messages(body.get("messages"), limits)
    sampling = _sampling(body, limits)
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise APIError(400, f"'logprobs' must be a boolean, got {logprobs!r}", "logprobs", "invalid_type")
    if top is not None and (not _is_int(top) or not 0 <= top <= 20):
        raise APIError(400, f"'top_logprobs' must be an integer in [0, 20], got {top!r}", "top_logprobs",
                       "invalid_value")
    if top and not logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
    prompt = tokenizer.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})
    prompts, params = _choices([prompt], "messages", sampling, context, chat_answer_tokens(limits, context), stop_ids,
                               top or 0)
    return GenerationRequest(prompts, params, sampling["stops"], sampling["stream"], sampling["include_usage"],
                             len(prompt), (top or 0) if logprobs else None)


def chat_answer_tokens(limits: ServeLimits, context: int) -> int:
    """A chat answer's budget when the request names none: it leaves room for the turns after it,
    as the chat CLI does (chat.default_answer_tokens), within the server's --default-max-tokens."""
    return min(limits.default_max_tokens, default_answer_tokens(context))


def _prompt_list(prompt: Any, tokenizer: Tokenizer, limits: ServeLimits) -> list[list[int]]:
    """/v1/completions' `prompt` (a string, a list of strings, a list of token ids, or a list of
    such lists) as token-id prompts; text starts with BOS, as every document did in training."""
    vocab = tokenizer.vocab_size

    def one(p: Any, where: str) -> list[int]:
        if isinstance(p, str):
            return [tokenizer.bos_token_id, *tokenizer.encode(p)]
        if isinstance(p, list) and p and all(_is_int(t) and 0 <= t < vocab for t in p):
            return list(p)
        raise APIError(400, f"'{where}' must be a string or a non-empty list of token ids in [0, {vocab})",
                       "prompt", "invalid_value")

    if prompt is None:
        raise APIError(400, "missing required parameter 'prompt'", "prompt", "missing_required_parameter")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = [one(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    else:
        prompts = [one(prompt, "prompt")]
    if sum(len(p) for p in prompts) > limits.max_chars:
        raise APIError(400, f"the prompts hold more than {limits.max_chars} tokens", "prompt", "too_many_characters")
    return prompts


def parse_completion_request(body: Any, tokenizer: Tokenizer, model_id: str, context: int,
                             limits: ServeLimits) -> GenerationRequest:
    """Validate a /v1/completions body (plain text continuation, no chat template); raises
    APIError naming the offending parameter."""
    body = check_parameters(body, COMPLETION_PARAMETERS, COMPLETION_NEUTRAL)
    _model_check(body, model_id)
    prompts = _prompt_list(body.get("prompt"), tokenizer, limits)
    sampling = _sampling(body, limits)
    if len(prompts) * sampling["n"] > limits.max_choices:
        raise APIError(400, f"{len(prompts)} prompts x n={sampling['n']} is more than {limits.max_choices} choices",
                       "n", "invalid_value")
    logprobs, echo = body.get("logprobs"), body.get("echo")
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= 20):
        raise APIError(400, f"'logprobs' must be an integer in [0, 20], got {logprobs!r}", "logprobs", "invalid_value")
    if echo is not None and not isinstance(echo, bool):
        raise APIError(400, f"'echo' must be a boolean, got {echo!r}", "echo", "invalid_type")
    if echo and logprobs is not None:
        raise APIError(400, "'echo' with 'logprobs' would need the prompt's log-probabilities, which this server "
                            "does not compute: drop one of them", "echo", "unsupported_value")
    # A base model ends a document with the next document's BOS: that ends the text.
    prompts, params = _choices(prompts, "prompt", sampling, context, limits.default_completion_tokens,
                               (tokenizer.bos_token_id,), logprobs or 0)
    texts = [tokenizer.decode([t for t in p if t != tokenizer.bos_token_id]) for p in prompts] if echo else None
    return GenerationRequest(prompts, params, sampling["stops"], sampling["stream"], sampling["include_usage"],
                             sum(len(p) for p in prompts[::sampling["n"]]), logprobs, texts)


# ---- running a request --------------------------------------------------------------------------
class Choice:
    """One choice of a request: its token events turned into text pieces (detokenised, special
    tokens shown as a person reads them, stop sequences applied), the answer's parts, and the
    log-probabilities of the tokens whose text was returned."""

    def __init__(self, worker: EngineWorker, tokenizer: Tokenizer, prompt: list[int], params: SamplingParams,
                 request: GenerationRequest, display: dict[int, str], index: int):
        self.worker, self.tokenizer, self.params, self.index = worker, tokenizer, params, index
        self.handle = worker.submit(prompt, params)
        self.detok = IncrementalDetokenizer(tokenizer)
        self.display = display  # special tokens as a person reads them (detokenize.special_display)
        self.matcher = StopMatcher(request.stops)
        self.want_logprobs = request.logprobs is not None
        self.completion_tokens = 0
        self.answer: list[int] = []  # the answer's tokens, the stop token excluded
        self.text = ""  # what was returned
        self.finish_reason: str | None = None
        self._first: TokenEvent | None = None
        self._produced = 0  # characters the tokens so far turned into, before stop sequences
        self._logprobs: list[tuple[int, float, tuple, int]] = []  # (token, logprob, top, text offset)
        self._released = 0

    async def start(self) -> None:
        """Wait for the first token, so an engine-side refusal surfaces before any answer is sent."""
        self._first = await self.next_event()

    def parts(self) -> list[dict]:
        """The returned answer as assistant parts (detokenize.answer_parts), cut where a stop
        sequence cut the text: what a client sends back to continue the conversation exactly."""
        return truncate_parts(answer_parts(self.tokenizer, self.answer), len(self.text))

    async def next_event(self) -> TokenEvent:
        item = await self.handle.events.get()
        if isinstance(item, BaseException):
            self.handle.finished = True
            raise item
        return item

    async def pieces(self) -> AsyncIterator[str]:
        """Yield text pieces until the request finishes; then `finish_reason` is set."""
        while self.finish_reason is None:
            event, self._first = (self._first, None) if self._first is not None else (await self.next_event(), None)
            self.completion_tokens += 1  # every generated token counts, the stop token included
            text, token = "", event.token
            if not (event.finish_reason == "stop" and token in self.params.stop_token_ids):
                self.answer.append(token)
                text = self.detok.flush() + self.display[token] if token in self.display else self.detok.add(token)
                # calculator output is forced in, not sampled: it has no log-probability to list
                if self.want_logprobs and not event.forced:
                    self._logprobs.append((token, event.logprob, event.top_logprobs, self._produced))
            if event.finished:
                text += self.detok.flush()
            self._produced += len(text)
            out, stopped = self.matcher.push(text)
            if stopped:
                self.worker.abort(self.handle)  # the rest of the answer is not wanted: free its pages
                self.finish_reason = "stop"
            elif event.finished:
                self.handle.finished = True
                out += self.matcher.flush()
                self.finish_reason = "length" if event.finish_reason == "length" else "stop"
            if out:
                self.text += out
                yield out

    def take_logprobs(self) -> list[tuple[int, float, tuple, int]]:
        """The log-prob entries not handed out yet whose text has been returned (a token that
        starts inside the returned text; once finished, a trailing token that showed nothing too,
        unless a stop sequence cut the text)."""
        end = len(self.text)
        cut = self.matcher.stopped
        n = self._released
        while n < len(self._logprobs) and (self._logprobs[n][3] < end or (
                self.finish_reason is not None and not cut and self._logprobs[n][3] == end)):
            n += 1
        taken, self._released = self._logprobs[self._released:n], n
        return taken

    def close(self) -> None:
        """Abort the request in the engine unless it already finished."""
        if not self.handle.finished:
            self.worker.abort(self.handle)


async def start_choices(worker: EngineWorker, tokenizer: Tokenizer, request: GenerationRequest,
                        display: dict[int, str]) -> list[Choice]:
    """Submit every choice and wait for each one's first token: an engine-side refusal becomes a
    4xx (a failed engine a 500) before any answer is sent."""
    choices = [Choice(worker, tokenizer, prompt, params, request, display, i)
               for i, (prompt, params) in enumerate(zip(request.prompts, request.params))]
    try:
        for choice in choices:
            await choice.start()
    except BaseException as e:
        for choice in choices:
            choice.close()
        if isinstance(e, ValueError):
            raise APIError(400, str(e), None, "invalid_value") from None
        if isinstance(e, RuntimeError):
            raise APIError(500, str(e), None, "engine_error", type="server_error") from None
        raise
    return choices


async def merged(choices: list[Choice]) -> AsyncIterator[tuple[Choice, str | None]]:
    """(choice, text piece) as the choices produce them, interleaved; (choice, None) once a choice
    has finished. An engine failure in any choice is raised here."""
    pending: asyncio.Queue = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        try:
            async for piece in choice.pieces():
                pending.put_nowait((choice, piece))
            pending.put_nowait((choice, None))
        except Exception as e:
            pending.put_nowait((choice, e))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        for _ in range(len(choices)):
            while True:
                choice, item = await pending.get()
                if isinstance(item, Exception):
                    raise item
                yield choice, item
                if item is None:
                    break
    finally:
        for task in tasks:
            task.cancel()


def usage(request: GenerationRequest, choices: list[Choice]) -> dict:
    done = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": request.prompt_tokens, "completion_tokens": done,
            "total_tokens": request.prompt_tokens + done}


def chat_logprobs(entries: list[tuple[int, float, tuple, int]], piece) -> dict:
    """OpenAI's chat `logprobs` object for entries (token, logprob, top alternatives, offset)."""
    def item(token: int, logprob: float) -> dict:
        text, raw = piece(token)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    return {"content": [dict(item(t, lp), top_logprobs=[item(a, alp) for a, alp in top]) for t, lp, top, _ in entries],
            "refusal": None}


def text_logprobs(entries: list[tuple[int, float, tuple, int]], piece, offset: int = 0) -> dict:
    """The legacy completions `logprobs` object: tokens, their log-probs, the most likely
    alternatives (with the chosen token, as OpenAI lists it) and each token's character offset."""
    return {"tokens": [piece(t)[0] for t, _, _, _ in entries], "token_logprobs": [lp for _, lp, _, _ in entries],
            "top_logprobs": [{piece(a)[0]: alp for a, alp in (*top, (t, lp))} for t, lp, top, _ in entries],
            "text_offset": [offset + o for _, _, _, o in entries]}


class _SSEResponse(StreamingResponse):
    """A StreamingResponse that always watches for the client going away (whatever the ASGI
    version) and runs `on_close` however the stream ends, so an abandoned request is aborted."""

    def __init__(self, content: AsyncIterator[str], on_close, **kwargs):
        super().__init__(content, media_type="text/event-stream", **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away mid-write
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            self.on_close()


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


# ---- the app ------------------------------------------------------------------------------------
async def read_body(request: Request, limits: ServeLimits) -> bytes:
    """The request body, never more than limits.max_body_bytes of it in memory: a Content-Length
    above the cap is refused before anything is read, a chunked body once it passes the cap, and a
    body that stops arriving (shorter than its Content-Length) after limits.body_timeout_s."""
    cap = limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, f"Content-Length {declared[:40]!r} is not a byte count", None, "invalid_header")
        if int(declared) > cap:
            raise APIError(413, f"request body is {int(declared)} bytes, at most {cap}", None, "request_too_large")
    chunks, size = [], 0

    async def receive() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise APIError(413, f"request body is over {cap} bytes", None, "request_too_large")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(receive(), limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {limits.body_timeout_s:g} s "
                            f"({size} bytes received)", None, "request_timeout") from None
    return b"".join(chunks)


def parse_json(raw: bytes, max_depth: int) -> Any:
    """The body as JSON, nested at most `max_depth` levels (400 otherwise, also for input so deep
    that the parser itself would recurse too far)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None
    except RecursionError:
        body = None
        depth = math.inf
    else:
        depth = _depth(body, max_depth)
    if depth > max_depth:
        raise APIError(400, f"the request body nests arrays/objects more than {max_depth} levels deep", None,
                       "invalid_json")
    return body


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of parsed JSON, iteratively (no recursion), stopping once past `limit`."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if deepest > limit:
                break
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def context_window(engine: Engine) -> int:
    """Tokens a prompt and its answer may span: the model's training length, or less if the
    engine's page pool is smaller."""
    return min(engine.model.config.sequence_len, getattr(engine, "max_context", engine.model.config.sequence_len))


def create_app(engine: Engine, tokenizer: Tokenizer, model_id: str, limits: ServeLimits | None = None,
               api_key: str | None = None, cors_origins: tuple[str, ...] = ()) -> FastAPI:
    """The FastAPI app serving `engine`. Starts the engine thread now; it stops at app shutdown
    (or with `app.state.worker.close()`). `app.state.worker` exposes the worker for inspection.

    api_key: when set, every /v1/ request must carry `Authorization: Bearer <api_key>` (what the
    openai client sends), else a 401 in OpenAI's shape; / and /health stay open (the page asks
    for the key). cors_origins: origins a page on another host or port may call the API from
    (browser CORS); none by default."""
    if not isinstance(model_id, str) or not model_id:
        raise ValueError(f"model_id must be a non-empty string, got {model_id!r}")
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise ValueError("api_key must be None or a non-empty string")
    if any(not isinstance(o, str) or not o for o in cors_origins):
        raise ValueError(f"cors_origins must be non-empty strings (e.g. 'http://localhost:5173'), got {cors_origins!r}")
    limits = limits or ServeLimits()
    worker = EngineWorker(engine)
    context = context_window(engine)
    answer_budget = chat_answer_tokens(limits, context)
    stop_ids = (tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_token_id)
    display = special_display(tokenizer)
    created = int(time.time())
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")

    async def lifespan(app: FastAPI):
        yield
        worker.close()

    app = FastAPI(title="nanofast", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker, app.state.engine, app.state.limits = worker, engine, limits

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    if api_key is not None:
        expected = f"Bearer {api_key}".encode()

        @app.middleware("http")
        async def require_key(request: Request, call_next):
            if request.url.path.startswith("/v1/") and request.method != "OPTIONS" and not hmac.compare_digest(
                    request.headers.get("authorization", "").encode(), expected):
                return APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' (the server's "
                                     "--api-key)", None, "invalid_api_key").response()
            return await call_next(request)

    if cors_origins:  # added last: it runs first, so a preflight is answered before the key check
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None, code).response()

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = worker.alive
        return JSONResponse({"status": "ok" if ok else "engine thread stopped", "model": model_id, **worker.stats()},
                            status_code=200 if ok else 503)

    # Beyond OpenAI's fields: the context (vLLM's name for it) and the answer budget a chat request
    # gets by default, so a client can keep a conversation inside the context (the page does).
    card = {"id": model_id, "object": "model", "created": created, "owned_by": "nanofast", "max_model_len": context,
            "default_max_tokens": answer_budget}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model:path}")
    async def model_info(model: str) -> dict:
        if model != model_id:
            raise APIError(404, f"the model {model!r} does not exist: this server serves {model_id!r}", "model",
                           "model_not_found")
        return card

    def piece(token: int) -> tuple[str, bytes]:
        return token_piece(tokenizer, display, token)

    async def respond(req: GenerationRequest, chat: bool) -> Response:
        """Run the request's choices; answer as chat.completion(.chunk)s or text_completions."""
        choices = await start_choices(worker, tokenizer, req, display)
        cid, now = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        echo = req.echo or [""] * len(choices)

        def close() -> None:
            for choice in choices:
                choice.close()

        def logprobs(choice: Choice) -> dict | None:
            if req.logprobs is None:
                return None
            entries = choice.take_logprobs()
            return chat_logprobs(entries, piece) if chat else text_logprobs(entries, piece, len(echo[choice.index]))

        if not req.stream:
            try:
                async for _ in merged(choices):
                    pass
            except RuntimeError as e:
                raise APIError(500, str(e), None, "engine_error", type="server_error") from None
            finally:
                close()
            if chat:
                out = [{"index": c.index, "message": {"role": "assistant", "content": c.text, "refusal": None,
                                                      "parts": c.parts()},
                        "logprobs": logprobs(c), "finish_reason": c.finish_reason} for c in choices]
            else:
                out = [{"index": c.index, "text": echo[c.index] + c.text, "logprobs": logprobs(c),
                        "finish_reason": c.finish_reason} for c in choices]
            return JSONResponse({"id": cid, "object": "chat.completion" if chat else "text_completion",
                                 "created": now, "model": model_id, "system_fingerprint": None, "choices": out,
                                 "usage": usage(req, choices)})

        def chunk(choice: Choice | None, content: dict | str = "", finish_reason: str | None = None,
                  lp: dict | None = None) -> dict:
            out = {"id": cid, "object": "chat.completion.chunk" if chat else "text_completion", "created": now,
                   "model": model_id, "system_fingerprint": None, "choices": []}
            if choice is not None:
                out["choices"] = [{"index": choice.index, "delta" if chat else "text": content, "logprobs": lp,
                                   "finish_reason": finish_reason}]
            if req.include_usage:
                out["usage"] = None  # OpenAI: null on every chunk but the last when usage is asked for
            return out

        async def events() -> AsyncIterator[str]:
            try:
                for choice in choices:
                    if chat or echo[choice.index]:
                        yield _sse(chunk(choice, {"role": "assistant", "content": ""} if chat else echo[choice.index]))
                async for choice, text in merged(choices):
                    if text is not None:
                        yield _sse(chunk(choice, {"content": text} if chat else text, None, logprobs(choice)))
                    else:  # finished: the parts to send back (chat), the reason, any last log-probs
                        yield _sse(chunk(choice, {"parts": choice.parts()} if chat else "", choice.finish_reason,
                                         logprobs(choice)))
                if req.include_usage:
                    yield _sse(dict(chunk(None), usage=usage(req, choices)))
            except RuntimeError as e:  # the engine failed mid-stream: headers are gone, report in-band
                yield _sse(APIError(500, str(e), None, "engine_error", type="server_error").body())
            finally:
                close()
            yield _sse("[DONE]")

        return _SSEResponse(events(), close, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        body = parse_json(await read_body(request, limits), limits.max_json_depth)
        return await respond(parse_request(body, tokenizer, model_id, context, limits, stop_ids), chat=True)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        body = parse_json(await read_body(request, limits), limits.max_json_depth)
        return await respond(parse_completion_request(body, tokenizer, model_id, context, limits), chat=False)

    return app


# ---- command line -------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--checkpoint", default=None, help="nanofast or nanochat checkpoint directory (default: latest sft/mid/base)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: beside the checkpoints)")
    p.add_argument("--model-id", default=None, help="the model name clients send (default: nanofast-<checkpoint dir>)")
    p.add_argument("--max-num-seqs", type=int, default=32, help="requests decoded together")
    p.add_argument("--page-size", type=int, default=16, help="KV-cache tokens per page")
    p.add_argument("--num-pages", type=int, default=None, help="KV-cache pages (default: the engine's)")
    p.add_argument("--max-tokens-limit", type=int, default=ServeLimits.max_tokens, help="largest max_tokens a request may ask for")
    p.add_argument("--default-max-tokens", type=int, default=ServeLimits.default_max_tokens)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/ requests (default: none; the server listens "
                        "on loopback only unless --host says otherwise)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let a page served from ORIGIN (e.g. http://localhost:5173) call the API; repeatable "
                        "(default: none)")
    add_runtime_args(p)
    args = p.parse_args(argv)
    for name in ("port", "max_num_seqs", "page_size", "max_tokens_limit", "default_max_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Load the checkpoint and serve it with uvicorn until interrupted."""
    import torch
    import uvicorn

    from nanofast.chat import load_model, runtime
    from nanofast.checkpoint import CheckpointError

    args = parse_args(argv)
    try:
        device, dtype = runtime(args)
        model, tokenizer, checkpoint = load_model(args.checkpoint, args.tokenizer, device, dtype, args.base_dir)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    torch.set_grad_enabled(False)
    engine = Engine(model, tokenizer, page_size=args.page_size, num_pages=args.num_pages,
                    max_num_seqs=args.max_num_seqs)
    directory = checkpoint.parent if checkpoint.is_file() else checkpoint
    model_id = args.model_id or f"nanofast-{directory.resolve().name}"
    limits = ServeLimits(max_tokens=args.max_tokens_limit, default_max_tokens=args.default_max_tokens)
    app = create_app(engine, tokenizer, model_id, limits, api_key=args.api_key, cors_origins=tuple(args.cors_origin))
    print(f"serving {model_id} ({checkpoint}, {device}) on http://{args.host}:{args.port}/", file=sys.stderr)
    uvicorn.Server(server_config(app, host=args.host, port=args.port)).run()
    return 0


def server_config(app: FastAPI, **kwargs):
    """uvicorn's settings for `app` (kwargs: host, port, log_level, ...). An idle keep-alive
    connection is closed after 5 s; a request's headers may be at most 64 KiB (h11 buffers an
    incomplete event up to this); its body is bounded by read_body."""
    import uvicorn

    return uvicorn.Config(app, timeout_keep_alive=5, h11_max_incomplete_event_size=64 * 1024,
                          **{"log_level": "info", "lifespan": "on", **kwargs})


if __name__ == "__main__":
    sys.exit(main())
