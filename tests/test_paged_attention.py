"""Tests for nanofast.kernels.paged_attention (paged KV-cache decode attention + paged KV write).

The Triton kernels run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
Every decode result is compared with two yardsticks: the module's plain-torch reference, and an
independent dense implementation written here (each sequence's K/V rebuilt position by position
from the pages, masked causal / sliding-window attention of the last position) evaluated in fp64.

Error budgets, per dtype (outputs are O(1): softmax-weighted means of N(0, 1) values):

    fp32: max|kernel - dense64| <= 1e-5 and max|kernel - reference| <= 1e-5
          (fp32 accumulation in both; only the summation order differs).
    fp16: max|kernel - dense64| <= 2 * max|dense16 - dense64| + 2^-11
          dense16 = the same dense attention computed with fp16 torch ops (what a user gets from
          plain torch in fp16); the kernel accumulates in fp32 but rounds P to fp16 for the P @ V
          tensor-core product (as FlashAttention does) and rounds the output once: the extra
          2^-11 * max(1, max|out|) (half an fp16 ulp of the output, one rounding) covers that.
          max|kernel - reference| <= 2^-10 * max(1, max|out|) (both fp32 inside, each rounded once
          to fp16, plus P's rounding in the kernel).
    bf16: the interpreter cannot run tl.dot on bf16 (it multiplies raw bit patterns), so bf16 is
          covered by the compile gate (sm_90 machine code) and by the torch backend here:
          max|reference - dense64| <= 2^-8 (one bf16 rounding of an O(1) output).

Poison: every cache slot the kernel must not read (unused tail of each last page, pages of no
sequence, pages that block_table entries past a sequence's used count point to) holds NaN, and
those block_table entries also hold out-of-range ids: a single stray read shows up as NaN or a
fault. Outputs written into a preallocated buffer are checked for untouched guard bands.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from compile_gate_helpers import check_common_facts, gate_facts_fixture, gate_tests

pa = importlib.import_module("nanofast.kernels.paged_attention")
KERNEL_CONFIGS = pa.KERNEL_CONFIGS
paged_decode_attention = pa.paged_decode_attention
paged_decode_attention_reference = pa.paged_decode_attention_reference
paged_kv_write = pa.paged_kv_write
paged_kv_write_reference = pa.paged_kv_write_reference

DT_ID = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
NAN = float("nan")


# ----------------------------------------------------------------------------------------------
# Builders and the independent dense yardstick
# ----------------------------------------------------------------------------------------------

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_case(B, Hq, Hkv, D, page_size, seq_lens, dtype, seed, spare_pages=3, q_pad=True):
    """A poisoned paged cache holding B sequences of the given lengths.

    Pages are a random permutation of the whole pool (so ids near the pool's end are used); the
    pool has `spare_pages` pages no sequence owns. Cache slots not holding a sequence position are
    NaN. block_table (B, max_pages) has >= 2 entries past every sequence's used pages, holding ids
    of NaN pages, negative and out-of-range ids. q is a (B, Hq, D) slice of a packed qkv-like
    buffer whose other columns are NaN (q_pad=True), else contiguous.
    Returns q, k_cache, v_cache, block_table, seq_lens and the dense fp64 K, V per sequence.
    """
    g = _gen(seed)
    used = [-(-L // page_size) for L in seq_lens]
    max_pages = max(used) + 2
    num_pages = sum(used) + spare_pages
    perm = torch.randperm(num_pages, generator=g)
    k_cache = torch.full((num_pages, page_size, Hkv, D), NAN, dtype=torch.float64)
    v_cache = torch.full_like(k_cache, NAN)
    block_table = torch.empty((B, max_pages), dtype=torch.int32)
    spare = perm[sum(used):]
    dense = []
    start = 0
    for b, L in enumerate(seq_lens):
        pages = perm[start:start + used[b]]
        start += used[b]
        junk = [int(spare[(b + i) % len(spare)]) if len(spare) else 0 for i in range(max_pages - used[b])]
        # Garbage past the used pages: poisoned pages, a negative id, an id far outside the pool.
        if len(junk) >= 3:
            junk[1], junk[2] = -7, 2 ** 31 - 1
        block_table[b] = torch.tensor(pages.tolist() + junk, dtype=torch.int32)
        k = torch.randn((L, Hkv, D), generator=g, dtype=torch.float64)
        v = torch.randn((L, Hkv, D), generator=g, dtype=torch.float64)
        pos = torch.arange(L)
        k_cache[pages[pos // page_size], pos % page_size] = k
        v_cache[pages[pos // page_size], pos % page_size] = v
        dense.append((k, v))
    qv = torch.randn((B, Hq, D), generator=g, dtype=torch.float64)
    if q_pad:
        buf = torch.full((B, (Hq + 2 * Hkv) * D + 3), NAN, dtype=dtype)
        buf[:, :Hq * D] = qv.flatten(1).to(dtype)
        q = buf[:, :Hq * D].unflatten(-1, (Hq, D))
        assert B == 1 or not q.is_contiguous()
    else:
        q = qv.to(dtype)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    # Dense copies of what the (rounded) cache holds, for the fp64 yardstick.
    dense = [(k.to(dtype).double(), v.to(dtype).double()) for k, v in dense]
    return q, k_cache.to(dtype), v_cache.to(dtype), block_table, seq, dense


def dense_attention(q, dense, window, scale, dtype=torch.float64):
    """Independent definition: the last position of each sequence attends its dense K/V with a
    causal (+ sliding window) mask over ALL positions, computed with torch ops in `dtype`."""
    B, Hq, D = q.shape
    out = []
    for b, (k, v) in enumerate(dense):
        L, Hkv, _ = k.shape
        group = Hq // Hkv
        kk = k.to(dtype).repeat_interleave(group, dim=1).transpose(0, 1)  # (Hq, L, D)
        vv = v.to(dtype).repeat_interleave(group, dim=1).transpose(0, 1)
        s = (q[b].to(dtype)[:, None, :] @ kk.transpose(1, 2))[:, 0] * scale  # (Hq, L)
        j = torch.arange(L)
        allowed = j <= L - 1
        if window is not None:
            allowed &= j >= L - 1 - window
        s = s.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, dim=-1)
        out.append((p[:, None, :] @ vv)[:, 0])
    return torch.stack(out)


def _max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


# ----------------------------------------------------------------------------------------------
# Decode: Triton vs reference vs dense fp64
# ----------------------------------------------------------------------------------------------

# (B, Hq, Hkv, D, page_size, seq_lens, window, num_splits). BLOCK_N is 64 keys (16 for fp32 at
# D = 80), so lengths 65..200 span several tiles; 7 splits of 1..4 tiles leave splits empty.
CASES = [
    (1, 1, 1, 16, 1, [1], None, 1),                       # smallest: one key, page of one slot
    (3, 2, 1, 16, 3, [2, 3, 4], None, 2),                 # page_size - 1, page_size, + 1; group 2
    (3, 3, 1, 80, 16, [15, 16, 17], 5, 3),                # group 3, D = 80 (masked to 128), window 5
    (5, 8, 1, 16, 3, [1, 70, 130, 65, 5], None, 7),       # group 8, several tiles, empty splits
    (2, 4, 2, 80, 16, [100, 33], 0, 2),                   # window 0: only the current key
    (3, 6, 3, 16, 1, [67, 1, 20], 5, 3),                  # page size 1, odd Hkv
    (2, 3, 3, 80, 5, [49, 11], None, 1),                  # page size 5, group 1, direct write
    (1, 8, 2, 32, 17, [150], 5, 2),                       # page 17; window -> one tile, split 2 empty
    (1, 16, 2, 16, 16, [200], None, 7),                   # group 8, long sequence over 7 splits
    (3, 2, 2, 16, 3, [64, 128, 129], 70, 3),              # lengths at / past tile multiples, window 70
]


def _case_id(c):
    B, Hq, Hkv, D, ps, lens, w, s = c
    return f"B{B}-q{Hq}kv{Hkv}-D{D}-ps{ps}-L{'_'.join(map(str, lens))}-w{w}-s{s}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DT_ID.get)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_decode_triton_matches_reference_and_dense(case, dtype):
    B, Hq, Hkv, D, ps, lens, window, splits = case
    q, kc, vc, bt, sl, dense = make_case(B, Hq, Hkv, D, ps, lens, dtype, seed=CASES.index(case))
    scale = 1.0 / math.sqrt(D)
    out = paged_decode_attention(q, kc, vc, bt, sl, window=window, num_splits=splits, backend="triton")
    assert out.shape == (B, Hq, D) and out.dtype == dtype and out.is_contiguous()
    assert torch.isfinite(out).all(), "NaN/inf: a poisoned slot was read"
    ref = paged_decode_attention_reference(q, kc, vc, bt, sl, window=window)
    assert torch.isfinite(ref).all()
    want = dense_attention(q.double(), dense, window, scale)
    err, err_ref = _max_err(out, want), _max_err(out, ref)
    half_ulp = 2.0 ** -11 * max(1.0, want.abs().max().item())  # one fp16 rounding of the output
    if dtype == torch.float32:
        assert err <= 1e-5 and err_ref <= 1e-5, (err, err_ref)
    else:
        torch_err = _max_err(dense_attention(q.double(), dense, window, scale, dtype=dtype), want)
        assert err <= 2 * torch_err + half_ulp, (err, torch_err)
        assert err_ref <= 2 * half_ulp, err_ref
    # The reference itself matches the dense definition (it is the CPU path users get).
    assert _max_err(ref, want) <= (1e-6 if dtype == torch.float32 else half_ulp)


@pytest.mark.parametrize("splits", [1, 2, 3, 7])
def test_split_count_does_not_change_the_result(splits):
    # One fixed problem, every split count: differences are fp32 merge roundoff only.
    q, kc, vc, bt, sl, dense = make_case(2, 4, 2, 16, 3, [131, 9], torch.float32, seed=7)
    base = paged_decode_attention(q, kc, vc, bt, sl, num_splits=1, backend="triton")
    out = paged_decode_attention(q, kc, vc, bt, sl, num_splits=splits, backend="triton")
    assert _max_err(out, base) <= 2e-6
    assert _max_err(out, dense_attention(q.double(), dense, None, 0.25)) <= 1e-5


def test_scale_window_and_default_backend():
    q, kc, vc, bt, sl, dense = make_case(2, 4, 1, 16, 4, [30, 7], torch.float32, seed=3)
    # backend=None on CPU tensors is the torch reference.
    out = paged_decode_attention(q, kc, vc, bt, sl, scale=0.7, window=9)
    torch.testing.assert_close(out, paged_decode_attention_reference(q, kc, vc, bt, sl, 0.7, 9), rtol=0, atol=0)
    want = dense_attention(q.double(), dense, 9, 0.7)
    assert _max_err(out, want) <= 1e-6
    tri = paged_decode_attention(q, kc, vc, bt, sl, scale=0.7, window=9, num_splits=2, backend="triton")
    assert _max_err(tri, want) <= 1e-5
    # scale=None is 1/sqrt(D); a window wider than every sequence is full attention.
    full = paged_decode_attention(q, kc, vc, bt, sl, window=10 ** 9, backend="triton")
    assert _max_err(full, dense_attention(q.double(), dense, None, 0.25)) <= 1e-5


def test_torch_backend_bf16_and_fp64():
    q, kc, vc, bt, sl, dense = make_case(3, 4, 2, 80, 3, [1, 8, 40], torch.bfloat16, seed=11)
    out = paged_decode_attention(q, kc, vc, bt, sl, window=5, backend="torch")
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert _max_err(out, dense_attention(q.double(), dense, 5, 80 ** -0.5)) <= 2.0 ** -8
    q, kc, vc, bt, sl, dense = make_case(2, 2, 1, 16, 5, [12, 5], torch.float64, seed=12)
    out = paged_decode_attention(q, kc, vc, bt, sl, backend="torch")
    assert _max_err(out, dense_attention(q, dense, None, 0.25)) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_gather_pages_is_advanced_indexing(dtype, index_dtype):
    """The torch path's page gather equals cache[pages] for a block table (2-d, repeated and
    shuffled pages), one sequence's page list (1-d) and an empty table; the result owns its memory."""
    g = torch.Generator().manual_seed(3)
    cache = torch.randn((9, 5, 3, 7), generator=g).to(dtype)  # odd page size, heads, head dim
    for pages in (torch.tensor([[4, 0, 4], [8, 2, 1]]), torch.tensor([7, 3]), torch.zeros((0, 3), dtype=torch.long)):
        got = pa.gather_pages(cache, pages.to(index_dtype))
        assert torch.equal(got, cache[pages.long()]) and got.is_contiguous()
    before = cache.clone()
    pa.gather_pages(cache, torch.tensor([[4, 0]], dtype=index_dtype)).add_(1)  # a copy, never a view of the pool
    assert torch.equal(cache, before)


