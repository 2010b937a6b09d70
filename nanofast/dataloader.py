"""BOS-aligned best-fit packing of pretraining documents into (B, T) batches, exactly resumable.

Every row of T+1 tokens starts at a document's BOS token. Rows are filled from a buffer of
tokenised documents by repeatedly taking the LARGEST document that fits in the space left;
when none fits, the space is filled with a prefix of the SHORTEST one (the rest of it is
dropped). So there is no padding and every token can attend back to its document's start.
Inputs are row[:-1] and targets row[1:].

Data flow: a daemon thread reads parquet row groups (rank r of w takes global row groups
r, r+w, ...) and tokenises them (tiktoken releases the GIL) into a bounded queue; the
consumer thread only packs. The state returned with each batch describes the position after
that batch: the next row group to read plus, per buffered row group, a bitmask of its rows
still in the buffer. Buffered documents are re-read and re-tokenised on resume, so the buffer
is rebuilt exactly and a resumed loader yields the same batches as an uninterrupted one.
"""
from __future__ import annotations

import bisect
import itertools
import os
import queue
import threading
from typing import Any, Iterator, NamedTuple

import numpy as np
import pyarrow.parquet as pq
import torch

from nanofast.dataset import iter_documents, split_shards

STATE_VERSION = 1


class _Chunk(NamedTuple):
    """One tokenised row group (or the listed rows of one) as produced by the reader thread."""
    epoch: int
    row_group: int  # global row-group index
    rows: list[int]  # row numbers within the row group
    docs: list[np.ndarray]  # per row: (doc_len,) int32 token ids, starting with BOS
    cursor: tuple[int, int] | None  # (epoch, next global row group) after it; None for restored rows


class _End(NamedTuple):
    """Marks the end of a non-looping split."""


def _encode_rows(rows: list[int]) -> str | list[int]:
    """Sorted row numbers -> the shorter of a hex bitmask (bit i = row i; 250 characters cover
    1000 rows, good for a freshly read row group) and the plain list (good for a few stragglers)."""
    mask = 0
    for r in rows:
        mask |= 1 << r
    mask_hex = format(mask, "x")
    return mask_hex if len(mask_hex) < 4 * len(rows) else rows


def _decode_rows(rows: str | list[int]) -> list[int]:
    if isinstance(rows, str):
        bits = bin(int(rows, 16))[2:][::-1]
        return [i for i, bit in enumerate(bits) if bit == "1"]
    return sorted(int(r) for r in rows)


class _Reader:
    """The background half of PackedLoader: reads this rank's row groups and tokenises them into
    a bounded queue. It holds no reference to the loader, so a loader that is dropped without
    close() is still garbage-collected, and its __del__ stops this thread."""

    def __init__(self, tokenizer: Any, bos: int, tokenizer_threads: int, paths: list, file_offsets: list[int],
                 split: str, rank: int, world_size: int, loop: bool, prefetch: int):
        self.tokenizer, self.bos, self.tokenizer_threads = tokenizer, bos, tokenizer_threads
        self.paths, self.file_offsets, self.num_row_groups = paths, file_offsets, file_offsets[-1]
        self.split, self.rank, self.world_size, self.loop = split, rank, world_size, loop
        self.queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self.stop = threading.Event()

    def run(self, restore: list[tuple[int, int, list[int]]], epoch: int, next_rg: int) -> None:
        """Thread body: tokenise the restored rows, then the row-group stream, into the queue."""
        try:
            for rg_epoch, rg, rows in restore:
                texts = self._read_row_group(rg)
                if rows and rows[-1] >= len(texts):
                    raise ValueError(f"loader state references row {rows[-1]} of row group {rg}, which has "
                                     f"{len(texts)} rows: was the data changed?")
                if not self.put(self._tokenize(rg_epoch, rg, rows, [texts[r] for r in rows], None)):
                    return
            for rg_epoch, rg, texts, cursor in self._stream(epoch, next_rg):
                if not self.put(self._tokenize(rg_epoch, rg, list(range(len(texts))), texts, cursor)):
                    return
            self.put(_End())
        except BaseException as e:  # hand the error to the consumer, which re-raises it
            self.put(e)

    def put(self, item: Any) -> bool:
        """Blocking put that gives up (returns False) once close() was called."""
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _read_row_group(self, rg: int) -> list[str]:
        file = bisect.bisect_right(self.file_offsets, rg) - 1
        table = pq.ParquetFile(self.paths[file]).read_row_group(rg - self.file_offsets[file], columns=["text"])
        return table.column("text").to_pylist()

    def _stream(self, epoch: int, next_rg: int) -> Iterator[tuple[int, int, list[str], tuple[int, int]]]:
        """(epoch, row group, texts, cursor after it) for this rank, from the cursor onwards."""
        while True:
            if next_rg >= self.num_row_groups:
                if not self.loop or self.stop.is_set():
                    return
                epoch, next_rg = epoch + 1, self.rank
            fresh, docs = next_rg == self.rank, 0
            for loc, texts in iter_documents(self.paths, start=next_rg, step=self.world_size):
                docs += len(texts)
                yield epoch, loc.index, texts, (epoch, loc.index + self.world_size)
            if fresh and docs == 0:  # a looping split without documents would spin forever
                raise ValueError(f"the {self.split} split has no documents for rank {self.rank}")
            next_rg = self.num_row_groups

    def _tokenize(self, epoch: int, rg: int, rows: list[int], texts: list[str],
                  cursor: tuple[int, int] | None) -> _Chunk:
        docs = self.tokenizer.encode(texts, prepend=self.bos, num_threads=self.tokenizer_threads)
        if len(docs) != len(texts) or any(not doc or doc[0] != self.bos for doc in docs):
            raise ValueError("tokenizer.encode(texts, prepend=bos) must return one list per text, "
                             "each starting with the BOS id")
        # One array per document (not views of a shared one): a long document can stay buffered
        # for a long time and must not pin the memory of its whole row group.
        return _Chunk(epoch, rg, rows, [np.array(doc, dtype=np.int32) for doc in docs], cursor)


