"""Byte-level BPE tokenizer in the style of nanochat.

Training runs in Rust (rustbpe); inference runs in tiktoken, which is the fastest BPE encoder
available from Python. The vocabulary is: 256 raw bytes, then the learned merges, then the
special tokens below, appended last so that the merge ranks double as token ids.

On disk a tokenizer directory holds `tokenizer.json` (pattern, special tokens, and every
mergeable token in rank order, base64-encoded) and `token_bytes.pt` (the byte length of each
token id, 0 for specials) which turns a per-token loss into bits per byte.
"""
from __future__ import annotations

import base64
import binascii
import copy
import json
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import rustbpe
import tiktoken
import torch

SPECIAL_TOKENS = [
    "<|bos|>",  # begins every document
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool
    "<|python_end|>",
    "<|output_start|>",  # the tool's output, fed back to the assistant
    "<|output_end|>",
]

# GPT-4's split pattern, except numbers split into runs of at most 2 digits (not 3): a small
# vocabulary spends fewer entries on the 1000 three-digit numbers.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)

TOKENIZER_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.pt"
_FORMAT = "nanofast-bpe-v1"
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + 1  # every byte, every special, at least one merge


class Tokenizer:
    """A trained byte-level BPE tokenizer: a tiktoken Encoding plus the chat-format rules."""

    def __init__(self, enc: tiktoken.Encoding):
        missing = [name for name in SPECIAL_TOKENS if name not in enc.special_tokens_set]
        if missing:
            raise ValueError(f"encoding {enc.name!r} lacks special tokens {missing}: build it with Tokenizer.train")
        self.enc = enc
        self._special_ids = {name: enc.encode_single_token(name) for name in SPECIAL_TOKENS}
        self._token_bytes: torch.Tensor | None = None

    # ----------------------------------------------------------------------------------------
    # construction, training, persistence

    @classmethod
    def from_ranks(cls, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN) -> Tokenizer:
        """Build a tokenizer from BPE ranks (token bytes -> id); specials get the ids after them."""
        n = len(mergeable_ranks)
        specials = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding("nanofast", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                special_tokens=specials)
        return cls(enc)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 32768, doc_cap: int = 10_000) -> Tokenizer:
        """Train BPE on `texts` so the final vocabulary (bytes + merges + specials) is `vocab_size`.

        Each document is cut to its first `doc_cap` characters, so a few huge documents cannot
        dominate the pair statistics (and the memory) of the training run.
        """
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < _MIN_VOCAB:
            raise ValueError(f"vocab_size must be an int >= {_MIN_VOCAB} (256 bytes + "
                             f"{len(SPECIAL_TOKENS)} specials + 1 merge), got {vocab_size!r}")
        if isinstance(doc_cap, bool) or not isinstance(doc_cap, int) or doc_cap < 1:
            raise ValueError(f"doc_cap must be a positive int, got {doc_cap!r}")
        if isinstance(texts, str):
            raise TypeError("texts must be an iterable of documents, not a single str: wrap it in a list")
        seen = {"docs": 0, "chars": 0}

        def capped() -> Iterator[str]:
            for i, text in enumerate(texts):
                if not isinstance(text, str):
                    raise TypeError(f"training document {i} is {type(text).__name__}, expected str")
                text = text[:doc_cap]
                seen["docs"] += 1
                seen["chars"] += len(text)
                yield text

        bpe = rustbpe.Tokenizer()
        n_merged = vocab_size - len(SPECIAL_TOKENS)
        bpe.train_from_iterator(capped(), n_merged, pattern=SPLIT_PATTERN)
        if seen["chars"] == 0:
            raise ValueError(f"no training text: got {seen['docs']} documents with 0 characters; "
                             "pass an iterable of non-empty strings")
        if bpe.vocab_size != n_merged:
            raise ValueError(f"training text too small: learned {bpe.vocab_size - 256} merges, need "
                             f"{n_merged - 256} for vocab_size={vocab_size}; give more text or a smaller vocab_size")
        ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
        return cls.from_ranks(ranks, bpe.get_pattern())

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `tokenizer.json` and `token_bytes.pt` into `directory` (created if missing)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        ranks = self.enc._mergeable_ranks
        tokens = sorted(ranks, key=ranks.__getitem__)
        state = {
            "format": _FORMAT,
            "pattern": self.enc._pat_str,
            "special_tokens": SPECIAL_TOKENS,
            "tokens": [base64.b64encode(t).decode("ascii") for t in tokens],
        }
        (directory / TOKENIZER_FILE).write_text(json.dumps(state), encoding="utf-8")
        torch.save(self.token_bytes(), directory / TOKEN_BYTES_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer written by `save`; checks both files for corruption."""
        directory = Path(directory)
        for name in (TOKENIZER_FILE, TOKEN_BYTES_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"no tokenizer at {directory}: run `python train.py --stage tokenizer` first")
        tok = cls.from_ranks(*_read_state(directory / TOKENIZER_FILE))
        path = directory / TOKEN_BYTES_FILE
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"corrupt tokenizer file {path}: {type(e).__name__}; retrain the tokenizer") from None
        if not isinstance(stored, torch.Tensor) or not torch.equal(stored, tok.token_bytes()):
            raise ValueError(f"corrupt tokenizer file {path}: does not match {TOKENIZER_FILE}; retrain the tokenizer")
        return tok

    # ----------------------------------------------------------------------------------------
    # vocabulary

    @property
    def vocab_size(self) -> int:
        """Number of token ids, specials included."""
        return self.enc.n_vocab

    @property
    def bos_token_id(self) -> int:
        """Id of `<|bos|>`, which starts every document."""
        return self._special_ids["<|bos|>"]

    def encode_special(self, name: str) -> int:
        """Id of the special token `name`, e.g. "<|assistant_start|>"."""
        try:
            return self._special_ids[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown special token {name!r}; valid names: {', '.join(SPECIAL_TOKENS)}") from None

    def id_to_token(self, token_id: int) -> str:
        """The text of one token (invalid UTF-8 from a partial character shows as U+FFFD)."""
        return self.decode([token_id])

    def token_bytes(self) -> torch.Tensor:
        """int32 tensor (vocab_size,): UTF-8 byte length of each token, 0 for special tokens."""
        if self._token_bytes is None:
            lengths = torch.zeros(self.vocab_size, dtype=torch.int32)
            for token, rank in self.enc._mergeable_ranks.items():
                lengths[rank] = len(token)
            self._token_bytes = lengths
        return self._token_bytes.clone()  # a clone: callers may move or modify it freely

    # ----------------------------------------------------------------------------------------
    # encoding and decoding

    def _resolve(self, token: int | str | None, what: str) -> int | None:
        if token is None:
            return None
        if isinstance(token, str):
            return self.encode_special(token)
        if isinstance(token, int) and not isinstance(token, bool) and 0 <= token < self.vocab_size:
            return token
        raise ValueError(f"{what} must be a special-token name or an id in [0, {self.vocab_size}), got {token!r}")

    def encode(self, text: str | list[str], prepend: int | str | None = None, append: int | str | None = None,
               num_threads: int = 8) -> list[int] | list[list[int]]:
        """Encode one text (-> list[int]) or a batch (-> list[list[int]], encoded in parallel).

        Special-token strings inside the text are encoded as plain text, never as specials, so
        user data cannot forge control tokens. `prepend`/`append` (an id or a special name, e.g.
        "<|bos|>") are added to every row.
        """
        first, last = self._resolve(prepend, "prepend"), self._resolve(append, "append")
        if isinstance(text, str):
            rows = [self.enc.encode_ordinary(text)]
        elif isinstance(text, list) and all(isinstance(t, str) for t in text):
            # more threads than cores only adds contention: on 2 cores 8 threads is ~25% slower than 2
            threads = max(1, min(num_threads, _available_cpus(), len(text)))
            rows = self.enc.encode_ordinary_batch(text, num_threads=threads)
        else:
            raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")
        for row in rows:
            if first is not None:
                row.insert(0, first)
            if last is not None:
                row.append(last)
        return rows[0] if isinstance(text, str) else rows

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids to text; bytes that are not valid UTF-8 become U+FFFD."""
        try:
            return self.enc.decode(list(ids))
        except (KeyError, OverflowError, TypeError):
            raise ValueError(f"decode got an id outside [0, {self.vocab_size}) or a non-int") from None

    # ----------------------------------------------------------------------------------------
    # chat format

    def _render(self, conversation: dict) -> tuple[list[int], list[int]]:
        """Render a whole conversation (no truncation) to ids and a training mask."""
        messages = _chat_messages(conversation)
        ids: list[int] = []
        mask: list[int] = []

        def add(tokens: int | list[int], trained: int) -> None:
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([trained] * len(tokens))

        sp = self._special_ids
        add(self.bos_token_id, 0)
        for index, role, content in messages:
            if role == "user":
                add(sp["<|user_start|>"], 0)
                add(self.enc.encode_ordinary(content), 0)
                add(sp["<|user_end|>"], 0)
                continue
            add(sp["<|assistant_start|>"], 0)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for j, part in enumerate(parts):
                kind, text = _part(part, index, j)
                body = self.enc.encode_ordinary(text)
                if kind == "text":
                    add(body, 1)
                elif kind == "python":
                    add(sp["<|python_start|>"], 1)
                    add(body, 1)
                    add(sp["<|python_end|>"], 1)
                else:  # python_output: produced by the tool at inference time, so never trained on
                    add(sp["<|output_start|>"], 0)
                    add(body, 0)
                    add(sp["<|output_end|>"], 0)
            add(sp["<|assistant_end|>"], 1)
        return ids, mask

    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """Token ids and a same-length mask (1 = the model is trained to predict this token).

        `conversation` is {"messages": [{"role": ..., "content": ...}, ...]}: an optional leading
        system message (merged into the first user message), then user/assistant turns
        alternating, starting with user. Assistant content is a str or a list of parts
        {"type": "text" | "python" | "python_output", "text": str}. Both lists are cut to
        `max_tokens`.
        """
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        ids, mask = self._render(conversation)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict) -> list[int]:
        """Prompt ids for sampling the final assistant turn: drop it, render the rest, open a new turn."""
        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        if not isinstance(messages, list) or not messages:
            raise ValueError("conversation must be a dict with a non-empty 'messages' list")
        last = messages[-1]
        if not isinstance(last, dict) or last.get("role") != "assistant":
            raise ValueError(f"render_for_completion needs the last message ({len(messages) - 1}) to be "
                             "the assistant turn to complete")
        prompt = copy.copy(conversation)
        prompt["messages"] = messages[:-1]
        ids, _ = self._render(prompt)
        ids.append(self._special_ids["<|assistant_start|>"])
        return ids

    def visualize(self, ids: Sequence[int], mask: Sequence[int], color: bool = True) -> str:
        """Show each token, trained ones (mask 1) green and the rest grey, or bracketed if not `color`."""
        if len(ids) != len(mask):
            raise ValueError(f"ids and mask differ in length ({len(ids)} vs {len(mask)})")
        out = []
        for token_id, trained in zip(ids, mask):
            text = self.id_to_token(token_id)
            if color:
                out.append(f"\033[{'32' if trained else '90'}m{text}\033[0m")
            else:
                out.append(f"[{text}]" if trained else text)
        return ("" if color else "|").join(out)


