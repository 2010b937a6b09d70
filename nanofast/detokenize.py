"""Streaming text from token ids, and stop-sequence matching on that text.

A byte-level BPE token can end in the middle of a multi-byte UTF-8 character (an emoji is often
split over two or three tokens), so decoding each token on its own shows U+FFFD where the pieces
meet. `IncrementalDetokenizer` holds back the incomplete tail until the character is whole.
"""
from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence

from nanofast.tokenizer import Tokenizer


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
