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
* Split-KV (flash-decoding) planned from the actual lengths: with few or ragged sequences one
  program per (b, kv head) would leave most SMs idle while one of them walks a long context, so
  `plan_paged_decode` picks one chunk size for the batch and cuts each sequence's visible keys into
  ceil(tiles / chunk) units of similar size (FlashInfer-style), ~2 programs per SM in all. The
  decode kernel runs every unit of the batch in ONE launch (grid (units, Hkv), unit -> (sequence,
  split) through small int32 plan arrays); one-unit sequences write the output directly, the others
  write a partial output and log-sum-exp (fp32 scratch) that a small second kernel merges with LSE
  rescaling, looping over chunks of 16 splits (registers independent of the split count).
* Any page_size through one code path: keys are processed in tiles of BLOCK_N positions; each
  position gathers its own page id from the block table (a tile may span several small pages, or a
  fraction of one large page). The K/V rows are D contiguous elements, so loads stay 128-bit wide.
* Online softmax in the exp2 domain with log2(e) folded into the scale (exp2 is the native MUFU
  instruction; exp would add a multiply per score).

Layering, as the other kernel modules: Triton kernels -> launchers (`paged_decode_attention_triton`,
`paged_kv_write_triton`) -> functional API with `backend=` (`paged_decode_attention`,
`paged_kv_write`) -> plain-torch references beside them. Inference only: no autograd.

