"""Tests for nanofast.kernels.linear_cross_entropy: the fused, chunked LM-head loss, in Hugging
Face's / PyTorch's conventions (`linear_cross_entropy`: ignore_index, bias, softcap, label
smoothing, z-loss) and nanofast's own (`linear_softcap_cross_entropy`: ignore -1, explicit softcap).

Both backends are run: "torch" (the per-chunk step in torch ops) and "triton" (the per-row kernel
through Triton's interpreter: tests/conftest.py sets TRITON_INTERPRET=1; shapes kept small, the
interpreter costs ~1 ms per program). Loss and gradients are compared with an fp64 evaluation of the
maths written out here (not through F.cross_entropy) on the same rounded inputs, under
FlashAttention-style budgets (tests/error_budget.py):
|fused - ref64| <= FACTOR * |unfused torch in the input dtype - ref64| + ATOL * max(1, max|ref64|).
The references themselves are checked to be exactly F.cross_entropy (and nanofast's model head).
The Triton kernel is also compiled for sm_90 and its machine code checked (compile gate).
"""
from __future__ import annotations

import functools
import importlib

import pytest
import torch
import torch.nn.functional as F

from nanofast import ops
from nanofast.kernels.linear_cross_entropy import (LinearCrossEntropyLoss, LinearSoftcapCrossEntropy,
                                                   linear_cross_entropy, linear_cross_entropy_reference,
                                                   linear_softcap_cross_entropy,
                                                   linear_softcap_cross_entropy_reference)
from compile_gate_helpers import check_common_facts, gate_facts_fixture, gate_tests
from error_budget import check_budget

lce = importlib.import_module("nanofast.kernels.linear_cross_entropy")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_ID = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
BACKENDS = ["torch", "triton"]
REDUCTIONS = ["mean", "sum", "none"]

# (FACTOR, ATOL) per quantity and dtype. The fused path rounds where the unfused one does (logits
# in the input dtype, fp32 softcap/softmax, dlogits rounded to the input dtype before the two
# gradient GEMMs, dW and db in fp32 then cast to their parameter's dtype), so FACTOR = 2 (2x
# torch's own error against fp64) plus an ATOL (times max(1, max|ref64|)) for what differs by
# construction:
# - loss: fp32 sums in another order (online max/sum-exp over BLOCK_V blocks, logsumexp per chunk,
#   the smoothing term's row sum) and, in the kernel, tanh built from exp: measured worst need
#   5.9e-8 (fp32), 0 for fp16/bf16 (their logits' rounding dominates both paths alike); ATOL 1e-6.
# - grads (dx, dW, db): the GEMMs run per chunk (dW, db summed over chunks in fp32), and
#   "mean"/"sum" gradients are computed in the forward for a unit upstream gradient, rounded to
#   x's dtype, then multiplied by the real one in fp32 and rounded once more: up to half an ulp
#   more than the unfused path's single rounding. fp32: measured worst need 1.8e-7 -> 5e-7. fp16:
#   2.0e-4 (the (3, 4) x 97 case, a dx near 1.8) under half an fp16 ulp at [1, 2), 2^-11 ->
#   ATOL 2^-11. bf16: 0 with the torch step, 3.1e-3 with the Triton kernel under the interpreter,
#   whose fp32 -> bf16 stores truncate (the GPU rounds to nearest), so a bf16 dlogit may sit one
#   bf16 ulp (2^-8 relative) below torch's -> ATOL 2^-8.
BUDGET = {
    "loss": {torch.float32: (2.0, 1e-6), torch.float16: (2.0, 1e-6), torch.bfloat16: (2.0, 1e-6)},
    "grad": {torch.float32: (2.0, 5e-7), torch.float16: (2.0, 2.0 ** -11), torch.bfloat16: (2.0, 2.0 ** -8)},
}
_check_budget = functools.partial(check_budget, BUDGET)

# (leading shape, C, V, chunk_rows): N = 1, V = 1, odd V (97, 257) and C, (B, T, C) leading dims,
# chunks smaller than N and not dividing it, the default chunking.
SHAPES = [((1,), 5, 7, None), ((13,), 9, 1, 4), ((2, 7), 24, 257, 3), ((3, 4), 7, 97, 5), ((37,), 48, 300, 16),
          ((40,), 33, 64, None)]
