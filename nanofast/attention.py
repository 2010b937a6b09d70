"""Attention of one inference-engine step over the paged KV cache: the new tokens' K and V are
written into their cache slots, then decoding sequences attend in one batched paged-decode call
and chunked ones (prefill, recompute, tool output) per sequence against their gathered pages.
The kernels behind each call are picked in `nanofast.ops`."""
from __future__ import annotations

import math

import torch

from nanofast import ops
from nanofast.kv_cache import PagedBatch


def paged_step_attention(batch: PagedBatch, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         window: int) -> torch.Tensor:
    """q (1, N, Hq, D), k, v (1, N, Hkv, D) of this step's N tokens, in the compute dtype (any
    strides with D contiguous, e.g. views of a packed (N, (Hq + 2 Hkv) D) qkv buffer) -> (1, N, Hq, D),
    rows in `batch`'s order (the decoding sequences' tokens first).
    K and V are written first, so each token also attends to itself and to the earlier tokens of
    its own chunk; `window` is the layer's left window (tokens), as in training."""
    k_cache, v_cache = batch.cache.k[layer], batch.cache.v[layer]
    ops.paged_kv_write(k[0], v[0], k_cache, v_cache, batch.slot_mapping)
    nd = batch.num_decode
    parts = []
    if nd:
        parts.append(ops.paged_decode_attention(q[0, :nd], k_cache, v_cache, batch.block_table[:nd],
                                                batch.seq_lens[:nd], window, host_seq_lens=batch.context_lens[:nd]))
    for row, start, n in batch.chunks:
        ctx = batch.context_lens[row]
        pages = batch.block_table[row, :math.ceil(ctx / batch.cache.page_size)].long()
        parts.append(ops.paged_prefill_attention(q[0, start:start + n], k_cache, v_cache, pages, ctx, window))
    return (parts[0] if len(parts) == 1 else torch.cat(parts))[None]
