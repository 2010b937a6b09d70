"""csrc/paged_attention.cu: paged KV-cache decode attention and the paged cache write, executed on
the CPU through the emulation (csrc/cuda_emu.h) and compiled with nvcc for sm_90a and sm_80.

Error budget: max|kernel - ref_fp64| <= 2 * max|torch_lowprec - ref_fp64| + atol(dtype) * max|ref|,
where ref_fp64 is dense masked attention in float64 over the gathered pages and torch_lowprec the same
maths done by torch in fp32 from the same (rounded) inputs and rounded to the input dtype once.
atol: fp32 2e-6, fp16 2e-4, bf16 2e-3 (tests/cuda_emu_helpers.py, shared with the other CUDA files).

Every cache element the kernel must not read is NaN: slots past a sequence's length in its last
page, slots before its window, whole pages nobody owns, and the pages that garbage block-table
entries (past the used pages) point to; some garbage entries are far out of range. A single read of
any of them would make the output non-finite (or fault).
"""
from __future__ import annotations

import ctypes
import math
import re

import pytest
import torch

from nanofast.kernels import cuda_abi, cuda_build, cuda_facts
from nanofast.kernels import paged_attention_cuda as pa_cuda
from nanofast.kernels import paged_attention as pa

import cuda_emu_helpers
from cuda_emu_helpers import DT_ID, DTYPES, FACTOR, HAVE_NVCC, _bits
from cuda_emu_helpers import _assert_budget as _shared_assert_budget

SOURCE = "paged_attention.cu"
emu = cuda_emu_helpers.emu  # the fixture (bound by name, so pyflakes sees it used)


# ------------------------------------------------------------------------------------------------ helpers

def _assert_budget(out, ref64, lowp, dtype, what):
    """The shared budget at the fixed FACTOR (no per-call factor here); a non-finite output means a
    NaN-poisoned cache slot was read."""
    _shared_assert_budget(out, ref64, lowp, dtype, what, factor=FACTOR, nonfinite_hint="read a poisoned cache slot?")


def _visible(L: int, window: int | None) -> tuple[int, int]:
    return (0 if window is None else max(0, L - 1 - window)), L


def _make_q(B, Hq, D, dtype, layout, gen):
    x = torch.randn(B, Hq, D, generator=gen)
    if layout == "contig":
        return x.to(dtype).contiguous()
    if layout == "transposed":  # (Hq, B, D) storage viewed as (B, Hq, D)
        return x.to(dtype).transpose(0, 1).contiguous().transpose(0, 1)
    pad = {"padded": 8, "odd": 3}[layout]  # 8 keeps 16-byte rows (fp16 / fp32), 3 forces the scalar path
    buf = torch.full((B, Hq, D + pad), float("nan"), dtype=dtype)
    buf[..., :D] = x.to(dtype)
    return buf[..., :D]


def _make_caches(P, ps, Hkv, D, dtype, layout):
    """NaN-filled k_cache, v_cache (P, ps, Hkv, D) in the given memory layout."""
    def one():
        if layout == "contig":
            return torch.full((P, ps, Hkv, D), float("nan"), dtype=dtype)
        if layout == "hnd":  # (P, Hkv, ps, D) storage seen as NHD: unusual but aligned strides
            return torch.full((P, Hkv, ps, D), float("nan"), dtype=dtype).transpose(1, 2)
        return torch.full((P, ps, Hkv, D + 1), float("nan"), dtype=dtype)[..., :D]  # "odd": scalar path
    return one(), one()