SHAPE_ID = {s: f"{'x'.join(map(str, s[0]))}-C{s[1]}-V{s[2]}-r{s[3]}" for s in SHAPES}
# The options each shape runs `linear_cross_entropy` with: every option on several shapes, both
# signs of ignore_index, and the plain F.cross_entropy call (no option) on its own.
SHAPE_OPTIONS = [
    dict(bias=True, label_smoothing=0.1, z_loss=1e-3),
    dict(ignore_index=-100, softcap=30.0, bias=True),          # V = 1: lse = the one logit
    dict(ignore_index=-100, label_smoothing=0.05, softcap=15.0),
    dict(ignore_index=3, bias=True, z_loss=1e-2),               # ignore_index a valid class
    dict(softcap=15.0, label_smoothing=0.2, z_loss=1e-4, bias=True),
    dict(),
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(lead, C, V, dtype, seed, ignore_frac=0.2, w_dtype=None, ignore_index=-1, bias=False):
    g = _gen(seed)
    x = torch.randn(*lead, C, generator=g).to(dtype)
    # Logits of O(5): the softcap (15) bends them visibly, the softmax is neither flat nor one-hot.
    w = (torch.randn(V, C, generator=g) * (5.0 / C ** 0.5)).to(w_dtype or dtype)
    t = torch.randint(0, V, lead, generator=g)
    t[torch.rand(lead, generator=g) < ignore_frac] = ignore_index
    b = torch.randn(V, generator=g).to(w_dtype or dtype) if bias else None
    return x, w, t, b


def _upstream(reduction, lead, seed):
    g = _gen(seed + 1000)
    return torch.randn(lead, generator=g) if reduction == "none" else torch.tensor(0.7)


def _run(fn, x, w, t, gout, b=None, **kw):
    """(loss, dx, dW, db) of fn(x, w, t[, b], **kw) under the upstream gradient gout."""
    xs, ws = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    bs = None if b is None else b.detach().clone().requires_grad_()
    loss = fn(xs, ws, t, **kw) if b is None else fn(xs, ws, t, bs, **kw)
    loss.backward(gout)
    return loss.detach(), xs.grad, ws.grad, (None if bs is None else bs.grad)


def _oracle(x, w, t, b, gout, ignore_index=-100, softcap=None, label_smoothing=0.0, z_loss=0.0,
            reduction="mean"):
    """(loss, dx, dW, db) in fp64 from the maths as written (on the inputs rounded to x's dtype,
    as the GEMM sees them): -(1 - eps) log p_y - eps mean_v log p_v + zl lse^2 per kept row."""
    xd = x.double().requires_grad_()
    wd = w.to(x.dtype).double().requires_grad_()
    bd = None if b is None else b.to(x.dtype).double().requires_grad_()
    z = xd @ wd.T + (0.0 if bd is None else bd)
    c = softcap * torch.tanh(z / softcap) if softcap else z
    c = c.reshape(-1, c.shape[-1])
    tf = t.reshape(-1)
    keep = tf != ignore_index
    logp = c.log_softmax(-1)
    row = (-(1.0 - label_smoothing) * logp.gather(1, torch.where(keep, tf, 0)[:, None])[:, 0]
           - label_smoothing * logp.mean(-1) + z_loss * torch.logsumexp(c, -1) ** 2)
    row = torch.where(keep, row, 0.0)
    loss = {"mean": lambda: row.sum() / keep.sum(), "sum": row.sum, "none": lambda: row.view(t.shape)}[reduction]()
    loss.backward(gout.double())
    return loss.detach(), xd.grad, wd.grad, (None if bd is None else bd.grad)


def _check_all(fn, ref, x, w, t, b, gout, opts, reduction, where, ignore_default, **kw):
    """fn (fused) against ref (unfused torch in x's dtype) and the fp64 oracle, loss and every
    gradient, under the budget; returns the fused results."""
    dtype = x.dtype
    got = _run(fn, x, w, t, gout, b, reduction=reduction, **opts, **kw)
    lp = _run(ref, x, w, t, gout, b, reduction=reduction, **opts)
    r64 = _oracle(x, w, t, b, gout, reduction=reduction, **({"ignore_index": ignore_default} | opts))
    assert got[0].dtype == torch.float32
    assert got[0].shape == (t.shape if reduction == "none" else ())
    assert got[1].dtype == x.dtype and got[2].dtype == w.dtype
    _check_budget("loss", dtype, f"loss {where}", got[0], lp[0], r64[0])
    _check_budget("grad", dtype, f"dx {where}", got[1], lp[1], r64[1])
    # dW, db in their parameter's dtype (the unfused path's too); the budget is the compute dtype's.
    assert (got[3] is None) == (b is None)
    for name, i in (("dw", 2), ("db", 3)):
        if got[i] is not None:
            assert got[i].dtype == (w if i == 2 else b).dtype, f"{name} {where}"
            _check_budget("grad", dtype, f"{name} {where}", got[i], lp[i], r64[i])
    return got


def _check_hf(x, w, t, b, gout, opts, reduction, backend, chunk_rows, where=""):
    return _check_all(linear_cross_entropy, linear_cross_entropy_reference, x, w, t, b, gout, opts, reduction, where,
                      -100, backend=backend, chunk_rows=chunk_rows)


def _check_softcap(x, w, t, gout, softcap, reduction, backend, chunk_rows, where=""):
    return _check_all(linear_softcap_cross_entropy, linear_softcap_cross_entropy_reference, x, w, t, None, gout,
                      {"softcap": softcap}, reduction, where, -1, backend=backend, chunk_rows=chunk_rows)


# ------------------------------------------------------------------------------------------------
# References
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_is_the_models_head(reduction):
    """linear_softcap_cross_entropy_reference is exactly nanofast's model head: ops.linear, then
    ops.softcap_cross_entropy."""
    x, w, t, _ = _inputs((2, 5), 16, 33, torch.bfloat16, 0, w_dtype=torch.float32)
    want = ops.softcap_cross_entropy(ops.linear(x, w), t, 15.0, reduction=reduction)
    got = linear_softcap_cross_entropy_reference(x, w, t, 15.0, reduction)
    assert torch.equal(got, want)
    # No cap (None or 0) is plain F.cross_entropy of the fp32 logits.
    want = F.cross_entropy(F.linear(x, w.to(x.dtype)).float().flatten(0, 1), t.flatten(), ignore_index=-1,
                           reduction=reduction)
    for cap in (None, 0.0):
        got = linear_softcap_cross_entropy_reference(x, w, t, cap, reduction)
        assert torch.equal(got, want.view(t.shape) if reduction == "none" else want)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_is_f_cross_entropy(reduction):
    """linear_cross_entropy_reference is F.cross_entropy of F.linear's fp32 logits (bit for bit),
    the z-loss added on top, and the fp64 oracle of these tests writes the same maths (PyTorch's
    label smoothing included)."""
    x, w, t, b = _inputs((3, 6), 12, 41, torch.float32, 1, ignore_index=-100, bias=True)
    logits = F.linear(x, w, b).float().flatten(0, 1)
    for ls in (0.0, 0.3, 1.0):
        want = F.cross_entropy(logits, t.flatten(), ignore_index=-100, label_smoothing=ls, reduction=reduction)
        got = linear_cross_entropy_reference(x, w, t, b, label_smoothing=ls, reduction=reduction)
        assert torch.equal(got, want.view(t.shape) if reduction == "none" else want)
        oracle = _oracle(x, w, t, b, _upstream(reduction, (3, 6), 1), label_smoothing=ls, reduction=reduction)[0]
        torch.testing.assert_close(got.double(), oracle, rtol=1e-6, atol=1e-6)
    keep = t.flatten() != -100
    z = torch.where(keep, torch.logsumexp(logits, -1) ** 2, 0.0) * 0.01
    ce = F.cross_entropy(logits, t.flatten(), ignore_index=-100, reduction=reduction)
    want = {"mean": ce + z.sum() / keep.sum(), "sum": ce + z.sum(), "none": (ce + z).view(t.shape)}[reduction]
    torch.testing.assert_close(linear_cross_entropy_reference(x, w, t, b, z_loss=0.01, reduction=reduction), want,
                               rtol=1e-6, atol=0)
    oracle = _oracle(x, w, t, b, _upstream(reduction, (3, 6), 1), z_loss=0.01, reduction=reduction)[0]
    torch.testing.assert_close(want.double(), oracle, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_called_like_f_cross_entropy_has_no_hidden_softcap(backend):
    """The HF entry called with F.cross_entropy's arguments alone computes F.cross_entropy: large
    logits (a cap of 15 would bend them: the old silent default gave 17.08 for 53.16) stay uncapped."""
    g = _gen(2)
    x, w = torch.randn(6, 16, generator=g), torch.randn(40, 16, generator=g) * 12
    t = torch.randint(0, 40, (6,), generator=g)
    t[1] = -100
    want = F.cross_entropy(F.linear(x, w), t)
    assert want > 20
    torch.testing.assert_close(linear_cross_entropy(x, w, t, backend=backend), want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(LinearCrossEntropyLoss(backend=backend)(x, w, t), want, rtol=1e-6, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Fused vs reference, both backends
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_ID.get)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, shape, dtype, reduction):
    """`linear_cross_entropy` on awkward shapes, each with its own options (SHAPE_OPTIONS)."""
    lead, C, V, chunk_rows = shape
    i = SHAPES.index(shape)
    opts = dict(SHAPE_OPTIONS[i])
    bias = opts.pop("bias", False)
    seed = i * 10 + DTYPES.index(dtype)
    x, w, t, b = _inputs(lead, C, V, dtype, seed, ignore_index=opts.get("ignore_index", -100), bias=bias)
    _check_hf(x, w, t, b, _upstream(reduction, lead, seed), opts, reduction, backend, chunk_rows, SHAPE_ID[shape])


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("shape", SHAPES[2:4], ids=SHAPE_ID.get)
@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_entry_matches_reference(backend, shape, dtype, reduction):
    """nanofast's entry (ignore -1, softcap 15) on the same machinery (its gradient-in-forward and
    recompute paths; test_matches_reference covers the shapes)."""
    lead, C, V, chunk_rows = shape
    seed = SHAPES.index(shape) * 10 + DTYPES.index(dtype) + 100
    x, w, t, _ = _inputs(lead, C, V, dtype, seed)
    _check_softcap(x, w, t, _upstream(reduction, lead, seed), 15.0, reduction, backend, chunk_rows, SHAPE_ID[shape])


# Each option alone (and all together) on one shape, fp32, chunks of 4 over 14 rows.
OPTIONS = {
    "plain": {},
    "bias": {"bias": True},
    "ignore-100": {"ignore_index": -100},
    "ignore0": {"ignore_index": 0},          # a valid class index, ignored (as F.cross_entropy allows)
    "ignore1000": {"ignore_index": 1000},    # beyond V
    "smooth": {"label_smoothing": 0.15},
    "smooth1": {"label_smoothing": 1.0},     # no target term left
    "zloss": {"z_loss": 0.05},
    "softcap": {"softcap": 4.0},
    "all": {"bias": True, "ignore_index": -7, "softcap": 6.0, "label_smoothing": 0.3, "z_loss": 0.02},
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_option(backend, option, reduction):
    opts = dict(OPTIONS[option])
    bias = opts.pop("bias", False)
    ii = opts.get("ignore_index", -100)
    x, w, t, b = _inputs((14,), 10, 23, torch.float32, 3, ignore_frac=0.25, ignore_index=ii, bias=bias)
    _check_hf(x, w, t, b, _upstream(reduction, (14,), 3), opts, reduction, backend, 4, option)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_softcap(backend, reduction):
    """softcap None and 0 are the same uncapped path, within budget of the reference; large logits
    (up to ~40) that a cap would bend."""
    x, w, t, _ = _inputs((3, 7), 20, 65, torch.float32, 1)
    w = w * 4
    gout = _upstream(reduction, (3, 7), 1)
    got = _check_softcap(x, w, t, gout, None, reduction, backend, 5, "softcap None")
    got0 = _run(linear_softcap_cross_entropy, x, w, t, gout, softcap=0.0, reduction=reduction, backend=backend,
                chunk_rows=5)
    for a, b in zip(got[:3], got0[:3]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_ID.get)
def test_padded_weight_slice_fp32_master(backend, dtype):
    """The model's call: x in the compute dtype, weight = lm_head.weight[:vocab_size] of an fp32
    master padded to a multiple of 64 rows. The pad rows get exactly zero gradient, the gradient of
    the weight (and of an fp32 bias) is fp32."""
    x, w, t, b = _inputs((2, 9), 24, 50, dtype, 2, w_dtype=torch.float32, bias=True)
    padded = torch.cat([w, torch.randn(14, 24, generator=_gen(3))]).requires_grad_()
    xs = x.clone().requires_grad_()
    loss = linear_softcap_cross_entropy(xs, padded[:50], t, 15.0, backend=backend, chunk_rows=7)
    loss.backward()
    assert padded.grad.dtype == torch.float32 and xs.grad.dtype == dtype
    assert torch.equal(padded.grad[50:], torch.zeros(14, 24))
    _check_softcap(x, w, t, torch.tensor(1.0), 15.0, "mean", backend, 7, "fp32 master")
    _check_hf(x, w, torch.where(t == -1, -100, t), b, torch.tensor(1.0), {"softcap": 15.0}, "mean", backend, 7,
              "fp32 master + bias")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_x(backend):
    """x as a transposed (T, B, C) view and as a column slice of a wider buffer: same results as
    contiguous copies (up to the GEMM's own rounding on strided operands) and within budget."""
    g = _gen(4)
    C, V = 17, 41
    w, b = torch.randn(V, C, generator=g), torch.randn(V, generator=g)
    xt = torch.randn(5, 3, C, generator=g).transpose(0, 1)       # (B=3, T=5, C), non-contiguous rows
    xs = torch.randn(3, 5, C + 9, generator=g)[..., 4:4 + C]     # row stride C + 9
    opts = {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 15.0}
    for x in (xt, xs):
        assert not x.is_contiguous()
        t = torch.randint(0, V, (3, 5), generator=g)
        t[1, 2] = -100
        gout = torch.randn(3, 5, generator=g)
        got = _check_hf(x, w, t, b, gout, opts, "none", backend, 4, "strided")
        want = _run(linear_cross_entropy, x.contiguous(), w, t, gout, b, reduction="none", backend=backend,
                    chunk_rows=4, **opts)
        for a, c in zip(got, want):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_targets_whole_chunk_and_all(backend, reduction):
    opts = {"label_smoothing": 0.1, "z_loss": 1e-2}
    x, w, t, b = _inputs((20,), 12, 30, torch.float32, 5, ignore_frac=0.0, bias=True)
    t[4:8] = -100  # exactly the second chunk of 4 rows
    t[13] = -100
    gout = _upstream(reduction, (20,), 5)
    got = _check_hf(x, w, t, b, gout, opts, reduction, backend, 4, "chunk ignored")
    assert torch.equal(got[1][4:8], torch.zeros(4, 12))  # no gradient reaches ignored rows
    if reduction == "none":
        assert torch.equal(got[0][4:8], torch.zeros(4))
    # Every target ignored: F.cross_entropy's mean is 0/0 = nan with zero gradients; sum 0; none 0.
    t_all = torch.full((20,), -100)
    for fn, extra in ((linear_cross_entropy, dict(backend=backend, chunk_rows=4)), (linear_cross_entropy_reference, {})):
        loss, gx, gw, gb = _run(fn, x, w, t_all, gout, b, reduction=reduction, **opts, **extra)
        if reduction == "mean":
            assert torch.isnan(loss)
        else:
            assert not loss.any()
        assert not gx.any() and not gw.any() and not gb.any()
    # nanofast's entry, -1 ignored.
    loss, gx, gw, _ = _run(linear_softcap_cross_entropy, x, w, torch.full((20,), -1), gout, softcap=15.0,
                           reduction=reduction, backend=backend, chunk_rows=4)
    assert (torch.isnan(loss) if reduction == "mean" else not loss.any()) and not gx.any() and not gw.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x, w = torch.randn(0, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    b = torch.randn(11, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long)
    assert torch.isnan(linear_cross_entropy(x, w, t, b, backend=backend))  # as F.cross_entropy: 0/0
    assert torch.isnan(linear_softcap_cross_entropy(x, w, t, 15.0, backend=backend))
    loss = linear_cross_entropy(x, w, t, b, reduction="sum", z_loss=0.1, backend=backend)
    loss.backward()
    assert loss.item() == 0 and x.grad.shape == (0, 8) and not w.grad.any() and not b.grad.any()


# ------------------------------------------------------------------------------------------------
# Design: gradients in the forward, recompute for "none", no gradient pass without grads
# ------------------------------------------------------------------------------------------------

def _record_steps(monkeypatch, backend):
    calls = []
    owner, name = (lce.TRITON_LAUNCHERS, "step") if backend == "triton" else (lce, "_step_torch")
    orig = getattr(owner, name)

    def rec(logits, targets, loss, lse, scale, opts, forward, grad):
        calls.append((logits.shape[0], forward, grad))
        return orig(logits, targets, loss, lse, scale, opts, forward, grad)

    monkeypatch.setattr(owner, name, rec)
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_in_forward_and_recompute_for_none(monkeypatch, backend):
    calls = _record_steps(monkeypatch, backend)
    x, w, t, b = _inputs((10,), 8, 20, torch.float32, 6, ignore_frac=0.0, bias=True)  # every row kept
    xs, ws, bs = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    loss = linear_cross_entropy(xs, ws, t, bs, reduction="mean", backend=backend, chunk_rows=4)
    assert calls == [(4, True, True), (4, True, True), (2, True, True)]  # 3 chunks, loss and grads
    calls.clear()
    loss.backward()
    assert calls == []  # the backward only scales the saved gradients
    loss = linear_cross_entropy(xs, ws, t, bs, reduction="none", backend=backend, chunk_rows=4)
    assert calls == [(4, True, False), (4, True, False), (2, True, False)]
    calls.clear()
    loss.sum().backward()  # an expanded (stride-0) upstream gradient
    assert calls == [(4, False, True), (4, False, True), (2, False, True)]  # recomputed, lse reused


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_computes_loss_only(monkeypatch, backend):
    calls = _record_steps(monkeypatch, backend)
    x, w, t, b = _inputs((9,), 8, 20, torch.float32, 7, ignore_frac=0.0, bias=True)
    want = linear_cross_entropy_reference(x, w, t, b, softcap=15.0)
    with torch.no_grad():
        got = linear_cross_entropy(x.requires_grad_(), w, t, b, softcap=15.0, backend=backend, chunk_rows=5)
    assert not got.requires_grad and calls == [(5, True, False), (4, True, False)]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    calls.clear()
    got = linear_cross_entropy(x.detach(), w, t, b, softcap=15.0, backend=backend, chunk_rows=5)  # nothing requires grad
    assert not got.requires_grad and calls == [(5, True, False), (4, True, False)]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_only_some_inputs_require_grad(backend, reduction):
    x, w, t, b = _inputs((9,), 8, 20, torch.float32, 8, ignore_index=-100, bias=True)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, reduction=reduction)
    ref = _run(linear_cross_entropy_reference, x, w, t, _upstream(reduction, (9,), 8), b, **kw)
    for i in range(3):
        leaves = [a.clone().requires_grad_(j == i) for j, a in enumerate((x, w, b))]
        loss = linear_cross_entropy(*leaves[:2], t, leaves[2], backend=backend, chunk_rows=4, **kw)
        loss.backward(_upstream(reduction, (9,), 8))
        for j, leaf in enumerate(leaves):
            if j == i:
                torch.testing.assert_close(leaf.grad, ref[i + 1], rtol=1e-5, atol=1e-6)
            else:
                assert leaf.grad is None


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_skip_the_chunk_loop(monkeypatch, backend, reduction):
    """On CPU only the kept rows reach the GEMMs and the per-row step (RL's and SFT's masked
    prompts cost nothing), in the forward and in "none"'s recomputing backward; the values equal the
    loop over every row, and ignored rows get zero loss and zero dx."""
    x, w, t, b = _inputs((11, 3), 8, 20, torch.float32, 12, ignore_index=-100, bias=True)
    t[:, 0] = -100
    t[2] = -100
    kept = int((t != -100).sum())
    assert 0 < kept < t.numel() - 11
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=15.0, reduction=reduction, backend=backend, chunk_rows=4)
    gout = _upstream(reduction, (11, 3), 13)
    calls = _record_steps(monkeypatch, backend)
    got = _run(linear_cross_entropy, x, w, t, gout, b, **kw)
    chunks = [min(4, kept - s) for s in range(0, kept, 4)]
    if reduction == "none":
        assert calls == [(r, True, False) for r in chunks] + [(r, False, True) for r in chunks]
    else:
        assert calls == [(r, True, True) for r in chunks]
    # The same call with the compaction switched off (the path CUDA and torch.compile take).
    monkeypatch.setattr(lce, "_chunked", lambda *a, **k: lce._chunk_loop(*a, **{"lse_in": None, **k}))
    calls.clear()
    full = _run(linear_cross_entropy, x, w, t, gout, b, **kw)
    assert sum(r for r, fwd, _ in calls if fwd) == t.numel()
    for a, c in zip(got, full):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)
    if reduction == "none":
        assert not got[0][t == -100].any()
    assert not got[1][t == -100].any()


def test_deterministic_and_chunking_invariant():
    """Two runs agree bitwise; different chunkings agree to fp32 summation order."""
    x, w, t, b = _inputs((23,), 16, 70, torch.float32, 9, ignore_index=-100, bias=True)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=15.0, backend="triton")
    runs = [_run(linear_cross_entropy, x, w, t, torch.tensor(1.0), b, chunk_rows=r, **kw) for r in (5, 5, 23, 1)]
    for a, c in zip(runs[0], runs[1]):
        assert torch.equal(a, c)
    for other in runs[2:]:
        for a, c in zip(runs[0], other):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opts", [lce._Loss(-1, 15.0, 0.0, 0.0), lce._Loss(2, 15.0, 0.2, 0.05), lce._Loss(-100, 0.0, 0.3, 0.0)],
                         ids=["cap", "cap-smooth-zloss-ignore2", "smooth"])