# ------------------------------------------------------------------------------------------------
# helpers


def _available_cpus() -> int:
    """CPUs this process may run on (respects affinity masks, e.g. under a job scheduler)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _read_state(path: Path) -> tuple[dict[bytes, int], str]:
    """Parse and validate `tokenizer.json`; any defect is a ValueError naming the file."""
    def bad(why: str) -> ValueError:
        return ValueError(f"corrupt tokenizer file {path}: {why}; retrain the tokenizer")

    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"not valid JSON ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise bad(f"missing format tag {_FORMAT!r}")
    if state.get("special_tokens") != SPECIAL_TOKENS:
        raise bad("special tokens differ from nanofast.tokenizer.SPECIAL_TOKENS")
    pattern, tokens = state.get("pattern"), state.get("tokens")
    if not isinstance(pattern, str) or not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise bad("'pattern' must be a str and 'tokens' a list of str")
    try:
        raw = [base64.b64decode(t, validate=True) for t in tokens]
    except binascii.Error:
        raise bad("a token is not valid base64") from None
    if raw[:256] != [bytes([b]) for b in range(256)] or len(set(raw)) != len(raw):
        raise bad("tokens must start with the 256 single bytes and be unique")
    return {token: rank for rank, token in enumerate(raw)}, pattern


def _chat_messages(conversation: dict) -> list[tuple[int, str, object]]:
    """Validate a conversation; return (original index, role, content) with the system turn merged."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError("conversation must be a dict with a non-empty 'messages' list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
    turns = [(i, m["role"], m["content"]) for i, m in enumerate(messages)]
    if turns[0][1] == "system":
        # nanochat's format has no system turn: its text becomes a preamble of the first user turn
        if len(turns) < 2 or turns[1][1] != "user":
            raise ValueError("message 1 must be a user message: a system message must be followed by one")
        system, user = turns[0][2], turns[1][2]
        if not isinstance(system, str) or not isinstance(user, str):
            raise ValueError("messages 0 and 1 (system and user) must have str content")
        turns = [(1, "user", system + "\n\n" + user)] + turns[2:]
    for k, (i, role, content) in enumerate(turns):
        expected = "user" if k % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"message {i} has role {role!r}, expected {expected!r}: turns must alternate "
                             "user/assistant, starting with user (after an optional system message)")
        if role == "user" and not isinstance(content, str):
            raise ValueError(f"message {i} (user) must have str content, got {type(content).__name__}")
        if role == "assistant" and not isinstance(content, (str, list)):
            raise ValueError(f"message {i} (assistant) content must be a str or a list of parts")
    return turns


