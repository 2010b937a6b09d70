"""Attention of one inference-engine step over the paged KV cache: the new tokens' K and V are
written into their cache slots, then decoding sequences attend in one batched paged-decode call
and all chunked ones (prefill, recompute, tool output) in one batched prefill call against their
pages. The kernels behind each call are picked in `nanofast.ops`."""
from __future__ import annotations

import torch

from nanofast import ops
from nanofast.kv_cache import PagedBatch


def paged_step_attention(batch: PagedBatch, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         window: int) -> torch.Tensor:
    """q (1, N, Hq, D), k, v (1, N, Hkv, D) of this step's N tokens, in the compute dtype (any
    strides with D contiguous, e.g. views of a packed (N, (Hq + 2 Hkv) D) qkv buffer) -> (1, N, Hq, D),
    rows in `batch`'s order (the decoding sequences' tokens first, then the chunks back to back).
    K and V are written first, so each token also attends to itself and to the earlier tokens of
    its own chunk; `window` is the layer's left window (tokens), as in training."""
    k_cache, v_cache = batch.cache.k[layer], batch.cache.v[layer]
    ops.paged_kv_write(k[0], v[0], k_cache, v_cache, batch.slot_mapping)
    nd = batch.num_decode
    parts = []
    if nd:
        parts.append(ops.paged_decode_attention(q[0, :nd], k_cache, v_cache, batch.block_table[:nd],
                                                batch.seq_lens[:nd], window, host_seq_lens=batch.context_lens[:nd]))
    if batch.chunks:  # chunks follow the decode rows, back to back: one call for all of them
        parts.append(ops.paged_prefill_attention_batched(q[0, nd:], k_cache, v_cache, batch.block_table,
                                                         [(row, start - nd, n) for row, start, n in batch.chunks],
                                                         batch.context_lens, window, batch.prefill_plan))
    return (parts[0] if len(parts) == 1 else torch.cat(parts))[None]