def test_cache_views_with_free_strides():
    # k_cache / v_cache as views kv[:, 0] / kv[:, 1] of one (pages, 2, page, Hkv, D) buffer, and a
    # contiguous q: only D must be contiguous.
    q, kc, vc, bt, sl, dense = make_case(2, 4, 2, 16, 3, [20, 70], torch.float16, seed=5, q_pad=False)
    kv = torch.stack([kc, vc], dim=1)
    out = paged_decode_attention(q, kv[:, 0], kv[:, 1], bt, sl, num_splits=2, backend="triton")
    ref = paged_decode_attention_reference(q, kc, vc, bt, sl)
    assert _max_err(out, ref) <= 2.0 ** -10


def test_q_with_non_unit_last_stride_is_copied():
    q, kc, vc, bt, sl, _ = make_case(2, 2, 1, 16, 3, [5, 9], torch.float32, seed=6, q_pad=False)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, Hq, D) with stride(-1) = Hq
    assert qt.stride(-1) != 1
    out = paged_decode_attention(qt, kc, vc, bt, sl, backend="triton")
    assert _max_err(out, paged_decode_attention_reference(q, kc, vc, bt, sl)) <= 1e-5


@pytest.mark.parametrize("splits", [1, 3, "plan"])
def test_output_guard_bands_untouched(splits):
    # Write into a strided view of a sentinel-filled buffer: only the (B, Hq, D) window changes.
    B, Hq, Hkv, D = 3, 4, 2, 80
    q, kc, vc, bt, sl, dense = make_case(B, Hq, Hkv, D, 16, [3, 40, 17], torch.float16, seed=9)
    sentinel = 1234.0
    buf = torch.full((B + 2, Hq + 1, D + 8), sentinel, dtype=torch.float16)
    out = buf[1:B + 1, :Hq, 4:D + 4]
    if splits == "plan":  # some sequences direct, some merged
        got = pa._decode_triton(q, kc, vc, bt, sl, D ** -0.5, None, None, out=out,
                                plan=torch.tensor([1, 4, 2], dtype=torch.int32))
    else:
        got = pa._decode_triton(q, kc, vc, bt, sl, D ** -0.5, None, splits, out=out)
    assert got.data_ptr() == out.data_ptr()
    mask = torch.ones_like(buf, dtype=torch.bool)
    mask[1:B + 1, :Hq, 4:D + 4] = False
    assert (buf[mask] == sentinel).all(), "the kernel wrote outside its output"
    assert _max_err(out, paged_decode_attention_reference(q, kc, vc, bt, sl)) <= 2.0 ** -10


