"""Paged KV-cache decode attention (one new query token per sequence) and the paged KV write.

The KV cache is a pool of fixed-size pages shared by all sequences (vLLM / FlashInfer "NHD"):

    k_cache, v_cache : (num_pages, page_size, Hkv, D)
    block_table      : (B, max_pages) int32, block_table[b, i] = page holding positions
                       i*page_size .. (i+1)*page_size - 1 of sequence b
    seq_lens         : (B,) int32, L_b = tokens of sequence b INCLUDING the current one (its k/v
                       were already written with `paged_kv_write`)

Position j of sequence b lives at k_cache[block_table[b, j // page_size], j % page_size]. Entries of
a block_table row past the sequence's ceil(L_b / page_size) used pages are never read (they may hold
garbage), and neither are slots past L_b in the last page.

Maths, per sequence b and query head h (kv head h // (Hq / Hkv), GQA):

    keys    j in [lo, L-1], lo = 0 (window=None) or max(0, L-1-window)   (flash-attn window_size=(w, 0))
    out[h]  = sum_j softmax_j(scale * q[h] . k[j]) v[j]                   (fp32 accumulation)

Why this kernel shape. Decode attention reads the whole KV cache of every sequence per generated
token and does 2 flops per byte: it is bound by memory bandwidth, so the design is about reading
each K/V byte exactly once and keeping enough bytes in flight:

* GQA head packing: one program owns one (sequence, kv head) and ALL Hq/Hkv query heads that share
  it, as the rows of a tile padded to a power of two >= 16 (tl.dot's minimum M on tensor cores),
  so each K/V page is read once per kv head, not once per query head.
* Split-KV (flash-decoding): with few sequences (B * Hkv programs << SM count) one program per
  (b, kv head) would leave most SMs idle while it walks a long context, so each sequence's key range
  is cut into `num_splits` contiguous chunks that run in parallel and write a partial output and
  log-sum-exp (fp32 scratch); a small second kernel merges them with LSE rescaling.
* Any page_size through one code path: keys are processed in tiles of BLOCK_N positions; each
  position gathers its own page id from the block table (a tile may span several small pages, or a
  fraction of one large page). The K/V rows are D contiguous elements, so loads stay 128-bit wide.
* Online softmax in the exp2 domain with log2(e) folded into the scale (exp2 is the native MUFU
  instruction; exp would add a multiply per score).

Layering, as the other kernel modules: Triton kernels -> launchers (`paged_decode_attention_triton`,
`paged_kv_write_triton`) -> functional API with `backend=` (`paged_decode_attention`,
`paged_kv_write`) -> plain-torch references beside them. Inference only: no autograd.

Host syncs: validation of *values* (seq_lens within the block table's capacity, used page ids
within the pool, slots within the cache) reads tensors back to the host, so it runs for CPU tensors
only. On CUDA the kernels instead clamp/mask so that bad values can never read or write outside
the tensors: seq_lens are clamped to max_pages * page_size, keys whose page id is outside
[0, num_pages) are skipped, slots outside the cache are skipped (the result is then wrong, but no
memory fault and no corruption of other tensors).
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .backend import resolve_backend
from .compile_gate import gate_signature
from .launch import TL_DTYPE as _TL_DTYPE, next_pow2 as _next_pow2, sm_count as _sm_count

try:  # triton is optional: backend="torch" (and "cuda") work without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on installs without triton
    triton = None
    tl = None

__all__ = ["paged_decode_attention", "paged_decode_attention_reference", "paged_decode_attention_triton",
           "paged_kv_write", "paged_kv_write_reference", "paged_kv_write_triton", "KERNEL_CONFIGS"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_SPLITS = 256  # the merge kernel holds (splits, D) fp32 partials of one head in registers
_MIN_DOT = 16  # tl.dot needs every tile dim >= 16 (mma.sync m16n8k16 fragments)


# ----------------------------------------------------------------------------------------------
# Validation (shared by the references, the launchers and the public functions)
# ----------------------------------------------------------------------------------------------

def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


def _check_tensor(name: str, x, ndim: int, doc: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {doc}, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {doc} ({ndim} dims), got shape {tuple(x.shape)}")


def _check_caches(k_cache, v_cache, dtype: torch.dtype, device: torch.device, ref: str) -> None:
    doc = "(num_pages, page_size, Hkv, D)"
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, c, 4, doc)
        if c.dtype != dtype:
            raise TypeError(f"{name} must have {ref}'s dtype {dtype}, got {c.dtype}")
        if c.device != device:
            raise ValueError(f"{name} is on {c.device} but {ref} is on {device}: all tensors must be on one device")
        if c.shape[-1] > 1 and c.stride(-1) != 1:
            # The cache is written in place and far too big to copy per call.
            raise ValueError(f"{name} must be contiguous in its last dim (stride 1), got strides {c.stride()}")
        if min(c.shape) < 1:
            raise ValueError(f"{name} must have shape {doc} with every dim >= 1, got {tuple(c.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)} {doc}, got {tuple(v_cache.shape)}")


def _check_decode(q, k_cache, v_cache, block_table, seq_lens, scale, window, num_splits=None) -> None:
    """Shapes, dtypes, devices and scalars of a decode call (values too, for CPU tensors)."""
    _check_tensor("q", q, 3, "(B, Hq, D)")
    if not q.is_floating_point():
        raise TypeError(f"q must be a floating tensor of shape (B, Hq, D), got dtype {q.dtype}")
    B, Hq, D = q.shape
    if Hq < 1 or D < 1:
        raise ValueError(f"q must have shape (B, Hq, D) with Hq >= 1 and D >= 1, got {tuple(q.shape)}")
    _check_caches(k_cache, v_cache, q.dtype, q.device, "q")
    num_pages, page_size, Hkv, Dk = k_cache.shape
    if Dk != D:
        raise ValueError(f"k_cache and v_cache must have q's head dim D={D} in (num_pages, page_size, Hkv, D), "
                         f"got D={Dk} (shape {tuple(k_cache.shape)})")
    if Hq % Hkv:
        raise ValueError(f"q's head count Hq={Hq} must be a multiple of the caches' kv head count Hkv={Hkv} (GQA)")
    _check_tensor("block_table", block_table, 2, f"(B, max_pages) = ({B}, max_pages)")
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table must be an int32 tensor of shape (B, max_pages), got dtype {block_table.dtype}")
    if block_table.shape[0] != B or block_table.shape[1] < 1:
        raise ValueError(f"block_table must have shape (B, max_pages) = ({B}, >= 1), got {tuple(block_table.shape)}")
    _check_tensor("seq_lens", seq_lens, 1, f"(B,) = ({B},)")
    if seq_lens.dtype != torch.int32:
        raise TypeError(f"seq_lens must be an int32 tensor of shape (B,), got dtype {seq_lens.dtype}")
    if seq_lens.shape[0] != B:
        raise ValueError(f"seq_lens must have shape (B,) = ({B},) (one length per query row), "
                         f"got {tuple(seq_lens.shape)}")
    for name, t in (("block_table", block_table), ("seq_lens", seq_lens)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: all tensors must be on one device")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not math.isfinite(scale) or not scale > 0):
        raise ValueError(f"scale must be None (1/sqrt(D)) or a finite real number > 0, got {scale!r}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, numbers.Integral):
            raise TypeError(f"window must be None or an int >= 0, got {type(window).__name__}")
        if window < 0:
            raise ValueError(f"window must be None (full causal) or an int >= 0, got {window}")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral)
                                   or not 1 <= num_splits <= MAX_SPLITS):
        raise ValueError(f"num_splits must be None (automatic) or an int in [1, {MAX_SPLITS}], got {num_splits!r}")
    # Value checks read the tensors back: free on CPU, a device sync per call on CUDA (skipped
    # there; the kernels clamp and mask instead, see the module docstring).
    if not q.is_cuda and B > 0:
        cap = block_table.shape[1] * page_size
        lo, hi = int(seq_lens.min()), int(seq_lens.max())
        if lo < 1 or hi > cap:
            raise ValueError(f"seq_lens must lie in [1, max_pages * page_size = {cap}], got values in [{lo}, {hi}]")
        used = torch.arange(block_table.shape[1]) < ((seq_lens.long() + page_size - 1) // page_size)[:, None]
        ids = block_table[used]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_pages):
            raise ValueError(f"block_table entries of used pages must be page ids in [0, num_pages = {num_pages}), "
                             f"got values in [{int(ids.min())}, {int(ids.max())}]")


def _check_write(k, v, k_cache, v_cache, slot_mapping) -> None:
    _check_tensor("k", k, 3, "(N, Hkv, D)")
    if not k.is_floating_point():
        raise TypeError(f"k must be a floating tensor of shape (N, Hkv, D), got dtype {k.dtype}")
    _check_tensor("v", v, 3, f"(N, Hkv, D) = {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape (N, Hkv, D) = {tuple(k.shape)}, got {tuple(v.shape)}")
    if v.dtype != k.dtype:
        raise TypeError(f"v must have k's dtype {k.dtype}, got {v.dtype}")
    if v.device != k.device:
        raise ValueError(f"v is on {v.device} but k is on {k.device}: all tensors must be on one device")
    _check_caches(k_cache, v_cache, k.dtype, k.device, "k")
    N, Hkv, D = k.shape
    if tuple(k_cache.shape[2:]) != (Hkv, D):
        raise ValueError(f"k_cache and v_cache must have shape (num_pages, page_size, Hkv, D) with (Hkv, D) = "
                         f"{(Hkv, D)} from k, got {tuple(k_cache.shape)}")
    _check_tensor("slot_mapping", slot_mapping, 1, f"(N,) = ({N},)")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"slot_mapping must be an int32 or int64 tensor of shape (N,), got dtype {slot_mapping.dtype}")
    if slot_mapping.shape[0] != N:
        raise ValueError(f"slot_mapping must have shape (N,) = ({N},) (one slot per token of k), "
                         f"got {tuple(slot_mapping.shape)}")
    if slot_mapping.device != k.device:
        raise ValueError(f"slot_mapping is on {slot_mapping.device} but k is on {k.device}: all tensors must be "
                         "on one device")
    if not k.is_cuda and N > 0:  # value check: host sync on CUDA, so CPU only (the kernel masks instead)
        slots = k_cache.shape[0] * k_cache.shape[1]
        hi = int(slot_mapping.max())
        if hi >= slots:
            raise ValueError(f"slot_mapping values must be < num_pages * page_size = {slots} (or < 0 to skip a "
                             f"token), got max {hi}")


def _check_kernel_dtype(x: Tensor, name: str) -> None:
    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32 for the kernel backends, got {x.dtype}")


# ----------------------------------------------------------------------------------------------
# Plain-torch references (the definitions the kernels are tested against)
# ----------------------------------------------------------------------------------------------

def paged_decode_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                                     seq_lens: Tensor, scale: float | None = None,
                                     window: int | None = None) -> Tensor:
    """Plain-torch paged decode attention: gathers every sequence's pages, masked softmax in fp32.

    Same arguments and result as `paged_decode_attention` (fp64 inputs compute in fp64). One batched
    gather of the whole block table (no host loop, no device sync), then positions outside
    [lo, L-1] are masked out of the scores AND the values: block-table entries past a sequence's
    used pages are replaced by page 0 before the gather, and unused slots may hold anything (NaN
    included), which must not leak through a zero softmax weight (0 * NaN = NaN).
    """
    _check_decode(q, k_cache, v_cache, block_table, seq_lens, scale, window)
    B, Hq, D = q.shape
    page_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    acc = torch.promote_types(q.dtype, torch.float32)
    lens = seq_lens.long()[:, None]  # (B, 1)
    used = torch.arange(block_table.shape[1], device=q.device)[None, :] < (lens + page_size - 1) // page_size
    pages = torch.where(used, block_table.long(), 0)
    pos = torch.arange(block_table.shape[1] * page_size, device=q.device)[None, :]
    valid = pos < lens
    if window is not None:
        valid &= pos >= lens - 1 - window
    k = k_cache[pages].flatten(1, 2).to(acc)  # (B, n, Hkv, D)
    v = v_cache[pages].flatten(1, 2).to(acc).masked_fill(~valid[:, :, None, None], 0)
    qg = q.to(acc).view(B, Hkv, Hq // Hkv, D)  # query head h uses kv head h // group
    s = torch.einsum("bhgd,bnhd->bhgn", qg, k) * scale
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    o = torch.einsum("bhgn,bnhd->bhgd", torch.softmax(s, dim=-1), v)
    return o.reshape(B, Hq, D).to(q.dtype)


def paged_kv_write_reference(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Plain-torch paged KV write: k_cache[slot // page_size, slot % page_size] = k[i] (and v) for
    every token i with slot_mapping[i] >= 0; tokens with a negative slot (padding) are skipped.
    Same arguments as `paged_kv_write`. Duplicate slots: which token lands is unspecified."""
    _check_write(k, v, k_cache, v_cache, slot_mapping)
    page_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    page, off = slots // page_size, slots % page_size
    k_cache[page, off] = k[keep]
    v_cache[page, off] = v[keep]


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if triton is not None:
    # log2(e), which the decode kernel folds into its softmax scale. A kernel reads a module global
    # only when it is a tl.constexpr.
    _LOG2E = tl.constexpr(1.4426950408889634)

    @triton.jit
    def _paged_decode_kernel(Q, K, V, BT, SL, O, OP, LSE,
                             stride_qb, stride_qh, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                             stride_btb, stride_ob, stride_oh, num_pages, capacity, window, num_splits, sm_scale,
                             GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
                             BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                             SPLIT: tl.constexpr):
        """Grid (B, Hkv, num_splits). Program (b, kvh, s) attends the GROUP query heads
        kvh*GROUP .. kvh*GROUP + GROUP-1 of sequence b over split s of its key range.

        Q: (B, Hq, D) row strides stride_qb/stride_qh, unit last stride. K/V: (pages, PAGE_SIZE, Hkv, D)
        with page/slot/head strides, unit last stride. BT: block table rows (stride_btb, unit column
        stride); SL: (B,) int32. SPLIT=False: normalised output to O (B, Hq, D) with strides
        stride_ob/stride_oh. SPLIT=True: partial output (normalised by its own softmax sum) to OP
        (B, Hq, num_splits, D) fp32 and its base-2 log-sum-exp (of scale*log2e*q.k) to LSE
        (B, Hq, num_splits) fp32, contiguous; an empty split writes 0 and -inf.
        window < 0 means no window.
        """
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        n_kv = tl.num_programs(1)
        # Clamp L to the block table's capacity: an oversized seq_len (unchecked on CUDA) then
        # cannot index past the block-table row.
        L = tl.minimum(tl.load(SL + b), capacity)
        lo = tl.where(window >= 0, tl.maximum(L - 1 - window, 0), 0)
        n_tiles = tl.cdiv(L - lo, BLOCK_N)
        per_split = tl.cdiv(n_tiles, num_splits)
        t_start = split * per_split
        t_end = tl.minimum(t_start + per_split, n_tiles)

        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        g_mask = g < GROUP
        d_mask = d < HEAD_DIM
        heads = kvh * GROUP + g
        # Padded rows (g >= GROUP) load q = 0: finite scores, results never stored.
        q = tl.load(Q + b.to(tl.int64) * stride_qb + heads[:, None].to(tl.int64) * stride_qh + d[None, :],
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)
        # Fold log2(e) into the scale: softmax via exp2 (one MUFU op per score, no extra multiply).
        qk_scale = tl.cast(sm_scale, tl.float32) * _LOG2E

        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        bt_row = BT + b.to(tl.int64) * stride_btb
        k_head = K + kvh.to(tl.int64) * stride_kh
        v_head = V + kvh.to(tl.int64) * stride_vh
        for t in range(t_start, t_end):
            pos = lo + t * BLOCK_N + tl.arange(0, BLOCK_N)
            valid = pos < L
            # Per-key gather through the block table: a tile may cover several (small) pages. Masked
            # positions read neither the block table (garbage past the used pages) nor the cache.
            page = tl.load(bt_row + pos // PAGE_SIZE, mask=valid, other=0)
            valid = valid & (page >= 0) & (page < num_pages)  # unchecked ids on CUDA: never fault
            # int64: page * stride_kp exceeds 2^31 elements for pools of more than ~16 GB (bf16).
            slot = (pos % PAGE_SIZE).to(tl.int64)
            page = page.to(tl.int64)
            kv_mask = valid[:, None] & d_mask[None, :]
            k = tl.load(k_head + (page * stride_kp + slot * stride_ks)[:, None] + d[None, :], mask=kv_mask, other=0.0)
            # ieee: fp32 caches get fp32 products (not TF32's 10-bit mantissa); fp16/bf16 ignore it.
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
            s = tl.where(valid[None, :], s, float("-inf"))
            # Every tile holds >= 1 valid key, so m_new is finite and alpha = exp2(-inf) = 0 on the
            # first tile (no inf - inf).
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_head + (page * stride_vp + slot * stride_vs)[:, None] + d[None, :], mask=kv_mask, other=0.0)
            # P rounded to V's dtype feeds the tensor cores (as FlashAttention does); accumulate in fp32.
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m_i = m_new

        nonempty = l_i > 0.0
        out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        row_mask = g_mask[:, None] & d_mask[None, :]
        if SPLIT:
            row = (b * (n_kv * GROUP) + heads).to(tl.int64) * num_splits + split  # (b, h, split) contiguous
            tl.store(OP + row[:, None] * HEAD_DIM + d[None, :], out, mask=row_mask)
            lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
            tl.store(LSE + row, lse, mask=g_mask)
        else:
            o_ptr = O + b.to(tl.int64) * stride_ob + heads[:, None].to(tl.int64) * stride_oh + d[None, :]
            tl.store(o_ptr, out.to(O.dtype.element_ty), mask=row_mask)

    @triton.jit
    def _paged_decode_merge_kernel(OP, LSE, O, stride_ob, stride_oh, num_splits,
                                   HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        """Grid (B, Hq): combine the num_splits partial outputs of one head.

        out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M), M = max_s lse_s. Empty splits have
        lse = -inf and weigh 0; M is replaced by 0 when every split is empty (only possible for an
        invalid seq_len), so no -inf - -inf = NaN: the output is 0 then.
        """
        b = tl.program_id(0)
        h = tl.program_id(1)
        row = (b * tl.num_programs(1) + h).to(tl.int64) * num_splits
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        s_mask = s < num_splits
        lse = tl.load(LSE + row + s, mask=s_mask, other=float("-inf"))
        m = tl.max(lse, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp2(lse - m)
        o = tl.load(OP + (row + s)[:, None] * HEAD_DIM + d[None, :], mask=s_mask[:, None] & (d < HEAD_DIM)[None, :],
                    other=0.0)
        den = tl.sum(w, axis=0)
        out = tl.sum(o * w[:, None], axis=0) / tl.where(den > 0.0, den, 1.0)
        tl.store(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + d, out.to(O.dtype.element_ty),
                 mask=d < HEAD_DIM)

    @triton.jit
    def _paged_kv_write_kernel(K, V, KC, VC, SLOT, stride_kn, stride_kh, stride_vn, stride_vh,
                               stride_kp, stride_ks, stride_kch, stride_vp, stride_vs, stride_vch, num_slots,
                               HKV: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
                               BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        """One program per token i: its (Hkv, D) k and v rows to slot SLOT[i] of KC / VC (skip if
        the slot is < 0, padding, or >= num_slots, an unchecked bad value on CUDA)."""
        i = tl.program_id(0).to(tl.int64)
        slot = tl.load(SLOT + i).to(tl.int64)
        # Expressed as a row count, not `tile_mask & scalar_mask`, which the interpreter mis-types.
        n_rows = tl.where((slot >= 0) & (slot < num_slots), HKV, 0)
        page = slot // PAGE_SIZE
        off = slot % PAGE_SIZE
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        mask = (h < n_rows)[:, None] & (d < HEAD_DIM)[None, :]
        hh = h[:, None].to(tl.int64)
        k = tl.load(K + i * stride_kn + hh * stride_kh + d[None, :], mask=mask, other=0.0)
        v = tl.load(V + i * stride_vn + hh * stride_vh + d[None, :], mask=mask, other=0.0)
        tl.store(KC + page * stride_kp + off * stride_ks + hh * stride_kch + d[None, :], k, mask=mask)
        tl.store(VC + page * stride_vp + off * stride_vs + hh * stride_vch + d[None, :], v, mask=mask)


# ----------------------------------------------------------------------------------------------
# Launch configuration (one function each, used by the launchers and by KERNEL_CONFIGS)
# ----------------------------------------------------------------------------------------------

def _decode_meta(group: int, head_dim: int, itemsize: int) -> dict:
    """Tile sizes, warps and pipeline depth of the decode kernel for `group` query heads per kv head.

    BLOCK_N (keys per tile): 16-bit caches move a 16 KB K tile and a 16 KB V tile per iteration at
    D = 128 (64 keys), loaded with cp.async two stages deep, so ~64 KB per CTA are in flight to hide
    DRAM latency; 8 warps keep that at ~74 registers/thread (4 warps measured 110-142). fp32 caches
    use an fp32 FMA dot (input_precision="ieee", no tensor cores): its operands are staged through
    registers, so 16 keys at D = 128 (measured 64 registers; 32 keys spilled 121 stores).
    """
    block_d = max(_MIN_DOT, _next_pow2(head_dim))
    budget = 16384 if itemsize <= 2 else 8192  # bytes of one K (or V) tile
    block_n = max(_MIN_DOT, min(64, budget // (block_d * itemsize)))
    num_warps = 8 if itemsize <= 2 and block_n * block_d >= 8192 else 4
    return dict(BLOCK_G=max(_MIN_DOT, _next_pow2(group)), BLOCK_D=block_d, BLOCK_N=block_n,
                num_warps=num_warps, num_stages=2)


def _merge_meta(num_splits: int, head_dim: int) -> dict:
    return dict(BLOCK_S=_next_pow2(num_splits), BLOCK_D=_next_pow2(head_dim), num_warps=4 if num_splits > 16 else 1)


def _write_meta(hkv: int, head_dim: int) -> dict:
    block_h, block_d = _next_pow2(hkv), _next_pow2(head_dim)
    # ~8 elements (one 128-bit access in 16-bit) per thread of the (Hkv, D) row pair.
    return dict(BLOCK_H=block_h, BLOCK_D=block_d, num_warps=min(8, max(1, block_h * block_d // 256)))


def _auto_splits(batch: int, hkv: int, capacity: int, window: int | None, block_n: int,
                 sm_count: int | None) -> int:
    """Split count so that batch * hkv * splits ~ 2x the SM count (two resident CTAs per SM hide
    each other's load latency), bounded by the tiles of the longest possible key range. The bound
    uses the block table's capacity (and the window), not max(seq_lens), which would need a host
    sync. sm_count None (CPU, the interpreter runs programs one after another): 1."""
    if sm_count is None:
        return 1
    keys = capacity if window is None else min(capacity, window + 1)
    max_tiles = -(-keys // block_n)
    want = -(-2 * sm_count // max(batch * hkv, 1))
    return max(1, min(want, max_tiles, MAX_SPLITS))


# ----------------------------------------------------------------------------------------------
# Launchers (Triton backend)
# ----------------------------------------------------------------------------------------------

def _decode_triton(q, k_cache, v_cache, block_table, seq_lens, scale: float, window: int | None,
                   num_splits: int | None, out: Tensor | None = None) -> Tensor:
    """paged_decode_attention_triton without validation (inputs checked by the caller). `out`: an
    optional preallocated (B, Hq, D) destination in q's dtype, any strides with unit stride on D."""
    B, Hq, D = q.shape
    num_pages, page_size, Hkv, _ = k_cache.shape
    if out is None:
        out = torch.empty((B, Hq, D), dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    if D > 1 and q.stride(-1) != 1:
        q = q.contiguous()  # (B, Hq, D) is tiny next to the cache; the kernel wants unit stride on D
    if block_table.shape[1] > 1 and block_table.stride(1) != 1:
        block_table = block_table.contiguous()
    seq_lens = seq_lens.contiguous()
    meta = _decode_meta(Hq // Hkv, D, q.element_size())
    nw, ns = meta.pop("num_warps"), meta.pop("num_stages")
    capacity = block_table.shape[1] * page_size
    # Windows wider than any sequence are full attention; clamping keeps the argument in int32.
    win = -1 if window is None else min(int(window), capacity)
    if num_splits is None:
        sm = _sm_count(q.device) if q.is_cuda else None
        splits = _auto_splits(B, Hkv, capacity, window, meta["BLOCK_N"], sm)
    else:
        splits = int(num_splits)
    common = (q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_table.stride(0))
    if splits == 1:
        _paged_decode_kernel[(B, Hkv, 1)](
            q, k_cache, v_cache, block_table, seq_lens, out, out, out, *common, out.stride(0), out.stride(1),
            num_pages, capacity, win, 1, scale, GROUP=Hq // Hkv, HEAD_DIM=D, PAGE_SIZE=page_size, SPLIT=False,
            num_warps=nw, num_stages=ns, **meta)
        return out
    part = torch.empty((B, Hq, splits, D), dtype=torch.float32, device=q.device)
    lse = torch.empty((B, Hq, splits), dtype=torch.float32, device=q.device)
    _paged_decode_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, block_table, seq_lens, out, part, lse, *common, out.stride(0), out.stride(1),
        num_pages, capacity, win, splits, scale, GROUP=Hq // Hkv, HEAD_DIM=D, PAGE_SIZE=page_size, SPLIT=True,
        num_warps=nw, num_stages=ns, **meta)
    mm = _merge_meta(splits, D)
    mw = mm.pop("num_warps")
    _paged_decode_merge_kernel[(B, Hq)](part, lse, out, out.stride(0), out.stride(1), splits, HEAD_DIM=D,
                                        num_warps=mw, **mm)
    return out


def paged_decode_attention_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                                  seq_lens: Tensor, scale: float, window: int | None,
                                  num_splits: int | None) -> Tensor:
    """Triton launcher (same signature as `cuda_ops.paged_decode_attention_cuda`): validates, then
    runs the decode kernel (and, for num_splits > 1, the merge kernel). See `paged_decode_attention`."""
    _check_decode(q, k_cache, v_cache, block_table, seq_lens, scale, window, num_splits)
    _check_kernel_dtype(q, "q")
    return _decode_triton(q, k_cache, v_cache, block_table, seq_lens, float(scale), window, num_splits)


def _write_triton(k, v, k_cache, v_cache, slot_mapping) -> None:
    N, Hkv, D = k.shape
    if N == 0:
        return
    if D > 1 and k.stride(-1) != 1:
        k = k.contiguous()
    if D > 1 and v.stride(-1) != 1:
        v = v.contiguous()
    num_pages, page_size = k_cache.shape[:2]
    meta = _write_meta(Hkv, D)
    nw = meta.pop("num_warps")
    _paged_kv_write_kernel[(N,)](k, v, k_cache, v_cache, slot_mapping.contiguous(), k.stride(0), k.stride(1),
                                 v.stride(0), v.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
                                 num_pages * page_size, HKV=Hkv, HEAD_DIM=D, PAGE_SIZE=page_size, num_warps=nw,
                                 **meta)


def paged_kv_write_triton(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Triton launcher of `paged_kv_write` (same signature as `cuda_ops.paged_kv_write_cuda`)."""
    _check_write(k, v, k_cache, v_cache, slot_mapping)
    _check_kernel_dtype(k, "k")
    _write_triton(k, v, k_cache, v_cache, slot_mapping)


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------

def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                           scale: float | None = None, window: int | None = None, *,
                           num_splits: int | None = None, backend: str | None = None) -> Tensor:
    """Decode attention of one new token per sequence over a paged KV cache (GQA, sliding window).

    Args:
        q: (B, Hq, D) fp16 / bf16 / fp32 (fp64 with backend="torch"): the current token's queries.
            Any strides (e.g. a slice of a packed qkv buffer); a non-unit stride on D costs one
            small copy (the kernel needs D contiguous for 128-bit loads).
        k_cache, v_cache: (num_pages, page_size, Hkv, D) "NHD" pools, q's dtype and device, D
            contiguous (stride 1); the other strides are free, e.g. k_cache = kv[:, 0] of a
            (num_pages, 2, page_size, Hkv, D) buffer. Any page_size >= 1. Hq % Hkv == 0.
        block_table: (B, max_pages) int32, page ids of each sequence in order. Only the first
            ceil(seq_lens[b] / page_size) entries of row b are read; the rest may hold anything.
        seq_lens: (B,) int32, each in [1, max_pages * page_size]: the sequence length including
            the current token, whose k/v must already be in the cache (`paged_kv_write`).
        scale: softmax scale, > 0; None -> 1 / sqrt(D).
        window: None (full causal) or w >= 0: the query (position L-1) attends keys j with
            L-1-w <= j <= L-1 (flash-attn window_size=(w, 0), as nanofast.ops.attention).
        num_splits: Triton backend: split each sequence's key range into this many chunks run in
            parallel and merged (1..256; 1 writes the output directly). None: on CUDA enough splits
            that B * Hkv * splits ~ 2 x SM count, bounded by the tiles of the longest possible key
            range; on CPU (interpreter) 1. Ignored by backend="torch".
        backend: "torch" | "triton" | "cuda" | None (triton on CUDA tensors, torch on CPU).
    Returns:
        (B, Hq, D) contiguous in q's dtype. Softmax and accumulation in fp32.
    Raises:
        TypeError / ValueError naming the offending argument and the expected shape/dtype. Value
        checks (seq_lens range, used page ids) run for CPU tensors only: on CUDA they would cost a
        host sync per call, and the kernel masks out-of-range values instead (module docstring).
    """
    _check_decode(q, k_cache, v_cache, block_table, seq_lens, scale, window, num_splits)
    be = resolve_backend(backend, q)
    if be == "torch":
        return paged_decode_attention_reference(q, k_cache, v_cache, block_table, seq_lens, scale, window)
    _check_kernel_dtype(q, "q")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    window = None if window is None else int(window)
    if be == "cuda":
        from .cuda_ops import paged_decode_attention_cuda  # lazy: builds/loads the CUDA extension

        return paged_decode_attention_cuda(q, k_cache, v_cache, block_table, seq_lens, scale, window, num_splits)
    return _decode_triton(q, k_cache, v_cache, block_table, seq_lens, scale, window, num_splits)


def paged_kv_write(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor, *,
                   backend: str | None = None) -> None:
    """Write new keys/values into the paged cache in place.

    Args:
        k, v: (N, Hkv, D) in the caches' dtype and device (any strides; D contiguous avoids a copy).
        k_cache, v_cache: (num_pages, page_size, Hkv, D), D contiguous; modified in place.
        slot_mapping: (N,) int32 or int64, slot = page_id * page_size + offset_in_page for token i;
            slot < 0 skips the token (padding). Slots must be distinct (duplicates: unspecified
            winner). Slots >= num_pages * page_size raise on CPU and are skipped on CUDA (no check
            there: it would be a host sync).
        backend: "torch" | "triton" | "cuda" | None (triton on CUDA tensors, torch on CPU).
    Every other cache slot is left bitwise untouched.
    """
    _check_write(k, v, k_cache, v_cache, slot_mapping)
    be = resolve_backend(backend, k)
    if be == "torch":
        paged_kv_write_reference(k, v, k_cache, v_cache, slot_mapping)
        return
    _check_kernel_dtype(k, "k")
    if be == "cuda":
        from .cuda_ops import paged_kv_write_cuda  # lazy: builds/loads the CUDA extension

        paged_kv_write_cuda(k, v, k_cache, v_cache, slot_mapping)
        return
    _write_triton(k, v, k_cache, v_cache, slot_mapping)


# ----------------------------------------------------------------------------------------------
# What an H100 compiles (checked by the compile gate in the tests)
# ----------------------------------------------------------------------------------------------

def _decode_config(dtype: torch.dtype, group: int, head_dim: int, page_size: int, split: bool) -> dict:
    t = _TL_DTYPE[dtype]
    m = _decode_meta(group, head_dim, torch.empty((), dtype=dtype).element_size())
    nw, ns = m.pop("num_warps"), m.pop("num_stages")
    const = dict(GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=page_size, SPLIT=split, **m)
    sig = gate_signature(_paged_decode_kernel, const, t,
                         {"K": f"*{t}", "BT": "*i32", "SL": "*i32", "OP": "*fp32", "LSE": "*fp32"})
    # What Triton's launcher specialises for a contiguous cache and packed qkv at D in {64, 128}: all
    # pointers 16-byte aligned and every stride a multiple of 16 elements (D, Hkv*D, page_size*Hkv*D,
    # (Hq + 2 Hkv) * D). num_pages, capacity and the lengths are arbitrary.
    aligned = ("Q", "K", "V", "BT", "SL", "O", "OP", "LSE", "stride_qb", "stride_qh", "stride_kp", "stride_ks",
               "stride_kh", "stride_vp", "stride_vs", "stride_vh", "stride_ob", "stride_oh")
    return dict(fn=_paged_decode_kernel, signature=sig, constexprs=const, num_warps=nw, num_stages=ns,
                aligned=aligned,
                config=f"decode {t} group={group} D={head_dim} page={page_size} {'split' if split else 'direct'} "
                       f"BLOCK={m['BLOCK_G']}x{m['BLOCK_N']}x{m['BLOCK_D']} warps={nw}")


def _merge_config(dtype: torch.dtype, num_splits: int, head_dim: int) -> dict:
    t = _TL_DTYPE[dtype]
    m = _merge_meta(num_splits, head_dim)
    nw = m.pop("num_warps")
    const = dict(HEAD_DIM=head_dim, **m)
    sig = gate_signature(_paged_decode_merge_kernel, const, t, {"OP": "*fp32", "LSE": "*fp32"})
    return dict(fn=_paged_decode_merge_kernel, signature=sig, constexprs=const, num_warps=nw,
                num_stages=1, aligned=("OP", "LSE", "O", "stride_ob", "stride_oh"),
                config=f"merge {t} splits={num_splits} D={head_dim} BLOCK_S={m['BLOCK_S']} warps={nw}")


def _write_config(dtype: torch.dtype, hkv: int, head_dim: int, page_size: int, slot_dtype: str = "i64") -> dict:
    t = _TL_DTYPE[dtype]
    m = _write_meta(hkv, head_dim)
    nw = m.pop("num_warps")
    const = dict(HKV=hkv, HEAD_DIM=head_dim, PAGE_SIZE=page_size, **m)
    sig = gate_signature(_paged_kv_write_kernel, const, t, {"K": f"*{t}", "SLOT": f"*{slot_dtype}"})
    # What Triton's launcher specialises for a contiguous cache and packed qkv: every pointer and
    # stride; num_slots (the token count) is arbitrary.
    aligned = tuple(a for a in sig if sig[a] != "constexpr" and a != "num_slots")
    return dict(fn=_paged_kv_write_kernel, signature=sig, constexprs=const, num_warps=nw, num_stages=1,
                aligned=aligned,
                config=f"write {t} Hkv={hkv} D={head_dim} page={page_size} slot={slot_dtype} warps={nw}")


def _kernel_configs() -> list[dict]:
    if triton is None:
        return []
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    return [
        # nanochat-like MHA (group 1) and Llama-style GQA (group 4, 8) at D = 128, page 16 (vLLM's
        # default), direct and split-KV variants; bf16 is what serving runs, fp16 the interpreter twin.
        _decode_config(bf16, 1, 128, 16, split=False),
        _decode_config(bf16, 1, 128, 16, split=True),
        _decode_config(bf16, 4, 128, 16, split=True),
        _decode_config(bf16, 8, 128, 16, split=False),
        _decode_config(bf16, 8, 128, 16, split=True),
        _decode_config(fp16, 4, 128, 16, split=True),
        _decode_config(fp16, 8, 128, 16, split=False),
        _decode_config(bf16, 4, 64, 16, split=True),
        _decode_config(fp16, 1, 64, 16, split=False),
        # Large pages (one tile inside one page) and fp32 (CPU-parity / debugging runs).
        _decode_config(bf16, 8, 128, 256, split=True),
        _decode_config(fp32, 4, 128, 16, split=True),
        _merge_config(bf16, 8, 128),
        _merge_config(fp16, 64, 128),
        _merge_config(bf16, 32, 64),
        _write_config(bf16, 8, 128, 16),
        _write_config(fp16, 2, 128, 16, "i32"),
        _write_config(bf16, 4, 64, 16),
    ]


KERNEL_CONFIGS: list[dict] = _kernel_configs()
"""Each entry: keyword arguments of `compile_gate.compile_triton` (fn, signature, constexprs, num_warps,
num_stages, aligned, config), built from the launchers' own `_decode_meta` / `_merge_meta` / `_write_meta`,
so `compile_triton(**cfg, arch=90)` compiles exactly what an H100 launches for that shape."""
