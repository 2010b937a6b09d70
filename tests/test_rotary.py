"""Tests for nanofast.kernels.rotary (rotary embedding in Hugging Face's rotate_half conventions).

The yardstick is transformers' own `apply_rotary_pos_emb` (Llama's modeling module): the torch
backend must equal it bit for bit where HF's conventions apply, and the Triton kernel (through
Triton's interpreter, tests/conftest.py) must be within the FlashAttention-style budget of it
evaluated in fp64 on the same rounded inputs:

    max|kernel - hf64| <= FACTOR * max|hf_lowprec - hf64| + ATOL * max(1, max|hf64|)

Tables are random angles over all D columns, so the two halves of cos and sin differ: nothing may
assume HF's equal halves. The kernel is also compiled for sm_90 / sm_80 (compile gate).
"""
from __future__ import annotations

import functools
import importlib

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply_rotary_pos_emb

from compile_gate_helpers import check_common_facts, gate_facts_fixture, gate_tests
from error_budget import check_budget

rot = importlib.import_module("nanofast.kernels.rotary")
qnr = importlib.import_module("nanofast.kernels.qk_norm_rope")  # the module (the package re-exports the function)
apply_rotary_pos_emb = rot.apply_rotary_pos_emb
rotary_embedding = rot.rotary_embedding
KERNEL_CONFIGS = rot.KERNEL_CONFIGS

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_ID = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# (FACTOR, ATOL) per dtype, the kernel tests' values. The kernel computes in fp32 and rounds once;
# HF's formula in a 16-bit dtype rounds after each product and the sum, so twice its error plus
# fp32-level slack. bf16: the Triton interpreter converts fp32 -> bf16 by truncation (the GPU
# rounds to nearest even), so one bf16 ulp may appear where HF's rounding is exact: ATOL = 2^-7.
# The backward is the same rotation (opposite angle): the same budget.
BUDGET = {
    "fwd": {torch.float32: (2.0, 2e-6), torch.float16: (2.0, 1e-5), torch.bfloat16: (2.0, 2.0 ** -7)},
    "bwd": {torch.float32: (2.0, 2e-6), torch.float16: (2.0, 1e-5), torch.bfloat16: (2.0, 2.0 ** -7)},
}
_check_budget = functools.partial(check_budget, BUDGET)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, gen, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(dtype)


def _angles(shape, gen) -> torch.Tensor:
    """Random angles in [-pi, pi) over every column: cos/sin halves differ."""
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * torch.pi


def _heads(B, T, H, D, layout, dtype, gen):
    """A head tensor in one of the layouts (and its unsqueeze_dim):

    hf: HF's attention, a (B, T, H, D) projection viewed (B, H, T, D) by transpose(1, 2);
    bhtd: a contiguous (B, H, T, D); bthd: a contiguous (B, T, H, D) (unsqueeze_dim=2);
    packed / packed_hf: a view into a wider (B, T, H*D + 5) buffer whose spare columns are NaN (a
    read outside the heads would show), in (B, T, H, D) or, transposed, in HF's layout.
    """
    x = _randn((B, T, H, D), gen, dtype)
    if layout == "hf":
        return x.transpose(1, 2), 1
    if layout == "bhtd":
        return x.transpose(1, 2).contiguous(), 1
    if layout == "bthd":
        return x, 2
    if layout in ("packed", "packed_hf"):
        buf = torch.full((B, T, H * D + 5), float("nan"), dtype=dtype)
        buf[..., 2:2 + H * D] = x.flatten(-2)
        v = buf[..., 2:2 + H * D].unflatten(-1, (H, D))
        return (v, 2) if layout == "packed" else (v.transpose(1, 2), 1)
    raise ValueError(layout)