def _part(part: object, index: int, j: int) -> tuple[str, str]:
    """Validate one assistant content part; return (type, text)."""
    if (not isinstance(part, dict) or part.get("type") not in ("text", "python", "python_output")
            or not isinstance(part.get("text"), str)):
        raise ValueError(f"message {index} part {j} must be {{'type': 'text'|'python'|'python_output', "
                         f"'text': str}}, got {part!r:.80}")
    return part["type"], part["text"]


# ------------------------------------------------------------------------------------------------
# compression against reference tokenizers

_OFFLINE_LOCK = threading.Lock()


class _Offline(Exception):
    pass


def _load_offline(name: str, timeout_s: float) -> tuple[tiktoken.Encoding | None, str | None]:
    """`tiktoken.get_encoding(name)` from the local cache only: (encoding, None) or (None, reason).

    tiktoken downloads a missing encoding; with no network that can block for minutes, so its
    file reader is swapped for one that refuses URLs, and the lookup also runs under a timeout
    in case tiktoken's internals change.
    """
    result: dict[str, object] = {}

    def lookup() -> None:
        import tiktoken.load as tl

        with _OFFLINE_LOCK:
            original = getattr(tl, "read_file", None)

            def local_only(blobpath: str) -> bytes:
                if "://" in blobpath:
                    raise _Offline(blobpath)
                return original(blobpath)

            if original is not None:
                tl.read_file = local_only
            try:
                result["enc"] = tiktoken.get_encoding(name)
            except _Offline:
                result["reason"] = "not available offline"
            except ValueError as e:
                result["reason"] = f"unknown to tiktoken ({str(e).splitlines()[0][:80]})"
            except Exception as e:
                result["reason"] = f"not available offline ({type(e).__name__})"
            finally:
                if original is not None:
                    tl.read_file = original

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return None, "not available offline (lookup timed out)"
    return result.get("enc"), result.get("reason")


