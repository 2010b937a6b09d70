"""Attention of one inference-engine step over the paged KV cache, all of it here.

A step's new tokens' K and V are written into their cache slots (`paged_kv_write`), then the
decoding sequences attend in one batched paged-decode call (`paged_decode_attention`) and all
chunked ones (prefill, recompute, tool output) in one batched prefill call against their pages
(`paged_prefill_attention_batched`); `paged_step_attention` runs the three for one layer. Where
QK-norm+rotary runs on a kernel backend, `packed_step` computes a layer's q, k, v with one GEMM into
a packed buffer, normalises and rotates it in place (`qk_norm_rope_packed_`) and attends.

Each call has a plain-torch path (the CPU's) beside the kernels of `nanofast.kernels`; which one runs
is `nanofast.ops.op_backend`'s answer for the op ("paged_attention", "qk_norm_rope"), as for the
training ops. The prefill's index tensors are built from the step's host lists once per step (by
the first layer, kept in `PagedBatch.prefill_plan`) and reused by the other layers. Inference only:
no autograd. Layouts follow flash-attn: (tokens, heads, head_dim), caches (num_pages, page_size,
Hkv, D).
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from nanofast import kernels, ops
from nanofast.kernels import registry, vendor
from nanofast.kv_cache import PagedBatch

# The torch paths' stand-in for "no window" (flash-attn's -1): larger than any position, so the
# window term of a mask never excludes a key.
_NO_WINDOW = 1 << 62


def _mask_window(window: int) -> int:
    """`window` validated by flash-attn's rule (vendor.left_window: an int >= -1, -1 unlimited), as
    the left reach the torch paths' masks use."""
    w = vendor.left_window(window)
    return _NO_WINDOW if w is None else w


# ---- one layer of one engine step -------------------------------------------------------------
def paged_step_attention(batch: PagedBatch, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         window: int) -> torch.Tensor:
    """q (1, N, Hq, D), k, v (1, N, Hkv, D) of this step's N tokens, in the compute dtype (any
    strides with D contiguous, e.g. views of a packed (N, (Hq + 2 Hkv) D) qkv buffer) -> (1, N, Hq, D),
    rows in `batch`'s order (the decoding sequences' tokens first, then the chunks back to back).
    K and V are written first, so each token also attends to itself and to the earlier tokens of
    its own chunk; `window` is the layer's left window (tokens), as in training."""
    k_cache, v_cache = batch.cache.k[layer], batch.cache.v[layer]
    paged_kv_write(k[0], v[0], k_cache, v_cache, batch.slot_mapping)
    nd = batch.num_decode
    parts = []
    if nd:
        # the general step plans from its host lengths; the static step has a fixed plan (none on torch)
        host = None if batch.context_lens is None else batch.context_lens[:nd]
        splits = None if batch.decode_splits is None else batch.decode_splits[window]
        parts.append(paged_decode_attention(q[0, :nd], k_cache, v_cache, batch.block_table[:nd],
                                            batch.seq_lens[:nd], window, host_seq_lens=host, num_splits=splits))
    if batch.chunks:  # chunks follow the decode rows, back to back: one call for all of them
        parts.append(paged_prefill_attention_batched(q[0, nd:], k_cache, v_cache, batch.block_table,
                                                     [(row, start - nd, n) for row, start, n in batch.chunks],
                                                     batch.context_lens, window, batch.prefill_plan))
    return (parts[0] if len(parts) == 1 else torch.cat(parts))[None]


def takes_packed_path(batch: PagedBatch, x: torch.Tensor) -> bool:
    """Whether a layer of the engine's step runs `packed_step`: the batch carries its rotary cache,
    no autograd, and QK-norm+rotary runs on a kernel backend (whose in-place kernel the packed path
    is; the torch path computes q, k, v apart, as in training)."""
    return (batch.cos_sin_cache is not None and not torch.is_grad_enabled()
            and ops.op_backend("qk_norm_rope", x) != "torch")


