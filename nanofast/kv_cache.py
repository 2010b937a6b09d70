"""The paged KV cache: a preallocated pool of pages, the block manager that hands them out, and
`PagedBatch`, the view of one engine step the model's attention runs against. Data only: the
attention over it is `nanofast.attention`'s.

Pages are ref-counted, so sequences that share a prompt prefix share its pages. A page whose KV is
complete (all `page_size` positions computed) is registered in the prefix cache under a hash chain
(blake2b of the parent page's key and the page's tokens); when its last user releases it, it stays
cached (evictable, least recently released first) until the pool needs it. Lookups verify the
cached page's tokens and parent page, so a hash collision can never hand out another text's KV.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch


def page_key(parent_key: bytes, tokens: tuple[int, ...]) -> bytes:
    """Prefix-cache key of a full page: its parent's key chained with its tokens."""
    h = hashlib.blake2b(parent_key, digest_size=16)
    h.update(b"".join(t.to_bytes(4, "little", signed=True) for t in tokens))
    return h.digest()


@dataclass
class _CachedPage:
    key: bytes
    tokens: tuple[int, ...]
    parent: int  # page id of the previous page of the prefix, -1 for the first


class BlockManager:
    """Bookkeeping for `num_pages` pages of `page_size` token slots (no tensors).

    Invariant: every page is in exactly one of: in use (ref > 0), evictable (ref == 0, cached),
    free (ref == 0, not cached). `available` = free + evictable pages.
    """

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages and page_size must be >= 1, got {num_pages}, {page_size}")
        self.num_pages, self.page_size = num_pages, page_size
        self.ref = [0] * num_pages
        self.free: deque[int] = deque(range(num_pages))
        self.evictable: OrderedDict[int, None] = OrderedDict()  # LRU order: oldest release first
        self.by_key: dict[bytes, int] = {}
        self.cached: dict[int, _CachedPage] = {}
        self.hits = self.lookups = 0  # prefix-cache statistics, in pages

    @property
    def available(self) -> int:
        return len(self.free) + len(self.evictable)

    @property
    def in_use(self) -> int:
        return self.num_pages - self.available

    def allocate(self) -> int | None:
        """A fresh page (ref 1), evicting the least recently released cached page if none is free;
        None when every page is in use."""
        if self.free:
            page = self.free.popleft()
        elif self.evictable:
            page, _ = self.evictable.popitem(last=False)
            del self.by_key[self.cached.pop(page).key]
        else:
            return None
        self.ref[page] = 1
        return page

    def release(self, page: int) -> None:
        if self.ref[page] <= 0:
            raise RuntimeError(f"page {page} released more often than it was taken")
        self.ref[page] -= 1
        if self.ref[page] == 0:
            if page in self.cached:
                self.evictable[page] = None
            else:
                self.free.append(page)

    def match_prefix(self, tokens: list[int], max_pages: int) -> list[int]:
        """Take (ref + 1) the cached pages holding the longest prefix of `tokens`, at most
        `max_pages` full pages. Each page is verified against the tokens and its parent."""
        pages: list[int] = []
        key, parent = b"", -1
        for i in range(max_pages):
            chunk = tuple(tokens[i * self.page_size:(i + 1) * self.page_size])
            self.lookups += 1
            key = page_key(key, chunk)
            page = self.by_key.get(key)
            entry = self.cached.get(page) if page is not None else None
            if entry is None or entry.tokens != chunk or entry.parent != parent:
                break
            self.hits += 1
            if self.ref[page] == 0:
                del self.evictable[page]
            self.ref[page] += 1
            pages.append(page)
            parent = page
        return pages

    def register(self, pages: list[int], tokens: list[int], start: int, end: int) -> None:
        """Enter pages[start:end] (full, computed) into the prefix cache; pages[:start] already are."""
        key = self.cached[pages[start - 1]].key if start > 0 and pages[start - 1] in self.cached else b""
        if start > 0 and not key:
            return  # the chain is broken (the parent was registered under another page): skip
        for i in range(start, end):
            page, chunk = pages[i], tuple(tokens[i * self.page_size:(i + 1) * self.page_size])
            key = page_key(key, chunk)
            if page in self.cached:
                continue  # shared from the cache already
            if key in self.by_key:
                return  # the same prefix lives in another page; later pages chain from that one
            self.by_key[key] = page
            self.cached[page] = _CachedPage(key, chunk, pages[i - 1] if i > 0 else -1)


class KVCache:
    """Per-layer K and V page pools: (num_layers, num_pages, page_size, Hkv, D) in one tensor each."""

    def __init__(self, num_layers: int, num_pages: int, page_size: int, n_kv_head: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_layers, num_pages, page_size, n_kv_head, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.page_size = page_size

    @classmethod
    def of(cls, k: torch.Tensor, v: torch.Tensor) -> KVCache:
        """A KVCache over existing (num_layers, num_pages, page_size, Hkv, D) pools (no copy)."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.page_size = k, v, k.shape[2]
        return cache

    @staticmethod
    def bytes_per_page(num_layers: int, page_size: int, n_kv_head: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * page_size * n_kv_head * head_dim * torch.finfo(dtype).bits // 8


@dataclass
class PagedBatch:
    """One engine step for the model: N new tokens of S sequences, flattened into idx (1, N).

    The first `num_decode` sequences contribute one token each (rows 0 .. num_decode - 1, run by
    the paged decode kernel in one batch); the others contribute chunks (prefill, recompute after
    preemption, tool output), rows back to back after the decode rows, run together in one
    batched prefill call against their pages (`nanofast.attention.paged_step_attention`).
    """
    cache: KVCache
    positions: torch.Tensor     # (N,) int64 position of each token in its sequence
    prev_tokens: torch.Tensor   # (N,) int64 token before each (any id where position == 0)
    has_prev: torch.Tensor      # (N,) bool: position > 0 (smear applies)
    slot_mapping: torch.Tensor  # (N,) int64 cache slot of each token: page * page_size + offset
    block_table: torch.Tensor   # (S, max_pages) int32, rows in the order of the sequences
    seq_lens: torch.Tensor      # (S,) int32 context length after this step
    logits_rows: torch.Tensor | None  # (S,) int64 flat row of each sequence's last token; None: every row
    num_decode: int
    chunks: list[tuple[int, int, int]]  # per chunked sequence: (sequence row, first flat row, tokens)
    context_lens: list[int] | None  # seq_lens on the host; None in the static decode step (nothing on the host)
    # (max_position, D) [cos | sin] rotary tables in the compute dtype (GPT.cos_sin_cache): read by
    # the packed-qkv attention path (kernels.qk_norm_rope_inplace at `positions`); None without it.
    cos_sin_cache: torch.Tensor | None = None
    # index tensors of the batched prefill (attention.paged_prefill_attention_batched's `plan`), built
    # by the first layer and reused by the others
    prefill_plan: dict = field(default_factory=dict)
    # The static decode step's split plan (`nanofast.decode_graph`): layer window -> splits for every
    # sequence (paged_decode_attention's uniform num_splits), fixed per captured bucket so that no
    # layer plans from lengths on the host. None: the kernels plan from context_lens.
    decode_splits: dict[int, int] | None = None
