"""nanofast.attention: the engine's paged attention against plain references (CPU): the paged
decode's torch path against the kernels' reference, the batched prefill against one SDPA per chunk
(and, through a plain stand-in, its flash-attn varlen packing), the grouping of chunks by padding."""
import math

import pytest
import torch

from nanofast import attention
from nanofast.kernels import vendor


@pytest.mark.parametrize("window", [0, 5, 1000])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (3, 1)])
def test_paged_decode_torch_path_equals_the_kernels_reference(window, hq, hkv):
    """The fused-SDPA CPU path against nanofast.kernels' readable reference (engine-style tables:
    rows padded with page 0, lengths 1 .. full)."""
    from nanofast.kernels import paged_decode_attention_reference

    g = torch.Generator().manual_seed(window + hq)
    P, D, pages = 4, 16, 20
    kc, vc = torch.randn(pages, P, hkv, D, generator=g), torch.randn(pages, P, hkv, D, generator=g)
    table = torch.randperm(pages, generator=g)[:15].view(3, 5).to(torch.int32)
    lens = torch.tensor([1, 9, 20], dtype=torch.int32)
    table[0, 1:] = 0  # padding past the used pages, as the engine writes it
    q = torch.randn(3, hq, D, generator=g)
    want = paged_decode_attention_reference(q, kc, vc, table, lens, window=window)
    torch.testing.assert_close(attention.paged_decode_attention(q, kc, vc, table, lens, window), want,
                               rtol=1e-5, atol=1e-6)


def _prefill_case(hq, hkv, seed, P=4, D=8):
    """A cache, an engine-style block table (rows padded with page 0) and 4 chunks of mixed sizes:
    (row, start, n) with one decode row (row 0) before them, as the engine orders a step."""
    g = torch.Generator().manual_seed(seed)
    pages = 24
    kc, vc = torch.randn(pages, P, hkv, D, generator=g), torch.randn(pages, P, hkv, D, generator=g)
    ctx = [6, 13, 2, 21, 7]  # row 0 decodes; rows 1..4 are chunks
    lens = [None, 5, 2, 21, 3]  # a chunk may be the whole prompt or the tail of a longer context
    perm = torch.randperm(pages, generator=g).tolist()
    table, used = [], 0
    for c in ctx:
        n = -(-c // P)
        table.append(perm[used:used + n])
        used += n
    width = max(map(len, table))
    table = torch.tensor([t + [0] * (width - len(t)) for t in table], dtype=torch.int32)
    chunks, start = [], 0
    for row in range(1, 5):
        chunks.append((row, start, lens[row]))
        start += lens[row]
    q = torch.randn(start, hq, D + 2, generator=g)[..., :D]  # strided, as views of a packed qkv buffer
    return q, kc, vc, table, chunks, ctx


@pytest.mark.parametrize("window", [0, 3, 1000])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (3, 1)])
def test_batched_prefill_equals_the_per_chunk_path(window, hq, hkv):
    """One call over every chunk gives each chunk what paged_prefill_attention gives it alone."""
    q, kc, vc, table, chunks, ctx = _prefill_case(hq, hkv, seed=window + 7 * hq)
    want = attention.paged_prefill_attention_per_chunk(q, kc, vc, table, chunks, ctx, window)
    plan = {}  # what the engine keeps per step: the second layer's call reuses the first's index tensors
    got = attention.paged_prefill_attention_batched(q, kc, vc, table, chunks, ctx, window, plan)
    assert got.shape == want.shape == (q.size(0), hq, q.size(-1)) and len(plan["groups"]) > 1  # chunks reordered
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(attention.paged_prefill_attention_batched(q, kc, vc, table, chunks, ctx, window, plan), got)
    # the next layer may have another window: the step's plan (masks cached per window) still fits it
    other = window + 2
    want = attention.paged_prefill_attention_per_chunk(q, kc, vc, table, chunks, ctx, other)
    got = attention.paged_prefill_attention_batched(q, kc, vc, table, chunks, ctx, other, plan)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert all(set(g["masks"]) == {window, other} for g in plan["groups"])