def packed_step(attn: torch.nn.Module, x: torch.Tensor, ve: torch.Tensor | None, window: int, batch: PagedBatch,
                qk_scale: float, gate_channels: int) -> torch.Tensor:
    """A `nanofast.model.CausalSelfAttention` layer's engine step when QK-norm+rotary runs on a
    kernel backend: one GEMM into a packed qkv buffer (N, (Hq + 2 Hkv) D), the value embedding added
    into its v heads in place, then kernels.qk_norm_rope_inplace normalises, rotates (at each token's
    own position, from batch.cos_sin_cache) and scales the q and k heads in place, and the q, k, v
    views go to the paged attention. The same maths as the layer's `forward` (separate c_q/c_k/c_v
    + ops.qk_norm_rope, which on a kernel backend also normalises before rotating); only the GEMM's
    blocking may differ (one N = (Hq + 2 Hkv) D GEMM instead of three). qk_scale and gate_channels
    are the model's QK-norm scale and the channels its value-embedding gate reads.
    x: (1, N, n_embd) -> (1, N, n_embd), after the layer's c_proj."""
    _, N, _ = x.shape
    Hq, Hkv, D = attn.n_head, attn.n_kv_head, attn.head_dim
    precisions = {m.active_precision for m in (attn.c_q, attn.c_k, attn.c_v)}
    if len(precisions) == 1:
        precision = precisions.pop()
        w = attn.packed_qkv_weight(x.dtype if precision is None else attn.c_q.weight.dtype)
        qkv = ops.linear(x[0], w, precision, attn.c_q.recipe)
    else:  # per-layer precisions differ: three GEMMs, packed afterwards
        qkv = torch.cat([attn.c_q(x[0]), attn.c_k(x[0]), attn.c_v(x[0])], dim=-1)
    q = qkv[:, :Hq * D].view(N, Hq, D)
    k = qkv[:, Hq * D:(Hq + Hkv) * D].view(N, Hkv, D)
    v = qkv[:, (Hq + Hkv) * D:].view(N, Hkv, D)
    if ve is not None:
        gate = 3 * torch.sigmoid(attn.ve_gate(x[0, :, :gate_channels]))
        v.add_(gate.unsqueeze(-1) * ve[0].view(N, Hkv, D))
    qk_norm_rope_packed_(qkv, batch.positions, batch.cos_sin_cache, Hq, Hkv, scale=qk_scale)
    y = paged_step_attention(batch, attn.layer, q[None], k[None], v[None], window)
    return attn.c_proj(y.reshape(1, N, -1))


def qk_norm_rope_packed_(qkv: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, n_head: int,
                         n_kv_head: int, scale: float = 1.0) -> None:
    """ops.qk_norm_rope of the inference engine, in place on a packed qkv buffer, on a kernel backend.

    qkv: (N, (Hq + 2 Hkv) D) in the compute dtype, each row [q heads | k heads | v heads] of one
    token, last dim contiguous; positions: (N,) int64, each token's position in its sequence;
    cos_sin_cache: (max_position, D) with [cos | sin] halves per position (the model's rotary
    tables side by side). The q and k heads become rotary(rms_norm(x)) * scale at their own
    positions, as `ops.qk_norm_rope` computes them on a kernel backend (normalise first, then
    rotate); v is untouched. One launch of kernels.qk_norm_rope_inplace on the backend op_backend
    picks for "qk_norm_rope"; callers use it only when that backend is a kernel (no autograd: inference).
    """
    backend = ops.op_backend("qk_norm_rope", qkv)
    kernels.qk_norm_rope_inplace(qkv, positions, cos_sin_cache, n_head, n_kv_head, scale=scale, backend=backend)


