"""csrc/qk_norm_rope.cu: the CUDA QK-norm + rotary embedding (forward, backward with the weights'
column sums, and in place on a packed qkv projection at given positions), executed on the CPU through
the emulation (csrc/cuda_emu.h) against fp64 references written here and against
nanofast.kernels.qk_norm_rope(..., backend="cuda"), on awkward shapes and layouts (packed, transposed,
misaligned heads), fp32/fp16/bf16, half-split and interleaved pairs, with NaN guard bands around
outputs, NaN row padding, determinism and no-mutation checks. Its nvcc facts, argument errors and
empty-input launches are in tests/test_cuda_kernels.py with the other sources'.

Error budget: max|kernel - ref_fp64| <= 2 * max|torch_lowprec - ref_fp64| + atol(dtype) * max|ref|,
where torch_lowprec is the same maths done by torch in fp32 and rounded to the input dtype once
(tests/cuda_emu_helpers.py).
"""
from __future__ import annotations

import pytest
import torch

from nanofast.kernels import qk_norm_rope_cuda as qk_cuda

from cuda_emu_helpers import (DT_ID, DTYPES, _assert_budget, _assert_guards, _bits, _case_id, _guarded, _module,
                              _weight, emu)  # noqa: F401 (emu: the fixture)


# ------------------------------------------------------------------------------------------------ QK-norm + rope