def test_batched_prefill_of_like_chunks_is_one_sdpa_call(monkeypatch):
    q, kc, vc, table, _, ctx = _prefill_case(6, 2, seed=3)
    chunks = [(0, 0, 5), (4, 5, 6)]  # contexts 6 and 7: 8 keys each in pages of 4
    calls = []
    sdpa = attention.F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    want = attention.paged_prefill_attention_per_chunk(q[:11], kc, vc, table, chunks, ctx, 5)
    calls.clear()
    plan = {}
    got = attention.paged_prefill_attention_batched(q[:11], kc, vc, table, chunks, ctx, 5, plan)
    assert len(calls) == 1 and len(plan["groups"]) == 1 and plan["rows"] is None
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_batched_prefill_errors_name_the_argument():
    q, kc, vc, table, chunks, ctx = _prefill_case(4, 2, seed=1)
    with pytest.raises(ValueError, match="chunks must list at least one"):
        attention.paged_prefill_attention_batched(q, kc, vc, table, [], ctx, 3)
    with pytest.raises(ValueError, match=r"q must be \(M, Hq, D\) with M = 31"):
        attention.paged_prefill_attention_batched(q[:-1], kc, vc, table, chunks, ctx, 3)
    with pytest.raises(ValueError, match="1 <= tokens <= its context length"):
        attention.paged_prefill_attention_batched(q[:3], kc, vc, table, [(2, 0, 3)], ctx, 3)  # 3 tokens, context 2


def test_prefill_groups_bound_the_padding():
    # a 3-token tool output does not ride in a long prompt's call; like shapes share one
    assert attention.prefill_groups([2000, 3], [2048, 2048]) == [[0], [1]]
    assert attention.prefill_groups([30, 17, 11, 9], [32, 20, 12, 12]) == [[0], [1], [2, 3]]
    assert attention.prefill_groups([5, 5, 5], [16, 16, 16]) == [[0, 1, 2]]
    assert attention.prefill_groups([7], [8]) == [[0]]
    for lens, keys in (([1, 9, 4, 4, 30, 2], [64, 12, 8, 40, 32, 4]), ([3] * 7, [4, 8, 12, 16, 20, 24, 28])):
        groups = attention.prefill_groups(lens, keys)
        assert sorted(i for g in groups for i in g) == list(range(len(lens)))
        for g in groups:  # padded area within 1.25x of the real one
            padded = len(g) * max(lens[i] for i in g) * max(keys[i] for i in g)
            assert padded <= 1.25 * sum(lens[i] * keys[i] for i in g)
    assert attention.prefill_groups([3, 3], [4, 64], max_padding=100.0) == [[1, 0]]


class _FakeVarlenFlashAttn:
    """flash_attn_varlen_func's contract written plainly (per sequence, dense, bottom-right aligned
    causal mask with a left window), so the packing into it can be checked on CPU."""

    def __init__(self):
        self.calls = 0

    def flash_attn_varlen_func(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, window_size):
        self.calls += 1
        assert causal and window_size[1] == 0 and cu_q.dtype == cu_k.dtype == torch.int32
        out = []
        for i in range(cu_q.numel() - 1):
            qs, ks = q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]]
            vs = v[cu_k[i]:cu_k[i + 1]]
            n, c = qs.size(0), ks.size(0)
            assert n <= max_q and c <= max_k
            rep = qs.size(1) // ks.size(1)
            ks, vs = ks.repeat_interleave(rep, 1), vs.repeat_interleave(rep, 1)
            s = torch.einsum("nhd,chd->hnc", qs.double(), ks.double()) / math.sqrt(qs.size(-1))
            qi = torch.arange(c - n, c)[:, None]
            kj = torch.arange(c)[None, :]
            keep = kj <= qi
            if window_size[0] >= 0:  # -1: unlimited on the left
                keep &= kj >= qi - window_size[0]
            s = s.masked_fill(~keep, float("-inf"))
            out.append(torch.einsum("hnc,chd->nhd", s.softmax(-1), vs.double()).to(q.dtype))
        return torch.cat(out), None  # FA3 returns (out, lse)


@pytest.mark.parametrize("window", [0, 3, 1000, -1])
def test_batched_prefill_packs_flash_attn_varlen_inputs(monkeypatch, window):
    """The flash-attn branch (taken on CUDA for fp16/bf16): keys gathered per sequence into the
    varlen layout with cu_seqlens; checked on CPU against the per-chunk path with a plain stand-in,
    called through vendor.flash_attn_varlen_func (so flash-attn's contract is checked first: fp16)."""
    fake = _FakeVarlenFlashAttn()
    monkeypatch.setattr(vendor, "flash_attn_module", lambda q: fake)
    q, kc, vc, table, chunks, ctx = _prefill_case(6, 2, seed=window)
    want = attention.paged_prefill_attention_per_chunk(q, kc, vc, table, chunks, ctx, window)
    plan = {}
    got = attention.paged_prefill_attention_batched(q.half(), kc.half(), vc.half(), table, chunks, ctx, window, plan)
    assert fake.calls == 1 and set(plan) == {"slots", "cu"}
    torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=2e-3)
    with pytest.raises(vendor.ContractError, match=r"fp16 or bf16.*\[dtype; flash-attn"):
        attention.paged_prefill_attention_batched(q, kc, vc, table, chunks, ctx, window, {})  # fp32: refused
