"""The model's op boundaries against independent dense references, on awkward shapes."""
import math

import pytest
import torch

from nanofast import ops
from nanofast.kernels import vendor


def dense_attention(q, k, v, window):
    """O(T^2) attention with an explicit (T, T) band mask, fp64."""
    T, D = q.size(1), q.size(-1)
    rep = q.size(2) // k.size(2)
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q.double(), k.double()) / math.sqrt(D)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    scores = scores.masked_fill(~((j <= i) & (j >= i - window)), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v.double())


SHAPES = [  # (B, T, Hq, Hkv, D)
    (1, 1, 1, 1, 8), (2, 5, 3, 1, 8), (1, 17, 4, 2, 12), (2, 33, 6, 3, 16), (1, 64, 2, 2, 8), (3, 9, 5, 5, 4),
]


@pytest.mark.parametrize("B,T,Hq,Hkv,D", SHAPES)
@pytest.mark.parametrize("window", [0, 1, 3, 8, 10_000])
def test_attention_matches_dense_reference_forward_and_backward(B, T, Hq, Hkv, D, window):
    torch.manual_seed(T * 31 + window)
    # Non-contiguous inputs: slices of a wider buffer, as the model's views are.
    q = torch.randn(B, T, Hq, D + 3)[..., :D].requires_grad_()
    k = torch.randn(B, T, Hkv, D + 3)[..., :D].requires_grad_()
    v = torch.randn(B, T, Hkv, D + 3)[..., :D].requires_grad_()
    out = ops.attention(q, k, v, window)
    ref = dense_attention(q, k, v, window)
    assert out.shape == (B, T, Hq, D)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=2e-5)  # fp32 budget
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g.double())
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-4)


