"""Paged KV-cache decode attention and the paged KV write by csrc/paged_attention.cu.

`paged_decode_attention_cuda / paged_kv_write_cuda` check their arguments (a drop-in API of their
own); `decode / write` trust them: the op's "cuda" launchers, which its public entry runs after
validating once (see cuda_args.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import vendor
from .cuda_abi import DTYPE_CODES, PagedAttentionArgs, PagedKvWriteArgs
from .cuda_args import (check_device, check_index_tensor, check_int, check_like, check_real, check_same_dtype,
                        check_shape, check_tensor, ptr, unit_last)
from .cuda_build import launch
from .launch import sm_count
from .paged_plan import MAX_SPLITS, check_plan, hnd_hint, host_lengths, plan_paged_decode, plan_tensors


MAX_D = 256  # kMaxD in csrc/paged_attention.cu: at most 8 elements per lane in registers
MAX_WARPS = 8  # kMaxWarps in csrc/paged_attention.cu: the block size its __launch_bounds__ declares
SPLIT_MIN_KEYS = 64  # the plan's granule: a split streams about this many keys or more (>= half of it)
# The occupancy the plan targets: 16 resident warps per SM, each with one ~1 KB step of K/V rows in
# flight (2 x 32 lanes x 16 B), ~16 KB per SM: Little's law on an H100 wants ~3.35 TB/s x ~600 ns /
# 132 SMs ~= 15 KB. 16 warps of every instantiation fit an SM's 64 K registers (<= 128 registers per
# thread, __launch_bounds__(256, 2); asserted from the nvcc facts). See csrc/paged_attention.cu.
WARPS_PER_SM = 16
REGS_PER_SM = 65536


def _check_cache_pair(k_cache, v_cache) -> tuple[int, int, int, int]:
    check_tensor("k_cache", k_cache, 4)
    check_tensor("v_cache", v_cache, 4)
    if min(k_cache.shape) < 1:
        raise ValueError(f"k_cache must have shape (num_pages, page_size, Hkv, D) with every size >= 1, got "
                         f"{tuple(k_cache.shape)}")
    check_like("v_cache", v_cache, k_cache, "k_cache")
    return tuple(k_cache.shape)


def heads_layout(G: int) -> tuple[int, int, int]:
    """(heads per warp, warps, blocks per KV head) for the G query heads of a KV head.

    The one place of this policy: the launch passes the first two in its argument struct (the C side
    only checks them against what it compiled) and the split count and grid check use the third.
    A warp loads each K/V row into registers once for all its heads; more than 4 heads per warp
    would cost registers that the 8 elements per lane of q and the accumulator already claim at D = 256.
    """
    hpw = 1 if G == 1 else 2 if G == 2 else 4
    warps = min(-(-G // hpw), MAX_WARPS)
    return hpw, warps, -(-G // (hpw * warps))


def plan_splits(device: torch.device, seq_lens: Tensor, window: int, max_len: int, Hkv: int, G: int) -> list[int]:
    """Splits per sequence from the actual lengths (`paged_attention.plan_paged_decode`, the rule the
    Triton backend uses), sized so that units x Hkv x head blocks x warps ~ WARPS_PER_SM x SMs.

    On CUDA a device tensor here is read back (one device->host copy of B ints, a sync): callers pass
    host lengths (`host_seq_lens`) or `plan=` to avoid it. The emulation (CPU) runs blocks one
    after another: one split per sequence."""
    if device.type != "cuda":
        return [1] * seq_lens.shape[0]
    _, warps, hblocks = heads_layout(G)
    lens = seq_lens.to("cpu", torch.int64).clamp(1, max_len)  # the kernel clamps bad lengths the same way
    # waves = resident warps per SM / warps per block: plan_paged_decode aims at waves x SMs / (Hkv x
    # hblocks) units, each unit being Hkv x hblocks blocks of `warps` warps.
    plan = plan_paged_decode(lens, Hkv * hblocks, window=None if window < 0 else window, block_n=SPLIT_MIN_KEYS,
                             sm_count=sm_count(device), waves=WARPS_PER_SM / warps)
    return [int(x) for x in plan.tolist()]


def check_limits(q: Tensor, k_cache: Tensor) -> None:
    """What this backend cannot run that the op's contract allows: a head dim above the kernel's
    registers, or more (KV head x head block) pairs than the grid's y dimension. The op's public
    entry validated everything else."""
    Hq, D = q.shape[1], q.shape[2]
    Hkv = k_cache.shape[2]
    if D > MAX_D:
        raise ValueError(f"k_cache head dimension D = {D} exceeds the kernel's maximum {MAX_D} (the CUDA backend's)")
    if Hkv * heads_layout(Hq // Hkv)[2] > 65535:
        raise ValueError(f"Hkv = {Hkv} KV heads (x head blocks) exceed the launch grid's y dimension")


def _check_paged_attention(q, k_cache, v_cache, block_table, seq_lens, scale, window, num_splits, plan=None,
                           host_seq_lens=None) -> None:
    """Validate the arguments of paged_decode_attention_cuda."""
    check_tensor("q", q, 3)
    P, ps, Hkv, D = _check_cache_pair(k_cache, v_cache)
    check_index_tensor("block_table", block_table, 2, (torch.int32,))
    check_index_tensor("seq_lens", seq_lens, 1, (torch.int32,))
    check_device(q.device, k_cache=k_cache, v_cache=v_cache, block_table=block_table, seq_lens=seq_lens)
    check_same_dtype("k_cache", k_cache, q.dtype, "q")
    B, Hq, Dq = q.shape
    if Dq != D:
        raise ValueError(f"q must have shape (B, Hq, D = {D}) to match k_cache, got {tuple(q.shape)}")
    if Hq < 1 or Hq % Hkv:
        hint = ""
        if Hq >= 1 and Hq % ps == 0:  # only the transposed (HND) reading fits q's heads: name that layout
            hint = hnd_hint(k_cache, f"q's Hq={Hq} heads fit its Hkv = dim 1 ({ps})")
        raise ValueError(f"q has Hq = {Hq} heads: must be a positive multiple of the k_cache KV heads Hkv = {Hkv}"
                         + hint)
    check_limits(q, k_cache)
    if block_table.shape[0] != B or block_table.shape[1] < 1:
        raise ValueError(f"block_table must have shape (B = {B}, max_pages >= 1), got {tuple(block_table.shape)}")
    check_shape("seq_lens", seq_lens, (B,))
    max_len = block_table.shape[1] * ps
    if max_len > 2**31 - 1:
        raise ValueError(f"block_table max_pages * page_size = {max_len} positions exceed int32")
    scale = check_real("scale", scale)
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if window is not None:
        vendor.left_window(window)
    if plan is not None and num_splits is not None:
        raise ValueError("pass either num_splits (the same split count for every sequence) or plan "
                         "(splits per sequence), not both")
    if num_splits is not None:
        S = check_int("num_splits", num_splits, 1)
        if S > MAX_SPLITS:
            raise ValueError(f"num_splits must be <= {MAX_SPLITS}, got {S}")
    elif plan is not None:
        check_plan(plan, B)
    if host_seq_lens is not None and len(host_seq_lens) != B:
        raise ValueError(f"host_seq_lens must hold B = {B} lengths, got {len(host_seq_lens)}")
    if B and not q.is_cuda:
        w = -1 if window is None or vendor.left_window(window) is None else int(window)
        _check_paged_values(block_table, seq_lens, P, ps, w)


def decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor, scale: float,
           window: int | None, num_splits: int | None, plan: Tensor | None = None,
           host_seq_lens: list[int] | None = None) -> Tensor:
    """paged_decode_attention_cuda for validated arguments: the split plan (num_splits for every
    sequence, else `plan`, else planned from the lengths by `plan_splits`), then one launch."""
    q = unit_last(q)
    B, Hq, _ = q.shape
    Hkv, ps = k_cache.shape[2], k_cache.shape[1]
    max_len = block_table.shape[1] * ps
    w = -1 if window is None or vendor.left_window(window) is None else int(window)  # -1: full causal
    if w > 2**31 - 1:
        w = -1  # a window longer than any sequence is no window
    if num_splits is not None:
        splits = [int(num_splits)] * B
    elif plan is not None:
        splits = [int(x) for x in plan.tolist()]
    else:
        lens = host_lengths(seq_lens, host_seq_lens) if B else seq_lens
        splits = plan_splits(q.device, lens, w, max_len, Hkv, Hq // Hkv) if B else []
    if sum(splits) > 2**31 - 1:
        raise ValueError(f"{sum(splits)} work units exceed the launch grid")
    out = torch.empty(tuple(q.shape), dtype=q.dtype, device=q.device)
    decode_into(q, k_cache, v_cache, block_table, seq_lens, float(scale), w, splits, out)
    return out


def _check_paged_values(block_table: Tensor, seq_lens: Tensor, P: int, ps: int, window: int) -> None:
    """CPU tensors: seq_lens in [1, max_pages * page_size]; block-table entries of every page the
    kernel reads in [0, P). Entries of pages it does not read (past the sequence, before its
    window) may be anything. On CUDA this would be a host sync per decode step (and a device assert
    would poison the context), so there the kernel clamps lengths and drops keys of out-of-pool
    pages instead: a wrong result for bad values, never a fault (as the Triton kernel does)."""
    max_len = block_table.shape[1] * ps
    lens = seq_lens.to(torch.int64)
    lo, hi = int(lens.min()), int(lens.max())
    if lo < 1 or hi > max_len:
        raise ValueError(f"seq_lens must lie in [1, max_pages * page_size = {max_len}], got [{lo}, {hi}]")
    last = (lens - 1) // ps
    first = torch.zeros_like(last) if window < 0 else (lens - 1 - window).clamp(min=0) // ps
    idx = torch.arange(block_table.shape[1])
    read = (idx >= first[:, None]) & (idx <= last[:, None])
    bad = read & ((block_table < 0) | (block_table >= P))
    if bool(bad.any()):
        b, p = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"block_table[{b}, {p}] = {int(block_table[b, p])} is a page sequence {b} reads: it must "
                         f"lie in [0, num_pages = {P})")


def decode_into(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                                 seq_lens: Tensor, scale: float, window: int, splits, out: Tensor) -> None:
    """Attention into a caller-provided out (B, Hq, D) in q's dtype, any strides but a contiguous last
    dim; scale a float, window an int (-1: none). `splits`: splits per
    sequence (a list of B ints >= 1), or one int for every sequence (the uniform plan)."""
    B, Hq, D = q.shape
    if B == 0:
        return
    if isinstance(splits, int):
        splits = [splits] * B
    P, ps, Hkv, _ = k_cache.shape
    packed, units = plan_tensors(list(splits), B, 1, q.device)
    seq_start, unit_seq, unit_idx = packed[:B + 1], packed[B + 1:B + 1 + units], packed[B + 1 + units:]
    part_o = part_lse = None
    if units > B:
        part_o = torch.empty((units, Hq, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((units, Hq), dtype=torch.float32, device=q.device)
    ks, vs = k_cache.stride(), v_cache.stride()
    hpw, warps, _ = heads_layout(Hq // Hkv)
    launch("nf_paged_attention_fwd", q.device, PagedAttentionArgs(
        dtype=DTYPE_CODES[q.dtype], B=B, Hq=Hq, Hkv=Hkv, D=D, q=q.data_ptr(), q_sb=q.stride(0), q_sh=q.stride(1),
        k=k_cache.data_ptr(), k_sp=ks[0], k_ss=ks[1], k_sh=ks[2], v=v_cache.data_ptr(), v_sp=vs[0], v_ss=vs[1],
        v_sh=vs[2], num_pages=P, page_size=ps, block_table=block_table.data_ptr(), bt_sb=block_table.stride(0),
        bt_sp=block_table.stride(1), max_pages=block_table.shape[1], seq_lens=seq_lens.data_ptr(),
        sl_s=seq_lens.stride(0), window=window, scale=scale, num_units=units, seq_start=seq_start.data_ptr(),
        unit_seq=unit_seq.data_ptr(), unit_idx=unit_idx.data_ptr(), part_o=ptr(part_o),
        part_lse=ptr(part_lse), out=out.data_ptr(), o_sb=out.stride(0), o_sh=out.stride(1), heads_per_warp=hpw,
        warps=warps))


def paged_decode_attention_cuda(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                                scale: float, window: int | None, num_splits: int | None,
                                plan: Tensor | None = None, host_seq_lens: list[int] | None = None) -> Tensor:
    """Decode attention of one query token per sequence over a paged KV cache (csrc/paged_attention.cu).

    q: (B, Hq, D) float32/float16/bfloat16, any strides (a non-unit last-dim stride costs a copy of q).
    k_cache, v_cache:
    (num_pages, page_size, Hkv, D) in q's dtype (NHD; any strides, last dim contiguous), D <= 256,
    Hq a multiple of Hkv; query head h uses KV head h // (Hq // Hkv). block_table: (B, max_pages)
    int32, page ids of each sequence's positions in order; entries past a sequence's used pages are
    never read. seq_lens: (B,) int32 in [1, max_pages * page_size], the length including the current
    token. Values (lengths, used page ids) are checked for CPU tensors; on CUDA (no host sync) the
    kernel clamps lengths and skips keys in pages outside the pool instead. scale > 0 multiplies
    q.k. window None or -1: all keys; w >= 0: keys j with len-1-w <= j <= len-1.
    num_splits: the uniform plan, this many splits of every sequence (1..256, paged_plan.MAX_SPLITS). plan: (B,) int32
    CPU tensor of splits per sequence (`paged_attention.plan_paged_decode`), exclusive with
    num_splits. Both None: planned from the lengths (`plan_splits`: ~16 warps per SM of similar-sized
    work units, one launch; on CUDA a device->host copy of seq_lens unless host_seq_lens (the same
    lengths as host ints) is given; 1 split each in the emulation).
    Returns (B, Hq, D) in q's dtype; fp32 scores, online softmax, deterministic.
    """
    q = unit_last(q)
    _check_paged_attention(q, k_cache, v_cache, block_table, seq_lens, scale, window, num_splits, plan,
                           host_seq_lens)
    return decode(q, k_cache, v_cache, block_table, seq_lens, scale, window, num_splits, plan, host_seq_lens)


def _check_write(k, v, k_cache, v_cache, slot_mapping) -> None:
    check_tensor("k", k, 3)
    check_tensor("v", v, 3)
    P, ps, Hkv, D = _check_cache_pair(k_cache, v_cache)
    check_index_tensor("slot_mapping", slot_mapping, 1, (torch.int32, torch.int64))
    check_device(k.device, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    N = k.shape[0]
    check_shape("k", k, (N, Hkv, D))
    check_shape("v", v, (N, Hkv, D))
    check_same_dtype("v", v, k.dtype, "k")
    check_same_dtype("k_cache", k_cache, k.dtype, "k")
    check_shape("slot_mapping", slot_mapping, (N,))
    # On CUDA the kernel skips out-of-range slots instead: checking would be a host sync.
    if N and not slot_mapping.is_cuda and int(slot_mapping.max()) >= P * ps:
        raise ValueError(f"slot_mapping entries must be < num_pages * page_size = {P * ps} (or negative: skipped), "
                         f"got {int(slot_mapping.max())}")


def paged_kv_write_cuda(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Store k, v (N, Hkv, D) into the paged caches (num_pages, page_size, Hkv, D) in place.

    k, v: any strides (a non-unit last-dim stride costs a copy); caches: last dim contiguous.
    Token n goes to page slot_mapping[n] // page_size, offset slot_mapping[n] % page_size (int32 or
    int64, < num_pages * page_size: raises for CPU tensors, skipped on CUDA where checking would
    cost a host sync); negative slots are skipped (padding tokens). Values are copied
    bit for bit; every other cache element is left untouched. Slots must be distinct (duplicates race).
    """
    k, v = unit_last(k), unit_last(v)
    _check_write(k, v, k_cache, v_cache, slot_mapping)
    write(k, v, k_cache, v_cache, slot_mapping)


def write(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """paged_kv_write_cuda for validated arguments."""
    k, v = unit_last(k), unit_last(v)
    N, Hkv, D = k.shape
    P, ps = k_cache.shape[:2]
    if N == 0:
        return
    if -(-N * Hkv // 4) > 2**31 - 1:
        raise ValueError(f"N * Hkv = {N * Hkv} rows exceed the launch grid")
    slots = slot_mapping.contiguous()
    kcs, vcs = k_cache.stride(), v_cache.stride()
    launch("nf_paged_kv_write", k.device, PagedKvWriteArgs(
        dtype=DTYPE_CODES[k.dtype], N=N, Hkv=Hkv, D=D, k=k.data_ptr(), k_sn=k.stride(0), k_sh=k.stride(1),
        v=v.data_ptr(), v_sn=v.stride(0), v_sh=v.stride(1), kc=k_cache.data_ptr(), kc_sp=kcs[0], kc_ss=kcs[1],
        kc_sh=kcs[2], vc=v_cache.data_ptr(), vc_sp=vcs[0], vc_ss=vcs[1], vc_sh=vcs[2], num_pages=P, page_size=ps,
        slots=slots.data_ptr(), slots64=int(slots.dtype == torch.int64)))