def compression_report(tokenizer: Tokenizer, texts: list[str],
                       references: Sequence[str] = ("gpt2", "cl100k_base"), timeout_s: float = 2.0) -> dict:
    """UTF-8 bytes per token of `tokenizer` and of tiktoken's `references` on `texts`.

    Returns {"bytes": int, "encodings": {name: {"tokens", "bytes_per_token", "reason"}}}; a
    reference that is not in tiktoken's local cache gets None counts and a reason string.
    """
    if isinstance(texts, str) or not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of str")
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    if n_bytes == 0:
        raise ValueError("compression_report needs non-empty texts")

    def row(n_tokens: int | None, reason: str | None = None) -> dict:
        return {"tokens": n_tokens, "bytes_per_token": None if n_tokens is None else n_bytes / n_tokens,
                "reason": reason}

    encodings = {"nanofast": row(sum(map(len, tokenizer.encode(texts))))}
    for name in references:
        enc, reason = _load_offline(name, timeout_s)
        encodings[name] = row(None, reason) if enc is None else row(sum(map(len, enc.encode_ordinary_batch(texts))))
    return {"bytes": n_bytes, "encodings": encodings}


def compression_table(report: dict) -> str:
    """Render a `compression_report` as a markdown table."""
    lines = [f"Compression on {report['bytes']:,} bytes of text", "",
             "| tokenizer | tokens | bytes/token | note |", "|---|---:|---:|---|"]
    for name, r in report["encodings"].items():
        if r["tokens"] is None:
            lines.append(f"| {name} | - | - | {r['reason']} |")
        else:
            lines.append(f"| {name} | {r['tokens']:,} | {r['bytes_per_token']:.3f} | |")
    return "\n".join(lines)