def _tables(B, T, D, kind, dtype, gen):
    """(cos, sin, position_ids) of a kind: btd (B, T, D); 1td (1, T, D); td (T, D); fp32: (B, T, D)
    fp32 tables whatever q's dtype; left: (L, D) tables with left-padding-like (B, T) ids (HF's
    generate fills pad positions with 1); offset: (L, D) tables with (T,) ids at a decode offset;
    batch1: (L, D) tables with (1, T) ids."""
    if kind in ("btd", "1td", "td", "fp32"):
        shape = {"btd": (B, T, D), "1td": (1, T, D), "td": (T, D), "fp32": (B, T, D)}[kind]
        ang = _angles(shape, gen)
        dt = torch.float32 if kind == "fp32" else dtype
        return ang.cos().to(dt), ang.sin().to(dt), None
    L = T + 6
    ang = _angles((L, D), gen)
    if kind == "left":
        pad = torch.randint(0, T, (B,), generator=gen)
        pos = torch.stack([torch.cat([torch.ones(int(p), dtype=torch.int64), torch.arange(T - int(p))]) for p in pad])
    elif kind == "offset":
        pos = torch.arange(5, 5 + T)
    elif kind == "batch1":
        pos = torch.randperm(L, generator=gen)[:T][None]
    else:
        raise ValueError(kind)
    return ang.cos().to(dtype), ang.sin().to(dtype), pos


def _hf_tables(cos, sin, pos, B):
    """What HF's function takes: per-position (B', T, D) tables (gathered, a batch dim added)."""
    if pos is not None:
        cos, sin = cos[pos], sin[pos]
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    return cos, sin


def _fwd_bwd(fn, q, k, dq, dk, dtype=None):
    """fn(q, k) -> (q_out, k_out) and the gradients of q, k for upstream (dq, dk), on fresh leaves
    that keep q's and k's layouts (recast to `dtype` first when given)."""
    if dtype is not None:
        q, k, dq, dk = (t.detach().to(dtype) for t in (q, k, dq, dk))
    ql, kl = q.detach().requires_grad_(), k.detach().requires_grad_()
    qo, ko = fn(ql, kl)
    torch.autograd.backward((qo, ko), (dq, dk))
    return qo.detach(), ko.detach(), ql.grad, kl.grad


