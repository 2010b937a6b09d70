"""Streaming text from token ids, and stop-sequence matching on that text; how an answer's
special tokens are shown to a person and carried as structured parts.

A byte-level BPE token can end in the middle of a multi-byte UTF-8 character (an emoji is often
split over two or three tokens), so decoding each token on its own shows U+FFFD where the pieces
meet. `IncrementalDetokenizer` holds back the incomplete tail until the character is whole.
"""
from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence

from nanofast.tokenizer import SPECIAL_TOKENS, Tokenizer


class IncrementalDetokenizer:
    """Turn a stream of token ids into text pieces that never end in a partial character.

    The pieces of one stream concatenated equal `tokenizer.decode(all ids)`: invalid bytes become
    U+FFFD exactly as there, and an incomplete character left at the end is flushed as U+FFFD by
    `flush()`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._token_bytes = tokenizer.enc.decode_single_token_bytes
        self._vocab_size = tokenizer.vocab_size
        # errors="replace" matches tiktoken's decode; the incremental decoder keeps a trailing
        # incomplete sequence buffered instead of replacing it.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        """Feed one token id; return the text that is now complete (possibly "")."""
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < self._vocab_size:
            raise ValueError(f"token must be an id in [0, {self._vocab_size}), got {token!r}")
        return self._decoder.decode(self._token_bytes(token))

    def add_many(self, tokens: Iterable[int]) -> str:
        """Feed several ids; return the complete text they add."""
        return "".join(self.add(t) for t in tokens)

    def flush(self) -> str:
        """End of stream: return what is still held (an incomplete character becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Find stop sequences in streamed text; hold back text that might be the start of one.

    `push(text)` returns (text safe to show, stopped). Once a stop sequence is found, the text
    before it is returned, the sequence itself and everything after are dropped, and stopped is True.
    """

    def __init__(self, stops: Sequence[str]):
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop sequences must be non-empty strings, got {list(stops)!r}")
        self.stops = tuple(stops)
        self._pending = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        """Add streamed text; return (text that can be emitted now, whether a stop sequence matched)."""
        if self.stopped:
            return "", True
        buf = self._pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._pending = True, ""
            return buf[:min(hits)], True
        # Hold back the longest tail that is a proper prefix of some stop sequence.
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self._pending = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        """End of stream without a match: the held-back text is ordinary output after all."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out


# ---- what a person reads, and the parts that round-trip ------------------------------------------
# An answer may call the calculator: <|python_start|>expr<|python_end|><|output_start|>result
# <|output_end|>. People read it as one block, "[calculator: expr = result]"; no special token is
# ever shown. Clients that send the answer back as history send its parts (nanochat's assistant
# content format, {"type": "text" | "python" | "python_output", "text": ...}), which render to the
# same token ids the model produced.
_SHOWN = {"<|python_start|>": "[calculator: ", "<|python_end|>": "", "<|output_start|>": " = ", "<|output_end|>": "]"}
_PART_OF = {"<|python_start|>": "python", "<|output_start|>": "python_output"}
_PART_END = {"<|python_end|>": "python", "<|output_end|>": "python_output"}


def special_display(tokenizer: Tokenizer, dim: bool = False) -> dict[int, str]:
    """How each special token of an answer is shown: the calculator's four as the readable block
    `[calculator: 19*2 = 38]` (dimmed with ANSI codes when `dim`), every other one as nothing."""
    start, end = ("\x1b[2m", "\x1b[0m") if dim else ("", "")
    shown = dict(_SHOWN, **{"<|python_start|>": start + _SHOWN["<|python_start|>"], "<|output_end|>": "]" + end})
    return {tokenizer.encode_special(name): shown.get(name, "") for name in SPECIAL_TOKENS}


def stream_text(tokenizer: Tokenizer, ids: Iterable[int], display: dict[int, str]) -> Iterable[str]:
    """Text pieces for a stream of token ids, a special token shown as display[id] (the text
    before it flushed first, so a character is never split around it)."""
    detok = IncrementalDetokenizer(tokenizer)
    for token in ids:
        piece = detok.flush() + display[token] if token in display else detok.add(token)
        if piece:
            yield piece
    tail = detok.flush()
    if tail:
        yield tail


def display_text(tokenizer: Tokenizer, ids: Sequence[int], dim: bool = False) -> str:
    """The text a person reads for answer tokens `ids` (see special_display)."""
    return "".join(stream_text(tokenizer, ids, special_display(tokenizer, dim)))


def answer_parts(tokenizer: Tokenizer, ids: Sequence[int]) -> list[dict]:
    """Answer tokens as nanochat's assistant parts: text, python (the calculator call) and
    python_output (its result); other special tokens are dropped. `parts_display` of the result is
    `display_text(ids)`, and `tokenizer.render_conversation` renders the parts back to `ids` (less
    any dropped special token)."""
    specials = {tokenizer.encode_special(name): name for name in SPECIAL_TOKENS}
    parts: list[dict] = []
    kind, run = "text", []

    def close() -> None:
        text = tokenizer.decode(run)
        if text or kind != "text":
            parts.append({"type": kind, "text": text})
        run.clear()

    for token in ids:
        name = specials.get(token)
        if name is None:
            run.append(token)
        elif name in _PART_OF and kind == "text":
            close()
            kind = _PART_OF[name]
        elif _PART_END.get(name) == kind:
            close()
            kind = "text"
    if run or kind != "text":
        close()
    return parts


def parts_display(parts: Sequence[dict]) -> str:
    """The text a person reads for assistant parts (the same as display_text of their tokens)."""
    out = []
    for part in parts:
        kind, text = part["type"], part["text"]
        out.append(text if kind == "text" else
                   f"{_SHOWN['<|python_start|>']}{text}" if kind == "python" else f" = {text}]")
    return "".join(out)


def truncate_parts(parts: Sequence[dict], chars: int) -> list[dict]:
    """Parts whose display is the first `chars` characters of parts_display(parts) (a stop
    sequence cut the answer there): whole parts while they fit; a text part or a calculator call
    cut inside its text is cut; a cut inside a block's decoration or result keeps what was shown as
    text, so the display and what goes back to the model stay the shown characters."""
    out, used = [], 0
    prefix = _SHOWN["<|python_start|>"]
    for part in parts:
        shown = parts_display([part])
        if used + len(shown) <= chars:
            out.append(dict(part))
            used += len(shown)
            continue
        keep = chars - used
        if part["type"] == "python" and keep > len(prefix):
            out.append({"type": "python", "text": part["text"][:keep - len(prefix)]})
        elif keep > 0:
            out.append({"type": "text", "text": shown[:keep]})
        break
    return out


def token_piece(tokenizer: Tokenizer, display: dict[int, str], token: int) -> tuple[str, bytes]:
    """One token as log-probability listings show it: (text, its UTF-8 bytes). A special token is
    its display text (so a listing's texts add up to what a person read); any other token is its
    own bytes, decoded with U+FFFD where it ends inside a character (the bytes stay exact)."""
    if token in display:
        text = display[token]
        return text, text.encode()
    raw = tokenizer.enc.decode_single_token_bytes(token)
    return raw.decode("utf-8", errors="replace"), raw