def _paged_problem(B, Hkv, G, D, ps, lens, window, dtype, q_layout, kv_layout, seed):
    """Random problem with every unreadable cache element NaN. Returns q, k_cache, v_cache,
    block_table, seq_lens and the dense fp32-valued K, V per sequence (visible positions only)."""
    gen = torch.Generator().manual_seed(seed)
    assert len(lens) == B
    used = [-(-L // ps) for L in lens]
    max_pages = max(used) + 2  # garbage entries past every sequence's pages
    spare = 3  # pages nobody owns: NaN; garbage table entries point at them
    P = sum(used) + spare
    # Owned pages taken from a random permutation, biased to the pool's end: the largest page id is used.
    perm = torch.randperm(P, generator=gen)
    owned = torch.cat([torch.tensor([P - 1]), perm[perm != P - 1]])[: sum(used)]
    owned = owned[torch.randperm(len(owned), generator=gen)]
    free = sorted(set(range(P)) - set(owned.tolist()))
    k_cache, v_cache = _make_caches(P, ps, Hkv, D, dtype, kv_layout)
    bt = torch.empty(B, max_pages, dtype=torch.int32)
    dense = []
    at = 0
    for b, L in enumerate(lens):
        pages = owned[at:at + used[b]]
        at += used[b]
        garbage = [free[(b + i) % len(free)] if i % 3 else (-7 if i % 2 else 2**30) for i in range(max_pages - used[b])]
        bt[b] = torch.tensor(pages.tolist() + garbage, dtype=torch.int32)
        lo, hi = _visible(L, window)
        K = torch.randn(hi - lo, Hkv, D, generator=gen).to(dtype)
        V = torch.randn(hi - lo, Hkv, D, generator=gen).to(dtype)
        for j in range(lo, hi):  # only the visible positions get values: everything else stays NaN
            k_cache[pages[j // ps], j % ps] = K[j - lo]
            v_cache[pages[j // ps], j % ps] = V[j - lo]
        dense.append((K, V))
    q = _make_q(B, Hkv * G, D, dtype, q_layout, gen)
    return q, k_cache, v_cache, bt, torch.tensor(lens, dtype=torch.int32), dense


def _reference(q, dense, scale, prec):
    """Dense attention per sequence over its visible keys in `prec`; query head h reads KV head h // G."""
    B, Hq, D = q.shape
    out = torch.empty(B, Hq, D, dtype=prec)
    for b, (K, V) in enumerate(dense):
        G = Hq // K.shape[1]
        Kx = K.to(prec).repeat_interleave(G, dim=1)  # (n, Hq, D)
        Vx = V.to(prec).repeat_interleave(G, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].to(prec), Kx) * scale
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(s, dim=-1), Vx)
    return out


# (B, Hkv, G, D, page_size, seq_lens, window, num_splits, q layout, cache layout)
CASES = [
    (1, 1, 1, 16, 1, [1], None, 1, "contig", "contig"),
    (3, 2, 2, 80, 3, [2, 3, 4], None, 2, "padded", "contig"),
    (3, 1, 3, 128, 16, [15, 16, 17], 5, 3, "transposed", "hnd"),
    (5, 2, 8, 16, 16, [1, 15, 16, 17, 40], None, 3, "contig", "odd"),
    (1, 2, 8, 128, 3, [10], 0, 2, "padded", "contig"),
    (3, 1, 1, 80, 1, [1, 7, 13], 5, 1, "odd", "contig"),
    (3, 3, 2, 256, 16, [33, 16, 1], None, 2, "contig", "hnd"),
    (2, 1, 3, 96, 3, [5, 31], 5, 3, "transposed", "odd"),
    (1, 1, 40, 16, 3, [7], None, 1, "contig", "contig"),  # 40 heads: several blocks per KV head
    (3, 2, 1, 20, 3, [9, 2, 3], 100, 2, "contig", "contig"),  # window longer than the sequence
    (1, 1, 2, 128, 16, [48], 0, 3, "contig", "hnd"),  # one key: two of three splits empty
    (3, 1, 8, 64, 1, [30, 1, 12], 5, 1, "transposed", "contig"),
]


def _case_id(c):
    B, Hkv, G, D, ps, lens, w, S, ql, kl = c
    return f"B{B}-Hkv{Hkv}-G{G}-D{D}-ps{ps}-L{'.'.join(map(str, lens))}-w{w}-S{S}-{ql}-{kl}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_paged_attention_matches_fp64_reference(emu, dtype, case):
    B, Hkv, G, D, ps, lens, window, S, ql, kl = case
    q, kc, vc, bt, sl, dense = _paged_problem(B, Hkv, G, D, ps, lens, window, dtype, ql, kl, seed=len(CASES) + D + B)
    scale = 1.0 / math.sqrt(D)
    before = [_bits(t) for t in (q, kc, vc, bt, sl)]
    out = pa_cuda.paged_decode_attention_cuda(q, kc, vc, bt, sl, scale, window, S)
    assert out.dtype == dtype and out.shape == (B, Hkv * G, D)
    ref64 = _reference(q, dense, scale, torch.float64)
    lowp = _reference(q, dense, scale, torch.float32).to(dtype)
    _assert_budget(out, ref64, lowp, dtype, f"out {_case_id(case)}")
    for name, t, b in zip(("q", "k_cache", "v_cache", "block_table", "seq_lens"), (q, kc, vc, bt, sl), before):
        assert torch.equal(_bits(t), b), f"{name} was modified"


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_splits_agree_and_are_deterministic(emu, dtype):
    """Every split count gives the same attention (within the budget), and each is bit-reproducible."""
    q, kc, vc, bt, sl, dense = _paged_problem(3, 2, 3, 32, 3, [1, 11, 26], None, dtype, "contig", "contig", seed=7)
    ref64 = _reference(q, dense, 0.3, torch.float64)
    lowp = _reference(q, dense, 0.3, torch.float32).to(dtype)
    for S in (1, 2, 3, 9):  # 9 splits: several are empty for the two shorter sequences
        a = pa_cuda.paged_decode_attention_cuda(q, kc, vc, bt, sl, 0.3, None, S)
        b = pa_cuda.paged_decode_attention_cuda(q, kc, vc, bt, sl, 0.3, None, S)
        assert torch.equal(_bits(a), _bits(b)), f"num_splits={S}: two runs differ"
        _assert_budget(a, ref64, lowp, dtype, f"num_splits={S}")
    default = pa_cuda.paged_decode_attention_cuda(q, kc, vc, bt, sl, 0.3, None, None)  # emulation default: 1 split
    assert torch.equal(_bits(default), _bits(pa_cuda.paged_decode_attention_cuda(q, kc, vc, bt, sl, 0.3, None, 1)))


@pytest.mark.parametrize("S", [1, 3])
@pytest.mark.parametrize("pad", [0, 8, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_paged_attention_writes_only_its_output(emu, dtype, pad, S):
    """Output inside NaN guard bands (a guard batch row before and after, padded rows; pad 3 breaks
    the 16-byte alignment): every output element written, no guard element."""
    B, Hkv, G, D = 3, 2, 2, 48
    q, kc, vc, bt, sl, dense = _paged_problem(B, Hkv, G, D, 4, [3, 9, 1], 5, dtype, "contig", "contig", seed=11)
    buf = torch.full((B + 2, Hkv * G, D + pad), float("nan"), dtype=dtype)
    out = buf[1:1 + B, :, :D]
    mask = torch.zeros(buf.shape, dtype=torch.bool)
    mask[1:1 + B, :, :D] = True
    pa_cuda.decode_into(q, kc, vc, bt, sl, 0.25, 5, S, out)
    assert torch.isnan(buf[~mask].float()).all(), "a guard element was written"
    assert torch.isfinite(buf[mask].float()).all(), "an output element was not written"
    ref = pa_cuda.paged_decode_attention_cuda(q, kc, vc, bt, sl, 0.25, 5, S)
    if pad != 3:  # same (vectorised) path: same bits
        assert torch.equal(_bits(out), _bits(ref))
    _assert_budget(out, _reference(q, dense, 0.25, torch.float64),
                   _reference(q, dense, 0.25, torch.float32).to(dtype), dtype, "guarded out")


def test_empty_batch(emu):
    q = torch.randn(0, 4, 16)
    kc = torch.randn(2, 4, 2, 16)
    out = pa_cuda.paged_decode_attention_cuda(q, kc, kc, torch.zeros(0, 3, dtype=torch.int32),
                                         torch.zeros(0, dtype=torch.int32), 0.25, None, None)
    assert out.shape == (0, 4, 16)
    pa_cuda.paged_kv_write_cuda(torch.randn(0, 2, 16), torch.randn(0, 2, 16), kc, kc.clone(), torch.zeros(0, dtype=torch.int64))


def test_default_plan_targets_16_warps_per_sm(monkeypatch):
    """On CUDA: splits from the actual lengths (the Triton backend's rule), sized for ~16 warps per SM."""
    dev = torch.device("cuda", 0)
    monkeypatch.setattr(pa_cuda, "sm_count", lambda device: 132)  # an H100 SXM, without one
    lens = lambda *x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    # G = 4: one 1-warp block per KV head; 8 KV heads -> target 16 x 132 / 8 = 264 units of 64+ keys.
    plan = pa_cuda.plan_splits(dev, lens(4096), -1, 1 << 20, 8, 4)
    assert plan == [64]  # 64 tiles of 64 keys: one per unit (the old rule: 33 splits, ~2 warps per SM)
    ragged = pa_cuda.plan_splits(dev, lens(1 << 16, *[1] * 63), -1, 1 << 20, 8, 4)
    assert ragged[1:] == [1] * 63 and 190 <= ragged[0] <= 256  # the long one is spread, the short stay whole
    warps = sum(ragged) * 8 * 1
    assert 0.9 * 16 * 132 <= warps <= 1.5 * 16 * 132
    # G = 16: 4 warps per block (4 heads each): a quarter of the units for the same warps.
    assert pa_cuda.plan_splits(dev, lens(1 << 16), -1, 1 << 20, 8, 16) == [64]  # 66 units wanted: 1024 / 16 tiles
    assert pa_cuda.plan_splits(dev, lens(100), -1, 1 << 20, 1, 1) == [2]  # too short to split further
    assert pa_cuda.plan_splits(dev, lens(5000), 10, 1 << 20, 1, 1) == [1]  # window: 11 visible keys
    assert pa_cuda.plan_splits(torch.device("cpu"), lens(1 << 20, 5), -1, 1 << 21, 1, 1) == [1, 1]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("lens,G,ps,window", [
    ([300, 1, 5, 1, 70], 1, 16, None),   # one long, many short
    ([1, 1, 1], 4, 3, None),             # all length 1: no merge
    ([257], 8, 1, None),                 # one sequence, page size 1
    ([200, 64, 9], 4, 64, 100),          # big pages, window
])
def test_planned_ragged_batch(emu, dtype, lens, G, ps, window, monkeypatch):
    """A plan from the lengths (as on an H100) through the emulation: one launch call, the budgets hold."""
    B, Hkv, D = len(lens), 2, 32
    q, kc, vc, bt, sl, dense = _paged_problem(B, Hkv, G, D, ps, lens, window, dtype, "contig", "contig", seed=B + G)
    plan = pa.plan_paged_decode(sl, Hkv, window=window, block_n=16, sm_count=4, waves=4)
    if max(lens) > 64:
        assert int(plan.max()) > 1
    calls = []
    real = pa_cuda.launch
    monkeypatch.setattr(pa_cuda, "launch", lambda name, *a: (calls.append(name), real(name, *a))[1])
    out = pa.paged_decode_attention(q, kc, vc, bt, sl, 0.3, window, plan=plan, backend="cuda")
    assert calls == ["nf_paged_attention_fwd"]
    _assert_budget(out, _reference(q, dense, 0.3, torch.float64), _reference(q, dense, 0.3, torch.float32).to(dtype),
                   dtype, f"plan {plan.tolist()}")
    # A hand-written plan with more splits than keys (empty units) and the uniform plan agree.
    odd = torch.tensor([min(n, 9) + 2 for n in lens], dtype=torch.int32)
    _assert_budget(pa_cuda.paged_decode_attention_cuda(q, kc, vc, bt, sl, 0.3, window, None, odd),
                   _reference(q, dense, 0.3, torch.float64), _reference(q, dense, 0.3, torch.float32).to(dtype),
                   dtype, "odd plan")
    with pytest.raises(ValueError, match="either num_splits"):
        pa_cuda.paged_decode_attention_cuda(q, kc, vc, bt, sl, 0.3, window, 2, plan)
    with pytest.raises(ValueError, match="plan entries must lie in"):
        pa_cuda.paged_decode_attention_cuda(q, kc, vc, bt, sl, 0.3, window, None, plan * 0)


# ------------------------------------------------------------------------------------------------ cache write

@pytest.mark.parametrize("layout", ["contig", "odd"])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_paged_kv_write_exact(emu, dtype, slot_dtype, layout):
    gen = torch.Generator().manual_seed(3)
    N, Hkv, D, P, ps = 7, 3, 40, 5, 3
    wide = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[dtype]
    info = torch.iinfo(wide)

    def rand_bits(*shape):  # arbitrary bit patterns: NaN payloads, infinities, subnormals, -0
        return torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64).to(wide).view(dtype)

    pad = 0 if layout == "contig" else 1
    kc_buf, vc_buf = rand_bits(P, ps, Hkv, D + pad), rand_bits(P, ps, Hkv, D + pad)
    kc, vc = kc_buf[..., :D], vc_buf[..., :D]
    k = rand_bits(N, Hkv + 1, D + 2 * pad)[:, :Hkv, :D]  # strided source rows
    v = rand_bits(N, Hkv, D)
    slots = torch.randperm(P * ps, generator=gen)[:N]
    slots[[1, 4]] = torch.tensor([-1, -5])  # padding tokens
    slots[0] = P * ps - 1  # the very last slot of the pool
    slots = slots.to(slot_dtype)
    kc_before, vc_before, k_before = _bits(kc_buf), _bits(vc_buf), _bits(k)
    pa_cuda.paged_kv_write_cuda(k, v, kc, vc, slots)
    exp_k, exp_v = kc_before.clone(), vc_before.clone()
    kb, vb = _bits(k), _bits(v)
    for n, s in enumerate(slots.tolist()):
        if s >= 0:
            exp_k[s // ps, s % ps, :, :D] = kb[n]
            exp_v[s // ps, s % ps, :, :D] = vb[n]
    assert torch.equal(_bits(kc_buf), exp_k), "k_cache differs from the expected bit-exact scatter"
    assert torch.equal(_bits(vc_buf), exp_v), "v_cache differs from the expected bit-exact scatter"
    assert torch.equal(_bits(k), k_before), "k was modified"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_ID.get)
def test_write_then_attend(emu, dtype):
    """A decode step end to end: store the new token's k/v through paged_kv_write_cuda, then attend."""
    gen = torch.Generator().manual_seed(5)
    B, Hkv, G, D, ps, P = 2, 2, 2, 32, 4, 9
    lens = [6, 3]
    kc = torch.full((P, ps, Hkv, D), float("nan"), dtype=dtype)
    vc = torch.full((P, ps, Hkv, D), float("nan"), dtype=dtype)
    bt = torch.tensor([[8, 2, 5], [0, 7, 7]], dtype=torch.int32)
    K = [torch.randn(L, Hkv, D, generator=gen).to(dtype) for L in lens]
    V = [torch.randn(L, Hkv, D, generator=gen).to(dtype) for L in lens]
    for b, L in enumerate(lens):  # every position, the newest included, goes in through the kernel
        slots = torch.tensor([int(bt[b, j // ps]) * ps + j % ps for j in range(L)], dtype=torch.int64)
        pa_cuda.paged_kv_write_cuda(K[b], V[b], kc, vc, slots)
    q = torch.randn(B, Hkv * G, D, generator=gen).to(dtype)
    out = pa_cuda.paged_decode_attention_cuda(q, kc, vc, bt, torch.tensor(lens, dtype=torch.int32), 0.2, None, 2)
    dense = list(zip(K, V))
    _assert_budget(out, _reference(q, dense, 0.2, torch.float64), _reference(q, dense, 0.2, torch.float32).to(dtype),
                   dtype, "write then attend")


# ------------------------------------------------------------------------------------------------ errors

def _err_cases():
    q = torch.randn(2, 4, 16)
    kc = torch.randn(5, 3, 2, 16)
    bt = torch.zeros(2, 3, dtype=torch.int32)
    sl = torch.tensor([1, 9], dtype=torch.int32)
    att = pa_cuda.paged_decode_attention_cuda
    k = torch.randn(3, 2, 16)
    sm = torch.tensor([0, 4, -1])
    wr = pa_cuda.paged_kv_write_cuda
    return [
        (lambda: att(q.numpy(), kc, kc, bt, sl, 0.25, None, 1), TypeError, "q must be a torch.Tensor"),
        (lambda: att(q[0], kc, kc, bt, sl, 0.25, None, 1), ValueError, "q must have 3 dims"),
        (lambda: att(q.double(), kc, kc, bt, sl, 0.25, None, 1), TypeError, "q must be float32"),
        (lambda: att(q, kc.half(), kc.half(), bt, sl, 0.25, None, 1), TypeError, "k_cache must have the dtype of q"),
        (lambda: att(q, kc, kc.half(), bt, sl, 0.25, None, 1), TypeError, "v_cache must have the dtype of k_cache"),
        (lambda: att(q, kc[0], kc, bt, sl, 0.25, None, 1), ValueError, "k_cache must have 4 dims"),
        (lambda: att(q, kc, kc[:4], bt, sl, 0.25, None, 1), ValueError, "v_cache must have shape"),
        (lambda: att(q, kc[:, :0], kc[:, :0], bt, sl, 0.25, None, 1), ValueError, "k_cache must have shape"),
        (lambda: att(q, kc.transpose(2, 3), kc, bt, sl, 0.25, None, 1), ValueError, "k_cache must have a contiguous"),
        (lambda: att(q[..., :8], kc, kc, bt, sl, 0.25, None, 1), ValueError, "q must have shape (B, Hq, D = 16)"),
        (lambda: att(q[:, :3], kc, kc, bt, sl, 0.25, None, 1), ValueError, "multiple of the k_cache KV heads"),
        (lambda: att(torch.randn(2, 4, 264), torch.randn(5, 3, 2, 264), torch.randn(5, 3, 2, 264), bt, sl, 0.25, None,
                     1), ValueError, "exceeds the kernel's maximum 256"),
        (lambda: att(q, kc, kc, bt.long(), sl, 0.25, None, 1), TypeError, "block_table must be int32"),
        (lambda: att(q, kc, kc, bt[0], sl, 0.25, None, 1), ValueError, "block_table must have 2 dims"),
        (lambda: att(q, kc, kc, bt[:1], sl, 0.25, None, 1), ValueError, "block_table must have shape (B = 2"),
        (lambda: att(q, kc, kc, bt, sl.long(), 0.25, None, 1), TypeError, "seq_lens must be int32"),
        (lambda: att(q, kc, kc, bt, sl[:1], 0.25, None, 1), ValueError, "seq_lens must have shape (2,)"),
        (lambda: att(q, kc, kc, bt, sl - 1, 0.25, None, 1), ValueError, "seq_lens must lie in [1, "),
        (lambda: att(q, kc, kc, bt, sl + 1, 0.25, None, 1), ValueError, "seq_lens must lie in [1, "),
        (lambda: att(q, kc, kc, bt - 1, sl, 0.25, None, 1), ValueError, "block_table[0, 0] = -1"),
        (lambda: att(q, kc, kc, bt + 5, sl, 0.25, None, 1), ValueError, "must lie in [0, num_pages = 5)"),
        (lambda: att(q, kc, kc, bt, sl, 0.0, None, 1), ValueError, "scale must be > 0"),
        (lambda: att(q, kc, kc, bt, sl, float("inf"), None, 1), ValueError, "scale must be a finite"),
        (lambda: att(q, kc, kc, bt, sl, "0.25", None, 1), TypeError, "scale must be a float"),
        (lambda: att(q, kc, kc, bt, sl, 0.25, -2, 1), ValueError, "[window; flash-attn"),
        (lambda: att(q, kc, kc, bt, sl, 0.25, 2.0, 1), TypeError, "window must be an int >= -1"),
        (lambda: att(q, kc, kc, bt, sl, 0.25, None, 0), ValueError, "num_splits must be >= 1"),
        (lambda: att(q, kc, kc, bt, sl, 0.25, None, 1.5), TypeError, "num_splits must be an int"),
        (lambda: att(q, kc, kc, bt, sl, 0.25, None, 257), ValueError, "num_splits must be <= 256"),
        (lambda: att(q, kc, kc.to("meta"), bt, sl, 0.25, None, 1), ValueError, "v_cache must be on a CPU or CUDA"),
        (lambda: wr(k.numpy(), k, kc, kc, sm), TypeError, "k must be a torch.Tensor"),
        (lambda: wr(k, k[:2], kc, kc, sm), ValueError, "v must have shape (3, 2, 16)"),
        (lambda: wr(k[..., :8], k[..., :8], kc, kc, sm), ValueError, "k must have shape (3, 2, 16)"),
        (lambda: wr(k, k.half(), kc, kc, sm), TypeError, "v must have the dtype of k"),
        (lambda: wr(k.half(), k.half(), kc, kc, sm), TypeError, "k_cache must have the dtype of k"),
        (lambda: wr(k, k, kc, kc[:, :2], sm), ValueError, "v_cache must have shape"),
        (lambda: wr(k, k, kc, kc, sm.float()), TypeError, "slot_mapping must be int32 or int64"),
        (lambda: wr(k, k, kc, kc, sm[:2]), ValueError, "slot_mapping must have shape (3,)"),
        (lambda: wr(k, k, kc, kc, sm + 12), ValueError, "slot_mapping entries must be < num_pages * page_size = 15"),
    ]


@pytest.mark.parametrize("idx", range(len(_err_cases())))
def test_argument_errors(idx):
    call, exc, msg = _err_cases()[idx]
    with pytest.raises(exc, match=re.escape(msg)):
        call()


def test_unread_block_table_entries_are_not_validated(emu):
    """Entries past the used pages, and before a window, are the caller's garbage: accepted."""
    kc = torch.randn(4, 2, 1, 8)
    bt = torch.tensor([[-1, 3, 99]], dtype=torch.int32)  # position 2..3 live in page 3; window 1 skips page 0
    out = pa_cuda.paged_decode_attention_cuda(torch.randn(1, 1, 8), kc, kc, bt, torch.tensor([4], dtype=torch.int32), 0.3,
                                         1, 1)
    assert torch.isfinite(out).all()


def test_small_operands_with_strided_last_dim_are_copied(emu):
    """q, k and v may have any strides (a copy gives the kernels unit stride on D); caches may not."""
    gen = torch.Generator().manual_seed(2)
    kc = torch.randn(3, 2, 1, 8, generator=gen)
    vc = torch.randn(3, 2, 1, 8, generator=gen)
    bt = torch.tensor([[2, 0]], dtype=torch.int32)
    sl = torch.tensor([3], dtype=torch.int32)
    q = torch.randn(1, 8, 2, generator=gen).transpose(1, 2)  # (1, 2, 8), last-dim stride 2
    assert torch.equal(pa_cuda.paged_decode_attention_cuda(q, kc, vc, bt, sl, 0.3, None, 1),
                       pa_cuda.paged_decode_attention_cuda(q.contiguous(), kc, vc, bt, sl, 0.3, None, 1))
    k = torch.randn(2, 8, 1, generator=gen).transpose(1, 2)
    kc2, vc2 = kc.clone(), vc.clone()
    pa_cuda.paged_kv_write_cuda(k, k, kc2, vc2, torch.tensor([5, -1]))
    assert torch.equal(kc2[2, 1], k[0]) and torch.equal(vc2[2, 1], k[0]) and torch.equal(kc2[:2], kc[:2])
    with pytest.raises(ValueError, match="k_cache must have a contiguous last dimension"):
        strided = torch.randn(3, 2, 1, 16)[..., ::2]
        pa_cuda.paged_kv_write_cuda(k, k, strided, strided.clone(), torch.tensor([5, -1]))


def test_kernels_mask_bad_values_without_faulting(emu):
    """On CUDA values are not checked on the host (that would sync): the kernels clamp lengths to the
    block table's capacity, drop keys whose page id is outside the pool and skip slots past the
    cache, so bad values give a wrong result but never a fault. Exercised here through the unchecked
    entry points."""
    gen = torch.Generator().manual_seed(4)
    kc = torch.full((3, 2, 1, 8), float("nan"))
    vc = torch.full((3, 2, 1, 8), float("nan"))
    K, V = torch.randn(4, 1, 8, generator=gen), torch.randn(4, 1, 8, generator=gen)
    kc[1], vc[1] = K[:2], V[:2]  # positions 0, 1 in page 1
    kc[2], vc[2] = K[2:], V[2:]  # positions 2, 3 in page 2
    q = torch.randn(3, 2, 8, generator=gen)
    bt = torch.tensor([[1, 2**30], [1, 2], [1, 2]], dtype=torch.int32)
    sl = torch.tensor([4, 100, 0], dtype=torch.int32)
    for S in (1, 3):
        out = torch.full((3, 2, 8), float("nan"))
        pa_cuda.decode_into(q, kc, vc, bt, sl, 0.3, -1, S, out)
        ref = _reference(q[:2], [(K[:2], V[:2]), (K, V)], 0.3, torch.float64)  # page 2**30 dropped; 100 -> 4
        assert (out[:2].double() - ref).abs().max() < 1e-5, S
        assert torch.equal(out[2], torch.zeros(2, 8)), f"no keys (length 0) must give zeros, got {out[2]}"
    k = torch.randn(2, 1, 8, generator=gen)
    kc2, vc2 = kc.clone(), vc.clone()
    slots = torch.tensor([6, 1], dtype=torch.int64)  # 6 = num_pages * page_size: past the cache
    cuda_build.launch("nf_paged_kv_write", k.device, cuda_abi.PagedKvWriteArgs(
        dtype=0, N=2, Hkv=1, D=8, k=k.data_ptr(), k_sn=8, k_sh=8, v=k.data_ptr(), v_sn=8, v_sh=8, kc=kc2.data_ptr(),
        kc_sp=16, kc_ss=8, kc_sh=8, vc=vc2.data_ptr(), vc_sp=16, vc_ss=8, vc_sh=8, num_pages=3, page_size=2,
        slots=slots.data_ptr(), slots64=1))
    assert torch.equal(_bits(kc2[1:]), _bits(kc[1:])) and torch.equal(kc2[0, 1], k[1])


def test_launch_functions_reject_bad_arguments(emu):
    lib = emu[SOURCE]
    q = torch.randn(1, 2, 8)
    kc = torch.randn(2, 2, 1, 8)
    bt = torch.zeros(1, 1, dtype=torch.int32)
    sl = torch.ones(1, dtype=torch.int32)
    out = torch.empty_like(q)
    plan = torch.tensor([0, 1, 0, 0], dtype=torch.int32)  # seq_start [0, 1], unit_seq [0], unit_idx [0]
    good = dict(dtype=0, B=1, Hq=2, Hkv=1, D=8, q=q.data_ptr(), q_sb=16, q_sh=8, k=kc.data_ptr(), k_sp=16, k_ss=8,
                k_sh=8, v=kc.data_ptr(), v_sp=16, v_ss=8, v_sh=8, num_pages=2, page_size=2, block_table=bt.data_ptr(),
                bt_sb=1, bt_sp=1, max_pages=1, seq_lens=sl.data_ptr(), sl_s=1, window=-1, scale=0.5, num_units=1,
                seq_start=plan.data_ptr(), unit_seq=plan.data_ptr() + 8, unit_idx=plan.data_ptr() + 12,
                out=out.data_ptr(), o_sb=16, o_sh=8, heads_per_warp=2, warps=1)

    def call(**changes):
        return lib.nf_paged_attention_fwd(ctypes.byref(cuda_abi.PagedAttentionArgs(**{**good, **changes})), None)

    assert call() == 0
    # dtype, Hq < Hkv, D, splits without scratch, fewer units than sequences, no plan, scale, a
    # heads-per-warp and a warp count never compiled
    for bad in ({"dtype": 5}, {"Hkv": 3}, {"D": 300}, {"num_units": 2}, {"num_units": 0}, {"seq_start": None},
                {"unit_seq": None}, {"unit_idx": None}, {"scale": 0.0}, {"heads_per_warp": 3}, {"warps": 9},
                {"warps": 0}):
        rc = call(**bad)
        assert rc == -1 and b"invalid argument" in lib.nf_paged_attention_error_string(rc), bad
    with pytest.raises(RuntimeError, match="nf_paged_kv_write failed .*invalid argument"):
        cuda_build.launch("nf_paged_kv_write", q.device, cuda_abi.PagedKvWriteArgs(
            dtype=0, N=0, Hkv=1, D=8, k=q.data_ptr(), k_sn=8, k_sh=8, v=q.data_ptr(), v_sn=8, v_sh=8, kc=kc.data_ptr(),
            kc_sp=16, kc_ss=8, kc_sh=8, vc=kc.data_ptr(), vc_sp=16, vc_ss=8, vc_sh=8, num_pages=2, page_size=2,
            slots=bt.data_ptr(), slots64=0))


# ------------------------------------------------------------------------------------------------ nvcc

# 128: the cap __launch_bounds__(256, 2) gives ptxas (16 warps per SM); the others are small by design.
REG_BOUND = {"paged_attention_kernel": 128, "paged_attention_merge_kernel": 40, "paged_kv_write_kernel": 40}


def _resident_warps(registers: int, shared: int) -> int:
    """Warps of one kernel resident per Hopper/Ampere SM from its compiled registers and shared memory:
    registers are allocated per warp in units of 256 (registers x 32 rounded up), 64 K per SM, at
    most 64 warps; no shared memory is used (asserted below)."""
    per_warp = -(-registers * 32 // 256) * 256
    return min(64, pa_cuda.REGS_PER_SM // per_warp)
INSTANTIATIONS = {"paged_attention_kernel": 21, "paged_attention_merge_kernel": 3, "paged_kv_write_kernel": 4}


@pytest.mark.skipif(not HAVE_NVCC, reason="nvcc not found (install the CUDA toolkit or set NVCC)")
@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_nvcc_facts_paged_attention(arch):
    facts = cuda_facts.nvcc_facts(SOURCE, arch)
    counts = {}
    for f in facts:
        counts[f.kernel] = counts.get(f.kernel, 0) + 1
        what = f"{f.kernel}<{f.config}> sm_{f.arch}"
        assert f.spill_store_bytes == 0 and f.spill_load_bytes == 0 and f.local_bytes == 0, f"{what}: {f}"
        assert 0 < f.registers <= REG_BOUND[f.kernel], f"{what}: {f.registers} registers"
        assert f.shared_bytes == 0, f"{what}: {f.shared_bytes} B shared (the design uses shuffles only)"
        assert f.barriers == 0, f"{what}: uses a block barrier"
        if f.kernel == "paged_attention_kernel":
            # The occupancy the plan targets (paged_attention_cuda.WARPS_PER_SM) fits: 16 warps x ~1 KB of
            # K/V rows in flight each ~= 16 KB per SM (Little's law on an H100: ~15 KB).
            assert _resident_warps(f.registers, f.shared_bytes) >= pa_cuda.WARPS_PER_SM, f"{what}: {f.registers}"
        if not f.instructions:
            continue  # no nvdisasm (triton wheel) to read SASS
        assert f.instructions.get("STL", 0) == 0 and f.instructions.get("LDL", 0) == 0, what
        targs = [a.strip() for a in f.config.split(",")]
        if f.kernel == "paged_attention_kernel":
            hpw = int(targs[3])
            # dot-product butterfly and segment merge: at least one shuffle per head for each, plus acc
            assert f.instructions.get("SHFL.BFLY", 0) >= 3 * hpw, f"{what}: {f.instructions}"
            if int(targs[1]) > 1:  # the VEC path: q, K and V rows as 16-byte loads
                assert f.instructions.get("LDG.E.128", 0) >= 3, f"{what}: {f.instructions}"
        if f.kernel == "paged_kv_write_kernel" and int(targs[1]) > 1:
            assert f.instructions.get("LDG.E.128", 0) >= 2 and f.instructions.get("STG.E.128", 0) >= 2, what
    assert counts == INSTANTIATIONS