# --------------------------------------------------------------------------------------------
# The torch backend is HF's function
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("layout", ["hf", "bthd"])
def test_torch_backend_is_transformers_bitwise(layout, dtype):
    g = _gen(0)
    B, T, HQ, HK, D = 2, 5, 3, 1, 8
    q, u = _heads(B, T, HQ, D, layout, dtype, g)
    k, _ = _heads(B, T, HK, D, layout, dtype, g)
    for kind in ("btd", "1td"):
        cos, sin, _ = _tables(B, T, D, kind, dtype, g)
        want = hf_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=u)
        got = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=u)  # CPU default: torch
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert torch.equal(rotary_embedding(k, cos, sin, unsqueeze_dim=u, backend="torch"), want[1])
    # (T, D) tables and position ids: HF's function on the gathered per-position tables
    for kind in ("td", "left", "offset"):
        cos, sin, pos = _tables(B, T, D, kind, dtype, g)
        want = hf_apply_rotary_pos_emb(q, k, *_hf_tables(cos, sin, pos, B), unsqueeze_dim=u)
        got = apply_rotary_pos_emb(q, k, cos, sin, pos, u, backend="torch")
        assert all(torch.equal(a, b) for a, b in zip(got, want)), kind
    # fp32 tables with 16-bit q: HF promotes to fp32; here the same numbers, rounded once to q's dtype
    cos, sin, _ = _tables(B, T, D, "fp32", dtype, g)
    want = hf_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=u)
    got = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=u)
    assert all(a.dtype == dtype and torch.equal(a, b.to(dtype)) for a, b in zip(got, want))
    assert torch.equal(rot.rotate_half(q), torch.cat((-q[..., D // 2:], q[..., :D // 2]), dim=-1))


def test_reference_matches_the_definition_index_by_index_fp64():
    """out[:D/2] = x1 cos1 - x2 sin1, out[D/2:] = x2 cos2 + x1 sin2, with unequal halves."""
    g = _gen(1)
    B, T, H, D = 2, 3, 2, 6
    x = _randn((B, T, H, D), g, torch.float64)
    ang = _angles((B, T, D), g)
    c, s = ang.cos()[:, :, None], ang.sin()[:, :, None]
    h = D // 2
    want = torch.cat([x[..., :h] * c[..., :h] - x[..., h:] * s[..., :h],
                      x[..., h:] * c[..., h:] + x[..., :h] * s[..., h:]], dim=-1)
    got = rot.rotary_embedding_reference(x, ang.cos(), ang.sin(), unsqueeze_dim=2)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)


# --------------------------------------------------------------------------------------------
# The Triton kernel against transformers (interpreter)
# --------------------------------------------------------------------------------------------

# (B, T, Hq, Hk, D, layout, tables)
CASES = [
    (1, 1, 1, 1, 2, "hf", "btd"),            # T = 1, B = 1, D = 2
    (2, 5, 3, 5, 8, "hf", "btd"),            # odd T, 3 and 5 heads, Hk > Hq
    (2, 3, 4, 2, 96, "bthd", "td"),          # D = 96 (D/2 not a power of two), shared (T, D) tables
    (1, 7, 5, 1, 64, "packed", "1td"),       # views into a packed buffer, batch-1 tables
    (3, 5, 6, 2, 16, "hf", "left"),          # left-padding position ids into (L, D) tables
    (3, 1, 2, 2, 6, "bhtd", "offset"),       # a decode step: T = 1, (T,) ids at an offset
    (2, 3, 3, 3, 128, "packed_hf", "fp32"),  # HF layout over a packed buffer, fp32 tables
    (1, 4, 13, 5, 32, "hf", "batch1"),       # (1, T) ids, 13 / 5 heads
]


def _case_id(c):
    B, T, HQ, HK, D, layout, tables = c
    return f"B{B}T{T}q{HQ}k{HK}D{D}-{layout}-{tables}"


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_triton_matches_transformers_fwd_bwd(case, dtype):
    B, T, HQ, HK, D, layout, kind = case
    g = _gen(10 + CASES.index(case))
    q, u = _heads(B, T, HQ, D, layout, dtype, g)
    k, _ = _heads(B, T, HK, D, layout, dtype, g)
    cos, sin, pos = _tables(B, T, D, kind, dtype, g)
    dq, dk = torch.randn_like(q.detach()), torch.randn_like(k.detach())
    q_before, k_before = q.clone(), k.clone()

    kern = _fwd_bwd(lambda a, b: apply_rotary_pos_emb(a, b, cos, sin, pos, u, backend="triton"), q, k, dq, dk)
    ours_torch = _fwd_bwd(lambda a, b: apply_rotary_pos_emb(a, b, cos, sin, pos, u, backend="torch"), q, k, dq, dk)
    hc, hs = _hf_tables(cos, sin, pos, B)
    # HF as its models run it (tables in q's dtype), and in fp64 on the same rounded inputs
    lowp = _fwd_bwd(lambda a, b: hf_apply_rotary_pos_emb(a, b, hc.to(dtype), hs.to(dtype), u), q, k, dq, dk)
    ref = _fwd_bwd(lambda a, b: hf_apply_rotary_pos_emb(a, b, hc.double(), hs.double(), u), q, k, dq, dk,
                   dtype=torch.float64)
    for i, name in enumerate(("q_out", "k_out", "dq", "dk")):
        _check_budget("fwd" if i < 2 else "bwd", dtype, name, kern[i], lowp[i], ref[i])
        _check_budget("fwd" if i < 2 else "bwd", dtype, f"torch backend {name}", ours_torch[i], lowp[i], ref[i])
        assert kern[i].shape == ref[i].shape and kern[i].dtype == dtype, name
    assert torch.equal(q, q_before) and torch.equal(k, k_before)  # inputs untouched


def test_outputs_are_new_token_major_tensors():
    """unsqueeze_dim=1: a (B, H, T, D) view of a contiguous (B, T, H, D) buffer, HF's own layout,
    whatever q's strides; unsqueeze_dim=2: contiguous. The gradients follow the same rule."""
    g = _gen(2)
    B, T, H, D = 2, 3, 5, 8
    cos, sin, _ = _tables(B, T, D, "btd", torch.float32, g)
    for layout in ("hf", "bhtd", "bthd", "packed", "packed_hf"):
        x, u = _heads(B, T, H, D, layout, torch.float32, g)
        x = x.detach().requires_grad_()
        out = rotary_embedding(x, cos, sin, unsqueeze_dim=u, backend="triton")
        want_strides = (T * H * D, D, H * D, 1) if u == 1 else (T * H * D, H * D, D, 1)
        assert out.stride() == want_strides and out.shape == x.shape, layout
        assert out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        out.backward(torch.randn_like(out))
        assert x.grad.shape == x.shape
        if layout == "hf":  # HF's own result for its layout has the same strides
            assert hf_apply_rotary_pos_emb(x, x, cos, sin)[0].stride() == out.stride()
        # read in place: only a tensor without a unit stride on D is copied for the kernel
        assert rot._unit_last(x) is x
    strided_d = torch.randn(B, T, D, H).transpose(-1, -2)  # (B, T, H, D) with stride H on D
    assert rot._unit_last(strided_d).is_contiguous()
    torch.testing.assert_close(rotary_embedding(strided_d, cos, sin, unsqueeze_dim=2, backend="triton"),
                               rotary_embedding(strided_d, cos, sin, unsqueeze_dim=2, backend="torch"))


def test_expanded_upstream_gradient_and_single_tensor_entry():
    """.sum() hands stride-0 gradients (copied once for the kernel's unit-stride rows);
    rotary_embedding is apply_rotary_pos_emb's q half, forward and backward, on both backends."""
    g = _gen(3)
    B, T, HQ, HK, D = 2, 4, 3, 2, 16
    q, _ = _heads(B, T, HQ, D, "hf", torch.float32, g)
    k, _ = _heads(B, T, HK, D, "hf", torch.float32, g)
    cos, sin, pos = _tables(B, T, D, "left", torch.float32, g)
    for backend in ("torch", "triton"):
        ql, kl, xl = (t.detach().requires_grad_() for t in (q, k, q))
        qo, ko = apply_rotary_pos_emb(ql, kl, cos, sin, pos, backend=backend)
        (qo.sum() + ko.sum()).backward()
        xo = rotary_embedding(xl, cos, sin, pos, backend=backend)
        xo.sum().backward()
        assert torch.equal(xo, qo) and torch.equal(xl.grad, ql.grad), backend
        h2, hk2 = (t.detach().requires_grad_() for t in (q, k))
        a, b = hf_apply_rotary_pos_emb(h2, hk2, cos[pos], sin[pos])
        (a.sum() + b.sum()).backward()
        torch.testing.assert_close(ql.grad, h2.grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(kl.grad, hk2.grad, rtol=1e-6, atol=1e-6)


def test_zero_tokens():
    g = _gen(4)
    for B, T in ((0, 3), (2, 0)):
        cos, sin, _ = _tables(max(B, 1), T, 8, "1td", torch.float32, g)
        q = torch.randn(B, 3, T, 8, requires_grad=True)
        k = torch.randn(B, 1, T, 8, requires_grad=True)
        qo, ko = apply_rotary_pos_emb(q, k, cos, sin, backend="triton")
        assert qo.shape == q.shape and ko.shape == k.shape
        (qo.sum() + ko.sum()).backward()
        assert q.grad.shape == q.shape and k.grad.shape == k.shape


def test_out_of_range_position_never_reads_outside_the_tables():
    """On CUDA the ids are not read back (no sync): the kernel masks the table rows, so an id
    outside [0, L) rotates by cos = sin = 0 (zeros) instead of reading NaN guard rows around the
    tables. (On CPU the public entry refuses such ids; the launcher is called directly.)"""
    g = _gen(5)
    B, T, H, D, L = 1, 4, 2, 8, 3
    guard = torch.full((L + 4, D), float("nan"))
    ang = _angles((L, D), g)
    cos, sin = guard.clone(), guard.clone()
    cos[2:2 + L], sin[2:2 + L] = ang.cos().float(), ang.sin().float()
    pos = torch.tensor([[0, -1, 2, 3]])
    x = torch.randn(B, H, T, D, generator=g)
    out, none = rot.TRITON_LAUNCHERS.fwd(x, None, cos[2:2 + L], sin[2:2 + L], pos, 1)
    assert none is None and torch.isfinite(out).all()
    assert torch.equal(out[:, :, 1], torch.zeros(B, H, D)) and torch.equal(out[:, :, 3], torch.zeros(B, H, D))
    want = rot.rotary_embedding_reference(x[:, :, ::2], cos[2:2 + L], sin[2:2 + L], pos[:, ::2])
    torch.testing.assert_close(out[:, :, ::2], want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"position_ids must lie in \[0, L = 3\)"):
        rotary_embedding(x, cos[2:2 + L], sin[2:2 + L], pos, backend="triton")


# --------------------------------------------------------------------------------------------
# Gradients of the tables, autograd and torch.compile
# --------------------------------------------------------------------------------------------

def test_table_gradients_on_torch_and_a_clear_error_on_the_kernels():
    g = _gen(6)
    q, _ = _heads(2, 3, 2, 8, "hf", torch.float32, g)
    k, _ = _heads(2, 3, 1, 8, "hf", torch.float32, g)
    cos, sin, _ = _tables(2, 3, 8, "btd", torch.float32, g)
    c, s = cos.clone().requires_grad_(), sin.clone().requires_grad_()
    sum(t.sum() for t in apply_rotary_pos_emb(q, k, c, s, backend="torch")).backward()
    hc, hs = cos.clone().requires_grad_(), sin.clone().requires_grad_()
    sum(t.sum() for t in hf_apply_rotary_pos_emb(q, k, hc, hs)).backward()
    assert torch.equal(c.grad, hc.grad) and torch.equal(s.grad, hs.grad)
    for name in ("cos", "sin"):
        tables = {"cos": cos, "sin": sin, name: (cos if name == "cos" else sin).clone().requires_grad_()}
        with pytest.raises(ValueError, match=f"{name} requires grad, but the kernel backends compute no gradient"):
            apply_rotary_pos_emb(q, k, tables["cos"], tables["sin"], backend="triton")
        with torch.no_grad():  # no gradient asked for: nothing is dropped
            apply_rotary_pos_emb(q, k, tables["cos"], tables["sin"], backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph_fwd_bwd_matches_eager(backend):
    """HF's layout, left-padding position ids (no data-dependent guard), both entries."""
    g = _gen(7)
    B, T, HQ, HK, D = 2, 3, 3, 1, 8
    q, _ = _heads(B, T, HQ, D, "hf", torch.float32, g)
    k, _ = _heads(B, T, HK, D, "hf", torch.float32, g)
    cos, sin, pos = _tables(B, T, D, "left", torch.float32, g)

    def step(q, k):
        qo, ko = apply_rotary_pos_emb(q, k, cos, sin, pos, backend=backend)
        return (qo * qo).sum() + ko.pow(3).sum() + (rotary_embedding(k, cos, sin, pos, backend=backend) * 0.5).sum()

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k)]
        loss = fn(*leaves)
        return [loss, *torch.autograd.grad(loss, leaves)]

    torch._dynamo.reset()
    try:
        compiled = grads(torch.compile(step, fullgraph=True))
    finally:
        torch._dynamo.reset()
    for a, b in zip(compiled, grads(step)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_opcheck_custom_op():
    """The custom op's fake (shapes and token-major strides), schema and autograd registration."""
    g = _gen(8)
    q, _ = _heads(1, 3, 3, 8, "hf", torch.float32, g)
    k, _ = _heads(1, 3, 1, 8, "hf", torch.float32, g)
    cos, sin, _ = _tables(1, 3, 8, "btd", torch.float32, g)
    tc, ts, pos = _tables(1, 3, 8, "batch1", torch.float32, g)
    ql, kl = q.detach().requires_grad_(), k.detach().requires_grad_()
    for args in ((ql, kl, cos, sin, None, 1, False, "triton"), (ql, None, tc, ts, pos, 1, True, "triton"),
                 (ql.transpose(1, 2), kl.transpose(1, 2), tc, ts, pos[0], 2, False, "triton")):
        torch.library.opcheck(torch.ops.nanofast.rotary.default, args)


# --------------------------------------------------------------------------------------------
# nanofast's qk_norm_rope rotates the other way: documented, and checked here
# --------------------------------------------------------------------------------------------

def test_qk_norm_rope_direction_relation_is_as_documented():
    """qk_norm_rope maps (a, b) to (a c + b s, b c - a s): with sin negated and (T, D/2) half
    tables it equals HF's rotation (full tables cat(c, c), cat(s, s)) of the normalised q and k;
    with HF's own sin it is the opposite rotation. Both docstrings say so."""
    assert "(a c + b s, b c - a s)" in qnr.__doc__
    assert "qk_norm_rope(q, k, c, -s)" in " ".join(rot.__doc__.split())
    g = _gen(9)
    B, T, HQ, HK, D = 2, 5, 3, 1, 8
    q, k = _randn((B, T, HQ, D), g, torch.float64), _randn((B, T, HK, D), g, torch.float64)
    ang = _angles((T, D // 2), g)
    c, s = ang.cos(), ang.sin()
    full_c, full_s = torch.cat([c, c], -1), torch.cat([s, s], -1)
    nq, nk = F.rms_norm(q, (D,)), F.rms_norm(k, (D,))
    want = hf_apply_rotary_pos_emb(nq, nk, full_c[None], full_s[None], unsqueeze_dim=2)
    for backend in ("torch", "triton"):
        dt = torch.float64 if backend == "torch" else torch.float32  # the kernels load fp16/bf16/fp32
        got = qnr.qk_norm_rope(q.to(dt), k.to(dt), c.to(dt), (-s).to(dt), backend=backend)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, rtol=1e-5 if dt == torch.float32 else 1e-12,
                                       atol=1e-5 if dt == torch.float32 else 1e-12)
    wrong = qnr.qk_norm_rope(q, k, c, s, backend="torch")  # HF's sin: the opposite angle
    assert (wrong[0] - want[0]).abs().max() > 0.1
    back = hf_apply_rotary_pos_emb(wrong[0], wrong[1], full_c[None], full_s[None], unsqueeze_dim=2)
    torch.testing.assert_close(back[0], nq, rtol=1e-12, atol=1e-12)  # HF's rotation undoes it
    # ... and this module's own entry on the same tables agrees with HF's
    ours = apply_rotary_pos_emb(nq, nk, full_c, full_s, unsqueeze_dim=2, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(ours, want))


# --------------------------------------------------------------------------------------------
# Errors name the argument
# --------------------------------------------------------------------------------------------

def _bad_cases():
    g = _gen(11)
    q = torch.randn(2, 3, 5, 8, generator=g)      # (B, H, T, D)
    k = torch.randn(2, 1, 5, 8, generator=g)
    cos, sin = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    tab, pos = torch.randn(9, 8, generator=g), torch.arange(5)
    return [
        (lambda: apply_rotary_pos_emb(q.numpy(), k, cos, sin), TypeError, r"q must be a torch.Tensor of shape \(B, Hq, T, D\)"),
        (lambda: apply_rotary_pos_emb(q[0], k, cos, sin), ValueError, r"q must have shape \(B, Hq, T, D\) \(4 dims"),
        (lambda: apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2), ValueError,
         r"k must have shape \(B, T, Hk, D\) with B=2, T=3, D=8"),
        (lambda: apply_rotary_pos_emb(q, k[..., :4], cos, sin), ValueError, r"k must have shape .* D=8"),
        (lambda: apply_rotary_pos_emb(q.long(), k, cos, sin), TypeError, "q must be a floating tensor"),
        (lambda: apply_rotary_pos_emb(q, k.double(), cos, sin), TypeError, "q and k must have the same dtype"),
        (lambda: apply_rotary_pos_emb(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7]), ValueError,
         "D of q must be even"),
        (lambda: apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=0), ValueError, "unsqueeze_dim must be 1"),
        (lambda: apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=True), TypeError, "unsqueeze_dim must be the int"),
        (lambda: apply_rotary_pos_emb(q, k, cos, sin, 2), TypeError,
         "position_ids must be None or an int64 tensor.*pass unsqueeze_dim=... by keyword"),
        (lambda: apply_rotary_pos_emb(q, k, cos[:, :4], sin[:, :4]), ValueError,
         r"cos and sin must have shape \(B, T, D\) = \(2, 5, 8\)"),
        (lambda: apply_rotary_pos_emb(q, k, cos[:1].expand(3, 5, 8), sin[:1].expand(3, 5, 8)), ValueError,
         r"cos and sin must have shape \(B, T, D\)"),
        (lambda: apply_rotary_pos_emb(q, k, cos, sin[:, :, :4]), ValueError, "sin must have cos's shape"),
        (lambda: apply_rotary_pos_emb(q, k, cos.long(), sin), TypeError, "cos must be a floating tensor"),
        (lambda: apply_rotary_pos_emb(q, k, [1.0], sin), TypeError, "cos must be a torch.Tensor"),
        (lambda: apply_rotary_pos_emb(q, k, cos, sin, pos), ValueError,
         r"with position_ids, cos and sin are tables of shape \(L, D\)"),
        (lambda: apply_rotary_pos_emb(q, k, tab, tab, pos.float()), TypeError, "position_ids must be int64"),
        (lambda: apply_rotary_pos_emb(q, k, tab, tab, pos[:4]), ValueError,
         r"position_ids must have shape \(B, T\) = \(2, 5\)"),
        (lambda: apply_rotary_pos_emb(q, k, tab, tab, pos + 5), ValueError, r"position_ids must lie in \[0, L = 9\)"),
        (lambda: rotary_embedding(q, cos, sin, unsqueeze_dim=3), ValueError, "unsqueeze_dim must be 1"),
        (lambda: rotary_embedding(q[0], cos, sin), ValueError, r"x must have shape \(B, H, T, D\)"),
        (lambda: apply_rotary_pos_emb(q, k, cos, sin, backend="cuda"), ValueError,
         "backend='cuda' is not available for this op"),
        (lambda: apply_rotary_pos_emb(q.double(), k.double(), cos, sin, backend="triton"), TypeError,
         "q must be float16, bfloat16 or float32 for the kernel backends"),
        (lambda: apply_rotary_pos_emb(q, k, cos.double(), sin.double(), backend="triton"), TypeError,
         "cos must be float16, bfloat16 or float32 for the kernel backends"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_cases())))