def qk_ref(x, cos, sin, w, scale, eps, interleaved, prec=torch.float64):
    """Per head: normalise (stats in `prec`), weight, rotate, scale; x (B, T, H, D)."""
    T, D = x.shape[1], x.shape[3]
    xp = x.to(prec)
    n = xp * torch.rsqrt(xp.pow(2).mean(-1, keepdim=True) + eps)
    if w is not None:
        n = n * w.to(prec)
    c = cos[:T].to(prec)[None, :, None, :]
    s = sin[:T].to(prec)[None, :, None, :]
    if interleaved:
        a, b = n[..., 0::2], n[..., 1::2]
        out = torch.stack([a * c + b * s, b * c - a * s], -1).flatten(-2)
    else:
        a, b = n[..., :D // 2], n[..., D // 2:]
        out = torch.cat([a * c + b * s, b * c - a * s], -1)
    return out * scale


def _heads(B, T, H, D, dtype, layout, gen):
    """(B, T, H, D) q and k operands in a given memory layout; returns (q, k, buffers)."""
    Hq, Hk = H
    if layout == "packed":  # views into one (B, T, Hq + 2*Hk, D) qkv projection output
        buf = torch.randn(B, T, Hq + 2 * Hk, D, generator=gen).to(dtype)
        return buf[:, :, :Hq], buf[:, :, Hq:Hq + Hk], [buf]
    if layout == "transposed":  # (B, H, T, D) storage seen as (B, T, H, D)
        qb = torch.randn(B, Hq, T, D, generator=gen).to(dtype)
        kb = torch.randn(B, Hk, T, D, generator=gen).to(dtype)
        return qb.transpose(1, 2), kb.transpose(1, 2), [qb, kb]
    pad = {"contig": 0, "odd": 3}[layout]  # odd: head stride D + 3 breaks every alignment
    qb = torch.full((B, T, Hq, D + pad), float("nan"), dtype=dtype)
    kb = torch.full((B, T, Hk, D + pad), float("nan"), dtype=dtype)
    q, k = qb[..., :D], kb[..., :D]
    q.copy_(torch.randn(B, T, Hq, D, generator=gen))
    k.copy_(torch.randn(B, T, Hk, D, generator=gen))
    return q, k, [qb, kb]


def _rope_tables(T, D, dtype, gen):
    ang = torch.randn(T + 3, D // 2, generator=gen) * 3
    return ang.cos().to(dtype), ang.sin().to(dtype)


# (B, T, Hq, Hk, D, layout). D > 256 takes the streaming path; the emulation's 3 backward blocks hold
# 12 warps, so cases with more (token, head) items make warps accumulate several heads' dw.
QK_CASES = [(1, 1, 1, 1, 2, "contig"), (2, 3, 3, 1, 6, "odd"), (1, 4, 2, 2, 64, "packed"),
            (2, 2, 5, 3, 80, "transposed"), (2, 4, 3, 1, 272, "contig"), (1, 3, 1, 2, 130, "odd"),
            (1, 6, 2, 2, 258, "odd"), (1, 2, 3, 1, 264, "packed")]
QK_VARIANTS = [(None, torch.float32), ("fp32", torch.bfloat16), ("same", torch.float32)]  # (weights, cos/sin dtype)


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "inter"])
@pytest.mark.parametrize("variant", QK_VARIANTS, ids=lambda v: f"w{v[0]}-cs{DT_ID[v[1]]}")
@pytest.mark.parametrize("case", QK_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_qk_norm_rope_forward_backward(emu, dtype, case, variant, interleaved):
    B, T, Hq, Hk, D, layout = case
    wkind, cs_dtype = variant
    gen = torch.Generator().manual_seed(B * 100 + T * 10 + D)
    q, k, bufs = _heads(B, T, (Hq, Hk), D, dtype, layout, gen)
    cos, sin = _rope_tables(T, D, cs_dtype, gen)
    qw, kw = _weight(wkind, D, dtype, gen), _weight(wkind, D, dtype, gen)
    scale, eps = 0.37, 1e-6
    inputs = [*bufs, cos, sin, *(w for w in (qw, kw) if w is not None)]
    before = [_bits(t) for t in inputs]

    q_out, k_out, q_rstd, k_rstd = qk_cuda.qk_norm_rope_fwd_cuda(q, k, cos, sin, qw, kw, scale, eps, interleaved)
    for out, x, w, r, name in ((q_out, q, qw, q_rstd, "q"), (k_out, k, kw, k_rstd, "k")):
        assert out.dtype == dtype and out.is_contiguous() and out.shape == x.shape
        ref64 = qk_ref(x, cos, sin, w, scale, eps, interleaved)
        lowp = qk_ref(x, cos, sin, w, scale, eps, interleaved, torch.float32).to(dtype)
        _assert_budget(out, ref64, lowp, dtype, f"{name}_out")
        assert r.dtype == torch.float32 and r.shape == x.shape[:3]
        _assert_budget(r, torch.rsqrt(x.double().pow(2).mean(-1) + eps),
                       torch.rsqrt(x.float().pow(2).mean(-1) + eps), torch.float32, f"{name}_rstd")

    # backward through fp64 / fp32 autograd of the same reference
    gq = torch.randn(B, T, Hq, D, generator=gen).to(dtype).transpose(1, 2).contiguous().transpose(1, 2)
    gk = torch.randn(B, T, Hk, D, generator=gen).to(dtype)
    before += [_bits(t) for t in (gq, gk, q_rstd, k_rstd)]
    dq, dk, dqw, dkw = qk_cuda.qk_norm_rope_bwd_cuda(gq, gk, q, k, cos, sin, qw, kw, q_rstd, k_rstd, scale, interleaved)
    grads = {}
    for prec in (torch.float64, torch.float32):
        xs = [t.detach().to(prec).requires_grad_() for t in (q, k)]
        ws = [w.detach().to(prec).requires_grad_() if w is not None else None for w in (qw, kw)]
        loss = sum((qk_ref(x, cos, sin, w, scale, eps, interleaved, prec) * g.to(prec)).sum()
                   for x, w, g in zip(xs, ws, (gq, gk)))
        loss.backward()
        grads[prec] = [xs[0].grad, xs[1].grad, *(w.grad if w is not None else None for w in ws)]
    for i, (got, name) in enumerate(((dq, "dq"), (dk, "dk"), (dqw, "dq_weight"), (dkw, "dk_weight"))):
        ref64, ref32 = grads[torch.float64][i], grads[torch.float32][i]
        if ref64 is None:
            assert got is None, name
            continue
        odt = dtype if i < 2 else (qw if i == 2 else kw).dtype
        assert got.dtype == odt and got.is_contiguous()
        _assert_budget(got, ref64, ref32.to(odt), odt, name)
    if qw is not None:
        again = qk_cuda.qk_norm_rope_bwd_cuda(gq, gk, q, k, cos, sin, qw, kw, q_rstd, k_rstd, scale, interleaved)
        for a, b in zip(again, (dq, dk, dqw, dkw)):
            assert torch.equal(_bits(a), _bits(b)), "backward must be bit-reproducible"
    after = [_bits(t) for t in [*inputs, gq, gk, q_rstd, k_rstd]]
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "an input was modified"


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("D,pad,interleaved", [(64, 8, False), (64, 8, True), (6, 3, True), (300, 4, False)])
def test_qk_norm_rope_writes_only_its_outputs(emu, dtype, D, pad, interleaved):
    B, T, Hq, Hk = 2, 3, 3, 2
    gen = torch.Generator().manual_seed(D + pad)
    q = torch.randn(B, T, Hq, D, generator=gen).to(dtype)
    k = torch.randn(B, T, Hk, D, generator=gen).to(dtype)
    cos, sin = _rope_tables(T, D, torch.float32, gen)
    qw, kw = torch.randn(D, generator=gen), torch.randn(D, generator=gen).to(dtype)
    qo, qobuf, qomask = _guarded(q.shape, dtype, pad)
    ko, kobuf, komask = _guarded(k.shape, dtype, pad)
    # rstd outputs are contiguous (B, T, H): guard them as slices of a longer NaN vector
    qrflat = torch.full((B * T * Hq + 8,), float("nan"))
    krflat = torch.full((B * T * Hk + 8,), float("nan"))
    qr = qrflat[4:4 + B * T * Hq].view(B, T, Hq)
    kr = krflat[4:4 + B * T * Hk].view(B, T, Hk)
    qk_cuda.fwd_into(q, k, cos, sin, qw, kw, 0.5, 1e-6, interleaved, qo, ko, qr, kr)
    _assert_guards(qobuf, qomask, "q_out")
    _assert_guards(kobuf, komask, "k_out")
    for flat, name in ((qrflat, "q_rstd"), (krflat, "k_rstd")):
        assert torch.isnan(flat[:4]).all() and torch.isnan(flat[-4:]).all() and torch.isfinite(flat[4:-4]).all(), name
    ref = qk_cuda.qk_norm_rope_fwd_cuda(q, k, cos, sin, qw, kw, 0.5, 1e-6, interleaved)
    assert torch.equal(_bits(qo), _bits(ref[0])) and torch.equal(_bits(ko), _bits(ref[1]))

    gq, gk = torch.randn_like(q), torch.randn_like(k)
    dq, dqbuf, dqmask = _guarded(q.shape, dtype, pad)
    dk, dkbuf, dkmask = _guarded(k.shape, dtype, pad)
    dqw, dqwbuf, dqwmask = _guarded((D,), qw.dtype, 0)
    dkw, dkwbuf, dkwmask = _guarded((D,), kw.dtype, 0)
    qk_cuda.bwd_into(gq, gk, q, k, cos, sin, qw, kw, ref[2], ref[3], 0.5, interleaved, dq, dk, dqw, dkw)
    for buf, mask, name in ((dqbuf, dqmask, "dq"), (dkbuf, dkmask, "dk"), (dqwbuf, dqwmask, "dq_weight"),
                            (dkwbuf, dkwmask, "dk_weight")):
        _assert_guards(buf, mask, name)
    bref = qk_cuda.qk_norm_rope_bwd_cuda(gq, gk, q, k, cos, sin, qw, kw, ref[2], ref[3], 0.5, interleaved)
    for got, exp in zip((dq, dk, dqw, dkw), bref):
        assert torch.equal(_bits(got), _bits(exp))


INPLACE_CASES = [(1, 1, 1, 2), (7, 3, 1, 6), (5, 4, 2, 64), (6, 2, 3, 80), (3, 2, 1, 320)]  # N, Hq, Hkv, D


@pytest.mark.parametrize("weights", [False, True], ids=["now", "w"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "inter"])
@pytest.mark.parametrize("case", INPLACE_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_qk_norm_rope_inplace(emu, dtype, case, interleaved, weights):
    N, Hq, Hkv, D = case
    gen = torch.Generator().manual_seed(N * 10 + D)
    W = (Hq + 2 * Hkv) * D
    pad = 4 if D % 8 == 0 else 3
    buf = torch.full((N, W + pad), float("nan"), dtype=dtype)  # NaN row padding must stay untouched
    qkv = buf[:, :W]
    qkv.copy_(torch.randn(N, W, generator=gen))
    max_pos = 11
    positions = torch.randint(0, max_pos, (N,), generator=gen)
    positions[0] = max_pos - 1
    if N > 2:
        positions[2] = positions[1]  # repeats are fine
    ang = torch.randn(max_pos, D // 2, generator=gen) * 3
    cache = torch.cat([ang.cos(), ang.sin()], dim=1)
    qw = (1 + 0.3 * torch.randn(D, generator=gen)).to(dtype) if weights else None
    kw = (1 + 0.3 * torch.randn(D, generator=gen)) if weights else None
    orig = qkv.clone()
    before_cache, before_pos = _bits(cache), positions.clone()
    qk_cuda.qk_norm_rope_inplace_cuda(qkv, positions, cache, Hq, Hkv, qw, kw, 0.8, 1e-6, interleaved)
    assert torch.isnan(buf[:, W:].float()).all(), "row padding was written"
    assert torch.equal(_bits(qkv[:, (Hq + Hkv) * D:]), _bits(orig[:, (Hq + Hkv) * D:])), "v heads were modified"
    cos, sin = cache[positions, :D // 2], cache[positions, D // 2:]  # token n's own row
    for lo, H, w, name in ((0, Hq, qw, "q"), (Hq * D, Hkv, kw, "k")):
        x = orig[:, lo:lo + H * D].view(1, N, H, D)
        got = qkv[:, lo:lo + H * D].view(1, N, H, D)
        ref64 = qk_ref(x, cos, sin, w, 0.8, 1e-6, interleaved)
        lowp = qk_ref(x, cos, sin, w, 0.8, 1e-6, interleaved, torch.float32).to(dtype)
        _assert_budget(got, ref64, lowp, dtype, f"in-place {name}")
    assert torch.equal(_bits(cache), before_cache) and torch.equal(positions, before_pos)
    # the same as the out-of-place launcher at those positions
    out = qk_cuda.qk_norm_rope_fwd_cuda(orig[:, :Hq * D].view(1, N, Hq, D), orig[:, Hq * D:(Hq + Hkv) * D].view(1, N, Hkv, D),
                                   cos.contiguous(), sin.contiguous(), qw, kw, 0.8, 1e-6, interleaved)
    assert torch.equal(_bits(qkv[:, :Hq * D]), _bits(out[0].view(N, -1)))


def test_qk_norm_rope_inplace_int32_positions(emu):
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(4, 4 * 8, generator=gen)
    cache = torch.randn(6, 8, generator=gen)
    pos = torch.tensor([5, 0, 2, 2])
    a, b = qkv.clone(), qkv.clone()
    qk_cuda.qk_norm_rope_inplace_cuda(a, pos, cache, 2, 1, None, None, 1.0, 1e-6, False)
    qk_cuda.qk_norm_rope_inplace_cuda(b, pos.int(), cache, 2, 1, None, None, 1.0, 1e-6, False)
    assert torch.equal(a, b) and not torch.equal(a, qkv)


# ------------------------------------------------------------------------------------------------ vs the Triton engineers' modules

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "inter"])
@pytest.mark.parametrize("weights", [False, True], ids=["now", "w"])
def test_qk_norm_rope_public_api_cuda_backend(emu, dtype, interleaved, weights):
    m = _module("qk_norm_rope")
    gen = torch.Generator().manual_seed(11)
    B, T, Hq, Hk, D = 2, 3, 3, 1, 80
    q = torch.randn(B, T, Hq, D, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(B, T, Hk, D, generator=gen).to(dtype).requires_grad_()
    ang = torch.randn(T + 1, D // 2, generator=gen)
    cos, sin = ang.cos(), ang.sin()
    qw = (1 + 0.3 * torch.randn(D, generator=gen)).to(dtype).requires_grad_() if weights else None
    kw = (1 + 0.3 * torch.randn(D, generator=gen)).to(dtype).requires_grad_() if weights else None
    eps, scale = 1e-6, 0.6
    q_out, k_out = m.qk_norm_rope(q, k, cos, sin, qw, kw, scale, eps, interleaved, backend="cuda")
    d64 = [t.detach().double() if t is not None else None for t in (q, k, qw, kw)]
    r64 = m.qk_norm_rope_reference(d64[0], d64[1], cos.double(), sin.double(), d64[2], d64[3], scale, eps, interleaved)
    with torch.no_grad():
        lowp = m.qk_norm_rope_reference(q, k, cos, sin, qw, kw, scale, eps, interleaved)
    _assert_budget(q_out, r64[0], lowp[0], dtype, "qk_norm_rope(backend='cuda') q")
    _assert_budget(k_out, r64[1], lowp[1], dtype, "qk_norm_rope(backend='cuda') k")
    # Also against the fp64 reference written in this file. Without weights that module rotates
    # before normalising; the orders agree only up to cos^2 + sin^2 - 1 of the fp32 tables (~1e-8).
    torch.testing.assert_close(r64[0], qk_ref(q.detach(), cos, sin, qw.detach() if weights else None, scale, eps,
                                              interleaved), rtol=1e-6, atol=1e-6)
    gq, gk = torch.randn_like(q_out), torch.randn_like(k_out)
    torch.autograd.backward([q_out, k_out], [gq, gk])
    leaves = [t for t in (q, k, qw, kw) if t is not None]
    refs = {}
    for prec in (torch.float64, None):
        xs = [(t.detach().to(prec) if prec else t.detach()).requires_grad_() for t in leaves]
        ws = xs[2:] if weights else [None, None]
        c, s = (cos.double(), sin.double()) if prec else (cos, sin)
        out = m.qk_norm_rope_reference(xs[0], xs[1], c, s, ws[0], ws[1], scale, eps, interleaved)
        g = [t.to(prec) if prec else t for t in (gq, gk)]
        torch.autograd.backward(list(out), g)
        refs[prec] = [t.grad for t in xs]
    for t, r64g, rl in zip(leaves, refs[torch.float64], refs[None]):
        _assert_budget(t.grad, r64g, rl, t.dtype, "qk_norm_rope(backend='cuda') grad")

    # in place through the public API
    N, Hkv = 5, 1
    qkv = torch.randn(N, (Hq + 2 * Hkv) * D, generator=gen).to(dtype)
    positions = torch.tensor([3, 0, 7, 7, 1])
    ang = torch.randn(8, D // 2, generator=gen) * 3  # one angle per pair: cos/sin form a rotation
    cache = torch.cat([ang.cos(), ang.sin()], 1)
    wq = qw.detach() if weights else None
    wk = kw.detach() if weights else None
    a, b, c64 = qkv.clone(), qkv.clone(), qkv.double()
    m.qk_norm_rope_inplace(a, positions, cache, Hq, Hkv, wq, wk, scale, eps, interleaved, backend="cuda")
    m.qk_norm_rope_inplace_reference(b, positions, cache, Hq, Hkv, wq, wk, scale, eps, interleaved)
    m.qk_norm_rope_inplace_reference(c64, positions, cache.double(), Hq, Hkv, None if wq is None else wq.double(),
                                     None if wk is None else wk.double(), scale, eps, interleaved)
    _assert_budget(a, c64, b, dtype, "qk_norm_rope_inplace(backend='cuda')")