# ---- the cache write and the paged decode --------------------------------------------------------
def paged_kv_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Write N new keys/values (N, Hkv, D) into their cache slots (page * page_size + offset), in place."""
    kernels.paged_kv_write(k, v, k_cache, v_cache, slot_mapping, backend=ops.op_backend("paged_attention", k))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                           seq_lens: torch.Tensor, window: int, host_seq_lens: list[int] | None = None,
                           num_splits: int | None = None) -> torch.Tensor:
    """One query token per sequence, q (B, Hq, D), against its pages; see kernels.paged_decode_attention.
    host_seq_lens: seq_lens as host ints (the engine knows them): the kernels plan their splits from
    these instead of reading seq_lens back, a host sync per call and layer on a GPU. num_splits
    instead: one fixed split count for every sequence (the static decode step's plan, which a
    captured graph can replay). Both are ignored on the torch path.

    The torch path (CPU) is the op's vendor path (nanofast.kernels.registry): the block table's
    pages gathered and one fused SDPA with a length and window mask, faster than the kernels'
    reference (einsums + softmax, argument validation), which stays the readable definition the
    kernels are tested against. Every block-table entry must be a valid page id (the engine pads
    rows with page 0): all of them are gathered.
    """
    backend = ops.op_backend("paged_attention", q)
    if backend != "torch":
        return kernels.paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, window=window,
                                              host_seq_lens=host_seq_lens, num_splits=num_splits, backend=backend)
    vendor.left_window(window)  # flash-attn's rule: an int >= -1
    return registry.op("paged_attention").vendor_path(q, k_cache, v_cache, block_table, seq_lens, None, window)


# ---- the chunks' prefill ------------------------------------------------------------------------
def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pages: torch.Tensor,
                            context_len: int, window: int) -> torch.Tensor:
    """A chunk of n queries (n, Hq, D) at positions context_len - n .. context_len - 1 of one
    sequence, attending causally (left window `window`) to its first context_len cached positions.

    pages: (ceil(context_len / page_size),) int64 page ids. The pages are gathered into a dense
    (context_len, Hkv, D) view for SDPA: a prefill chunk does O(n * context) work per byte gathered,
    so the gather is a small share, and prompts run in chunks of at most the engine's token budget.
    """
    n, window = q.size(0), _mask_window(window)
    k = kernels.gather_pages(k_cache, pages).flatten(0, 1)[:context_len]
    v = kernels.gather_pages(v_cache, pages).flatten(0, 1)[:context_len]
    qi = torch.arange(context_len - n, context_len, device=q.device)[:, None]
    kj = torch.arange(context_len, device=q.device)[None, :]
    mask = (kj <= qi) & (kj >= qi - window)
    y = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       attn_mask=mask, enable_gqa=q.size(1) != k.size(1))
    return y[0].transpose(0, 1)


def paged_prefill_attention_per_chunk(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                      block_table: torch.Tensor, chunks: list[tuple[int, int, int]],
                                      context_lens: list[int], window: int) -> torch.Tensor:
    """paged_prefill_attention_batched's arguments and result, one paged_prefill_attention call per
    chunk: the plain path the batched call is checked and timed against."""
    page = k_cache.size(1)
    return torch.cat([paged_prefill_attention(q[s:s + n], k_cache, v_cache,
                                              block_table[r, :-(-context_lens[r] // page)].long(), context_lens[r],
                                              window) for r, s, n in chunks])


def paged_prefill_attention_batched(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                    block_table: torch.Tensor, chunks: list[tuple[int, int, int]],
                                    context_lens: list[int], window: int, plan: dict | None = None) -> torch.Tensor:
    """Every chunk of an engine step (prefill, recompute, tool output) against its pages, batched.

    q: (M, Hq, D), the chunks' queries back to back in `chunks` order (M = sum of their lengths);
    k_cache, v_cache: (num_pages, page_size, Hkv, D) with the chunks' own K/V already written;
    block_table: (S, max_pages) int32 page ids per sequence row (entries past a row's used pages
    must be valid page ids: they are gathered, then masked); chunks: (sequence row, first row in
    q, tokens n) per chunk; context_lens: host ints per sequence row, the length after this step.
    Chunk c's queries sit at positions ctx - n .. ctx - 1 of its sequence and attend causally with
    left window `window` to positions 0 .. ctx - 1. Returns (M, Hq, D) in q's dtype, rows as q's.

    fp16/bf16 CUDA tensors with flash-attn importable: one flash_attn_varlen_func call (keys
    gathered per sequence and packed, cu_seqlens, causal bottom-right aligned, window_size=(window,
    0)), which does no padded work. Otherwise batched SDPA: chunks of similar shape go into one call
    (`prefill_groups`: padding adds at most a quarter to a call's query x key work), its pages
    gathered into (S', L, Hkv, D) (L its longest context rounded up to pages), queries padded to its
    longest chunk and one causal + window + length mask. Each chunk gets what paged_prefill_attention
    gives it alone up to rounding (masked keys and padded rows add nothing to the kept rows, but
    SDPA's CPU kernel may round differently with the longer key range: fp32 agrees to ~1e-7).
    plan: a dict the caller keeps for one step (empty at first): the index tensors built from the
    host lists are stored there by the first layer's call and reused by the others.
    """
    if plan is None:
        plan = {}
    if not chunks:
        raise ValueError("chunks must list at least one (sequence row, first row in q, tokens) chunk")
    lens = [n for _, _, n in chunks]
    ctxs = [context_lens[r] for r, _, _ in chunks]
    if q.dim() != 3 or q.size(0) != sum(lens):
        raise ValueError(f"q must be (M, Hq, D) with M = {sum(lens)} (the chunks' tokens), got {tuple(q.shape)}")
    if any(not 1 <= n <= c for n, c in zip(lens, ctxs)):
        raise ValueError(f"each chunk needs 1 <= tokens <= its context length, got tokens {lens}, contexts {ctxs}")
    dev = q.device
    P = k_cache.size(1)
    mask_window = _mask_window(window)
    fa = vendor.flash_attn_module(q)
    if fa is not None:
        if "slots" not in plan:
            # Each chunk's context keys, one sequence after another (flash-attn's varlen layout).
            pos = [torch.arange(c, device=dev) for c in ctxs]
            plan["slots"] = torch.cat([block_table[r].long()[p // P] * P + p % P for (r, _, _), p in zip(chunks, pos)])
            plan["cu"] = torch.tensor([[0, *itertools.accumulate(lens)], [0, *itertools.accumulate(ctxs)]],
                                      dtype=torch.int32, device=dev)
        k = k_cache.flatten(0, 1)[plan["slots"]]
        v = v_cache.flatten(0, 1)[plan["slots"]]
        return vendor.flash_attn_varlen_func(q, k, v, plan["cu"][0], plan["cu"][1], max(lens), max(ctxs), causal=True,
                                             window_size=(int(window), 0), module=fa)
    if "groups" not in plan:  # host lists -> index tensors once per step, not once per layer
        groups = [sorted(g) for g in prefill_groups(lens, [-(-c // P) * P for c in ctxs])]  # chunk order within
        plan["groups"] = [_padded_prefill_plan([chunks[i] for i in g], [ctxs[i] for i in g], block_table, P)
                          for g in groups]
        # rows of q in the order the groups return them (one group returns them in q's order)
        plan["rows"] = None if len(groups) == 1 else torch.cat([
            torch.arange(chunks[i][1], chunks[i][1] + chunks[i][2]) for g in groups for i in g]).to(dev)
    outs = []
    for g in plan["groups"]:
        qp = q[g["q_index"]]  # (S', n_max, Hq, D)
        k = kernels.gather_pages(k_cache, g["pages"]).flatten(1, 2)  # (S', L, Hkv, D)
        v = kernels.gather_pages(v_cache, g["pages"]).flatten(1, 2)
        mask = g["masks"].get(window)
        if mask is None:  # once per window per step: the layers share a few windows
            kj = torch.arange(k.size(1), device=dev)[None, None, :]
            mask = g["masks"][window] = (kj <= g["q_pos"]) & (kj >= g["q_pos"] - mask_window)  # and the length mask
        y = F.scaled_dot_product_attention(qp.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask[:, None], enable_gqa=q.size(1) != k.size(2))
        outs.append(y.transpose(1, 2)[g["keep"]])  # (rows of the group, Hq, D), chunk rows in order
    if plan["rows"] is None:
        return outs[0]
    return torch.empty_like(q).index_copy_(0, plan["rows"], torch.cat(outs))


def prefill_groups(lens: list[int], keys: list[int], max_padding: float = 1.25) -> list[list[int]]:
    """Chunk indices grouped for padded batched attention: chunk i has lens[i] queries over keys[i]
    keys; a group is padded to its most queries x most keys, and a chunk joins a group only while
    that padded area stays within `max_padding` x the group's real area. Padding costs FLOPs (each
    padded row and key is computed, then discarded) while a call costs a fixed overhead, so like
    shapes share a call and a 3-token tool output does not ride in a 2,000-token prompt's call.
    Groups of the chunks sorted by queries then keys, largest first; every index once."""
    order = sorted(range(len(lens)), key=lambda i: (lens[i], keys[i]), reverse=True)
    groups: list[list[int]] = []
    n_max = k_max = real = 0
    for i in order:
        if groups:
            k_new = max(k_max, keys[i])
            if (len(groups[-1]) + 1) * n_max * k_new <= max_padding * (real + lens[i] * keys[i]):
                groups[-1].append(i)
                k_max, real = k_new, real + lens[i] * keys[i]
                continue
        groups.append([i])
        n_max, k_max, real = lens[i], keys[i], lens[i] * keys[i]
    return groups


def _padded_prefill_plan(chunks: list[tuple[int, int, int]], ctxs: list[int], block_table: torch.Tensor,
                         page_size: int) -> dict:
    """Index tensors of one padded SDPA call over `chunks` (see paged_prefill_attention_batched)."""
    dev = block_table.device
    S, n_max, pages = len(chunks), max(n for _, _, n in chunks), -(-max(ctxs) // page_size)
    host = torch.tensor([[r, s, n, c] for (r, s, n), c in zip(chunks, ctxs)]).to(dev)
    rows, start, n, ctx = (host[:, i:i + 1] for i in range(4))
    j = torch.arange(n_max, device=dev)[None, :]
    jj = torch.minimum(j, n - 1)  # padded query rows repeat the chunk's last query (never all-masked)
    return {"q_index": start + jj,  # (S, n_max) rows of q
            "q_pos": (ctx - n + jj)[:, :, None],  # (S, n_max, 1) positions of those queries
            "keep": (j < n).expand(S, n_max),  # the real (unpadded) query rows
            "pages": block_table[rows[:, 0], :pages].long(),  # (S, pages)
            "masks": {}}  # window -> (S, n_max, pages * page_size) bool mask, filled by the first layer using it