@pytest.mark.parametrize("splits", [1, 2])
def test_unchecked_bad_values_never_fault(splits):
    # What CUDA callers get without the (CPU-only) value checks: seq_lens beyond the block table's
    # capacity are clamped to it, keys on out-of-range page ids are skipped, a length of 0 gives
    # zeros (no 0/0, and no -inf - -inf in the merge); no NaN, no stray read.
    q, kc, vc, bt, sl, dense = make_case(3, 2, 1, 16, 4, [8, 12, 5], torch.float32, seed=13)
    bt = bt.clone()
    cap = bt.shape[1] * 4
    bt[0, 1] = kc.shape[0] + 3  # positions 4..7 of sequence 0 now point outside the pool
    bt[1, 3:] = bt[1, 0]        # sequence 1 will read (cap - 12) more keys from its first page
    bad = torch.tensor([8, cap + 50, 0], dtype=torch.int32)
    out = pa._decode_triton(q, kc, vc, bt, bad, 0.25, None, splits)
    assert torch.isfinite(out).all()
    assert (out[2] == 0).all()
    k0, v0 = dense[0]
    keep = torch.tensor([0, 1, 2, 3])
    k1, v1 = dense[1]
    extra = torch.arange(cap - 12) % 4
    dense_fixed = [(k0[keep], v0[keep]), (torch.cat([k1, k1[extra]]), torch.cat([v1, v1[extra]]))]
    assert _max_err(out[:2], dense_attention(q[:2].double(), dense_fixed, None, 0.25)) <= 1e-5


# ----------------------------------------------------------------------------------------------
# The split plan (from the actual lengths) and its one-launch execution
# ----------------------------------------------------------------------------------------------

