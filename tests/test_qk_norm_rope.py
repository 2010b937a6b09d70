"""Tests for nanofast.kernels.qk_norm_rope (fused QK RMSNorm + rotary + scale).

The Triton kernels run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)
and are compared with the plain-torch reference evaluated in fp64 on the same (rounded) inputs,
under FlashAttention-style budgets, per dtype:

    max|kernel - ref64| <= FACTOR * max|torch_lowprec - ref64| + ATOL * max(1, max|ref64|)

where torch_lowprec is the reference run in the input dtype. The kernels are also compiled for
sm_90 / sm_80 and their machine code checked (compile gate).
"""
from __future__ import annotations

import functools
import importlib
import math

import pytest
import torch

from nanofast import ops
from compile_gate_helpers import check_common_facts, gate_facts_fixture, gate_tests
from error_budget import check_budget

# `nanofast.kernels` re-exports the function `qk_norm_rope`, which shadows the submodule as an
# attribute: fetch the module itself.
qnr = importlib.import_module("nanofast.kernels.qk_norm_rope")
KERNEL_CONFIGS = qnr.KERNEL_CONFIGS
QKNormRope = qnr.QKNormRope
qk_norm_rope = qnr.qk_norm_rope
qk_norm_rope_inplace = qnr.qk_norm_rope_inplace
qk_norm_rope_reference = qnr.qk_norm_rope_reference
qk_norm_rope_inplace_reference = qnr.qk_norm_rope_inplace_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_ID = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# (FACTOR, ATOL) per dtype. fp32/fp16: the kernel computes in fp32 and rounds once, torch rounds
# after every op in the input dtype, so twice torch's error plus fp32-level slack (different
# summation order of mean(x^2) over D, rsqrt vs 1/sqrt). bf16: the Triton *interpreter* converts
# fp32 -> bf16 by truncation (the GPU's cvt rounds to nearest even), so one bf16 ulp (2^-7
# relative) may appear even where torch's rounding happens to be exact: ATOL = 2^-7 covers it.
# Backward: the dx row reduction and the weight-gradient sums over B*T*H terms are fp32 sums in
# another order than torch's: a little more fp32 slack.
BUDGET = {
    "fwd": {torch.float32: (2.0, 2e-6), torch.float16: (2.0, 1e-5), torch.bfloat16: (2.0, 2.0 ** -7)},
    "bwd": {torch.float32: (2.0, 1e-5), torch.float16: (2.0, 2e-5), torch.bfloat16: (2.0, 2.0 ** -7)},
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, gen, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(dtype)


def _tables(rows: int, D: int, gen, dtype=torch.float32):
    """Genuine rotations (cos^2 + sin^2 = 1) at random angles: (rows, D/2) cos and sin."""
    ang = (torch.rand((rows, D // 2), generator=gen, dtype=torch.float64) * 2 - 1) * math.pi
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _make(B, T, HQ, HK, D, layout, dtype, gen):
    """q (B, T, HQ, D), k (B, T, HK, D) in a given memory layout; the buffer is also returned.

    contig: two contiguous tensors. packed: views into one (B, T, (HQ + 2*HK) * D + 3) buffer, as
    after a fused qkv projection (the v heads and 3 padding columns are NaN: reading them would
    show). strided: (B, H, T, D) tensors transposed to (B, T, H, D) (only D contiguous).
    """
    if layout == "contig":
        return _randn((B, T, HQ, D), gen, dtype), _randn((B, T, HK, D), gen, dtype), None
    if layout == "packed":
        width = (HQ + 2 * HK) * D
        buf = torch.full((B, T, width + 3), float("nan"), dtype=dtype)
        buf[..., :(HQ + HK) * D] = _randn((B, T, (HQ + HK) * D), gen, dtype)
        q = buf[..., :HQ * D].unflatten(-1, (HQ, D))
        k = buf[..., HQ * D:(HQ + HK) * D].unflatten(-1, (HK, D))
        return q, k, buf
    if layout == "strided":
        return (_randn((B, HQ, T, D), gen, dtype).transpose(1, 2), _randn((B, HK, T, D), gen, dtype).transpose(1, 2),
                None)
    raise ValueError(layout)


_check_budget = functools.partial(check_budget, BUDGET)


def _eps(dtype):
    return qnr.default_eps(dtype)  # F.rms_norm's default: fp32's epsilon for 16-bit inputs


def _run(backend, q, k, cos, sin, qw, kw, scale, eps, interleaved, dq, dk, dtype=None):
    """Forward + backward through the functional API; `dtype` recasts every input first (fp64 reference).

    Returns (q_out, k_out, dq, dk, dq_weight, dk_weight)."""
    if dtype is not None:
        q, k, cos, sin, dq, dk = (t.detach().to(dtype) for t in (q, k, cos, sin, dq, dk))
        qw, kw = (None if w is None else w.detach().to(dtype) for w in (qw, kw))
    # detach() keeps the input's own layout (packed / strided views) for the kernel to handle.
    ql, kl = q.detach().requires_grad_(), k.detach().requires_grad_()
    qwl, kwl = (None if w is None else w.detach().clone().requires_grad_() for w in (qw, kw))
    qo, ko = qk_norm_rope(ql, kl, cos, sin, qwl, kwl, scale=scale, eps=eps, interleaved=interleaved,
                          backend=backend)
    torch.autograd.backward((qo, ko), (dq, dk))
    return (qo.detach(), ko.detach(), ql.grad, kl.grad, None if qwl is None else qwl.grad,
            None if kwl is None else kwl.grad)


# --------------------------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DT_ID.get)
@pytest.mark.parametrize("shape", [(2, 5, 3, 3, 8), (1, 1, 6, 2, 64), (1, 7, 5, 5, 6)], ids=str)
def test_reference_equals_ops_qk_norm_rope_bitwise(shape, dtype):
    B, T, HQ, HK, D = shape
    g = _gen(0)
    q, k = _randn((B, T, HQ, D), g, dtype), _randn((B, T, HK, D), g, dtype)
    cos, sin = ops.rotary_tables(T + 4, D)
    cos, sin = cos[:T].to(dtype), sin[:T].to(dtype)  # as the model passes them
    want_q, want_k = ops.qk_norm_rope(q, k, cos, sin, scale=1.2)
    got_q, got_k = qk_norm_rope_reference(q, k, cos, sin, scale=1.2)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    # Longer tables: only the first T rows are used. Default backend on CPU is the reference.
    long_cos, long_sin = ops.rotary_tables(T + 4, D)
    got_q2, got_k2 = qk_norm_rope(q, k, long_cos.to(dtype), long_sin.to(dtype), scale=1.2)
    assert torch.equal(got_q2, want_q) and torch.equal(got_k2, want_k)


def _naive64(x, cos, sin, w, scale, eps, interleaved):
    """The definition, index by index in fp64: norm -> weight -> rotate pairs -> scale."""
    x = x.double()
    D = x.shape[-1]
    n = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if w is not None:
        n = n * w.double()
    if interleaved:
        ia, ib = torch.arange(0, D, 2), torch.arange(1, D, 2)
    else:
        ia, ib = torch.arange(D // 2), torch.arange(D // 2, D)
    c, s = cos.double()[:x.shape[1], None, :], sin.double()[:x.shape[1], None, :]
    out = torch.empty_like(n)
    out[..., ia] = n[..., ia] * c + n[..., ib] * s
    out[..., ib] = n[..., ib] * c - n[..., ia] * s
    return out * scale


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("weights", [False, True])
def test_reference_matches_definition_fp64(interleaved, weights):
    g = _gen(1)
    B, T, HQ, HK, D = 2, 3, 3, 2, 6
    q, k = _randn((B, T, HQ, D), g, torch.float64), _randn((B, T, HK, D), g, torch.float64)
    cos, sin = _tables(T + 2, D, g, torch.float64)
    qw = _randn((D,), g, torch.float64) if weights else None
    kw = _randn((D,), g, torch.float64) if weights else None
    qo, ko = qk_norm_rope_reference(q, k, cos, sin, qw, kw, scale=0.7, eps=1e-5, interleaved=interleaved)
    torch.testing.assert_close(qo, _naive64(q, cos, sin, qw, 0.7, 1e-5, interleaved), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ko, _naive64(k, cos, sin, kw, 0.7, 1e-5, interleaved), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Triton kernels vs the reference (interpreter)
# --------------------------------------------------------------------------------------------

# (B, T, Hq, Hk, D, layout, interleaved, weights, scale); weights: None, "both", "q", "k", "both32"
# ("both32": fp32 master weights with low-precision activations).
CASES = [
    (1, 1, 1, 1, 2, "contig", False, None, 1.0),
    (2, 3, 3, 3, 8, "packed", False, None, 1.2),
    (1, 5, 5, 1, 6, "strided", False, "both", 0.7),
    (2, 1, 6, 2, 64, "packed", True, None, 1.0),
    (1, 3, 3, 3, 128, "contig", False, "both", 1.2),
    (1, 2, 6, 3, 128, "packed", True, "both32", 1.2),
    (3, 1, 2, 2, 6, "contig", True, "k", 1.0),
    (1, 7, 1, 1, 8, "strided", True, None, 2.0),
    (1, 2, 13, 13, 64, "packed", False, "q", 1.2),
    (2, 2, 4, 2, 2, "packed", True, "both", 1.0),
]


def _case_id(c):
    B, T, HQ, HK, D, layout, inter, w, scale = c
    return f"B{B}T{T}q{HQ}k{HK}D{D}-{layout}{'-inter' if inter else ''}{'-w' + w if w else ''}-s{scale}"


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_triton_matches_reference_fwd_bwd(case, dtype):
    B, T, HQ, HK, D, layout, interleaved, weights, scale = case
    g = _gen(CASES.index(case))
    q, k, _ = _make(B, T, HQ, HK, D, layout, dtype, g)
    cos, sin = _tables(T + 2, D, g, dtype)
    wdt = torch.float32 if weights == "both32" else dtype
    qw = (1 + 0.3 * _randn((D,), g)).to(wdt) if weights in ("both", "both32", "q") else None
    kw = (1 + 0.3 * _randn((D,), g)).to(wdt) if weights in ("both", "both32", "k") else None
    dq, dk = _randn((B, T, HQ, D), g, dtype), _randn((B, T, HK, D), g, dtype)
    eps = _eps(dtype)  # the kernel's default; the fp64 reference must use the same value
    args = (cos, sin, qw, kw, scale, None, interleaved, dq, dk)
    kern = _run("triton", q, k, *args)
    lowp = _run("torch", q, k, *args)
    ref = _run("torch", q, k, cos, sin, qw, kw, scale, eps, interleaved, dq, dk, dtype=torch.float64)
    names = ("q_out", "k_out", "dq", "dk", "dq_weight", "dk_weight")
    for i, name in enumerate(names):
        if kern[i] is None:
            assert ref[i] is None and lowp[i] is None, name
            continue
        assert kern[i].dtype == lowp[i].dtype, name
        _check_budget("fwd" if i < 2 else "bwd", dtype, name, kern[i], lowp[i], ref[i])
    # Outputs are new contiguous tensors in the input dtype.
    assert kern[0].is_contiguous() and kern[1].is_contiguous() and kern[0].dtype == dtype
    # rstd from the launcher: 1 / rms of each input head, fp32.
    _, _, q_rstd, k_rstd = qnr.qk_norm_rope_fwd_triton(q, k, cos, sin, qw, kw, scale, None, interleaved)
    for x, r in ((q, q_rstd), (k, k_rstd)):
        want = torch.rsqrt(x.double().pow(2).mean(-1) + eps)
        assert r.dtype == torch.float32 and r.shape == x.shape[:3]
        torch.testing.assert_close(r.double(), want, rtol=2e-6, atol=0)


def test_triton_fp32_tables_with_bf16_activations_and_explicit_eps():
    g = _gen(5)
    q, k, _ = _make(1, 4, 3, 1, 8, "packed", torch.bfloat16, g)
    cos, sin = _tables(4, 8, g, torch.float32)
    qo, ko = qk_norm_rope(q, k, cos, sin, scale=1.3, eps=1e-3, backend="triton")
    ref = qk_norm_rope_reference(q.double(), k.double(), cos.double(), sin.double(), scale=1.3, eps=1e-3)
    low = qk_norm_rope_reference(q, k, cos, sin, scale=1.3, eps=1e-3)
    for i in range(2):
        _check_budget("fwd", torch.bfloat16, f"out{i}", (qo, ko)[i], low[i], ref[i])


def test_zero_tokens_and_default_cpu_backend():
    g = _gen(6)
    cos, sin = _tables(3, 8, g)
    for B, T in ((0, 3), (2, 0)):
        q, k = torch.randn(B, T, 3, 8, requires_grad=True), torch.randn(B, T, 1, 8, requires_grad=True)
        qo, ko = qk_norm_rope(q, k, cos, sin, backend="triton")
        assert qo.shape == q.shape and ko.shape == k.shape
        (qo.sum() + ko.sum()).backward()
        assert q.grad.shape == q.shape
    q, k = torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8)
    assert all(torch.equal(a, b) for a, b in zip(qk_norm_rope(q, k, cos, sin), qk_norm_rope_reference(q, k, cos, sin)))


# --------------------------------------------------------------------------------------------
# In-place inference variant
# --------------------------------------------------------------------------------------------

def _cache(max_pos: int, D: int, gen) -> torch.Tensor:
    """(max_pos, D) fp32 [cos | sin] rows of genuine rotations."""
    cos, sin = _tables(max_pos, D, gen, torch.float32)
    return torch.cat([cos, sin], dim=-1)


def _packed_qkv(N, HQ, HKV, D, dtype, gen, pad=5):
    """(N, W) view with row stride W + pad into a buffer whose padding columns are NaN."""
    W = (HQ + 2 * HKV) * D
    buf = torch.full((N, W + pad), float("nan"), dtype=dtype)
    buf[:, :W] = _randn((N, W), gen, dtype)
    return buf, buf[:, :W]


INPLACE_CASES = [  # (N, Hq, Hkv, D, interleaved, weights)
    (1, 1, 1, 2, False, False),
    (7, 3, 1, 6, False, True),
    (5, 6, 2, 64, True, False),
    (4, 5, 5, 128, True, True),
    (6, 4, 2, 8, False, False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("case", INPLACE_CASES, ids=lambda c: "N{}q{}kv{}D{}{}{}".format(
    *c[:4], "-inter" if c[4] else "", "-w" if c[5] else ""))
def test_inplace_matches_reference(case, dtype):
    N, HQ, HKV, D, interleaved, weights = case
    g = _gen(N * 100 + D)
    max_pos = 11
    cache_buf = torch.full((max_pos + 2, D), float("nan"))
    positions = torch.tensor([9, 2, 9, 0, 10, 2, 5][:N], dtype=torch.int64)  # non-monotonic, repeated
    cache_buf[1:-1] = _cache(max_pos, D, g)
    unused = sorted(set(range(max_pos)) - set(positions.tolist()))
    cache_buf[1 + torch.tensor(unused)] = float("nan")  # rows no token uses must never be read
    cache = cache_buf[1:-1]
    qw = (1 + 0.3 * _randn((D,), g)).to(dtype) if weights else None
    kw = (1 + 0.3 * _randn((D,), g)).to(dtype) if weights else None
    buf, qkv = _packed_qkv(N, HQ, HKV, D, dtype, g)
    before = buf.clone()
    qk_norm_rope_inplace(qkv, positions, cache, HQ, HKV, qw, kw, scale=1.2, interleaved=interleaved, backend="triton")

    W, nqk = (HQ + 2 * HKV) * D, (HQ + HKV) * D
    # v heads bitwise untouched, padding columns still NaN.
    assert torch.equal(buf[:, nqk:W], before[:, nqk:W])
    assert torch.isnan(buf[:, W:]).all()
    assert torch.isfinite(buf[:, :nqk]).all()
    # vs the reference in fp64 (same rounded inputs, same eps) and in the input dtype.
    eps = _eps(dtype)
    ref = before[:, :W].double().clone()
    qk_norm_rope_inplace_reference(ref, positions, torch.nan_to_num(cache.double()), HQ, HKV,
                                   None if qw is None else qw.double(), None if kw is None else kw.double(),
                                   scale=1.2, eps=eps, interleaved=interleaved)
    low = before[:, :W].clone()
    qk_norm_rope_inplace(low, positions, torch.nan_to_num(cache), HQ, HKV, qw, kw, scale=1.2,
                         interleaved=interleaved, backend="torch")
    _check_budget("fwd", dtype, "qk", buf[:, :nqk], low[:, :nqk], ref[:, :nqk])
    # Token i at its own position: equal to the (B=1, T=1) training path at that position's angles.
    i = 2 if N > 2 else 0
    p = int(positions[i])
    q1 = before[i, :HQ * D].view(1, 1, HQ, D)
    k1 = before[i, HQ * D:nqk].view(1, 1, HKV, D)
    want_q, want_k = qk_norm_rope(q1, k1, cache[p:p + 1, :D // 2], cache[p:p + 1, D // 2:], qw, kw, scale=1.2,
                                  interleaved=interleaved, backend="triton")
    assert torch.equal(buf[i, :HQ * D], want_q.flatten()) and torch.equal(buf[i, HQ * D:nqk], want_k.flatten())


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_inplace_reads_strided_positions(backend):
    """positions as a strided column of a wider index table (the static decode step's layout): each
    token rotates at its own position, as with a contiguous copy (the Triton launcher once read
    positions[i] at offset i and silently used the wrong rows)."""
    g = _gen(31)
    N, HQ, HKV, D = 5, 3, 1, 8
    cache = _cache(12, D, g)
    table = torch.tensor([[7, 0, 3], [1, 0, 3], [11, 0, 3], [4, 0, 3], [0, 0, 3]])
    positions = table[:, 0]  # stride 3
    _, qkv = _packed_qkv(N, HQ, HKV, D, torch.float32, g)
    want = qkv.clone()
    qk_norm_rope_inplace(want, positions.contiguous(), cache, HQ, HKV, scale=1.2, backend=backend)
    qk_norm_rope_inplace(qkv, positions, cache, HQ, HKV, scale=1.2, backend=backend)
    assert torch.equal(qkv, want)


def test_inplace_out_of_range_position_never_reads_outside_cache():
    """Bypass the (CPU-only) range check: the kernel's masked cache load keeps a bad position
    from reading the NaN rows around the cache; the heads are then rotated by zero tables."""
    g = _gen(7)
    N, HQ, HKV, D = 3, 2, 1, 8
    cache_buf = torch.full((6, D), float("nan"))
    cache_buf[1:5] = _cache(4, D, g)
    cache = cache_buf[1:5]
    buf, qkv = _packed_qkv(N, HQ, HKV, D, torch.float32, g)
    positions = torch.tensor([-1, 4, 1])
    meta = qnr._launch_meta(HQ, HKV, D)
    nw = meta.pop("num_warps")
    qnr._qk_norm_rope_inplace_kernel[(N,)](qkv, positions, cache, qkv, qkv, qkv.stride(0), cache.stride(0), 4,
                                           HQ, HKV, 1e-6, 1.0, HALF=D // 2, HAS_QW=False, HAS_KW=False,
                                           INTERLEAVED=False, num_warps=nw, **meta)
    nqk = (HQ + HKV) * D
    assert torch.equal(qkv[:2, :nqk], torch.zeros(2, nqk))  # bad positions: zero rotation, no NaN read
    assert torch.isfinite(qkv[2, :nqk]).all() and (qkv[2, :nqk] != 0).any()


# --------------------------------------------------------------------------------------------
# Out-of-bounds protection, determinism, no mutation
# --------------------------------------------------------------------------------------------

def _guarded(shape, dtype, guard=7):
    """A NaN buffer with `guard` elements either side of a contiguous `shape` view."""
    n = math.prod(shape)
    buf = torch.full((n + 2 * guard,), float("nan"), dtype=dtype)
    return buf, buf[guard:guard + n].view(shape)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DT_ID.get)
@pytest.mark.parametrize("shape", [(2, 3, 3, 1, 6), (1, 2, 5, 3, 2), (1, 3, 6, 6, 10)], ids=str)
def test_poisoned_guard_bands_fwd_bwd(shape, dtype, interleaved):
    B, T, HQ, HK, D = shape
    g = _gen(8)
    q, k, qkv = _make(B, T, HQ, HK, D, "packed", dtype, g)  # v heads and row padding are NaN
    cos_buf = torch.full((T + 3, D // 2), float("nan"))
    sin_buf = torch.full((T + 3, D // 2), float("nan"))
    cos_buf[:T], sin_buf[:T] = _tables(T, D, g)  # rows >= T are NaN: never read
    qw, kw = _randn((D,), g, dtype), _randn((D,), g, dtype)
    guards = [_guarded((B, T, HQ, D), dtype), _guarded((B, T, HK, D), dtype), _guarded((B, T, HQ), torch.float32),
              _guarded((B, T, HK), torch.float32)]
    qnr._launch_fwd(q, k, cos_buf, sin_buf, qw, kw, 1.1, 1e-6, interleaved, *(v for _, v in guards))
    for buf, view in guards:
        assert torch.isfinite(view).all()
        assert torch.isnan(buf[:7]).all() and torch.isnan(buf[-7:]).all()
    want = qnr.qk_norm_rope_fwd_triton(q.contiguous(), k.contiguous(), cos_buf[:T].contiguous(),
                                       sin_buf[:T].contiguous(), qw, kw, 1.1, 1e-6, interleaved)
    assert all(torch.equal(v, w) for (_, v), w in zip(guards, want))

    # Backward: upstream gradients as NaN-padded packed views, outputs and weight rows guarded.
    dqo, dko, _ = _make(B, T, HQ, HK, D, "packed", dtype, g)
    bguards = [_guarded((B, T, HQ, D), dtype), _guarded((B, T, HK, D), dtype),
               _guarded((B * T, D), torch.float32), _guarded((B * T, D), torch.float32)]
    qnr._launch_bwd(dqo, dko, q, k, cos_buf, sin_buf, qw, kw, guards[2][1], guards[3][1], 1.1, interleaved,
                    *(v for _, v in bguards))
    for buf, view in bguards:
        assert torch.isfinite(view).all()
        assert torch.isnan(buf[:7]).all() and torch.isnan(buf[-7:]).all()


def test_weight_grads_deterministic_fixed_order_reduction():
    g = _gen(9)
    q, k, _ = _make(2, 5, 3, 2, 8, "packed", torch.float16, g)
    cos, sin = _tables(5, 8, g)
    qw, kw = _randn((8,), g, torch.float16), _randn((8,), g, torch.float16)
    fwd = qnr.qk_norm_rope_fwd_triton(q, k, cos, sin, qw, kw, 1.0, None, False)
    dq, dk = _randn(q.shape, g, torch.float16), _randn(k.shape, g, torch.float16)
    runs = [qnr.qk_norm_rope_bwd_triton(dq, dk, q, k, cos, sin, qw, kw, fwd[2], fwd[3], 1.0, False) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    # The reduction is the fixed-order sum of per-token fp32 rows: recompute it from the rows.
    rows_q = torch.empty(10, 8)
    rows_k = torch.empty(10, 8)
    qnr._launch_bwd(dq, dk, q, k, cos, sin, qw, kw, fwd[2], fwd[3], 1.0, False, torch.empty_like(q),
                    torch.empty_like(k), rows_q, rows_k)
    assert torch.equal(runs[0][2], rows_q.sum(0).half()) and torch.equal(runs[0][3], rows_k.sum(0).half())
    # (No atomics in the compiled kernels: checked by the compile gate below.)


def test_inputs_not_mutated():
    g = _gen(10)
    q, k, buf = _make(1, 3, 3, 2, 8, "packed", torch.float16, g)
    cos, sin = _tables(4, 8, g)
    qw, kw = _randn((8,), g, torch.float16), _randn((8,), g, torch.float16)
    dq, dk = _randn(q.shape, g, torch.float16), _randn(k.shape, g, torch.float16)
    before = [t.clone() for t in (buf, cos, sin, qw, kw, dq, dk)]
    fwd = qnr.qk_norm_rope_fwd_triton(q, k, cos, sin, qw, kw, 1.2, None, True)
    rstd = [t.clone() for t in fwd[2:]]
    qnr.qk_norm_rope_bwd_triton(dq, dk, q, k, cos, sin, qw, kw, fwd[2], fwd[3], 1.2, True)
    after = (buf, cos, sin, qw, kw, dq, dk)
    assert all(torch.equal(a, b) for a, b in zip(before, after) if not a.isnan().any())
    assert torch.equal(before[0].nan_to_num(7.0), buf.nan_to_num(7.0))
    assert all(torch.equal(a, b) for a, b in zip(rstd, fwd[2:]))


def test_expanded_upstream_gradient():
    """.sum() hands the backward stride-0 gradients; they must work (copied to unit stride)."""
    q = torch.randn(1, 2, 3, 8, requires_grad=True)
    k = torch.randn(1, 2, 1, 8, requires_grad=True)
    cos, sin = _tables(2, 8, _gen(11))
    qo, ko = qk_norm_rope(q, k, cos, sin, backend="triton")
    (qo.sum() + ko.sum()).backward()
    q2, k2 = q.detach().requires_grad_(), k.detach().requires_grad_()
    r = qk_norm_rope_reference(q2, k2, cos, sin)
    (r[0].sum() + r[1].sum()).backward()
    torch.testing.assert_close(q.grad, q2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k.grad, k2.grad, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

def _bad_cases():
    q, k = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 2, 8)
    cos, sin = torch.randn(3, 4), torch.randn(3, 4)
    w = torch.randn(8)
    base = dict(q=q, k=k, cos=cos, sin=sin)
    return [
        (dict(base, q=q[0]), ValueError, "q must have shape"),
        (dict(base, k=torch.randn(2, 3, 2, 8, 1)), ValueError, "k must have shape"),
        (dict(base, q=[1.0]), TypeError, "q must be a torch.Tensor"),
        (dict(base, q=q.long()), TypeError, "q must be a floating"),
        (dict(base, k=torch.randn(2, 4, 2, 8)), ValueError, "k must have shape"),
        (dict(base, k=torch.randn(2, 3, 2, 6)), ValueError, "same head dim"),
        (dict(base, q=torch.randn(2, 3, 4, 7), k=torch.randn(2, 3, 2, 7)), ValueError, "even"),
        (dict(base, k=k.half()), TypeError, "same dtype"),
        (dict(base, k=k.to("meta")), ValueError, "same device"),
        (dict(base, q=torch.randn(2, 3, 8, 4).transpose(-1, -2)), ValueError, "q must be contiguous in its last dim"),
        (dict(base, cos=torch.randn(2, 4)), ValueError, "cos must have shape"),
        (dict(base, sin=torch.randn(3, 8)), ValueError, "sin must have shape"),
        (dict(base, cos=torch.randn(3)), ValueError, "cos must have shape"),
        (dict(base, sin=torch.randn(4, 3).t()), ValueError, "sin must be contiguous"),
        (dict(base, q_weight=torch.randn(4)), ValueError, r"q_weight must have shape \(8,\)"),
        (dict(base, k_weight=torch.randn(8, 1)), ValueError, r"k_weight must have shape \(8,\)"),
        (dict(base, scale="2"), TypeError, "scale"),
        (dict(base, eps=-1.0), ValueError, "eps"),
        (dict(base, interleaved=1), TypeError, "interleaved"),
        (dict(base, backend="cudnn"), ValueError, "backend"),
        (dict(base, q=q.double(), k=k.double(), backend="triton"), TypeError, "float16, bfloat16 or float32"),
        (dict(base, cos=cos.requires_grad_(), backend="triton"), ValueError, "cos and sin get no gradient"),
        (dict(base, cos=cos.double(), sin=sin.double(), backend="cuda"), TypeError, "cos must be float16"),
        (dict(base, sin=sin.half(), backend="cuda"), TypeError, "sin must have cos's shape and dtype"),
        (dict(base, sin=torch.randn(5, 4), backend="triton"), TypeError, "sin must have cos's shape"),
        (dict(base, q_weight=w.double(), backend="cuda"), TypeError, "q_weight must be float16"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_raises_clear_errors(case):
    kwargs, exc, match = _bad_cases()[case]
    with pytest.raises(exc, match=match):
        qk_norm_rope(**kwargs)
    if "backend" not in kwargs:  # the launcher and the reference validate the same way
        with pytest.raises(exc, match=match):
            qk_norm_rope_reference(**kwargs)
        args = {n: kwargs.get(n) for n in ("q", "k", "cos", "sin", "q_weight", "k_weight")}
        with pytest.raises(exc, match=match):
            qnr.qk_norm_rope_fwd_triton(**args, scale=kwargs.get("scale", 1.0), eps=kwargs.get("eps"),
                                        interleaved=kwargs.get("interleaved", False))


def _bad_inplace_cases():
    qkv, pos, cache = torch.randn(4, (3 + 2) * 8), torch.tensor([0, 3, 1, 1]), torch.randn(5, 8)
    base = dict(qkv=qkv, positions=pos, cos_sin_cache=cache, num_q_heads=3, num_kv_heads=1)
    return [
        (dict(base, qkv=torch.randn(4, 41)), ValueError, r"qkv must have shape \(N, \(Hq \+ 2\*Hkv\) \* D\)"),
        (dict(base, qkv=qkv[None]), ValueError, "qkv must have shape"),
        (dict(base, qkv=torch.randn(40, 4).t()), ValueError, "qkv must be contiguous in its last dim"),
        (dict(base, qkv=torch.randn(100).as_strided((4, 40), (20, 1))), ValueError, "must not overlap"),
        (dict(base, positions=pos[:3]), ValueError, r"positions must be a tensor of shape \(N,\)"),
        (dict(base, positions=pos.float()), TypeError, "positions must be int64"),
        (dict(base, positions=torch.tensor([0, 5, 1, 1])), ValueError, r"positions must lie in \[0, max_position"),
        (dict(base, positions=torch.tensor([0, -1, 1, 1])), ValueError, "positions must lie in"),
        (dict(base, cos_sin_cache=torch.randn(5, 7)), ValueError, "cos_sin_cache must have shape"),
        (dict(base, cos_sin_cache=torch.randn(5)), ValueError, "cos_sin_cache must have shape"),
        (dict(base, num_q_heads=0), ValueError, "num_q_heads must be an int >= 1"),
        (dict(base, num_kv_heads=1.5), ValueError, "num_kv_heads"),
        (dict(base, q_weight=torch.randn(7)), ValueError, r"q_weight must have shape \(8,\)"),
        (dict(base, qkv=qkv.long()), TypeError, "qkv must be a floating"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inplace_cases())))
def test_bad_inplace_input_raises_clear_errors(case):
    kwargs, exc, match = _bad_inplace_cases()[case]
    for backend in ("torch", "triton"):
        with pytest.raises(exc, match=match):
            qk_norm_rope_inplace(**kwargs, backend=backend)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("arg", ["cos_sin_cache", "q_weight"])
def test_inplace_kernel_backends_reject_fp64_tables_and_weights(backend, arg):
    # The torch reference takes fp64; the kernels load fp16/bf16/fp32 only, checked at the entry.
    kwargs = dict(qkv=torch.randn(4, 40), positions=torch.tensor([0, 3, 1, 1]), cos_sin_cache=torch.randn(5, 8),
                  num_q_heads=3, num_kv_heads=1, backend=backend)
    kwargs[arg] = kwargs["cos_sin_cache"].double() if arg == "cos_sin_cache" else torch.randn(8).double()
    with pytest.raises(TypeError, match=f"{arg} must be float16, bfloat16 or float32 for the kernel backends"):
        qk_norm_rope_inplace(**kwargs)


# --------------------------------------------------------------------------------------------
# Module, custom ops, torch.compile
# --------------------------------------------------------------------------------------------

def test_module_with_and_without_weights():
    g = _gen(12)
    q, k, _ = _make(1, 3, 3, 1, 8, "packed", torch.float32, g)
    cos, sin = _tables(3, 8, g)
    plain = QKNormRope(8, scale=1.2, backend="triton")
    assert list(plain.parameters()) == []
    torch.testing.assert_close(plain(q, k, cos, sin), qk_norm_rope_reference(q, k, cos, sin, scale=1.2))
    m = QKNormRope(8, weight=True, interleaved=True, backend="triton")
    with torch.no_grad():
        m.q_weight.mul_(torch.linspace(0.5, 1.5, 8))
    qo, ko = m(q, k, cos, sin)
    (qo.pow(2).sum() + ko.sum()).backward()
    assert m.q_weight.grad.shape == (8,) and m.k_weight.grad.shape == (8,)
    ref = qk_norm_rope_reference(q, k, cos, sin, m.q_weight, m.k_weight, interleaved=True)
    torch.testing.assert_close((qo, ko), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="head_dim"):
        QKNormRope(7)


def test_opcheck_custom_ops():
    g = _gen(13)
    q, k, _ = _make(1, 2, 3, 1, 8, "packed", torch.float32, g)
    cos, sin = _tables(3, 8, g)
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    w = torch.randn(8, requires_grad=True)
    for qw, kw in ((None, None), (w, None)):
        torch.library.opcheck(torch.ops.nanofast.qk_norm_rope_fwd.default,
                              (q, k, cos, sin, qw, kw, 1.2, 1e-6, True, "triton"))
    fwd = qnr.qk_norm_rope_fwd_triton(q.detach(), k.detach(), cos, sin, w.detach(), None, 1.2, 1e-6, False)
    dq, dk = torch.randn(q.shape), torch.randn(k.shape)
    torch.library.opcheck(torch.ops.nanofast.qk_norm_rope_bwd.default,
                          (dq, dk, q.detach(), k.detach(), cos, sin, w.detach(), None, fwd[2], fwd[3], 1.2, False,
                           "triton"))
    qkv = torch.randn(4, 5 * 8)
    torch.library.opcheck(torch.ops.nanofast.qk_norm_rope_inplace.default,
                          (qkv, torch.tensor([3, 0, 3, 1]), _cache(4, 8, g), 3, 1, None, w.detach(), 1.0, 1e-6,
                           False, "triton"))


def test_torch_compile_fullgraph_matches_eager():
    g = _gen(14)
    q, k, _ = _make(1, 3, 3, 1, 8, "packed", torch.float32, g)
    cos, sin = _tables(3, 8, g)
    qw, kw = 1 + 0.2 * _randn((8,), g), 1 + 0.2 * _randn((8,), g)

    def step(q, k, qw, kw):
        qo, ko = qk_norm_rope(q, k, cos, sin, qw, kw, scale=1.2, backend="triton")
        return (qo * qo).sum() + (ko.pow(3)).sum()

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, qw, kw)]
        loss = fn(*leaves)
        return [loss, *torch.autograd.grad(loss, leaves)]

    torch._dynamo.reset()
    compiled = grads(torch.compile(step, fullgraph=True))
    eager = grads(step)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Compile gate: what an H100 runs, compiled for sm_90 (and sm_80), machine code checked
# --------------------------------------------------------------------------------------------

# Measured (triton 3.9, sm_90): forward and in-place 40-56 registers, backward 52-70 without
# weights, 98 with weights (the per-token weight-gradient rows add a reduction over heads).
# 128 keeps >= 16 warps per SM resident for these 2-4 warp programs (enough loads in flight for a
# memory-bound kernel) and flags regressions (the per-program accumulator design measured 202).
MAX_REGISTERS = 128
SM80_CONFIGS = [1, 7]  # fwd bf16 Hq=Hk=13 D=128; bwd bf16 Hq=Hk=13 D=128
gate_facts = gate_facts_fixture("nanofast.kernels.qk_norm_rope", sm80=SM80_CONFIGS)


def test_kernel_configs_cover_nanochat_and_match_launchers():
    names = {c["fn"].__name__ for c in KERNEL_CONFIGS}
    assert names == {"_qk_norm_rope_fwd_kernel", "_qk_norm_rope_bwd_kernel", "_qk_norm_rope_inplace_kernel"}
    assert {c["fn"] for c in KERNEL_CONFIGS} == {qnr._qk_norm_rope_fwd_kernel, qnr._qk_norm_rope_bwd_kernel,
                                                 qnr._qk_norm_rope_inplace_kernel}
    labels = " | ".join(c["config"] for c in KERNEL_CONFIGS)
    for kind in ("fwd", "bwd"):
        for dt in ("bf16", "fp16", "fp32"):
            for h in (6, 13):  # nanochat depth 12 .. 26 at head_dim 128
                assert f"{kind} {dt} Hq={h} Hk={h} D=128 warps" in labels
    assert "D=64" in labels and "Hq=12 Hk=4" in labels and "weights" in labels and "interleaved" in labels
    assert "inplace" in labels
    assert KERNEL_CONFIGS[SM80_CONFIGS[0]]["config"].startswith("fwd bf16 Hq=13")
    assert KERNEL_CONFIGS[SM80_CONFIGS[1]]["config"].startswith("bwd bf16 Hq=13")
    for c in KERNEL_CONFIGS:
        # Every kernel argument is described, in order, and the meta-parameters are the launcher's.
        assert list(c["signature"]) == list(c["fn"].arg_names), c["config"]
        assert set(c["aligned"]) <= set(c["signature"]) and all(c["signature"][a] != "constexpr" for a in c["aligned"])
        words = dict(w.split("=") for w in c["config"].split() if "=" in w)
        meta = qnr._launch_meta(int(words["Hq"]), int(words["Hk"]), int(words["D"]))
        assert c["num_warps"] == meta["num_warps"]
        assert all(c["constexprs"][n] == meta[n] for n in ("BLOCK_HQ", "BLOCK_HK", "BLOCK_HALF"))


def _check_facts(cfg: dict, f: dict, arch: int) -> None:
    where = check_common_facts(cfg, f, arch, MAX_REGISTERS)
    # 128-bit vector loads and stores: with D = 128 (64), 16-byte aligned pointers and strides that
    # are multiples of 16 elements (as Triton specialises real nanochat calls), each thread's 8
    # contiguous 16-bit (4 fp32) elements of a pair half are one LDG.E.128. All configs reach
    # 128 bits for their main tiles, fp32 included; only the per-token cos/sin/weight rows, the
    # rstd values and positions use narrower loads.
    assert f["instructions"].get("LDG.E.128", 0) > 0, where
    assert f["instructions"].get("STG.E.128", 0) > 0, where
    assert "HGMMA" not in f["instructions"] and "HMMA" not in f["instructions"], where  # no tensor-core work
    # Deterministic weight gradients by construction: stores only, no atomic read-modify-write.
    assert f["stores"] > 0 and f["atomics"] == 0, where


test_compile_gate_sm90, test_compile_gate_sm80 = gate_tests(KERNEL_CONFIGS, SM80_CONFIGS, _check_facts)