Host syncs: planning from seq_lens reads them back (on CUDA one device->host copy of B ints per
call) unless the caller passes `host_seq_lens=` (the same lengths as host ints: the engine's),
`plan=` (computed from lengths it knows on the host) or `num_splits=`.
Validation of *values* (seq_lens within the block table's capacity, used page ids
within the pool, slots within the cache) reads tensors back to the host, so it runs for CPU tensors
only. On CUDA the kernels instead clamp/mask so that bad values can never read or write outside
the tensors: seq_lens are clamped to max_pages * page_size, keys whose page id is outside
[0, num_pages) are skipped, slots outside the cache are skipped (the result is then wrong, but no
memory fault and no corruption of other tensors).

torch.compile(fullgraph=True): the kernel backends run as the custom ops
`nanofast::paged_decode_attention` / `nanofast::paged_kv_write` (the split plan is computed from
values inside them), which also run the CPU value checks; the torch backend's decode is traced as
plain torch and skips them (values are unknown at trace time), while its write runs as the same
custom op (traced, an in-place write into a view of a larger pool becomes a copy of the whole pool).
"""
from __future__ import annotations

import math
import numbers
from types import SimpleNamespace

import torch
from torch import Tensor

from . import vendor
from .backend import resolve_backend
from .compile_gate import gate_signature
from .op import Op
from .launch import TL_DTYPE as _TL_DTYPE, next_pow2 as _next_pow2, sm_count as _sm_count
from .paged_plan import MAX_SPLITS, check_plan, hnd_hint, host_lengths, plan_paged_decode, plan_tensors

try:  # triton is optional: backend="torch" (and "cuda") work without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on installs without triton
    triton = None
    tl = None

__all__ = ["paged_decode_attention", "paged_decode_attention_reference", "paged_decode_attention_triton",
           "plan_paged_decode", "paged_kv_write", "paged_kv_write_reference", "paged_kv_write_triton", "gather_pages",
           "KERNEL_CONFIGS"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
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


def _check_decode(q, k_cache, v_cache, block_table, seq_lens, scale, window, num_splits=None, plan=None,
                  host_seq_lens=None) -> None:
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
        # Only the transposed (HND) reading fits q's heads: name that layout too, not just GQA.
        hint = hnd_hint(k_cache, f"q's Hq={Hq} heads fit its Hkv = dim 1 ({page_size})") if Hq % page_size == 0 else ""
        raise ValueError(f"q's head count Hq={Hq} must be a multiple of the caches' kv head count Hkv={Hkv} (GQA)"
                         + hint)
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
        vendor.left_window(window)  # flash-attn's rule: an int >= -1, -1 full causal like None
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral)
                                   or not 1 <= num_splits <= MAX_SPLITS):
        raise ValueError(f"num_splits must be None (automatic) or an int in [1, {MAX_SPLITS}], got {num_splits!r}")
    if plan is not None:
        if num_splits is not None:
            raise ValueError("pass either num_splits (the same split count for every sequence) or plan "
                             "(splits per sequence), not both")
        check_plan(plan, B, values=not torch.compiler.is_compiling())
    if host_seq_lens is not None:
        if num_splits is not None or plan is not None:
            raise ValueError("pass at most one of num_splits, plan and host_seq_lens (all three decide the split plan)")
        if (not isinstance(host_seq_lens, (list, tuple)) or len(host_seq_lens) != B
                or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in host_seq_lens)):
            raise ValueError(f"host_seq_lens must be a list of B = {B} ints (seq_lens on the host), "
                             f"got {host_seq_lens!r}"[:300])
    # Value checks read the tensors back: free on CPU, a device sync per call on CUDA (skipped
    # there; the kernels clamp and mask instead, see the module docstring). Under torch.compile the
    # values are unknown at trace time (a guard on them is a data-dependent error, no fullgraph):
    # the kernel backends' custom op runs this check when it executes instead.
    if not torch.compiler.is_compiling():
        _check_decode_values(q, k_cache, block_table, seq_lens, host_seq_lens)


def _check_decode_values(q, k_cache, block_table, seq_lens, host_seq_lens=None) -> None:
    """The value checks of a decode call (CPU tensors only; no-op on CUDA): host_seq_lens equal to
    seq_lens, seq_lens within the block table's capacity, page ids of used pages within the pool."""
    B = q.shape[0]
    if q.is_cuda or B == 0:
        return
    if host_seq_lens is not None and seq_lens.tolist() != list(host_seq_lens):
        raise ValueError(f"host_seq_lens must equal seq_lens, got {list(host_seq_lens)[:8]} vs "
                         f"{seq_lens.tolist()[:8]}")
    num_pages, page_size, Hkv = k_cache.shape[:3]
    cap = block_table.shape[1] * page_size
    lo, hi = int(seq_lens.min()), int(seq_lens.max())
    if lo < 1 or hi > cap:
        # A cache in HND layout, where q's heads fit either reading, shows up here first: its
        # "page_size" is the kv head count, usually far smaller than a page.
        hnd = lo >= 1 and hi <= block_table.shape[1] * Hkv and Hkv > page_size and q.shape[1] % page_size == 0
        hint = hnd_hint(k_cache, f"seq_lens up to {hi} fit its page_size = dim 2 ({Hkv})") if hnd else ""
        raise ValueError(f"seq_lens must lie in [1, max_pages * page_size = {cap}], got values in [{lo}, {hi}]" + hint)
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
        hnd = k_cache.shape[1] == Hkv and k_cache.shape[3] == D
        raise ValueError(f"k_cache and v_cache must have shape (num_pages, page_size, Hkv, D) with (Hkv, D) = "
                         f"{(Hkv, D)} from k, got {tuple(k_cache.shape)}"
                         + (hnd_hint(k_cache, f"dim 1 is k's Hkv = {Hkv}") if hnd else ""))
    _check_tensor("slot_mapping", slot_mapping, 1, f"(N,) = ({N},)")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"slot_mapping must be an int32 or int64 tensor of shape (N,), got dtype {slot_mapping.dtype}")
    if slot_mapping.shape[0] != N:
        raise ValueError(f"slot_mapping must have shape (N,) = ({N},) (one slot per token of k), "
                         f"got {tuple(slot_mapping.shape)}")
    if slot_mapping.device != k.device:
        raise ValueError(f"slot_mapping is on {slot_mapping.device} but k is on {k.device}: all tensors must be "
                         "on one device")
    # Under torch.compile the values are unknown at trace time: the custom op checks them instead.
    if not torch.compiler.is_compiling():
        _check_write_values(k, k_cache, slot_mapping)


def _check_write_values(k, k_cache, slot_mapping) -> None:
    """CPU tensors: every slot below the cache's capacity (a host sync on CUDA, where the kernels
    skip out-of-range slots instead)."""
    if not k.is_cuda and k.shape[0] > 0:
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
    return _decode_reference(q, k_cache, v_cache, block_table, seq_lens, scale, window)


def _decode_reference(q, k_cache, v_cache, block_table, seq_lens, scale, window) -> Tensor:
    """paged_decode_attention_reference for validated arguments."""
    B, Hq, D = q.shape
    page_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    acc = torch.promote_types(q.dtype, torch.float32)
    lens = seq_lens.long()[:, None]  # (B, 1)
    used = torch.arange(block_table.shape[1], device=q.device)[None, :] < (lens + page_size - 1) // page_size
    pages = torch.where(used, block_table.long(), 0)
    pos = torch.arange(block_table.shape[1] * page_size, device=q.device)[None, :]
    valid = pos < lens
    if window is not None and window >= 0:
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
    _write_reference(k, v, k_cache, v_cache, slot_mapping)