def test_kernel_writes_only_its_rows(opts):
    """The in-place gradient pass stores only inside the chunk's (R, V) rows: run the kernel on a
    view inside a sentinel-filled buffer (row stride V + 7) and compare with a contiguous run, and
    with the torch step."""
    R, V = 6, 37
    g = _gen(10)
    logits = torch.randn(R, V, generator=g) * 3
    t = torch.tensor([0, 5, -1, 36, 2, 17])
    t[2] = opts.ignore_index
    outs = []
    for padded in (False, True):
        if padded:
            buf = torch.full((R + 2, V + 7), -4096.0)
            view = buf[1:R + 1, 3:3 + V]
        else:
            view = torch.empty(R, V)
        view.copy_(logits)
        loss, lse = torch.full((R,), float("nan")), torch.full((R,), float("nan"))
        lce._step_triton(view, t, loss, lse, torch.tensor(0.5), opts, True, True)
        outs.append((view.clone(), loss, lse))
        if padded:
            mask = torch.ones_like(buf, dtype=torch.bool)
            mask[1:R + 1, 3:3 + V] = False
            assert (buf[mask] == -4096.0).all()
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert outs[0][1][2] == 0 and not outs[0][0][2].any()  # ignored row: zero loss, zero gradient
    ref = [logits.clone(), torch.empty(R), torch.empty(R)]
    lce._step_torch(ref[0], t, ref[1], ref[2], torch.tensor(0.5), opts, True, True)
    for a, b in zip(outs[0], ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_kernel_out_of_range_target_is_nan_not_a_stray_read():
    """The launcher checks targets on CPU only (on CUDA a check would sync the device): the kernel
    itself must never dereference a target outside [0, V); such a row's loss is NaN, while the
    ignore_index (here -100) gives 0."""
    R, V = 4, 10
    buf = torch.full((R + 1, V), float("nan"))  # a read past the chunk would poison lse
    logits = buf[:R]
    logits.copy_(torch.randn(R, V, generator=_gen(15)))
    loss, lse = torch.empty(R), torch.empty(R)
    lce._step_triton(logits, torch.tensor([1, V, -7, -100]), loss, lse, torch.tensor(1.0),
                     lce._Loss(-100, 15.0, 0.1, 0.01), True, False)
    assert torch.isfinite(lse).all() and loss[0].isfinite() and loss[1:3].isnan().all() and loss[3] == 0


def test_default_chunk_rows():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert lce.default_chunk_rows(4096, 32768, cpu) == (1 << 25) // 32768 == 1024
    assert lce.default_chunk_rows(16384, 65536, cuda) == 2048
    assert lce.default_chunk_rows(10, 65536, cuda) == 10
    assert lce.default_chunk_rows(5, 1 << 26, cpu) == 1
    assert lce.default_chunk_rows(0, 7, cpu) == 1


# ------------------------------------------------------------------------------------------------
# torch.compile, model, modules, validation count
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend, reduction):
    """fullgraph=True, forward and backward: the torch step traces whole; the Triton path goes
    through the nanofast::linear_cross_entropy_fwd/bwd custom ops (no graph break). Inductor
    compiles every case but the torch step's "none", which runs under aot_eager (the same Dynamo
    and AOTAutograd tracing of its recomputing backward, without a second ~20 s C++ build of a
    graph the "mean" case already has Inductor compile)."""
    def fn(x, w, t, b):
        loss = linear_cross_entropy(x * 1.5, w, t, b, softcap=15.0, label_smoothing=0.1, z_loss=1e-3,
                                    reduction=reduction, backend=backend, chunk_rows=6)
        return loss if reduction == "mean" else (loss * torch.arange(loss.numel()).view(loss.shape)).sum()

    x, w, t, b = _inputs((2, 5), 12, 33, torch.float32, 11, ignore_index=-100, bias=True)
    eager = _run(fn, x, w, t, torch.tensor(1.0), b)
    torch._dynamo.reset()
    compiler = "aot_eager" if (backend, reduction) == ("torch", "none") else "inductor"
    comp = _run(torch.compile(fn, fullgraph=True, backend=compiler), x, w, t, torch.tensor(1.0), b)
    for a, c in zip(comp, eager):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_torch_compile_fullgraph_softcap_entry_triton():
    """nanofast's entry on the Triton backend under fullgraph=True (once a graph break)."""
    def fn(x, w, t):
        return linear_softcap_cross_entropy(x * 1.5, w, t, 15.0, backend="triton", chunk_rows=4)

    x, w, t, _ = _inputs((2, 5), 12, 33, torch.float32, 12)
    eager = _run(fn, x, w, t, torch.tensor(1.0))
    torch._dynamo.reset()
    comp = _run(torch.compile(fn, fullgraph=True), x, w, t, torch.tensor(1.0))
    for a, c in zip(comp[:3], eager[:3]):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_custom_ops_pass_opcheck():
    """The custom ops' fake (meta) kernels and autograd registration agree with their real ones."""
    x, w, t, b = _inputs((6,), 8, 19, torch.float32, 17, ignore_index=-100, bias=True)
    x.requires_grad_()
    lse = torch.logsumexp(F.linear(x, w, b), -1).detach()
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    for red in ("mean", "none"):
        torch.library.opcheck(torch.ops.nanofast.linear_cross_entropy_fwd,
                              (x, w, b, t, -100, 15.0, 0.1, 0.01, red, "triton", 4, True, True, True, "target"),
                              test_utils=tests)
    torch.library.opcheck(torch.ops.nanofast.linear_cross_entropy_bwd,
                          (torch.randn(6), x.detach(), w, None, t, lse, -100, 0.0, 0.0, 0.0, "triton", 4, True, True,
                           False), test_utils=tests)