def test_bad_arguments_raise_errors_naming_them(index):
    call, exc, match = _bad_cases()[index]
    with pytest.raises(exc, match=match):
        call()


def test_the_fp64_torch_path_and_reference_entries():
    """backend='torch' takes fp64 (the yardstick); the references validate like the entries."""
    g = _gen(12)
    q, k = torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64), torch.randn(1, 1, 3, 4, generator=g,
                                                                                  dtype=torch.float64)
    cos, sin = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g,
                                                                               dtype=torch.float64)
    got = apply_rotary_pos_emb(q, k, cos, sin, backend="torch")
    want = rot.apply_rotary_pos_emb_reference(q, k, cos, sin)
    assert all(torch.equal(a, b) and a.dtype == torch.float64 for a, b in zip(got, want))
    with pytest.raises(ValueError, match="unsqueeze_dim must be 1"):
        rot.apply_rotary_pos_emb_reference(q, k, cos, sin, unsqueeze_dim=0)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        rot.rotary_embedding_reference(None, cos, sin)


# --------------------------------------------------------------------------------------------
# Compile gate: what an H100 runs, compiled for sm_90 (and sm_80), machine code checked
# --------------------------------------------------------------------------------------------

# Measured (triton 3.9, sm_90): 64-79 registers, no shared memory, no spills (the per-step tile is
# 8 values per thread per half: x1, x2 and two results, plus four table vectors). 128 keeps >= 16
# warps per SM resident for these 2-4 warp programs (loads in flight for a memory-bound kernel)
# and flags a regression.
MAX_REGISTERS = 128
SM80_CONFIGS = [0]  # fwd bf16 Hq=32 Hk=8 D=128
gate_facts = gate_facts_fixture("nanofast.kernels.rotary", sm80=SM80_CONFIGS)


