"""The split plan of a paged decode step, shared by the Triton and CUDA backends.

Decode attention reads every visible key of every sequence once; with few or ragged sequences one
program per (sequence, kv head) leaves most SMs idle while one walks a long context. A plan cuts
each sequence's visible keys into work units of similar size (flash-decoding, planned as FlashInfer
does) so one launch keeps the machine busy. Both backends take the same plan tensor; each picks its
own occupancy target (`waves`) when it plans for itself. Also shared: `hnd_hint`, the layout hint
both backends' validations add when a cache looks transposed.
"""
from __future__ import annotations

import functools
import math
import numbers

import torch
from torch import Tensor

from . import vendor

MAX_SPLITS = 256  # splits per sequence at most: bounds the fp32 partials (units x Hq x D) a call allocates
# and the merge's loop (it walks them in chunks of 16, so its registers do not depend on this)

PLAN_WAVES = 2  # the plan aims at ~2 decode programs per SM (two resident CTAs hide each other's latency)


def plan_paged_decode(seq_lens, num_kv_heads: int, *, window: int | None = None, block_n: int = 64,
                      sm_count: int | None = None, waves: float = PLAN_WAVES, max_splits: int = MAX_SPLITS) -> Tensor:
    """Split plan of a decode batch from its actual lengths: how many splits each sequence gets.

    Args:
        seq_lens: (B,) lengths (including the current token), an int tensor on any device (a CUDA
            tensor costs one device->host copy of B ints here: pass a host copy, e.g. what the
            engine already knows, to avoid the sync) or a sequence of ints, each >= 1.
        num_kv_heads: Hkv (each work unit runs Hkv programs, one per kv head).
        window: the call's sliding window (None or -1: full causal): a sequence's visible keys are
            min(L, window + 1).
        block_n: keys per tile of the kernel (64 for 16-bit caches at D <= 128, `_decode_meta`); a
            split is a whole number of tiles.
        sm_count: the SMs to fill; None (CPU: the interpreter runs programs one after another): one
            split per sequence.
        waves: target programs per SM; max_splits: cap per sequence (the merge reads at most that).
    Returns:
        (B,) int32 CPU tensor, splits[b] in [1, max_splits]. Pass it as `plan=` to
        `paged_decode_attention`.

    Rule (FlashInfer-style balanced planning): T_b = ceil(visible_b / block_n) tiles per sequence;
    one chunk size for the whole batch, c = max(ceil(sum_b T_b / target), ceil(max_b T_b / max_splits))
    tiles with target = max(1, ceil(waves * sm_count / Hkv)) units; sequence b gets
    splits[b] = ceil(T_b / c). Every unit then holds between c/2 and c tiles (T_b // splits[b] or one
    more, never more than c), except that a sequence shorter than c tiles is one unit of its own; the
    total is <= target + B units, all launched at once (grid (units, Hkv)), so a ragged batch (one long
    sequence, many short) spreads the long one over many SMs instead of leaving them idle.
    """
    if isinstance(seq_lens, Tensor):
        lens = [int(x) for x in seq_lens.detach().to("cpu", torch.int64).tolist()]
    else:
        lens = [int(x) for x in seq_lens]
    if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, numbers.Integral) or num_kv_heads < 1:
        raise ValueError(f"num_kv_heads must be an int >= 1, got {num_kv_heads!r}")
    if isinstance(block_n, bool) or not isinstance(block_n, numbers.Integral) or block_n < 1:
        raise ValueError(f"block_n must be an int >= 1, got {block_n!r}")
    if sm_count is not None and (isinstance(sm_count, bool) or not isinstance(sm_count, numbers.Integral)
                                 or sm_count < 1):
        raise ValueError(f"sm_count must be None (CPU) or an int >= 1, got {sm_count!r}")
    if (isinstance(max_splits, bool) or not isinstance(max_splits, numbers.Integral)
            or not 1 <= max_splits <= MAX_SPLITS):
        raise ValueError(f"max_splits must be an int in [1, {MAX_SPLITS}], got {max_splits!r}")
    if not isinstance(waves, numbers.Real) or isinstance(waves, bool) or not waves > 0:
        raise ValueError(f"waves must be a number > 0, got {waves!r}")
    if window is not None and vendor.left_window(window) is None:
        window = None
    if lens and min(lens) < 1:
        raise ValueError(f"seq_lens must all be >= 1 to plan a decode step, got min {min(lens)}")
    if not lens:
        return torch.zeros(0, dtype=torch.int32)
    vis = lens if window is None else [min(n, window + 1) for n in lens]
    tiles = [-(-n // block_n) for n in vis]
    if sm_count is None:
        return torch.ones(len(lens), dtype=torch.int32)
    target = max(1, math.ceil(waves * sm_count / num_kv_heads))
    chunk = max(1, -(-sum(tiles) // target), -(-max(tiles) // max_splits))
    return torch.tensor([-(-t // chunk) for t in tiles], dtype=torch.int32)


def host_lengths(seq_lens: Tensor, host_seq_lens: list[int] | None) -> Tensor:
    """The lengths to plan from as an int64 CPU tensor: the caller's host copy if it gave one, else
    seq_lens read back (on CUDA a device->host copy, i.e. a sync)."""
    if host_seq_lens is not None:
        return torch.tensor(host_seq_lens, dtype=torch.int64)
    return seq_lens.to("cpu", torch.int64)


def check_plan(plan, B: int, values: bool = True) -> None:
    """A plan tensor's type, shape, dtype and device; with `values`, also its entries (read on the
    host: the plan is a CPU tensor). Under torch.compile the entries are unknown at trace time, so
    the traced entry passes values=False and the kernel backends' custom op checks them when it runs."""
    if not isinstance(plan, Tensor):
        raise TypeError(f"plan must be a (B,) int32 tensor of splits per sequence (plan_paged_decode), "
                        f"got {type(plan).__name__}")
    if plan.dtype != torch.int32 or plan.ndim != 1 or plan.shape[0] != B:
        raise ValueError(f"plan must be a (B,) = ({B},) int32 tensor of splits per sequence (plan_paged_decode), "
                         f"got shape {tuple(plan.shape)} dtype {plan.dtype}")
    if plan.is_cuda:
        raise ValueError("plan must be a CPU tensor (it is read on the host to size the launch)")
    if values and B and (int(plan.min()) < 1 or int(plan.max()) > MAX_SPLITS):
        raise ValueError(f"plan entries must lie in [1, {MAX_SPLITS}] splits, got values in "
                         f"[{int(plan.min())}, {int(plan.max())}]")


def plan_tensors(splits: list[int] | None, B: int, uniform: int, device: torch.device) -> tuple[Tensor, int]:
    """One int32 tensor [seq_start (B+1) | unit_seq (U) | unit_idx (U)] on `device` (one host->device
    copy) and U. splits None: the uniform plan, `uniform` splits for every sequence.

    A uniform plan (splits None, or every entry equal) is built once per (B, splits, device) and
    reused: a CUDA graph that captured a decode step replays the plan tensor it captured, so that
    tensor must stay alive and unchanged, and the capture itself cannot make a pageable
    host->device copy. Callers only read the result."""
    if splits is None or (splits and all(n == splits[0] for n in splits)):
        return _uniform_plan(B, uniform if splits is None else splits[0], device)
    return _plan_tensors(splits, device)


def _plan_tensors(splits: list[int], device: torch.device) -> tuple[Tensor, int]:
    start = [0]
    for n in splits:
        start.append(start[-1] + n)
    unit_seq = [b for b, n in enumerate(splits) for _ in range(n)]
    unit_idx = [i for n in splits for i in range(n)]
    packed = torch.tensor(start + unit_seq + unit_idx, dtype=torch.int32)
    return packed.to(device, non_blocking=True) if device.type == "cuda" else packed, start[-1]


@functools.lru_cache(maxsize=256)
def _uniform_plan(B: int, n: int, device: torch.device) -> tuple[Tensor, int]:
    return _plan_tensors([n] * B, device)


def hnd_hint(k_cache: Tensor, why: str) -> str:
    """The tail of an error whose cache shape fits the transposed HND layout (num_pages, Hkv,
    page_size, D) where the NHD reading failed (FlashInfer's other layout, vLLM's v1 cache
    transposed): it names the layout, since the failing check alone (GQA, seq_lens) would not."""
    return (f"; k_cache and v_cache must be in NHD layout (num_pages, page_size, Hkv, D), and their shape "
            f"{tuple(k_cache.shape)} fits the HND layout (num_pages, Hkv, page_size, D) instead ({why}): if that is "
            "their layout, pass k_cache.transpose(1, 2) and v_cache.transpose(1, 2) (views: the kernels take any "
            "strides with a contiguous D)")