def _write_reference(k, v, k_cache, v_cache, slot_mapping) -> None:
    """paged_kv_write_reference for validated arguments."""
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
    def _paged_decode_kernel(Q, K, V, BT, SL, O, OP, LSE, SEQ_START, UNIT_SEQ, UNIT_IDX,
                             stride_qb, stride_qh, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                             stride_btb, stride_ob, stride_oh, num_pages, capacity, window, sm_scale,
                             GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
                             BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        """Grid (U, Hkv): one program per (work unit, kv head). Unit u is split UNIT_IDX[u] of the
        n = SEQ_START[b+1] - SEQ_START[b] splits of sequence b = UNIT_SEQ[u] (the plan, see
        `plan_paged_decode`); the program attends the GROUP query heads kvh*GROUP .. kvh*GROUP +
        GROUP-1 of sequence b over that split of its key range: the tiles of BLOCK_N keys
        [s * T // n, (s+1) * T // n) of the T tiles of visible keys (sizes differ by at most one tile).

        Q: (B, Hq, D) row strides stride_qb/stride_qh, unit last stride. K/V: (pages, PAGE_SIZE, Hkv, D)
        with page/slot/head strides, unit last stride. BT: block table rows (stride_btb, unit column
        stride); SL: (B,) int32; SEQ_START (B+1,), UNIT_SEQ (U,), UNIT_IDX (U,) int32.
        n == 1: normalised output to O (B, Hq, D) with strides stride_ob/stride_oh (no merge needed).
        n > 1: partial output (normalised by its own softmax sum) to OP (U, Hq, D) fp32 and its
        base-2 log-sum-exp (of scale*log2e*q.k) to LSE (U, Hq) fp32, contiguous; an empty split
        (only when n > T) writes 0 and -inf. window < 0 means no window.
        """
        u = tl.program_id(0)
        kvh = tl.program_id(1)
        n_kv = tl.num_programs(1)
        b = tl.load(UNIT_SEQ + u)
        split = tl.load(UNIT_IDX + u)
        num_splits = tl.load(SEQ_START + b + 1) - tl.load(SEQ_START + b)
        # Clamp L to the block table's capacity: an oversized seq_len (unchecked on CUDA) then
        # cannot index past the block-table row.
        L = tl.minimum(tl.load(SL + b), capacity)
        lo = tl.where(window >= 0, tl.maximum(L - 1 - window, 0), 0)
        n_tiles = tl.cdiv(L - lo, BLOCK_N)
        # int64 products: n_tiles * num_splits stays far below 2^31, but be safe for huge capacities.
        t_start = ((split.to(tl.int64) * n_tiles) // num_splits).to(tl.int32)
        t_end = (((split + 1).to(tl.int64) * n_tiles) // num_splits).to(tl.int32)

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
        # Which destination, as row counts (a scalar & tile mask is mis-typed by the interpreter).
        direct_rows = tl.where(num_splits == 1, GROUP, 0)
        part_rows = GROUP - direct_rows
        d_ok = d_mask[None, :]
        o_ptr = O + b.to(tl.int64) * stride_ob + heads[:, None].to(tl.int64) * stride_oh + d[None, :]
        tl.store(o_ptr, out.to(O.dtype.element_ty), mask=(g < direct_rows)[:, None] & d_ok)
        row = u.to(tl.int64) * (n_kv * GROUP) + heads  # (unit, h) contiguous
        tl.store(OP + row[:, None] * HEAD_DIM + d[None, :], out, mask=(g < part_rows)[:, None] & d_ok)
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(LSE + row, lse, mask=g < part_rows)

    @triton.jit
    def _paged_decode_merge_kernel(OP, LSE, O, SEQ_START, stride_ob, stride_oh,
                                   HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        """Grid (B, Hq): combine the n = SEQ_START[b+1] - SEQ_START[b] partial outputs of one head
        (rows SEQ_START[b] .. + n - 1 of OP (U, Hq, D) / LSE (U, Hq)); sequences with n == 1 were
        written directly by the decode kernel and are left alone.

        out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M), M = max_s lse_s, computed as an online
        (running-max) sum over chunks of BLOCK_S splits, so the registers hold one (BLOCK_S, D) tile
        whatever the split count (no spills at 256 splits). Empty splits have lse = -inf and weigh 0;
        the running max is replaced by 0 while every split seen is empty, so no -inf - -inf = NaN: the
        output is 0 when all are empty (only possible for an invalid seq_len).
        """
        b = tl.program_id(0)
        h = tl.program_id(1)
        n_heads = tl.num_programs(1)
        start = tl.load(SEQ_START + b)
        n = tl.load(SEQ_START + b + 1) - start
        # n == 1: the decode kernel wrote this row and OP/LSE hold nothing for it: read nothing.
        n = tl.where(n > 1, n, 0)
        d = tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_DIM
        m = tl.full([], float("-inf"), tl.float32)
        den = tl.zeros([], dtype=tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for c in range(0, n, BLOCK_S):
            s = c + tl.arange(0, BLOCK_S)
            s_mask = s < n
            row = (start + s).to(tl.int64) * n_heads + h
            lse = tl.load(LSE + row, mask=s_mask, other=float("-inf"))
            m_new = tl.maximum(m, tl.max(lse, axis=0))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_ref)  # 0 on the first chunk (m = -inf)
            w = tl.exp2(lse - m_ref)
            o = tl.load(OP + row[:, None] * HEAD_DIM + d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0)
            acc = acc * alpha + tl.sum(o * w[:, None], axis=0)
            den = den * alpha + tl.sum(w, axis=0)
            m = m_new
        out = acc / tl.where(den > 0.0, den, 1.0)
        # A row count, not a scalar & tile mask (which the interpreter mis-types).
        n_out = tl.where(n > 1, HEAD_DIM, 0)
        tl.store(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + d, out.to(O.dtype.element_ty),
                 mask=d < n_out)

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


def _merge_meta(head_dim: int) -> dict:
    """The merge loops over the splits in chunks of BLOCK_S = 16 rows with a running max (online
    softmax), so its registers do not grow with the split count: one (16, D) fp32 tile, 16 values
    per thread at D = 128 over 4 warps."""
    return dict(BLOCK_S=16, BLOCK_D=_next_pow2(head_dim), num_warps=4 if head_dim >= 128 else 2)


def _write_meta(hkv: int, head_dim: int) -> dict:
    block_h, block_d = _next_pow2(hkv), _next_pow2(head_dim)
    # ~8 elements (one 128-bit access in 16-bit) per thread of the (Hkv, D) row pair.
    return dict(BLOCK_H=block_h, BLOCK_D=block_d, num_warps=min(8, max(1, block_h * block_d // 256)))


# ----------------------------------------------------------------------------------------------
# Launchers (Triton backend)
# ----------------------------------------------------------------------------------------------

def _decode_triton(q, k_cache, v_cache, block_table, seq_lens, scale: float, window: int | None,
                   num_splits: int | None, out: Tensor | None = None, plan: Tensor | None = None,
                   host_seq_lens: list[int] | None = None) -> Tensor:
    """paged_decode_attention_triton without validation (inputs checked by the caller). `out`: an
    optional preallocated (B, Hq, D) destination in q's dtype, any strides with unit stride on D.
    The split plan: `plan` (checked (B,) int32 CPU splits per sequence) if given, else `num_splits`
    for every sequence (the uniform plan), else `plan_paged_decode` from host_seq_lens if given, else
    from seq_lens (on CUDA one device->host copy of the B lengths; on CPU one split per sequence)."""
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
    if plan is not None:
        splits = [int(x) for x in plan.tolist()]
    elif num_splits is not None:
        splits = None
    else:
        sm = _sm_count(q.device) if q.is_cuda else None
        # Lengths past the capacity (unchecked on CUDA) are clamped by the kernel; plan the same.
        lens = host_lengths(seq_lens, host_seq_lens).clamp(1, capacity)
        splits = [int(x) for x in plan_paged_decode(lens, Hkv, window=window, block_n=meta["BLOCK_N"],
                                                    sm_count=sm).tolist()]
    packed, units = plan_tensors(splits, B, 1 if num_splits is None else int(num_splits), q.device)
    seq_start, unit_seq, unit_idx = packed[:B + 1], packed[B + 1:B + 1 + units], packed[B + 1 + units:]
    direct = units == B  # every sequence is one unit: the decode kernel writes out, no merge
    if direct:
        part = lse = torch.empty(1, dtype=torch.float32, device=q.device)  # never written
    else:
        part = torch.empty((units, Hq, D), dtype=torch.float32, device=q.device)
        lse = torch.empty((units, Hq), dtype=torch.float32, device=q.device)
    _paged_decode_kernel[(units, Hkv)](
        q, k_cache, v_cache, block_table, seq_lens, out, part, lse, seq_start, unit_seq, unit_idx,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_table.stride(0),
        out.stride(0), out.stride(1), num_pages, capacity, win, scale, GROUP=Hq // Hkv, HEAD_DIM=D,
        PAGE_SIZE=page_size, num_warps=nw, num_stages=ns, **meta)
    if not direct:
        mm = _merge_meta(D)
        mw = mm.pop("num_warps")
        _paged_decode_merge_kernel[(B, Hq)](part, lse, out, seq_start, out.stride(0), out.stride(1), HEAD_DIM=D,
                                            num_warps=mw, **mm)
    return out


def paged_decode_attention_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                                  seq_lens: Tensor, scale: float, window: int | None,
                                  num_splits: int | None, plan: Tensor | None = None,
                                  host_seq_lens: list[int] | None = None) -> Tensor:
    """Triton launcher (same signature as `paged_attention_cuda.paged_decode_attention_cuda`):
    validates, then runs the decode kernel (one launch over all work units) and, when some sequence
    has more than one split, the merge kernel. See `paged_decode_attention`."""
    _check_decode(q, k_cache, v_cache, block_table, seq_lens, scale, window, num_splits, plan, host_seq_lens)
    _check_kernel_dtype(q, "q")
    return _decode_triton(q, k_cache, v_cache, block_table, seq_lens, float(scale), window, num_splits,
                          plan=plan, host_seq_lens=host_seq_lens)


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
    """Triton launcher of `paged_kv_write` (same signature as `paged_attention_cuda.paged_kv_write_cuda`)."""
    _check_write(k, v, k_cache, v_cache, slot_mapping)
    _check_kernel_dtype(k, "k")
    _write_triton(k, v, k_cache, v_cache, slot_mapping)


# ----------------------------------------------------------------------------------------------
# Custom ops: what torch.compile sees of a kernel backend
# ----------------------------------------------------------------------------------------------

# Dynamo cannot trace into a Triton launch (under the interpreter not at all) nor into the CUDA
# backend's ctypes launch, and the split plan is computed from tensor values on the host: under
# torch.compile a kernel backend's call is one opaque op, which also runs the value checks the
# traced public entry had to skip. Eager calls run the launchers directly (no op dispatcher: a
# decode step calls these once per layer).

@torch.library.custom_op("nanofast::paged_decode_attention", mutates_args=())
def _decode_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor, scale: float,
               window: int | None, num_splits: int | None, plan: Tensor | None, host_seq_lens: list[int] | None,
               backend: str) -> Tensor:
    """(B, Hq, D) contiguous in q's dtype: launcher `backend`'s decode of shape-checked arguments."""
    _check_decode_values(q, k_cache, block_table, seq_lens, host_seq_lens)
    if plan is not None:
        check_plan(plan, q.shape[0])
    return OP.launcher(backend).decode(q, k_cache, v_cache, block_table, seq_lens, scale, window, num_splits,
                                       plan=plan, host_seq_lens=host_seq_lens)


@_decode_op.register_fake
def _(q, k_cache, v_cache, block_table, seq_lens, scale, window, num_splits, plan, host_seq_lens, backend):
    return q.new_empty(q.shape)


@torch.library.custom_op("nanofast::paged_kv_write", mutates_args=("k_cache", "v_cache"))
def _write_op(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor, backend: str) -> None:
    """Launcher `backend`'s write of shape-checked arguments, into k_cache and v_cache in place
    ("torch": the reference's indexed assignment)."""
    _check_write_values(k, k_cache, slot_mapping)
    if backend == "torch":
        _write_reference(k, v, k_cache, v_cache, slot_mapping)
        return
    OP.launcher(backend).write(k, v, k_cache, v_cache, slot_mapping)


@_write_op.register_fake
def _(k, v, k_cache, v_cache, slot_mapping, backend):
    return None


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------

def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                           scale: float | None = None, window: int | None = None, *,
                           num_splits: int | None = None, plan: Tensor | None = None,
                           host_seq_lens: list[int] | None = None, backend: str | None = None) -> Tensor:
    """Decode attention of one new token per sequence over a paged KV cache (GQA, sliding window).

    Args:
        q: (B, Hq, D) fp16 / bf16 / fp32 (fp64 with backend="torch"): the current token's queries.
            Any strides (e.g. a slice of a packed qkv buffer); a non-unit stride on D costs one
            small copy (the kernel needs D contiguous for 128-bit loads).
        k_cache, v_cache: (num_pages, page_size, Hkv, D) "NHD" pools, q's dtype and device, D
            contiguous (stride 1); the other strides are free, e.g. k_cache = kv[:, 0] of a
            (num_pages, 2, page_size, Hkv, D) buffer. Any page_size >= 1. Hq % Hkv == 0. A cache
            in the transposed HND layout (num_pages, Hkv, page_size, D) raises a ValueError naming
            the layout when its shape only fits that reading (q's heads, or on CPU seq_lens that
            only fit its page size); pass k_cache.transpose(1, 2) (a view) instead.
        block_table: (B, max_pages) int32, page ids of each sequence in order. Only the first
            ceil(seq_lens[b] / page_size) entries of row b are read; the rest may hold anything.
        seq_lens: (B,) int32, each in [1, max_pages * page_size]: the sequence length including
            the current token, whose k/v must already be in the cache (`paged_kv_write`).
        scale: softmax scale, > 0; None -> 1 / sqrt(D).
        window: None or -1 (full causal; -1 as in flash-attn) or w >= 0: the query (position L-1)
            attends keys j with L-1-w <= j <= L-1 (flash-attn window_size=(w, 0), as
            nanofast.ops.attention). Below -1 raises.
        num_splits: the uniform plan: split every sequence's visible keys into this many chunks
            (whole tiles, sizes differing by at most one tile) run in parallel and merged (1..256;
            1 writes the output directly). None: `plan`, or else a plan from the actual lengths.
            Ignored by backend="torch".
        plan: (B,) int32 CPU tensor, splits per sequence in [1, 256], normally from
            `plan_paged_decode` (which the caller can compute from lengths it knows on the host).
            None (and num_splits None): the launcher plans from seq_lens itself: on CUDA that is
            one device->host copy of the B lengths (a sync) per call; on CPU (interpreter) one
            split per sequence. The plan makes work units of similar size (`plan_paged_decode`),
            all launched in one grid, so a ragged batch keeps every SM busy: Triton aims at ~2
            programs (8-warp CTAs) per SM, the CUDA backend at ~16 warps per SM
            (`paged_attention_cuda.plan_splits`). Both backends take the same plan tensor.
        host_seq_lens: seq_lens as a list of host ints, when the caller has them (an inference
            engine does): the launcher plans from these with its own rule instead of reading
            seq_lens back, so a call makes no host sync. Must equal seq_lens (checked on CPU only);
            exclusive with num_splits and plan. Ignored by backend="torch".
        backend: "torch" | "triton" | "cuda" | None (triton on CUDA tensors, torch on CPU).
    Returns:
        (B, Hq, D) contiguous in q's dtype. Softmax and accumulation in fp32.
    Raises:
        TypeError / ValueError naming the offending argument and the expected shape/dtype. Value
        checks (seq_lens range, used page ids) run for CPU tensors only: on CUDA they would cost a
        host sync per call, and the kernel masks out-of-range values instead (module docstring).
        Under torch.compile the kernel backends run them inside their custom op; the traced torch
        backend has none.
    """
    OP.checks["paged_decode_attention"](q, k_cache, v_cache, block_table, seq_lens, scale, window, num_splits, plan,
                                        host_seq_lens)
    be = resolve_backend(backend, q, OP.choices)
    if be == "torch":
        return _decode_reference(q, k_cache, v_cache, block_table, seq_lens, scale, window)
    _check_kernel_dtype(q, "q")
    launcher = OP.launcher(be)
    if hasattr(launcher, "check_limits"):  # what this backend cannot run that the contract allows
        launcher.check_limits(q, k_cache)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    window = None if window is None else int(window)
    if torch.compiler.is_compiling():
        return torch.ops.nanofast.paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, scale, window,
                                                         num_splits, plan, host_seq_lens, be)
    return launcher.decode(q, k_cache, v_cache, block_table, seq_lens, scale, window, num_splits, plan=plan,
                           host_seq_lens=host_seq_lens)


def paged_kv_write(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor, *,
                   backend: str | None = None) -> None:
    """Write new keys/values into the paged cache in place.

    Args:
        k, v: (N, Hkv, D) in the caches' dtype and device (any strides; D contiguous avoids a copy).
        k_cache, v_cache: (num_pages, page_size, Hkv, D), D contiguous; modified in place.
        slot_mapping: (N,) int32 or int64, slot = page_id * page_size + offset_in_page for token i;
            slot < 0 skips the token (padding). Slots must be distinct (duplicates: unspecified
            winner). Slots >= num_pages * page_size raise on CPU and are skipped on CUDA (no check
            there: it would be a host sync; under torch.compile only the kernel backends check).
        backend: "torch" | "triton" | "cuda" | None (triton on CUDA tensors, torch on CPU).
    Every other cache slot is left bitwise untouched.
    """
    OP.checks["paged_kv_write"](k, v, k_cache, v_cache, slot_mapping)
    be = resolve_backend(backend, k, OP.choices)
    if torch.compiler.is_compiling():
        # One opaque op on every backend, torch's too: traced, the reference's masked assignment
        # into a slice of a larger pool is functionalised into a copy of that whole pool per call.
        if be != "torch":
            _check_kernel_dtype(k, "k")
        torch.ops.nanofast.paged_kv_write(k, v, k_cache, v_cache, slot_mapping, be)
        return
    if be == "torch":
        _write_reference(k, v, k_cache, v_cache, slot_mapping)
        return
    _check_kernel_dtype(k, "k")
    OP.launcher(be).write(k, v, k_cache, v_cache, slot_mapping)


# ----------------------------------------------------------------------------------------------
# What an H100 compiles (checked by the compile gate in the tests)
# ----------------------------------------------------------------------------------------------

def _decode_config(dtype: torch.dtype, group: int, head_dim: int, page_size: int) -> dict:
    t = _TL_DTYPE[dtype]
    m = _decode_meta(group, head_dim, torch.empty((), dtype=dtype).element_size())
    nw, ns = m.pop("num_warps"), m.pop("num_stages")
    const = dict(GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=page_size, **m)
    sig = gate_signature(_paged_decode_kernel, const, t,
                         {"K": f"*{t}", "BT": "*i32", "SL": "*i32", "OP": "*fp32", "LSE": "*fp32",
                          "SEQ_START": "*i32", "UNIT_SEQ": "*i32", "UNIT_IDX": "*i32"})
    # What Triton's launcher specialises for a contiguous cache and packed qkv at D in {64, 128}: all
    # pointers 16-byte aligned and every stride a multiple of 16 elements (D, Hkv*D, page_size*Hkv*D,
    # (Hq + 2 Hkv) * D). num_pages, capacity and the lengths are arbitrary; the plan's unit arrays
    # are slices of one packed tensor at arbitrary offsets (SEQ_START is its start).
    aligned = ("Q", "K", "V", "BT", "SL", "O", "OP", "LSE", "SEQ_START", "stride_qb", "stride_qh", "stride_kp",
               "stride_ks", "stride_kh", "stride_vp", "stride_vs", "stride_vh", "stride_ob", "stride_oh")
    return dict(fn=_paged_decode_kernel, signature=sig, constexprs=const, num_warps=nw, num_stages=ns,
                aligned=aligned,
                config=f"decode {t} group={group} D={head_dim} page={page_size} planned "
                       f"BLOCK={m['BLOCK_G']}x{m['BLOCK_N']}x{m['BLOCK_D']} warps={nw}")


def _merge_config(dtype: torch.dtype, head_dim: int) -> dict:
    """The merge's machine code does not depend on the split count (a runtime loop over chunks of
    BLOCK_S splits): one config per (dtype, D) covers 2..256 splits."""
    t = _TL_DTYPE[dtype]
    m = _merge_meta(head_dim)
    nw = m.pop("num_warps")
    const = dict(HEAD_DIM=head_dim, **m)
    sig = gate_signature(_paged_decode_merge_kernel, const, t,
                         {"OP": "*fp32", "LSE": "*fp32", "SEQ_START": "*i32"})
    return dict(fn=_paged_decode_merge_kernel, signature=sig, constexprs=const, num_warps=nw,
                num_stages=1, aligned=("OP", "LSE", "O", "SEQ_START", "stride_ob", "stride_oh"),
                config=f"merge {t} D={head_dim} BLOCK_S={m['BLOCK_S']} warps={nw} splits<=256")


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
        # default); one kernel serves direct (1 split) and split units; bf16 is what serving runs,
        # fp16 the interpreter twin.
        _decode_config(bf16, 1, 128, 16),
        _decode_config(bf16, 4, 128, 16),
        _decode_config(bf16, 8, 128, 16),
        _decode_config(fp16, 4, 128, 16),
        _decode_config(fp16, 8, 128, 16),
        _decode_config(bf16, 4, 64, 16),
        _decode_config(fp16, 1, 64, 16),
        # Large pages (one tile inside one page), page 1 (a gather per key) and fp32 (CPU-parity runs).
        _decode_config(bf16, 8, 128, 256),
        _decode_config(bf16, 4, 128, 1),
        _decode_config(fp32, 4, 128, 16),
        # The merge at every dtype of the output; its code is the same for 2..256 splits (fp32 at
        # D = 128 is the widest tile: the old one-tile merge held 256 x 128 fp32 partials).
        _merge_config(bf16, 128),
        _merge_config(fp16, 128),
        _merge_config(fp32, 128),
        _merge_config(bf16, 64),
        _merge_config(bf16, 256),
        _write_config(bf16, 8, 128, 16),
        _write_config(fp16, 2, 128, 16, "i32"),
        _write_config(bf16, 4, 64, 16),
    ]


KERNEL_CONFIGS: list[dict] = _kernel_configs()
"""Each entry: keyword arguments of `compile_gate.compile_triton` (fn, signature, constexprs, num_warps,
num_stages, aligned, config), built from the launchers' own `_decode_meta` / `_merge_meta` / `_write_meta`,
so `compile_triton(**cfg, arch=90)` compiles exactly what an H100 launches for that shape."""


# The Triton backend's launchers, in the op's launcher protocol (decode, write; inputs trusted).
# The CUDA backend's are paged_attention_cuda.decode / write (and its check_limits).
TRITON_LAUNCHERS = SimpleNamespace(decode=_decode_triton, write=_write_triton)


def cost(seq_lens: list[int], hq: int, hkv: int, d: int, itemsize: int = 2) -> dict:
    """The floor any decode attention pays: every K and V row of every sequence read once, q read
    and the output written once (block table and lengths are negligible); 4 FLOPs per (query head,
    key, channel): the q.k and p.v products."""
    return {"bytes": (2 * sum(seq_lens) * hkv * d + 2 * len(seq_lens) * hq * d) * itemsize,
            "flops": 4 * hq * sum(seq_lens) * d}


def gather_pages(cache: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """cache (num_pages, page_size, ...) gathered at `pages` (any shape, integer page ids) ->
    (*pages.shape, page_size, ...), a new contiguous tensor: what `cache[pages]` gives.

    index_select copies each page as one contiguous block; advanced indexing (`cache[pages]`) goes
    through the generic strided index kernel element by element, several times slower on CPU for
    the same bytes (bench/test_bench_paged_attention.py times both)."""
    return cache.index_select(0, pages.reshape(-1).long()).view(*pages.shape, *cache.shape[1:])


def _vendor(q, k_cache, v_cache, block_table, seq_lens, scale=None, window=None):
    # Without a paged kernel the pages are gathered into a dense view for SDPA: one extra copy of
    # the visible cache, the cost the kernels avoid.
    k, v = gather_pages(k_cache, block_table).flatten(1, 2), gather_pages(v_cache, block_table).flatten(1, 2)
    pos = torch.arange(k.size(1), device=q.device)[None, :]
    lens = seq_lens.long()[:, None]
    valid = pos < lens
    if window is not None and window >= 0:
        valid &= pos >= lens - 1 - window
    y = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], k.transpose(1, 2), v.transpose(1, 2), attn_mask=valid[:, None, None, :], scale=scale,
        enable_gqa=q.size(1) != k.size(2))
    return y[:, :, 0]


OP = Op(name="paged_attention", vendor="torch", kernels=("triton", "cuda"), unmeasured="triton",
        why="memory-bound: reads the pages in place instead of gathering them (paged decode and paged_kv_write)",
        checks={"paged_decode_attention": _check_decode, "paged_kv_write": _check_write},
        references={"paged_decode_attention": paged_decode_attention_reference,
                    "paged_kv_write": paged_kv_write_reference},
        vendor_path=_vendor, launchers={"triton": TRITON_LAUNCHERS, "cuda": "paged_attention_cuda"}, cost=cost,
        configs=lambda arch=90: KERNEL_CONFIGS)