def test_kernel_configs_cover_hf_models_and_match_the_launcher():
    labels = " | ".join(c["config"] for c in KERNEL_CONFIGS)
    for kind in ("fwd", "bwd"):
        for dt in ("bf16", "fp16"):
            assert f"{kind} {dt} Hq=32 Hk=8 D=128 warps" in labels
    assert "D=64" in labels and "tables=fp32" in labels and "position_ids" in labels
    assert all(c["fn"] is rot._rotary_kernel for c in KERNEL_CONFIGS)
    for c in KERNEL_CONFIGS:
        # Every kernel argument is described, in order; the meta-parameters are the launcher's.
        assert list(c["signature"]) == list(c["fn"].arg_names), c["config"]
        assert set(c["aligned"]) <= set(c["signature"]) and all(c["signature"][a] != "constexpr" for a in c["aligned"])
        words = dict(w.split("=") for w in c["config"].split() if "=" in w)
        meta = rot._launch_meta(int(words["Hq"]), int(words["Hk"]), int(words["D"]))
        assert c["num_warps"] == meta["num_warps"], c["config"]
        assert all(c["constexprs"][n] == meta[n] for n in ("BLOCK_HQ", "BLOCK_HK", "BLOCK_HALF"))
        assert c["constexprs"]["INVERSE"] == c["config"].startswith("bwd")
    assert KERNEL_CONFIGS[SM80_CONFIGS[0]]["config"].startswith("fwd bf16 Hq=32 Hk=8 D=128")


def _check_facts(cfg: dict, f: dict, arch: int) -> None:
    where = check_common_facts(cfg, f, arch, MAX_REGISTERS)
    # 128-bit loads and stores of the head rows: 8 contiguous 16-bit values per thread and half,
    # 16-byte aligned (D and every stride multiples of 16 elements, as Triton specialises HF's shapes).
    assert f["instructions"].get("LDG.E.128", 0) > 0, where
    assert f["instructions"].get("STG.E.128", 0) > 0, where
    assert "HGMMA" not in f["instructions"] and "HMMA" not in f["instructions"], where
    assert f["stores"] > 0 and f["atomics"] == 0, where


test_compile_gate_sm90, test_compile_gate_sm80 = gate_tests(KERNEL_CONFIGS, SM80_CONFIGS, _check_facts)