def test_compiled_triton_path_still_checks_target_values():
    """Under torch.compile the entry cannot read target values (a data-dependent guard breaks
    fullgraph): the custom op checks them when it runs, with the entry's argument name."""
    x, w, t, _ = _inputs((6,), 8, 11, torch.float32, 20, ignore_frac=0.0)
    t[2] = -1
    hf = torch.compile(lambda x, w, t: linear_cross_entropy(x, w, t, backend="triton"), backend="aot_eager",
                       fullgraph=True)
    nf = torch.compile(lambda x, w, t: linear_softcap_cross_entropy(x, w, t, 15.0, backend="triton"),
                       backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    t_ok = torch.where(t == -1, -100, t)
    torch.testing.assert_close(hf(x, w, t_ok), linear_cross_entropy(x, w, t_ok), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"target must be -100 \(ignored\) or in \[0, 11\)"):
        hf(x, w, torch.where(t == -1, 11, t_ok))
    with pytest.raises(ValueError, match=r"targets must be -1 \(ignored\) or in \[0, 11\)"):
        nf(x, w, torch.where(t == -1, -5, t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_models_training_head_is_the_fused_op(backend, monkeypatch):
    """The GPT's loss goes through the fused op (on the padded lm_head's first vocab_size rows) and
    equals the head it replaced (lm_head over the padded vocabulary, sliced, softcap, cross-entropy)
    on the same hidden states: same loss, same lm_head gradient, zero on the pad rows."""
    from nanofast.model import GPT, config_for_depth

    cfg = config_for_depth(2, vocab_size=300, sequence_len=32, head_dim=64)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.3)  # init is ~0: make the softcap matter
    assert model.lm_head.weight.shape[0] == 320  # padded to a multiple of 64
    idx = torch.randint(0, 300, (2, 16), generator=_gen(16))
    targets = idx.roll(-1, 1)
    targets[:, -1] = -1
    seen, fused_head = {}, ops.linear_softcap_cross_entropy

    def spy(x, weight, *args, **kwargs):
        seen["x"] = x
        return fused_head(x, weight, *args, **kwargs)

    monkeypatch.setattr(ops, "linear_softcap_cross_entropy", spy)
    ops.set_kernel_backend(backend)
    try:
        loss = model(idx, targets)
        loss.backward()
    finally:
        ops.set_kernel_backend(None)
    x = seen["x"].detach().requires_grad_()
    w = model.lm_head.weight.detach().clone().requires_grad_()
    unfused = ops.softcap_cross_entropy(F.linear(x, w)[..., :300], targets, 15.0)
    unfused.backward()
    torch.testing.assert_close(loss.detach(), unfused.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.lm_head.weight.grad, w.grad, rtol=1e-5, atol=1e-7)
    assert not model.lm_head.weight.grad[300:].any()


def test_modules():
    m = LinearCrossEntropyLoss(ignore_index=-1, softcap=15.0, label_smoothing=0.1, z_loss=1e-3, reduction="sum",
                               backend="torch", chunk_rows=3)
    assert "reduction='sum'" in repr(m) and "label_smoothing=0.1" in repr(m) and list(m.parameters()) == []
    x, w, t, b = _inputs((7,), 8, 20, torch.float32, 13, bias=True)
    want = linear_cross_entropy_reference(x, w, t, b, ignore_index=-1, softcap=15.0, label_smoothing=0.1,
                                          z_loss=1e-3, reduction="sum")
    torch.testing.assert_close(m(x, w, t, b), want, rtol=1e-6, atol=1e-5)
    # The defaults are F.cross_entropy's.
    t100 = torch.where(t == -1, -100, t)
    torch.testing.assert_close(LinearCrossEntropyLoss()(x, w, t100), F.cross_entropy(F.linear(x, w), t100),
                               rtol=1e-6, atol=1e-6)
    s = LinearSoftcapCrossEntropy(15.0, reduction="sum", backend="torch", chunk_rows=3)
    assert "reduction='sum'" in repr(s) and list(s.parameters()) == []
    torch.testing.assert_close(s(x, w, t), linear_softcap_cross_entropy_reference(x, w, t, 15.0, reduction="sum"),
                               rtol=1e-6, atol=1e-5)
    # softcap=None: no cap, explicitly.
    torch.testing.assert_close(LinearSoftcapCrossEntropy(None)(x, w, t),
                               F.cross_entropy(F.linear(x, w), t, ignore_index=-1), rtol=1e-6, atol=1e-6)
    # backend None on CPU is the torch step.
    torch.testing.assert_close(linear_softcap_cross_entropy(x, w, t, 15.0),
                               linear_softcap_cross_entropy_reference(x, w, t, 15.0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry", ["linear_cross_entropy", "linear_softcap_cross_entropy"])
def test_validation_runs_once_per_call(entry, backend, monkeypatch):
    """Each public entry runs its OP check once per call, forward and backward (what
    tests/test_registry.py counts for every op)."""
    count = []
    check = lce.OP.checks[entry]
    monkeypatch.setitem(lce.OP.checks, entry, lambda *a, **kw: (count.append(1), check(*a, **kw))[1])
    x, w, t, b = _inputs((5,), 8, 11, torch.float32, 18, bias=True)
    x.requires_grad_()
    if entry == "linear_cross_entropy":
        linear_cross_entropy(x, w, t, b, ignore_index=-1, reduction="none", backend=backend).sum().backward()
    else:
        linear_softcap_cross_entropy(x, w, t, 15.0, reduction="none", backend=backend).sum().backward()
    assert len(count) == 1


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

def _bad_cases():
    x, w, t, b = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long), torch.randn(10)

    def f(x, w, t, softcap=15.0, **kw):
        return linear_softcap_cross_entropy(x, w, t, softcap, **kw)

    h = linear_cross_entropy
    return [
        (lambda: f([1.0], w, t), TypeError, "x must be a torch.Tensor"),
        (lambda: f(x.long(), w, t), TypeError, "x must have a floating dtype"),
        (lambda: f(torch.tensor(1.0), w, t), ValueError, "x must have shape"),
        (lambda: f(torch.randn(4, 0), w, t), ValueError, "x must have a non-empty last dim"),
        (lambda: f(x, "w", t), TypeError, r"weight must be a torch.Tensor of shape \(V, 8\)"),
        (lambda: f(x, w.long(), t), TypeError, "weight must have a floating dtype"),
        (lambda: f(x, torch.randn(10, 7), t), ValueError, r"weight must have shape \(V, 8\)"),
        (lambda: f(x, torch.randn(80), t), ValueError, r"weight must have shape \(V, 8\)"),
        (lambda: f(x, torch.randn(0, 8), t), ValueError, r"weight must have shape \(V, 8\) with V >= 1"),
        (lambda: f(x, torch.randn(10, 8, device="meta"), t), ValueError, "weight must be on x's device"),
        (lambda: f(x, w, [0, 1, 2, 3]), TypeError, r"targets must be a torch.Tensor of shape \(4,\)"),
        (lambda: f(x, w, t.int()), TypeError, "targets must have dtype torch.int64"),
        (lambda: f(x, w, torch.zeros(5, dtype=torch.long)), ValueError, r"targets must have shape \(4,\)"),
        (lambda: f(x, w, torch.zeros(4, 1, dtype=torch.long)), ValueError, r"targets must have shape \(4,\)"),
        (lambda: f(x, w, torch.zeros(4, dtype=torch.long, device="meta")), ValueError,
         "targets must be on x's device"),
        (lambda: f(x, w, torch.tensor([0, 10, 1, 2])), ValueError, r"targets must be -1 \(ignored\) or in \[0, 10\)"),
        (lambda: f(x, w, torch.tensor([0, -2, 1, 2])), ValueError, r"targets must be -1"),
        (lambda: f(x, w, t, reduction="avg"), ValueError, "reduction must be one of"),
        (lambda: f(x, w, t, softcap=-1.0), ValueError, "softcap must be a finite real number >= 0 or None"),
        (lambda: f(x, w, t, softcap=float("inf")), ValueError, "softcap must be"),
        (lambda: f(x, w, t, softcap="15"), ValueError, "softcap must be"),
        (lambda: f(x, w, t, softcap=True), ValueError, "softcap must be"),
        (lambda: f(x, w, t, chunk_rows=0), ValueError, "chunk_rows must be an int >= 1"),
        (lambda: f(x, w, t, chunk_rows=2.5), ValueError, "chunk_rows must be"),
        (lambda: f(x, w, t, backend="cudnn"), ValueError, "backend must be one of"),
        (lambda: f(x, w, t, backend="cuda"), ValueError, "backend='cuda' is not available"),
        (lambda: f(x.double(), w, t, backend="triton"), TypeError, "x must be float16, bfloat16 or float32"),
        # No silent softcap any more: it is a required argument of nanofast's entry and module.
        (lambda: linear_softcap_cross_entropy(x, w, t), TypeError, "softcap"),
        (lambda: linear_softcap_cross_entropy_reference(x, w, t), TypeError, "softcap"),
        (lambda: LinearSoftcapCrossEntropy(), TypeError, "softcap"),
        (lambda: LinearSoftcapCrossEntropy(15.0, reduction="mean!"), ValueError, "reduction must be one of"),
        (lambda: LinearSoftcapCrossEntropy(15.0, backend="cudnn"), ValueError, "backend must be one of"),
        # The HF entry.
        (lambda: h(x, w, t, [0.0] * 10), TypeError, r"bias must be a torch.Tensor of shape \(10,\) or None"),
        (lambda: h(x, w, t, b.long()), TypeError, "bias must have a floating dtype"),
        (lambda: h(x, w, t, torch.randn(11)), ValueError, r"bias must have shape \(10,\)"),
        (lambda: h(x, w, t, torch.randn(1, 10)), ValueError, r"bias must have shape \(10,\)"),
        (lambda: h(x, w, t, torch.randn(10, device="meta")), ValueError, "bias must be on x's device"),
        (lambda: h(x, w, [0, 1, 2, 3]), TypeError, r"target must be a torch.Tensor of shape \(4,\)"),
        (lambda: h(x, w, t.float()), TypeError, r"target must have dtype torch.int64 \(class indices\)"),
        (lambda: h(x, w, torch.zeros(3, dtype=torch.long)), ValueError, r"target must have shape \(4,\)"),
        (lambda: h(x, w, torch.tensor([0, -1, 1, 2])), ValueError,
         r"target must be -100 \(ignored\) or in \[0, 10\), got values in \[-1, 2\]"),
        (lambda: h(x, w, torch.tensor([0, 5, 10, -100])), ValueError, r"target must be -100 \(ignored\)"),
        (lambda: h(x, w, torch.tensor([0, 5, 11, 10]), ignore_index=10), ValueError,
         r"target must be 10 \(ignored\) or in \[0, 10\), got values in \[0, 11\]"),
        (lambda: h(x, w, t, ignore_index=-100.0), TypeError, "ignore_index must be an int"),
        (lambda: h(x, w, t, ignore_index=True), TypeError, "ignore_index must be an int"),
        (lambda: h(x, w, t, ignore_index=torch.tensor(-100)), TypeError, "ignore_index must be an int"),
        (lambda: h(x, w, t, label_smoothing=-0.1), ValueError, r"label_smoothing must be a real number in \[0, 1\]"),
        (lambda: h(x, w, t, label_smoothing=1.5), ValueError, "label_smoothing must be"),
        (lambda: h(x, w, t, label_smoothing=float("nan")), ValueError, "label_smoothing must be"),
        (lambda: h(x, w, t, label_smoothing="0.1"), ValueError, "label_smoothing must be"),
        (lambda: h(x, w, t, z_loss=-1e-4), ValueError, "z_loss must be a finite real number >= 0"),
        (lambda: h(x, w, t, z_loss=float("inf")), ValueError, "z_loss must be"),
        (lambda: h(x, w, t, z_loss=float("nan")), ValueError, "z_loss must be"),
        (lambda: h(x, w, t, z_loss=None), ValueError, "z_loss must be"),
        (lambda: h(x, w, t, softcap=-3.0), ValueError, "softcap must be"),
        (lambda: h(x, w, t, reduction="batchmean"), ValueError, "reduction must be one of"),
        (lambda: h(x, w, t, chunk_rows=-1), ValueError, "chunk_rows must be"),
        (lambda: h(x, w, t, backend="cuda"), ValueError, "backend='cuda' is not available"),
        (lambda: h(x.double(), w, t, backend="triton"), TypeError, "x must be float16, bfloat16 or float32"),
        (lambda: h(x, w, t, b, -100), TypeError, "positional"),  # options are keyword-only
        (lambda: linear_cross_entropy_reference(x, w, t, label_smoothing=2.0), ValueError, "label_smoothing must be"),
        (lambda: LinearCrossEntropyLoss(z_loss=-1.0), ValueError, "z_loss must be"),
        (lambda: LinearCrossEntropyLoss(ignore_index=None), TypeError, "ignore_index must be an int"),
        (lambda: LinearCrossEntropyLoss(backend="cudnn"), ValueError, "backend must be one of"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_raises_clear_errors(case):
    fn, exc, match = _bad_cases()[case]
    with pytest.raises(exc, match=match):
        fn()


def test_ignore_index_inside_the_vocabulary_is_not_an_error():
    """ignore_index may be a class index (F.cross_entropy allows it): those rows are skipped."""
    x, w, t, _ = _inputs((8,), 8, 10, torch.float32, 19, ignore_frac=0.0)
    t[:3] = 4
    got = linear_cross_entropy(x, w, t, ignore_index=4, reduction="none", backend="triton")
    assert not got[:3].any() and got[t != 4].all()
    torch.testing.assert_close(got, F.cross_entropy(F.linear(x, w), t, ignore_index=4, reduction="none"),
                               rtol=1e-6, atol=1e-6)


def test_fp64_torch_backend():
    """fp64 inputs run through backend="torch" (the GEMMs in fp64; softcap and softmax in fp32, as
    the reference's .float() does)."""
    x, w, t, b = _inputs((6,), 8, 20, torch.float64, 14, ignore_index=-100, bias=True)
    kw = dict(softcap=15.0, label_smoothing=0.1, z_loss=1e-3)
    got = _run(linear_cross_entropy, x, w, t, torch.tensor(1.0), b, backend="torch", chunk_rows=4, **kw)
    want = _run(linear_cross_entropy_reference, x, w, t, torch.tensor(1.0), b, **kw)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Compile gate: the H100 configurations compiled for sm_90, machine code read
# ------------------------------------------------------------------------------------------------

# <= 64 registers keeps >= 1024 resident threads (50% of an SM) for this bandwidth-bound row loop;
# measured 39-47.
MAX_REGISTERS = 64
gate_facts = gate_facts_fixture("nanofast.kernels.linear_cross_entropy")


def test_kernel_configs_match_launcher():
    for c in lce.KERNEL_CONFIGS:
        assert list(c["signature"]) == list(c["fn"].arg_names), c["config"]
        V = int(c["config"].split()[1][2:])
        meta = lce._meta(V)
        assert c["num_warps"] == meta["num_warps"] and c["constexprs"]["BLOCK_V"] == meta["BLOCK_V"]
    assert {c["signature"]["LOGITS"] for c in lce.KERNEL_CONFIGS} == {"*bf16", "*fp16", "*fp32"}
    # Every constexpr branch of the kernel is compiled somewhere, both ways.
    for flag in ("HAS_CAP", "HAS_SMOOTH", "HAS_ZLOSS", "FORWARD", "GRAD"):
        assert {c["constexprs"][flag] for c in lce.KERNEL_CONFIGS} == {True, False}, flag


def _check_facts(cfg: dict, f: dict, arch: int) -> None:
    where = check_common_facts(cfg, f, arch, MAX_REGISTERS)
    assert f["instructions"].get("LDG.E.128", 0) > 0, where  # 128-bit loads of the logits row
    if cfg["constexprs"]["GRAD"]:
        assert f["instructions"].get("STG.E.128", 0) > 0, where  # 128-bit in-place gradient stores
    assert f["atomics"] == 0, where
    assert f["i64_muls"] > 0, where  # row * stride in 64 bits


test_compile_gate_sm90, _ = gate_tests(lce.KERNEL_CONFIGS, [], _check_facts)