class PackedLoader:
    """Iterator over `(inputs, targets, state)`: inputs/targets int64 (B, T) on `device`.

    `tokenizer` needs `bos_token_id: int` and `encode(texts, prepend=id, num_threads=n) ->
    list[list[int]]`. Rank `rank` of `world_size` reads a disjoint share of the split's row
    groups. With `loop=True` the split repeats forever (the state counts epochs from 1);
    with `loop=False` iteration stops when the documents run out (a last partial batch is
    dropped). Pass a batch's `state` back as `state=` to continue right after that batch.
    The row stream does not depend on `batch_size`, so it may change across a resume.
    `buffer_docs` is the number of documents best fit chooses from, `prefetch` the number of
    tokenised row groups the reader thread may run ahead, `tokenizer_threads` goes to encode().
    """

    def __init__(self, tokenizer: Any, data_dir: str | os.PathLike, batch_size: int, seq_len: int,
                 split: str = "train", rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                 buffer_docs: int = 1000, state: dict | None = None, loop: bool = True,
                 tokenizer_threads: int = 4, prefetch: int = 4):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got batch_size={batch_size}, seq_len={seq_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if buffer_docs < 1 or tokenizer_threads < 1 or prefetch < 1:
            raise ValueError(f"buffer_docs, tokenizer_threads and prefetch must be >= 1, got "
                             f"{buffer_docs}, {tokenizer_threads}, {prefetch}")
        self.tokenizer, self.bos = tokenizer, int(tokenizer.bos_token_id)
        self.batch_size, self.seq_len, self.split = batch_size, seq_len, split
        self.rank, self.world_size, self.loop = rank, world_size, loop
        self.buffer_docs, self.tokenizer_threads = buffer_docs, tokenizer_threads
        self.device = torch.device(device)
        self.paths = split_shards(data_dir, split)
        counts = [pq.ParquetFile(p).metadata.num_row_groups for p in self.paths]
        self.file_offsets = [0, *itertools.accumulate(counts)]  # global index of each file's first row group
        self.num_row_groups = self.file_offsets[-1]
        if rank >= self.num_row_groups:
            raise ValueError(f"the {split} split has only {self.num_row_groups} row groups, so rank {rank} of "
                             f"{world_size} would get no data: use fewer ranks or more shards")
        restore, (epoch, next_rg) = self._parse_state(state) if state is not None else ([], (1, rank))

        # Buffer: documents keyed by an insertion ordinal; `_by_len` holds (length, ordinal) sorted,
        # so "largest that fits" and "shortest" are bisections, ties going to the oldest document.
        self._docs: dict[int, tuple[int, int, int, np.ndarray]] = {}  # ordinal -> (epoch, rg, row, tokens)
        self._by_len: list[tuple[int, int]] = []
        self._ordinal = 0
        self._cursor = (epoch, next_rg)  # as seen by the consumer, i.e. after the chunks it has taken
        self._pending_restore = len(restore)
        self._exhausted = self._finished = False

        self._reader = _Reader(tokenizer, self.bos, tokenizer_threads, self.paths, self.file_offsets,
                               split, rank, world_size, loop, prefetch)
        self._queue = self._reader.queue
        self._thread = threading.Thread(target=self._reader.run, args=(restore, epoch, next_rg),
                                        name=f"PackedLoader-{split}-rank{rank}", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- state

    def _parse_state(self, state: dict) -> tuple[list[tuple[int, int, list[int]]], tuple[int, int]]:
        """Validate a saved state; return the buffered (epoch, row group, rows) and the cursor."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a PackedLoader state (version {STATE_VERSION}): pass the dict "
                             "returned alongside a batch")
        expected = {"split": self.split, "rank": self.rank, "world_size": self.world_size,
                    "seq_len": self.seq_len, "buffer_docs": self.buffer_docs,
                    "row_groups": self.num_row_groups}
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(f"loader state has {key}={state.get(key)!r} but this loader has {key}={value!r}: "
                                 "resume with the settings and data the state was saved with")
        try:
            restore = [(int(e), int(g), _decode_rows(rows)) for e, g, rows in state["buffer"]]
            cursor = (int(state["epoch"]), int(state["next_row_group"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError("malformed PackedLoader state: pass the dict returned alongside a batch") from None
        if any(not 0 <= g < self.num_row_groups for _, g, _ in restore):
            raise ValueError("loader state references row groups outside the data: was the data changed?")
        return sorted(restore), cursor

    def state(self) -> dict:
        """JSON-able position after the last batch returned (no tokens, only references)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for epoch, rg, row, _ in self._docs.values():
            groups.setdefault((epoch, rg), []).append(row)
        return {"version": STATE_VERSION, "split": self.split, "rank": self.rank,
                "world_size": self.world_size, "seq_len": self.seq_len, "buffer_docs": self.buffer_docs,
                "row_groups": self.num_row_groups, "epoch": self._cursor[0], "next_row_group": self._cursor[1],
                "buffer": [[e, g, _encode_rows(sorted(rows))] for (e, g), rows in sorted(groups.items())]}

    # ---------------------------------------------------------------- consumer side

    def _take_chunk(self) -> bool:
        """Move the next chunk from the queue into the buffer; False at the end of the data."""
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the PackedLoader reader thread stopped (was close() called?)") from None
        if isinstance(item, BaseException):
            self.close()
            raise item
        if isinstance(item, _End):
            return False
        for row, doc in zip(item.rows, item.docs):
            self._docs[self._ordinal] = (item.epoch, item.row_group, row, doc)
            bisect.insort(self._by_len, (len(doc), self._ordinal))
            self._ordinal += 1
        if item.cursor is not None:
            self._cursor = item.cursor
        return True

    def _refill(self) -> None:
        while self._pending_restore:  # the saved buffer first, whatever its size
            self._take_chunk()
            self._pending_restore -= 1
        while len(self._docs) < self.buffer_docs and not self._exhausted:
            self._exhausted = not self._take_chunk()

    def _pop(self, index: int) -> np.ndarray:
        _, ordinal = self._by_len.pop(index)
        return self._docs.pop(ordinal)[3]

    def _fill_row(self, row: np.ndarray) -> bool:
        """Pack one row (T+1,) in place; False if the documents ran out first."""
        pos, capacity = 0, row.shape[0]
        while pos < capacity:
            self._refill()
            if not self._by_len:
                return False
            remaining = capacity - pos
            fit = bisect.bisect_right(self._by_len, (remaining, float("inf")))
            if fit > 0:  # the largest document that fits; among equal lengths the oldest
                length = self._by_len[fit - 1][0]
                doc = self._pop(bisect.bisect_left(self._by_len, (length, -1)))
            else:  # nothing fits: crop the shortest (the oldest among equals) to the space left
                doc = self._pop(0)[:remaining]
            row[pos:pos + len(doc)] = doc
            pos += len(doc)
        return True

    def __iter__(self) -> "PackedLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Next (inputs (B, T) int64, targets (B, T) int64, state after this batch)."""
        if self._finished:
            raise StopIteration
        B, T = self.batch_size, self.seq_len
        rows = np.empty((B, T + 1), dtype=np.int64)
        for r in range(B):
            if not self._fill_row(rows[r]):
                self._finished = True
                self.close()
                raise StopIteration
        use_cuda = self.device.type == "cuda"
        # Pinned staging + non_blocking copy overlaps the transfer with compute; a fresh pinned
        # tensor per batch comes from torch's caching host allocator, which is safe to reuse.
        # The shifted copies go through numpy: torch's strided copy_ drops and re-takes the GIL,
        # which costs milliseconds per batch while the reader thread is busy.
        staging = torch.empty((2, B, T), dtype=torch.long, pin_memory=use_cuda)
        view = staging.numpy()
        view[0] = rows[:, :-1]
        view[1] = rows[:, 1:]
        out = staging.to(self.device, non_blocking=use_cuda)
        return out[0], out[1], self.state()

    def close(self) -> None:
        """Stop the reader thread. Safe to call more than once."""
        self._reader.stop.set()
        try:
            while True:  # unblock a producer waiting on a full queue
                self._queue.get_nowait()
        except queue.Empty:
            pass
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)

    def __enter__(self) -> "PackedLoader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if hasattr(self, "_thread"):
            self.close()


# ------------------------------------------------------------------------------------------------
# Conversations (mid-training, SFT): whole conversations, loss masks, padding
# ------------------------------------------------------------------------------------------------

class ConversationLoader:
    """Iterator over `(inputs, targets, state)` of rendered conversations, (B, T) int64 on `device`.

    Unlike pretraining documents, a conversation is never split across rows: each row of T+1 tokens
    is filled best-fit (largest buffered conversation that fits the space left) and the rest is
    padding. Targets are -1 wherever the conversation's mask is 0 (user turns, tool output, the BOS
    of the next conversation) and on padding, so only the assistant's own tokens are trained.
    Conversations longer than T+1 are cut. Rows stay BOS-aligned.

    `conversations` is a sequence of conversation dicts (a `nanofast.tasks.Task` is one); rank r of
    w takes positions r, r+w, ... of a per-epoch shuffle (seeded), so ranks see disjoint data. The
    state with each batch is JSON-able (epoch, cursor, buffered positions): passing it back as
    `state=` continues exactly after that batch. `loop=False` stops after one epoch.
    """

    def __init__(self, tokenizer: Any, conversations: Any, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1, device: str | torch.device = "cpu", seed: int = 0, buffer_size: int = 64,
                 state: dict | None = None, loop: bool = True):
        if batch_size < 1 or seq_len < 1 or buffer_size < 1:
            raise ValueError(f"batch_size, seq_len and buffer_size must be >= 1, got {batch_size}, {seq_len}, "
                             f"{buffer_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if len(conversations) < world_size:
            raise ValueError(f"{len(conversations)} conversations cannot feed {world_size} ranks")
        self.tokenizer, self.conversations = tokenizer, conversations
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.device, self.seed, self.buffer_size, self.loop = torch.device(device), seed, buffer_size, loop
        state = state or {"epoch": 0, "cursor": 0, "buffer": []}
        if not isinstance(state, dict) or set(state) != {"epoch", "cursor", "buffer"}:
            raise ValueError("state must be the dict a ConversationLoader returned with a batch")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._epoch_order(self.epoch)
        # buffer entries: (epoch, position in that epoch's order) -> rendered (ids, mask)
        self.buffer: list[tuple[int, int, list[int], list[int]]] = []
        for epoch, pos in state["buffer"]:
            self.buffer.append((epoch, pos, *self._render(self._epoch_order(epoch)[pos])))
        self.exhausted = False

    def _epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.conversations), generator=g).tolist()
        return order[self.rank::self.world_size]

    def _render(self, index: int) -> tuple[list[int], list[int]]:
        return self.tokenizer.render_conversation(self.conversations[index], max_tokens=self.seq_len + 1)

    def _refill(self) -> None:
        while len(self.buffer) < self.buffer_size and not self.exhausted:
            if self.cursor == len(self._order):
                if not self.loop:
                    self.exhausted = True
                    break
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            self.buffer.append((self.epoch, self.cursor, *self._render(self._order[self.cursor])))
            self.cursor += 1

    def _row(self) -> tuple[list[int], list[int]] | None:
        ids: list[int] = []
        mask: list[int] = []
        space = self.seq_len + 1
        while True:
            self._refill()
            fits = [i for i, b in enumerate(self.buffer) if len(b[2]) <= space]
            if not fits:
                break
            best = max(fits, key=lambda i: (len(self.buffer[i][2]), -i))  # largest, oldest first
            _, _, conv_ids, conv_mask = self.buffer.pop(best)
            ids += conv_ids
            mask += conv_mask
            space -= len(conv_ids)
        if not ids:
            return None
        pad = self.seq_len + 1 - len(ids)
        return ids + [self.tokenizer.bos_token_id] * pad, mask + [0] * pad

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "buffer": [[e, p] for e, p, _, _ in self.buffer]}

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, dict]:
        rows = []
        for _ in range(self.batch_size):
            row = self._row()
            if row is None:
                raise StopIteration  # loop=False and the epoch is used up (a partial batch is dropped)
            rows.append(row)
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
        mask = torch.tensor([r[1] for r in rows], dtype=torch.bool)
        targets = torch.where(mask[:, 1:], ids[:, 1:], -1)
        return ids[:, :-1].to(self.device), targets.to(self.device), self.state()

    # context-manager symmetry with PackedLoader, so stages can treat both alike
    def __enter__(self) -> "ConversationLoader":
        return self

    def __exit__(self, *exc) -> None:
        return None