def test_attention_half_precision_error_within_budget():
    """bf16/fp16 attention against fp64: within a few bf16 ulps of activations of size ~1."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 40, 4, 16), torch.randn(2, 40, 2, 16), torch.randn(2, 40, 2, 16)
    ref = dense_attention(q, k, v, 7)
    for dtype, tol in [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)]:
        out = ops.attention(q.to(dtype), k.to(dtype), v.to(dtype), 7)
        assert out.dtype == dtype
        assert (out.double() - ref).abs().max() < tol


def rotate_complex(x, theta_base=100_000.0):
    """Independent rotary: pair (x1_i, x2_i) as the complex number x1 + i x2, multiplied by e^{-i t w_i}."""
    B, T, H, D = x.shape
    d = D // 2
    w = theta_base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * w[None, :]
    z = torch.complex(x[..., :d].double(), x[..., d:].double()) * torch.exp(-1j * angle)[None, :, None, :]
    return torch.cat([z.real, z.imag], dim=-1)


@pytest.mark.parametrize("T,D", [(1, 2), (7, 8), (33, 64), (5, 6)])
def test_rotary_is_rotation_by_minus_theta(T, D):
    x = torch.randn(2, T, 3, D)
    cos, sin = ops.rotary_tables(T, D)
    torch.testing.assert_close(ops.apply_rotary(x, cos, sin).double(), rotate_complex(x), atol=1e-5, rtol=1e-5)


def test_qk_norm_rope_order_does_not_matter_and_scales():
    q, k = torch.randn(2, 9, 4, 16), torch.randn(2, 9, 2, 16)
    cos, sin = ops.rotary_tables(9, 16)
    qo, ko = ops.qk_norm_rope(q, k, cos, sin, scale=1.2)
    torch.testing.assert_close(qo, ops.apply_rotary(ops.norm(q), cos, sin) * 1.2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ko.pow(2).mean(-1), torch.full((2, 9, 2), 1.44), atol=1e-4, rtol=1e-4)


def test_softcap_cross_entropy_matches_manual_and_ignores():
    logits = torch.randn(2, 5, 11) * 30
    targets = torch.randint(0, 11, (2, 5))
    targets[0, 1] = -1
    capped = 15 * torch.tanh(logits.double() / 15)
    nll = -capped.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    keep = targets >= 0
    none = ops.softcap_cross_entropy(logits, targets, reduction="none")
    assert none.shape == targets.shape and none[0, 1] == 0
    torch.testing.assert_close(none[keep].double(), nll[keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.softcap_cross_entropy(logits, targets).double(), nll[keep].mean(), atol=1e-5, rtol=1e-5)
    assert ops.softcap_logits(logits).abs().max() < 15


def test_linear_casts_master_weight_to_activation_dtype():
    w = torch.randn(6, 4)
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    y = ops.linear(x, w)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, (x.float() @ w.bfloat16().float().T).bfloat16(), atol=3e-2, rtol=3e-2)


def test_norm_is_parameter_free_rms_norm():
    x = torch.randn(3, 5, 7)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)
    torch.testing.assert_close(ops.norm(x), ref)


@pytest.mark.parametrize("window", [0, 5, 1000])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (3, 1)])
def test_paged_decode_torch_path_equals_the_kernels_reference(window, hq, hkv):
    """ops' fused-SDPA CPU path against nanofast.kernels' readable reference (engine-style tables:
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
    torch.testing.assert_close(ops.paged_decode_attention(q, kc, vc, table, lens, window), want,
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
    want = ops.paged_prefill_attention_per_chunk(q, kc, vc, table, chunks, ctx, window)
    plan = {}  # what the engine keeps per step: the second layer's call reuses the first's index tensors
    got = ops.paged_prefill_attention_batched(q, kc, vc, table, chunks, ctx, window, plan)
    assert got.shape == want.shape == (q.size(0), hq, q.size(-1)) and len(plan["groups"]) > 1  # chunks reordered
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(ops.paged_prefill_attention_batched(q, kc, vc, table, chunks, ctx, window, plan), got)
    # the next layer may have another window: the step's plan (masks cached per window) still fits it
    other = window + 2
    want = ops.paged_prefill_attention_per_chunk(q, kc, vc, table, chunks, ctx, other)
    torch.testing.assert_close(ops.paged_prefill_attention_batched(q, kc, vc, table, chunks, ctx, other, plan), want,
                               rtol=1e-6, atol=1e-6)
    assert all(set(g["masks"]) == {window, other} for g in plan["groups"])


def test_batched_prefill_of_like_chunks_is_one_sdpa_call(monkeypatch):
    q, kc, vc, table, _, ctx = _prefill_case(6, 2, seed=3)
    chunks = [(0, 0, 5), (4, 5, 6)]  # contexts 6 and 7: 8 keys each in pages of 4
    calls = []
    sdpa = ops.F.scaled_dot_product_attention
    monkeypatch.setattr(ops.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    want = ops.paged_prefill_attention_per_chunk(q[:11], kc, vc, table, chunks, ctx, 5)
    calls.clear()
    plan = {}
    got = ops.paged_prefill_attention_batched(q[:11], kc, vc, table, chunks, ctx, 5, plan)
    assert len(calls) == 1 and len(plan["groups"]) == 1 and plan["rows"] is None
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_batched_prefill_errors_name_the_argument():
    q, kc, vc, table, chunks, ctx = _prefill_case(4, 2, seed=1)
    with pytest.raises(ValueError, match="chunks must list at least one"):
        ops.paged_prefill_attention_batched(q, kc, vc, table, [], ctx, 3)
    with pytest.raises(ValueError, match=r"q must be \(M, Hq, D\) with M = 31"):
        ops.paged_prefill_attention_batched(q[:-1], kc, vc, table, chunks, ctx, 3)
    with pytest.raises(ValueError, match="1 <= tokens <= its context length"):
        ops.paged_prefill_attention_batched(q[:3], kc, vc, table, [(2, 0, 3)], ctx, 3)  # 3 tokens, context 2


def test_prefill_groups_bound_the_padding():
    # a 3-token tool output does not ride in a long prompt's call; like shapes share one
    assert ops.prefill_groups([2000, 3], [2048, 2048]) == [[0], [1]]
    assert ops.prefill_groups([30, 17, 11, 9], [32, 20, 12, 12]) == [[0], [1], [2, 3]]
    assert ops.prefill_groups([5, 5, 5], [16, 16, 16]) == [[0, 1, 2]]
    assert ops.prefill_groups([7], [8]) == [[0]]
    for lens, keys in (([1, 9, 4, 4, 30, 2], [64, 12, 8, 40, 32, 4]), ([3] * 7, [4, 8, 12, 16, 20, 24, 28])):
        groups = ops.prefill_groups(lens, keys)
        assert sorted(i for g in groups for i in g) == list(range(len(lens)))
        for g in groups:  # padded area within 1.25x of the real one
            padded = len(g) * max(lens[i] for i in g) * max(keys[i] for i in g)
            assert padded <= 1.25 * sum(lens[i] * keys[i] for i in g)
    assert ops.prefill_groups([3, 3], [4, 64], max_padding=100.0) == [[1, 0]]


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
    want = ops.paged_prefill_attention_per_chunk(q, kc, vc, table, chunks, ctx, window)
    plan = {}
    got = ops.paged_prefill_attention_batched(q.half(), kc.half(), vc.half(), table, chunks, ctx, window, plan)
    assert fake.calls == 1 and set(plan) == {"slots", "cu"}
    torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=2e-3)
    with pytest.raises(vendor.ContractError, match=r"fp16 or bf16.*\[dtype; flash-attn"):
        ops.paged_prefill_attention_batched(q, kc, vc, table, chunks, ctx, window, {})  # fp32: refused


def test_norm_with_residual_returns_the_new_stream():
    x, r = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    y, h = ops.norm(x, residual=r)
    torch.testing.assert_close(h, x + r, rtol=0, atol=0)
    torch.testing.assert_close(y, ops.norm(x + r), rtol=0, atol=0)