def _units(lens, splits, block_n, window=None):
    """The kernel's split rule replayed in Python: per sequence, the tile ranges of its units."""
    out = []
    for L, n in zip(lens, splits):
        vis = L if window is None else min(L, window + 1)
        T = -(-vis // block_n)
        out.append([(s * T // n, (s + 1) * T // n) for s in range(n)])
    return out


PLAN_CASES = [
    # (lens, Hkv, window, block_n, sm_count)
    ([4096] + [1] * 31, 8, None, 64, 132),       # one long, many short (the ragged case)
    ([1] * 64, 8, None, 64, 132),                # all length 1: one unit each
    ([8192], 8, None, 64, 132),                  # one sequence: ~2 programs per SM
    ([8192], 1, None, 64, 132),
    ([100, 3000, 7, 2048, 640, 1], 2, None, 64, 132),
    ([5000, 4000, 9], 4, 100, 64, 132),          # window: 101 visible keys at most
    ([10 ** 6], 1, None, 16, 10 ** 4),           # capped at MAX_SPLITS per sequence
    ([512] * 256, 8, None, 64, 132),             # big uniform batch: already > 2 programs per SM
]


@pytest.mark.parametrize("lens,hkv,window,block_n,sm", PLAN_CASES)
def test_plan_units_are_balanced_and_cover_every_key_once(lens, hkv, window, block_n, sm):
    plan = pa.plan_paged_decode(torch.tensor(lens, dtype=torch.int32), hkv, window=window, block_n=block_n,
                                sm_count=sm)
    assert plan.dtype == torch.int32 and plan.shape == (len(lens),) and plan.device.type == "cpu"
    splits = plan.tolist()
    assert min(splits) >= 1 and max(splits) <= pa.MAX_SPLITS
    units = _units(lens, splits, block_n, window)
    sizes = []
    for L, us in zip(lens, units):
        vis = L if window is None else min(L, window + 1)
        T = -(-vis // block_n)
        covered = [t for lo, hi in us for t in range(lo, hi)]
        assert covered == list(range(T)), "every tile exactly once, in order"
        assert all(hi > lo for lo, hi in us), "no empty unit"
        sizes += [hi - lo for lo, hi in us]
    # One chunk size c for the batch: every unit <= c tiles; a split sequence's units >= c / 2.
    tiles = [-(-(L if window is None else min(L, window + 1)) // block_n) for L in lens]
    target = -(-2 * sm // hkv)
    c = max(1, -(-sum(tiles) // target), -(-max(tiles) // pa.MAX_SPLITS))
    assert max(sizes) <= c
    for us in units:
        if len(us) > 1:
            assert min(hi - lo for lo, hi in us) * 2 >= c - 1
    # Work units ~ the target (<= target + B), at least one per sequence.
    assert len(lens) <= sum(splits) <= target + len(lens)
    if len(lens) * 1 < target and max(tiles) >= target:
        assert sum(splits) >= min(target, pa.MAX_SPLITS) // 2, "a long sequence fills the machine"


def test_plan_ragged_batch_spreads_the_long_sequence():
    plan = pa.plan_paged_decode([4096] + [1] * 31, 8, sm_count=132).tolist()
    # 95 tiles over a target of 33 units: chunks of 3 tiles, the long sequence gets 22 of them.
    assert plan == [22] + [1] * 31
    # The old rule gave every sequence the same count from the block table's capacity: 1 here
    # (32 * 8 programs >= 2 x 132), leaving one program to walk 4096 keys alone.
    assert pa.plan_paged_decode([1] * 5, 8, sm_count=132).tolist() == [1] * 5
    assert pa.plan_paged_decode([4096], 8).tolist() == [1]           # CPU (no SM count): one split
    assert pa.plan_paged_decode([], 8, sm_count=132).shape == (0,)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(seq_lens=[0, 5], num_kv_heads=2), ValueError, "seq_lens must all be >= 1"),
    (dict(seq_lens=[5], num_kv_heads=0), ValueError, "num_kv_heads must be an int >= 1"),
    (dict(seq_lens=[5], num_kv_heads=2, block_n=0), ValueError, "block_n must be an int >= 1"),
    (dict(seq_lens=[5], num_kv_heads=2, sm_count=0), ValueError, "sm_count must be None"),
    (dict(seq_lens=[5], num_kv_heads=2, sm_count=True), ValueError, "sm_count must be None"),
    (dict(seq_lens=[5], num_kv_heads=2, max_splits=257), ValueError, "max_splits must be an int in"),
    (dict(seq_lens=[5], num_kv_heads=2, waves=0), ValueError, "waves must be a number > 0"),
    (dict(seq_lens=[5], num_kv_heads=2, window=-2), ValueError, r"window=-2: .*-1 means unlimited"),
])
def test_plan_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        pa.plan_paged_decode(**kwargs)


class _LaunchCounter:
    """Stands in for a @triton.jit kernel: records each launch's grid, then launches the real one."""

    def __init__(self, fn):
        self.fn, self.grids = fn, []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.fn[grid]


# (B, Hq, Hkv, D, page_size, seq_lens, window, sm_count): ragged batches, GQA 1/4/8, pages 1/16/64.
RAGGED = [
    (6, 4, 4, 16, 16, [400, 1, 3, 1, 17, 2], None, 8),      # one long, many short, group 1
    (4, 8, 2, 16, 1, [150, 1, 1, 2], None, 4),              # page size 1, group 4
    (3, 8, 1, 32, 64, [1, 1, 1], None, 8),                  # all length 1: direct, no merge
    (1, 8, 1, 16, 16, [333], None, 16),                     # one sequence over many splits, group 8
    (5, 4, 1, 16, 64, [260, 70, 1, 129, 64], 100, 8),       # window 100 caps the long ones; big pages
    (3, 16, 2, 16, 16, [200, 9, 65], 0, 8),                 # window 0: one key each
]


def _ragged_id(c):
    B, Hq, Hkv, D, ps, lens, w, sm = c
    return f"q{Hq}kv{Hkv}-D{D}-ps{ps}-L{'_'.join(map(str, lens))}-w{w}-sm{sm}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DT_ID.get)
@pytest.mark.parametrize("case", RAGGED, ids=_ragged_id)
def test_planned_ragged_batch_is_one_launch_and_matches(case, dtype, monkeypatch):
    B, Hq, Hkv, D, ps, lens, window, sm = case
    q, kc, vc, bt, sl, dense = make_case(B, Hq, Hkv, D, ps, lens, dtype, seed=100 + RAGGED.index(case))
    block_n = pa._decode_meta(Hq // Hkv, D, q.element_size())["BLOCK_N"]
    plan = pa.plan_paged_decode(sl, Hkv, window=window, block_n=block_n, sm_count=sm)
    dec = _LaunchCounter(pa._paged_decode_kernel)
    mer = _LaunchCounter(pa._paged_decode_merge_kernel)
    monkeypatch.setattr(pa, "_paged_decode_kernel", dec)
    monkeypatch.setattr(pa, "_paged_decode_merge_kernel", mer)
    out = paged_decode_attention(q, kc, vc, bt, sl, window=window, plan=plan, backend="triton")
    units = int(plan.sum())
    assert dec.grids == [(units, Hkv)], "one decode launch over every work unit"
    assert mer.grids == ([] if units == B else [(B, Hq)])
    if max(lens) > 2 * block_n and (window is None or window >= 2 * block_n):
        assert units > B, "the long sequence is split"
    assert torch.isfinite(out).all(), "NaN/inf: a poisoned slot was read"
    want = dense_attention(q.double(), dense, window, 1.0 / math.sqrt(D))
    ref = paged_decode_attention_reference(q, kc, vc, bt, sl, window=window)
    err, err_ref = _max_err(out, want), _max_err(out, ref)
    half_ulp = 2.0 ** -11 * max(1.0, want.abs().max().item())
    if dtype == torch.float32:
        assert err <= 1e-5 and err_ref <= 1e-5, (err, err_ref)
    else:
        torch_err = _max_err(dense_attention(q.double(), dense, window, 1.0 / math.sqrt(D), dtype=dtype), want)
        assert err <= 2 * torch_err + half_ulp, (err, torch_err)
        assert err_ref <= 2 * half_ulp, err_ref


def test_hand_written_plan_with_more_splits_than_tiles():
    # A plan is only a split count per sequence: any counts in [1, 256] give the same result, empty
    # units included (a 1-tile sequence over 5 splits), and 256 splits exercise the merge's chunk loop.
    q, kc, vc, bt, sl, dense = make_case(3, 4, 2, 16, 16, [300, 40, 1], torch.float32, seed=21)
    want = dense_attention(q.double(), dense, None, 0.25)
    for splits in ([256, 5, 1], [3, 1, 2], [1, 1, 1], [17, 33, 256]):
        out = paged_decode_attention(q, kc, vc, bt, sl, plan=torch.tensor(splits, dtype=torch.int32),
                                     backend="triton")
        assert _max_err(out, want) <= 1e-5, splits


def test_default_plan_on_cpu_is_one_split_and_matches():
    # None on CPU plans one split per sequence (the interpreter runs programs one after another).
    q, kc, vc, bt, sl, _ = make_case(2, 2, 2, 16, 3, [70, 2], torch.float32, seed=4)
    out = paged_decode_attention(q, kc, vc, bt, sl, backend="triton")
    assert _max_err(out, paged_decode_attention_reference(q, kc, vc, bt, sl)) <= 1e-5


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_host_seq_lens_plan_without_reading_seq_lens_back(backend, monkeypatch):
    """An engine knows its lengths on the host: given them, the launcher plans from them (no
    device->host copy of seq_lens on a GPU) and the result is the default plan's."""
    q, kc, vc, bt, sl, _ = make_case(3, 4, 2, 16, 4, [37, 1, 12], torch.float32, seed=6)
    want = paged_decode_attention(q, kc, vc, bt, sl, backend=backend)
    seen = []

    def spy(seq_lens, host_seq_lens):
        seen.append(host_seq_lens)
        return real(seq_lens, host_seq_lens)

    real = pa.host_lengths
    monkeypatch.setattr(pa, "host_lengths", spy)
    if backend == "cuda":
        from nanofast.kernels import paged_attention_cuda

        monkeypatch.setattr(paged_attention_cuda, "host_lengths", spy)
    out = paged_decode_attention(q, kc, vc, bt, sl, host_seq_lens=[37, 1, 12], backend=backend)
    assert seen == [[37, 1, 12]] and torch.equal(out, want)
    assert real(None, [5, 2]).tolist() == [5, 2]  # the host copy is used as is: seq_lens is never touched


def _bad_plan_cases():
    q, kc, vc = torch.randn(2, 4, 16), torch.randn(6, 3, 2, 16), torch.randn(6, 3, 2, 16)
    bt, sl = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32), torch.tensor([7, 9], dtype=torch.int32)
    base = dict(q=q, k_cache=kc, v_cache=vc, block_table=bt, seq_lens=sl)
    ok = torch.tensor([2, 1], dtype=torch.int32)
    return [
        (dict(base, plan=[2, 1]), TypeError, "plan must be a"),
        (dict(base, plan=ok.long()), ValueError, r"plan must be a \(B,\) = \(2,\) int32"),
        (dict(base, plan=ok[:1]), ValueError, r"plan must be a \(B,\) = \(2,\) int32"),
        (dict(base, plan=ok[None]), ValueError, r"plan must be a \(B,\)"),
        (dict(base, plan=torch.tensor([0, 1], dtype=torch.int32)), ValueError, r"plan entries must lie in \[1, 256\]"),
        (dict(base, plan=torch.tensor([1, 257], dtype=torch.int32)), ValueError, "plan entries must lie in"),
        (dict(base, plan=ok, num_splits=2), ValueError, "either num_splits .* or plan"),
        (dict(base, host_seq_lens=[7, 9], plan=ok), ValueError, "at most one of num_splits, plan and host_seq_lens"),
        (dict(base, host_seq_lens=[7, 9], num_splits=2), ValueError, "at most one of"),
        (dict(base, host_seq_lens=[7]), ValueError, r"host_seq_lens must be a list of B = 2 ints"),
        (dict(base, host_seq_lens=torch.tensor([7, 9])), ValueError, "host_seq_lens must be a list"),
        (dict(base, host_seq_lens=[7, 8]), ValueError, "host_seq_lens must equal seq_lens"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_plan_cases())))
def test_bad_plan_raises_clear_errors(case):
    kwargs, exc, match = _bad_plan_cases()[case]
    backends = [kwargs.pop("backend")] if "backend" in kwargs else ["triton", "torch"]
    for backend in backends:
        with pytest.raises(exc, match=match):
            paged_decode_attention(**kwargs, backend=backend)


# ----------------------------------------------------------------------------------------------
# Paged KV write
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DT_ID.get)
@pytest.mark.parametrize("page_size,Hkv,D", [(1, 1, 16), (3, 3, 80), (16, 2, 32)])
def test_kv_write_matches_reference_and_touches_only_its_slots(page_size, Hkv, D, dtype, slot_dtype):
    g = _gen(page_size * 100 + D)
    N = 9
    num_pages = max(7, -(-12 // page_size))  # room for 9 tokens plus untouched slots
    kc0 = torch.randn((num_pages, page_size, Hkv, D), generator=g).to(dtype)
    vc0 = torch.randn((num_pages, page_size, Hkv, D), generator=g).to(dtype)
    # k, v as slices of a packed qkv-like buffer (non-contiguous rows).
    buf = torch.randn((N, (2 + 2 * Hkv) * D + 5), generator=g).to(dtype)
    k = buf[:, 2 * D:(2 + Hkv) * D].unflatten(-1, (Hkv, D))
    v = buf[:, (2 + Hkv) * D:(2 + 2 * Hkv) * D].unflatten(-1, (Hkv, D))
    slots = torch.randperm(num_pages * page_size, generator=g)[:N]
    slots[[1, 4]] = torch.tensor([-1, -100])  # padding tokens: skipped
    if num_pages * page_size > N:
        slots[-1] = num_pages * page_size - 1  # the pool's very last slot
    slots = slots.to(slot_dtype)
    caches = {}
    for backend in ("torch", "triton"):
        kc, vc = kc0.clone(), vc0.clone()
        paged_kv_write(k, v, kc, vc, slots, backend=backend)
        caches[backend] = (kc, vc)
    for name, (kc, vc) in caches.items():
        expect_k, expect_v = kc0.clone(), vc0.clone()
        for i, s in enumerate(slots.tolist()):
            if s >= 0:
                expect_k[s // page_size, s % page_size] = k[i]
                expect_v[s // page_size, s % page_size] = v[i]
        # Bitwise: written slots hold exactly k/v, every other slot is untouched.
        assert torch.equal(kc.view(torch.uint8), expect_k.view(torch.uint8)), name
        assert torch.equal(vc.view(torch.uint8), expect_v.view(torch.uint8)), name


def test_kv_write_into_strided_cache_views_then_decode():
    # Decode-loop shape: append each sequence's new token with paged_kv_write into kv[:, 0/1]
    # views, then attend; equals dense attention over the extended sequences.
    q, kc, vc, bt, sl, dense = make_case(2, 4, 2, 16, 3, [5, 9], torch.float32, seed=21, q_pad=False)
    kv = torch.stack([kc, vc], dim=1)
    g = _gen(22)
    new_k, new_v = torch.randn((2, 2, 16), generator=g), torch.randn((2, 2, 16), generator=g)
    pos = sl.long()  # the new token's position = old length (5 and 9: both inside allocated pages)
    slot = bt[torch.arange(2), pos // 3].long() * 3 + pos % 3
    paged_kv_write(new_k, new_v, kv[:, 0], kv[:, 1], slot, backend="triton")
    sl2 = sl + 1
    out = paged_decode_attention(q, kv[:, 0], kv[:, 1], bt, sl2, num_splits=2, backend="triton")
    dense2 = [(torch.cat([k, new_k[b, None].double()]), torch.cat([v, new_v[b, None].double()]))
              for b, (k, v) in enumerate(dense)]
    assert _max_err(out, dense_attention(q.double(), dense2, None, 0.25)) <= 1e-5


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------

def _bad_decode_cases():
    q, kc, vc = torch.randn(2, 4, 16), torch.randn(6, 3, 2, 16), torch.randn(6, 3, 2, 16)
    bt, sl = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32), torch.tensor([7, 9], dtype=torch.int32)
    base = dict(q=q, k_cache=kc, v_cache=vc, block_table=bt, seq_lens=sl)
    return [
        (dict(base, q=[1.0]), TypeError, r"q must be a torch.Tensor of shape \(B, Hq, D\)"),
        (dict(base, q=q[0]), ValueError, r"q must have shape \(B, Hq, D\)"),
        (dict(base, q=q.long()), TypeError, "q must be a floating tensor"),
        (dict(base, k_cache=kc[0]), ValueError, r"k_cache must have shape \(num_pages, page_size, Hkv, D\)"),
        (dict(base, v_cache=vc.half()), TypeError, "v_cache must have q's dtype"),
        (dict(base, k_cache=kc.half(), v_cache=vc.half()), TypeError, "k_cache must have q's dtype"),
        (dict(base, v_cache=torch.randn(6, 3, 1, 16)), ValueError, "v_cache must have k_cache's shape"),
        (dict(base, k_cache=torch.randn(6, 3, 2, 8), v_cache=torch.randn(6, 3, 2, 8)), ValueError,
         "head dim D=16"),
        (dict(base, q=torch.randn(2, 3, 16)), ValueError, "Hq=3 must be a multiple of .* Hkv=2"),
        (dict(base, k_cache=torch.randn(6, 3, 16, 2).transpose(-1, -2)), ValueError,
         "k_cache must be contiguous in its last dim"),
        (dict(base, k_cache=kc.to("meta")), ValueError, "k_cache is on meta"),
        (dict(base, block_table=bt.long()), TypeError, "block_table must be an int32 tensor"),
        (dict(base, block_table=bt[0]), ValueError, r"block_table must have shape \(B, max_pages\)"),
        (dict(base, block_table=bt[:1]), ValueError, r"block_table must have shape \(B, max_pages\) = \(2"),
        (dict(base, block_table=bt.to("meta")), ValueError, "block_table is on meta"),
        (dict(base, seq_lens=sl.long()), TypeError, "seq_lens must be an int32 tensor"),
        (dict(base, seq_lens=sl[:1]), ValueError, r"seq_lens must have shape \(B,\) = \(2,\)"),
        (dict(base, seq_lens=sl[None]), ValueError, r"seq_lens must have shape \(B,\)"),
        (dict(base, seq_lens=torch.tensor([0, 9], dtype=torch.int32)), ValueError,
         r"seq_lens must lie in \[1, max_pages \* page_size = 9\]"),
        (dict(base, seq_lens=torch.tensor([7, 10], dtype=torch.int32)), ValueError, "seq_lens must lie in"),
        (dict(base, block_table=torch.tensor([[0, 6, 2], [3, 4, 5]], dtype=torch.int32)), ValueError,
         r"block_table entries of used pages must be page ids in \[0, num_pages = 6\)"),
        (dict(base, block_table=torch.tensor([[0, 1, 2], [-1, 4, 5]], dtype=torch.int32)), ValueError,
         "block_table entries of used pages"),
        (dict(base, scale=0.0), ValueError, "scale must be None"),
        (dict(base, scale=-1.0), ValueError, "scale must be None"),
        (dict(base, scale=float("nan")), ValueError, "scale must be None"),
        (dict(base, window=-2), ValueError, r"window=-2: .*\[window; flash-attn"),
        (dict(base, window=2.5), TypeError, "window must be an int >= -1"),
        (dict(base, window=True), TypeError, "window must be an int >= -1"),
        (dict(base, num_splits=0), ValueError, "num_splits must be None"),
        (dict(base, num_splits=pa.MAX_SPLITS + 1), ValueError, "num_splits must be None"),
        (dict(base, backend="cudnn"), ValueError, "backend must be one of"),
        (dict(base, q=q.double(), k_cache=kc.double(), v_cache=vc.double(), backend="triton"), TypeError,
         "q must be float16, bfloat16 or float32"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_decode_cases())))
def test_bad_decode_input_raises_clear_errors(case):
    kwargs, exc, match = _bad_decode_cases()[case]
    with pytest.raises(exc, match=match):
        paged_decode_attention(**kwargs)
    if "backend" not in kwargs:
        # Validation does not depend on the backend, and the reference checks the same things.
        with pytest.raises(exc, match=match):
            paged_decode_attention(**kwargs, backend="triton")
        if "num_splits" not in kwargs:
            with pytest.raises(exc, match=match):
                paged_decode_attention_reference(**kwargs)


def test_garbage_past_used_pages_is_accepted():
    # Entries past a sequence's used pages are not validated (they may hold anything).
    q, kc, vc = torch.randn(2, 4, 16), torch.randn(6, 3, 2, 16), torch.randn(6, 3, 2, 16)
    bt = torch.tensor([[0, 1, -5], [3, 4, 99]], dtype=torch.int32)
    sl = torch.tensor([6, 4], dtype=torch.int32)
    out = paged_decode_attention(q, kc, vc, bt, sl, backend="triton")
    assert _max_err(out, paged_decode_attention_reference(q, kc, vc, bt, sl)) <= 1e-5


def _bad_write_cases():
    k, v = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    kc, vc = torch.randn(4, 3, 2, 16), torch.randn(4, 3, 2, 16)
    slots = torch.tensor([0, 5, -1])
    base = dict(k=k, v=v, k_cache=kc, v_cache=vc, slot_mapping=slots)
    return [
        (dict(base, k="k"), TypeError, r"k must be a torch.Tensor of shape \(N, Hkv, D\)"),
        (dict(base, k=k[0]), ValueError, r"k must have shape \(N, Hkv, D\)"),
        (dict(base, v=v[:2]), ValueError, "v must have k's shape"),
        (dict(base, v=v.half()), TypeError, "v must have k's dtype"),
        (dict(base, k=k.long(), v=v.long()), TypeError, "k must be a floating tensor"),
        (dict(base, k_cache=kc.half()), TypeError, "k_cache must have k's dtype"),
        (dict(base, v_cache=vc[..., :8]), ValueError, "v_cache must have k_cache's shape"),
        (dict(base, k_cache=torch.randn(4, 3, 1, 16), v_cache=torch.randn(4, 3, 1, 16)), ValueError,
         r"\(Hkv, D\) = \(2, 16\) from k"),
        (dict(base, k_cache=kc[None]), ValueError, "k_cache must have shape"),
        (dict(base, slot_mapping=slots.float()), TypeError, "slot_mapping must be an int32 or int64"),
        (dict(base, slot_mapping=slots[:2]), ValueError, r"slot_mapping must have shape \(N,\) = \(3,\)"),
        (dict(base, slot_mapping=torch.tensor([0, 12, 1])), ValueError,
         r"slot_mapping values must be < num_pages \* page_size = 12"),
        (dict(base, slot_mapping=slots.to("meta")), ValueError, "slot_mapping is on meta"),
        (dict(base, backend="tpu"), ValueError, "backend must be one of"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_write_cases())))
def test_bad_write_input_raises_clear_errors(case):
    kwargs, exc, match = _bad_write_cases()[case]
    for backend in (["torch", "triton"] if "backend" not in kwargs else [None]):
        extra = {} if backend is None else {"backend": backend}
        with pytest.raises(exc, match=match):
            paged_kv_write(**kwargs, **extra)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_hnd_cache_raises_a_layout_error_and_its_transpose_runs(backend):
    """A cache in the transposed HND layout (num_pages, Hkv, page_size, D) is named as such, on
    every backend, wherever its shape only fits that reading: q's heads (Hq a multiple of dim 1,
    not of dim 2), or (CPU values) seq_lens that only fit dim 2 as the page size; the write names
    it when dim 1 is k's Hkv. The fix the message gives, transpose(1, 2), is a view that runs."""
    g = _gen(21)
    P, Hkv, ps, D = 4, 2, 8, 16
    nhd = torch.randn(P, ps, Hkv, D, generator=g), torch.randn(P, ps, Hkv, D, generator=g)
    hnd = tuple(c.transpose(1, 2).contiguous() for c in nhd)  # (P, Hkv, ps, D), as an HND engine holds it
    bt, sl = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32), torch.tensor([11, 5], dtype=torch.int32)
    layout = r"k_cache and v_cache must be in NHD layout \(num_pages, page_size, Hkv, D\).* fits the HND layout"
    # Hq = 4: a multiple of Hkv = 2 (dim 1 of HND) but not of page_size = 8 (dim 2).
    q = torch.randn(2, 4, D, generator=g)
    with pytest.raises(ValueError, match=r"Hq=4 must be a multiple of .* Hkv=8 \(GQA\); " + layout):
        paged_decode_attention(q, *hnd, bt, sl, backend=backend)
    if backend == "cuda":  # the CUDA launcher's own drop-in API says the same
        from nanofast.kernels.paged_attention_cuda import paged_decode_attention_cuda

        with pytest.raises(ValueError, match=r"Hq = 4 heads: .* Hkv = 8; " + layout):
            paged_decode_attention_cuda(q, *hnd, bt, sl, 0.25, None, None)
    # Hq = 8 fits both readings; seq_lens 11 > max_pages * dim 1 = 4 but <= 2 * dim 2 = 16.
    q8 = torch.randn(2, 8, D, generator=g)
    with pytest.raises(ValueError, match=r"seq_lens must lie in \[1, max_pages \* page_size = 4\].*" + layout):
        paged_decode_attention(q8, *hnd, bt, sl, backend=backend)
    with pytest.raises(ValueError, match=r"\(Hkv, D\) = \(2, 16\) from k, got \(4, 2, 8, 16\); " + layout):
        paged_kv_write(torch.randn(3, Hkv, D), torch.randn(3, Hkv, D), *hnd, torch.tensor([0, 9, 30]),
                       backend=backend)
    # The suggested views compute what the NHD cache does.
    views = tuple(c.transpose(1, 2) for c in hnd)
    for qq in (q, q8):
        want = paged_decode_attention_reference(qq, *nhd, bt, sl)
        assert _max_err(paged_decode_attention(qq, *views, bt, sl, backend=backend), want) <= 1e-5
    # A genuine GQA mismatch that fits neither reading keeps the plain message.
    with pytest.raises(ValueError, match=r"Hq=3 must be a multiple of .* Hkv=8 \(GQA\)$"):
        paged_decode_attention(torch.randn(2, 3, D), *hnd, bt, sl, backend=backend)


# ----------------------------------------------------------------------------------------------
# Compile gate: what an H100 runs, compiled for sm_90 (and sm_80), machine code checked
# ----------------------------------------------------------------------------------------------

# Measured (triton 3.9, sm_90): decode 16-bit 72-80 registers at page 16/256 (8 warps at D = 128, 4
# at D = 64), 122 at page 1 (a page id per key), fp32 64, merge 40-48 at any split count (it
# loops over chunks of 16 splits; the old one-tile merge hit 255 registers + 72-88 stack bytes of
# spills at 256 splits x D = 128), write 30-32; no local memory or stack anywhere. 128 keeps >= 2 decode CTAs (16
# warps) resident per SM and flags regressions (4 warps at 64 keys measured 110-142).
MAX_REGISTERS = 128
SM80_CONFIGS = [2]  # decode bf16 group 8 D=128
gate_facts = gate_facts_fixture("nanofast.kernels.paged_attention", sm80=SM80_CONFIGS)


def test_kernel_configs_cover_serving_shapes_and_match_launchers():
    names = {c["fn"].__name__ for c in KERNEL_CONFIGS}
    assert names == {"_paged_decode_kernel", "_paged_decode_merge_kernel", "_paged_kv_write_kernel"}
    labels = " | ".join(c["config"] for c in KERNEL_CONFIGS)
    for dt in ("bf16", "fp16"):
        for d in (64, 128):
            assert f"decode {dt} " in labels and f"D={d}" in labels
    for g in (1, 4, 8):
        assert f"group={g} D=128" in labels
    assert "planned" in labels and "decode fp32" in labels and "page=256" in labels and "page=1 " in labels
    # The merge at the widest partial tile the old one-shot merge spilled on (256 splits x D=128 fp32).
    assert "merge fp32 D=128" in labels and "splits<=256" in labels
    assert KERNEL_CONFIGS[SM80_CONFIGS[0]]["config"].startswith("decode bf16 group=8 D=128 page=16 planned")
    for c in KERNEL_CONFIGS:
        # Every kernel argument is described, in order, and the meta-parameters are the launcher's.
        assert list(c["signature"]) == list(c["fn"].arg_names), c["config"]
        assert set(c["aligned"]) <= set(c["signature"]) and all(c["signature"][a] != "constexpr" for a in c["aligned"])
        words = dict(w.split("=") for w in c["config"].split() if "=" in w)
        kind, dt = c["config"].split()[:2]
        if kind == "decode":
            item = {"bf16": 2, "fp16": 2, "fp32": 4}[dt]
            meta = pa._decode_meta(int(words["group"]), int(words["D"]), item)
            assert (c["num_warps"], c["num_stages"]) == (meta["num_warps"], meta["num_stages"])
            assert all(c["constexprs"][n] == meta[n] for n in ("BLOCK_G", "BLOCK_N", "BLOCK_D"))
        elif kind == "merge":
            meta = pa._merge_meta(int(words["D"]))
            assert c["num_warps"] == meta["num_warps"] and c["constexprs"]["BLOCK_S"] == meta["BLOCK_S"]
        else:
            meta = pa._write_meta(int(words["Hkv"]), int(words["D"]))
            assert c["num_warps"] == meta["num_warps"] and c["constexprs"]["BLOCK_H"] == meta["BLOCK_H"]


def _check_facts(cfg: dict, f: dict, arch: int) -> None:
    where = check_common_facts(cfg, f, arch, MAX_REGISTERS)
    ins = f["instructions"]
    name = cfg["fn"].__name__
    assert ins.get("LDL", 0) == 0 and f["stack_bytes"] == 0, "register spills: " + where
    assert f["stores"] > 0 and f["atomics"] == 0, where  # no atomics: the split merge is a second pass
    # page_id * page_stride (decode, write) and row offsets are 64-bit multiplies: pools past 2^31
    # elements index correctly (the interpreter cannot show it: it would need such a pool).
    assert f["i64_muls"] > 0, where
    if name == "_paged_decode_kernel":
        if cfg["signature"]["K"] == "*fp32":
            # fp32: exact fp32 FMA dot (input_precision="ieee"), no TF32 tensor-core rounding.
            assert "HMMA" not in ins and "HGMMA" not in ins, where
        else:
            # 16 query rows (the GQA group padded to 16) are below wgmma's 64-row minimum, so the
            # dots are Ampere-style mma.sync (HMMA.16816), not Hopper HGMMA. Measured 16 per
            # BLOCK_N x D = 64 x 128 tile pair (QK^T and PV).
            assert ins.get("HMMA", 0) >= 8 and "HGMMA" not in ins, where
        # K/V tiles are gathered row by row (per-key page ids) but each row is D contiguous
        # elements: 128-bit cp.async copies, pipelined num_stages deep into shared memory.
        assert ins.get("LDGSTS.E.BYPASS.128", 0) >= 8, where
        assert ins.get("LDG.E.128", 0) >= 1, where  # the q tile
    else:
        # merge reads the fp32 partials and write copies k/v rows, both with 128-bit accesses.
        assert ins.get("LDG.E.128", 0) > 0, where
        if name == "_paged_kv_write_kernel":
            assert ins.get("STG.E.128", 0) > 0, where


test_compile_gate_sm90, test_compile_gate_sm80 = gate_tests(KERNEL_CONFIGS, SM80_CONFIGS, _check_facts)


def test_both_backends_share_one_split_plan_module():
    """kernels/paged_plan.py: the plan the Triton and CUDA launchers take, and its packed unit tables."""
    from nanofast.kernels import paged_attention_cuda, paged_plan

    assert pa.plan_paged_decode is paged_plan.plan_paged_decode is paged_attention_cuda.plan_paged_decode
    assert pa.MAX_SPLITS == paged_attention_cuda.MAX_SPLITS == paged_plan.MAX_SPLITS == 256
    packed, units = paged_plan.plan_tensors([2, 1, 3], 3, 1, torch.device("cpu"))
    assert units == 6 and packed.tolist() == [0, 2, 3, 6] + [0, 0, 1, 2, 2, 2] + [0, 1, 0, 0, 1, 2]
    with pytest.raises(ValueError, match="plan entries must lie in"):
        paged_plan.check_plan(torch.tensor([0, 1], dtype=torch.int32), 2)
