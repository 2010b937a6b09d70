"""Tests for nanofast.kernels.linear_cross_entropy (fused, chunked linear + softcap + cross-entropy).

Both backends are run: "torch" (the per-chunk step in torch ops) and "triton" (the per-row kernel
through Triton's interpreter: tests/conftest.py sets TRITON_INTERPRET=1; shapes kept small, the
interpreter costs ~1 ms per program). Loss and gradients are compared with an fp64 evaluation of the
same maths on the same rounded inputs under FlashAttention-style budgets (tests/error_budget.py):
|fused - ref64| <= FACTOR * |unfused torch in the input dtype - ref64| + ATOL * max(1, max|ref64|).
The Triton kernel is also compiled for sm_90 and its machine code checked (compile gate).
"""
from __future__ import annotations

import functools
import importlib

import pytest
import torch
import torch.nn.functional as F

from nanofast import ops
from nanofast.kernels import (LinearSoftcapCrossEntropy, linear_softcap_cross_entropy,
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
# gradient GEMMs, dW in fp32 then cast to weight's dtype), so FACTOR = 2 (2x torch's own error
# against fp64) plus an ATOL (times max(1, max|ref64|)) for what differs by construction:
# - loss: fp32 sums in another order (online max/sum-exp over BLOCK_V blocks, logsumexp per
#   chunk) and, in the kernel, tanh built from exp: measured worst need 1.0e-7 (fp32 Triton), 0
#   elsewhere; ATOL 1e-6 for every dtype.
# - grads: the GEMMs run per chunk (dW summed over chunks in fp32), and "mean"/"sum" gradients are
#   computed for a unit upstream gradient, then multiplied by it in fp32 and rounded once more to
#   x's dtype. fp32: measured worst need 1.2e-7 (Triton; 0 torch) -> 5e-7. fp16: 0 -> 1e-6.
#   bf16: 0 with the torch step, 2.2e-3 with the Triton kernel under the interpreter, whose
#   fp32 -> bf16 stores truncate (the GPU rounds to nearest), so a bf16 dlogit may sit one bf16 ulp
#   (2^-8 relative) below torch's -> ATOL 2^-8.
BUDGET = {
    "loss": {torch.float32: (2.0, 1e-6), torch.float16: (2.0, 1e-6), torch.bfloat16: (2.0, 1e-6)},
    "grad": {torch.float32: (2.0, 5e-7), torch.float16: (2.0, 1e-6), torch.bfloat16: (2.0, 2.0 ** -8)},
}
_check_budget = functools.partial(check_budget, BUDGET)

# (leading shape, C, V, chunk_rows): N = 1, V = 1, odd V and C, (B, T, C) leading dims, chunks
# smaller than N and not dividing it, the default chunking.
SHAPES = [((1,), 5, 7, None), ((13,), 9, 1, 4), ((2, 7), 24, 257, 3), ((37,), 48, 300, 16), ((40,), 33, 64, None)]
SHAPE_ID = {s: f"{'x'.join(map(str, s[0]))}-C{s[1]}-V{s[2]}-r{s[3]}" for s in SHAPES}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(lead, C, V, dtype, seed, ignore_frac=0.2, w_dtype=None):
    g = _gen(seed)
    x = torch.randn(*lead, C, generator=g).to(dtype)
    # Logits of O(5): the softcap (15) bends them visibly, the softmax is neither flat nor one-hot.
    w = (torch.randn(V, C, generator=g) * (5.0 / C ** 0.5)).to(w_dtype or dtype)
    t = torch.randint(0, V, lead, generator=g)
    t[torch.rand(lead, generator=g) < ignore_frac] = -1
    return x, w, t


def _upstream(reduction, lead, seed):
    g = _gen(seed + 1000)
    return torch.randn(lead, generator=g) if reduction == "none" else torch.tensor(0.7)


def _run(fn, x, w, t, gout, **kw):
    """Loss and grads (x, w) of fn(x, w, t, **kw) under the upstream gradient gout."""
    xs, ws = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(xs, ws, t, **kw)
    loss.backward(gout)
    return loss.detach(), xs.grad, ws.grad


def _ref64(x, w, t, gout, softcap, reduction):
    """Exact maths on the rounded inputs (weight cast to x's dtype first, as the GEMM does)."""
    return _run(linear_softcap_cross_entropy_reference, x.double(), w.to(x.dtype).double(), t, gout.double(),
                softcap=softcap, reduction=reduction)


def _check_all(x, w, t, gout, softcap, reduction, backend, chunk_rows, where=""):
    dtype = x.dtype
    got = _run(linear_softcap_cross_entropy, x, w, t, gout, softcap=softcap, reduction=reduction, backend=backend,
               chunk_rows=chunk_rows)
    lp = _run(linear_softcap_cross_entropy_reference, x, w, t, gout, softcap=softcap, reduction=reduction)
    r64 = _ref64(x, w, t, gout, softcap, reduction)
    assert got[0].dtype == torch.float32
    assert got[0].shape == (t.shape if reduction == "none" else ())
    assert got[1].dtype == x.dtype and got[2].dtype == w.dtype
    _check_budget("loss", dtype, f"loss {where}", got[0], lp[0], r64[0])
    _check_budget("grad", dtype, f"dx {where}", got[1], lp[1], r64[1])
    # dW in weight's dtype; the budget is the compute dtype's.
    factor, atol = BUDGET["grad"][dtype]
    err_k = (got[2].double() - r64[2]).abs().max().item()
    err_t = (lp[2].double() - r64[2]).abs().max().item()
    scale = max(1.0, r64[2].abs().max().item())
    assert torch.isfinite(got[2]).all()
    assert err_k <= factor * err_t + atol * scale, f"dw {where}: fused err {err_k:.3e} vs torch err {err_t:.3e}"
    return got


# ------------------------------------------------------------------------------------------------
# Reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_is_the_models_head(reduction):
    """The reference is exactly nanofast's model head: ops.linear, then ops.softcap_cross_entropy."""
    x, w, t = _inputs((2, 5), 16, 33, torch.bfloat16, 0, w_dtype=torch.float32)
    want = ops.softcap_cross_entropy(ops.linear(x, w), t, 15.0, reduction=reduction)
    got = linear_softcap_cross_entropy_reference(x, w, t, 15.0, reduction)
    assert torch.equal(got, want)
    # No cap (None or 0) is plain F.cross_entropy of the fp32 logits.
    want = F.cross_entropy(F.linear(x, w.to(x.dtype)).float().flatten(0, 1), t.flatten(), ignore_index=-1,
                           reduction=reduction)
    for cap in (None, 0.0):
        got = linear_softcap_cross_entropy_reference(x, w, t, cap, reduction)
        assert torch.equal(got, want.view(t.shape) if reduction == "none" else want)


# ------------------------------------------------------------------------------------------------
# Fused vs reference, both backends
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_ID.get)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, shape, dtype, reduction):
    lead, C, V, chunk_rows = shape
    seed = SHAPES.index(shape) * 10 + DTYPES.index(dtype)
    x, w, t = _inputs(lead, C, V, dtype, seed)
    _check_all(x, w, t, _upstream(reduction, lead, seed), 15.0, reduction, backend, chunk_rows, SHAPE_ID[shape])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_softcap(backend, reduction):
    """softcap None and 0 are the same uncapped path, within budget of the reference; large logits
    (up to ~40) that a cap would bend."""
    x, w, t = _inputs((3, 7), 20, 65, torch.float32, 1)
    w = w * 4
    gout = _upstream(reduction, (3, 7), 1)
    got = _check_all(x, w, t, gout, None, reduction, backend, 5, "softcap None")
    got0 = _run(linear_softcap_cross_entropy, x, w, t, gout, softcap=0.0, reduction=reduction, backend=backend,
                chunk_rows=5)
    for a, b in zip(got, got0):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_ID.get)
def test_padded_weight_slice_fp32_master(backend, dtype):
    """The model's call: x in the compute dtype, weight = lm_head.weight[:vocab_size] of an fp32
    master padded to a multiple of 64 rows. The pad rows get exactly zero gradient, the gradient of
    the weight is fp32."""
    x, w, t = _inputs((2, 9), 24, 50, dtype, 2, w_dtype=torch.float32)
    padded = torch.cat([w, torch.randn(14, 24, generator=_gen(3))]).requires_grad_()
    xs = x.clone().requires_grad_()
    loss = linear_softcap_cross_entropy(xs, padded[:50], t, backend=backend, chunk_rows=7)
    loss.backward()
    assert padded.grad.dtype == torch.float32 and xs.grad.dtype == dtype
    assert torch.equal(padded.grad[50:], torch.zeros(14, 24))
    _check_all(x, w, t, torch.tensor(1.0), 15.0, "mean", backend, 7, "fp32 master")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_x(backend):
    """x as a transposed (T, B, C) view and as a column slice of a wider buffer: same results as
    contiguous copies (up to the GEMM's own rounding on strided operands) and within budget."""
    g = _gen(4)
    C, V = 17, 41
    w = torch.randn(V, C, generator=g)
    xt = torch.randn(5, 3, C, generator=g).transpose(0, 1)       # (B=3, T=5, C), non-contiguous rows
    xs = torch.randn(3, 5, C + 9, generator=g)[..., 4:4 + C]     # row stride C + 9
    for x in (xt, xs):
        assert not x.is_contiguous()
        t = torch.randint(0, V, (3, 5), generator=g)
        t[1, 2] = -1
        gout = torch.randn(3, 5, generator=g)
        got = _check_all(x, w, t, gout, 15.0, "none", backend, 4, "strided")
        want = _run(linear_softcap_cross_entropy, x.contiguous(), w, t, gout, softcap=15.0, reduction="none",
                    backend=backend, chunk_rows=4)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_targets_whole_chunk_and_all(backend, reduction):
    x, w, t = _inputs((20,), 12, 30, torch.float32, 5, ignore_frac=0.0)
    t[4:8] = -1  # exactly the second chunk of 4 rows
    t[13] = -1
    gout = _upstream(reduction, (20,), 5)
    got = _check_all(x, w, t, gout, 15.0, reduction, backend, 4, "chunk ignored")
    assert torch.equal(got[1][4:8], torch.zeros(4, 12))  # no gradient reaches ignored rows
    if reduction == "none":
        assert torch.equal(got[0][4:8], torch.zeros(4))
    # Every target ignored: F.cross_entropy's mean is 0/0 = nan with zero gradients; sum 0; none 0.
    t_all = torch.full((20,), -1)
    loss, gx, gw = _run(linear_softcap_cross_entropy, x, w, t_all, gout, reduction=reduction, backend=backend,
                        chunk_rows=4)
    ref = _run(linear_softcap_cross_entropy_reference, x, w, t_all, gout, reduction=reduction)
    if reduction == "mean":
        assert torch.isnan(loss) and torch.isnan(ref[0])
    else:
        assert torch.equal(loss, ref[0]) and not loss.any()
    assert torch.equal(gx, ref[1]) and torch.equal(gw, ref[2]) and not gx.any() and not gw.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x, w = torch.randn(0, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long)
    assert torch.isnan(linear_softcap_cross_entropy(x, w, t, backend=backend))  # as F.cross_entropy: 0/0
    loss = linear_softcap_cross_entropy(x, w, t, reduction="sum", backend=backend)
    loss.backward()
    assert loss.item() == 0 and x.grad.shape == (0, 8) and not w.grad.any()


# ------------------------------------------------------------------------------------------------
# Design: gradients in the forward, recompute for "none", no gradient pass without grads
# ------------------------------------------------------------------------------------------------

def _record_steps(monkeypatch, backend):
    calls = []
    owner, name = (lce.TRITON_LAUNCHERS, "step") if backend == "triton" else (lce, "_step_torch")
    orig = getattr(owner, name)

    def rec(logits, targets, loss, lse, scale, softcap, forward, grad):
        calls.append((logits.shape[0], forward, grad))
        return orig(logits, targets, loss, lse, scale, softcap, forward, grad)

    monkeypatch.setattr(owner, name, rec)
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_in_forward_and_recompute_for_none(monkeypatch, backend):
    calls = _record_steps(monkeypatch, backend)
    x, w, t = _inputs((10,), 8, 20, torch.float32, 6)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = linear_softcap_cross_entropy(xs, ws, t, reduction="mean", backend=backend, chunk_rows=4)
    assert calls == [(4, True, True), (4, True, True), (2, True, True)]  # 3 chunks, loss and grads
    calls.clear()
    loss.backward()
    assert calls == []  # the backward only scales the saved gradients
    loss = linear_softcap_cross_entropy(xs, ws, t, reduction="none", backend=backend, chunk_rows=4)
    assert calls == [(4, True, False), (4, True, False), (2, True, False)]
    calls.clear()
    loss.sum().backward()  # an expanded (stride-0) upstream gradient
    assert calls == [(4, False, True), (4, False, True), (2, False, True)]  # recomputed, lse reused


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_computes_loss_only(monkeypatch, backend):
    calls = _record_steps(monkeypatch, backend)
    x, w, t = _inputs((9,), 8, 20, torch.float32, 7)
    want = linear_softcap_cross_entropy_reference(x, w, t)
    with torch.no_grad():
        got = linear_softcap_cross_entropy(x.requires_grad_(), w, t, backend=backend, chunk_rows=5)
    assert not got.requires_grad and calls == [(5, True, False), (4, True, False)]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    calls.clear()
    got = linear_softcap_cross_entropy(x.detach(), w, t, backend=backend, chunk_rows=5)  # nothing requires grad
    assert not got.requires_grad and calls == [(5, True, False), (4, True, False)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_one_input_requires_grad(backend):
    x, w, t = _inputs((9,), 8, 20, torch.float32, 8)
    ref_x, ref_w = (_run(linear_softcap_cross_entropy_reference, x, w, t, torch.tensor(1.0))[i] for i in (1, 2))
    xs = x.clone().requires_grad_()
    linear_softcap_cross_entropy(xs, w, t, backend=backend, chunk_rows=4).backward()
    torch.testing.assert_close(xs.grad, ref_x, rtol=1e-5, atol=1e-6)
    ws = w.clone().requires_grad_()
    linear_softcap_cross_entropy(x, ws, t, backend=backend, chunk_rows=4).backward()
    torch.testing.assert_close(ws.grad, ref_w, rtol=1e-5, atol=1e-6)


def test_deterministic_and_chunking_invariant():
    """Two runs agree bitwise; different chunkings agree to fp32 summation order."""
    x, w, t = _inputs((23,), 16, 70, torch.float32, 9)
    runs = [_run(linear_softcap_cross_entropy, x, w, t, torch.tensor(1.0), backend="triton", chunk_rows=r)
            for r in (5, 5, 23, 1)]
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    for other in runs[2:]:
        for a, b in zip(runs[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_kernel_writes_only_its_rows():
    """The in-place gradient pass stores only inside the chunk's (R, V) rows: run the kernel on a
    view inside a sentinel-filled buffer (row stride V + 7) and compare with a contiguous run."""
    R, V = 6, 37
    g = _gen(10)
    logits = torch.randn(R, V, generator=g) * 3
    t = torch.tensor([0, 5, -1, 36, 2, 17])
    outs = []
    for padded in (False, True):
        if padded:
            buf = torch.full((R + 2, V + 7), -4096.0)
            view = buf[1:R + 1, 3:3 + V]
        else:
            view = torch.empty(R, V)
        view.copy_(logits)
        loss, lse = torch.full((R,), float("nan")), torch.full((R,), float("nan"))
        lce._step_triton(view, t, loss, lse, torch.tensor(0.5), 15.0, True, True)
        outs.append((view.clone(), loss, lse))
        if padded:
            mask = torch.ones_like(buf, dtype=torch.bool)
            mask[1:R + 1, 3:3 + V] = False
            assert (buf[mask] == -4096.0).all()
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert outs[0][1][2] == 0 and not outs[0][0][2].any()  # ignored row: zero loss, zero gradient
    # Against the torch step: same loss, lse and gradient.
    ref = [logits.clone(), torch.empty(R), torch.empty(R)]
    lce._step_torch(ref[0], t, ref[1], ref[2], torch.tensor(0.5), 15.0, True, True)
    for a, b in zip(outs[0], ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_kernel_out_of_range_target_is_nan_not_a_stray_read():
    """The launcher checks targets on CPU only (on CUDA a check would sync the device): the kernel
    itself must never dereference a target outside [0, V); such a row's loss is NaN."""
    R, V = 3, 10
    buf = torch.full((R + 1, V), float("nan"))  # a read past the chunk would poison lse
    logits = buf[:R]
    logits.copy_(torch.randn(R, V, generator=_gen(15)))
    loss, lse = torch.empty(R), torch.empty(R)
    lce._step_triton(logits, torch.tensor([1, V, -7]), loss, lse, torch.tensor(1.0), 15.0, True, False)
    assert torch.isfinite(lse).all() and loss[0].isfinite() and loss[1:].isnan().all()


def test_default_chunk_rows():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert lce.default_chunk_rows(4096, 32768, cpu) == (1 << 25) // 32768 == 1024
    assert lce.default_chunk_rows(16384, 65536, cuda) == 2048
    assert lce.default_chunk_rows(10, 65536, cuda) == 10
    assert lce.default_chunk_rows(5, 1 << 26, cpu) == 1
    assert lce.default_chunk_rows(0, 7, cpu) == 1


# ------------------------------------------------------------------------------------------------
# torch.compile, module
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_matches_eager(reduction):
    def fn(x, w, t):
        loss = linear_softcap_cross_entropy(x * 1.5, w, t, reduction=reduction, backend="torch", chunk_rows=4)
        return loss if reduction == "mean" else (loss * torch.arange(loss.numel()).view(loss.shape)).sum()

    x, w, t = _inputs((2, 5), 12, 33, torch.float32, 11)
    eager = _run(fn, x, w, t, torch.tensor(1.0))
    torch._dynamo.reset()
    comp = _run(torch.compile(fn, fullgraph=True), x, w, t, torch.tensor(1.0))  # the torch step traces whole
    for a, b in zip(comp, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_torch_compile_triton_backend_graph_break():
    """Under torch.compile the Triton path runs eagerly (a graph break): same results."""
    def fn(x, w, t):
        return linear_softcap_cross_entropy(x * 1.5, w, t, backend="triton", chunk_rows=4)

    x, w, t = _inputs((2, 5), 12, 33, torch.float32, 12)
    eager = _run(fn, x, w, t, torch.tensor(1.0))
    torch._dynamo.reset()
    comp = _run(torch.compile(fn), x, w, t, torch.tensor(1.0))
    for a, b in zip(comp, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


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


def test_module():
    m = LinearSoftcapCrossEntropy(softcap=15.0, reduction="sum", backend="torch", chunk_rows=3)
    assert "reduction='sum'" in repr(m) and list(m.parameters()) == []
    x, w, t = _inputs((7,), 8, 20, torch.float32, 13)
    torch.testing.assert_close(m(x, w, t), linear_softcap_cross_entropy_reference(x, w, t, reduction="sum"),
                               rtol=1e-6, atol=1e-5)
    # backend None on CPU is the torch step.
    torch.testing.assert_close(linear_softcap_cross_entropy(x, w, t), linear_softcap_cross_entropy_reference(x, w, t),
                               rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

def _bad_cases():
    x, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    f = linear_softcap_cross_entropy
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
        (lambda: LinearSoftcapCrossEntropy(reduction="mean!"), ValueError, "reduction must be one of"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_raises_clear_errors(case):
    fn, exc, match = _bad_cases()[case]
    with pytest.raises(exc, match=match):
        fn()


def test_fp64_torch_backend():
    """fp64 inputs run through backend="torch" (the GEMMs in fp64; softcap and softmax in fp32, as
    the reference's .float() does)."""
    x, w, t = _inputs((6,), 8, 20, torch.float64, 14)
    got = _run(linear_softcap_cross_entropy, x, w, t, torch.tensor(1.0), backend="torch", chunk_rows=4)
    want = _run(linear_softcap_cross_entropy_reference, x, w, t, torch.tensor(1.0))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


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


def _check_facts(cfg: dict, f: dict, arch: int) -> None:
    where = check_common_facts(cfg, f, arch, MAX_REGISTERS)
    assert f["instructions"].get("LDG.E.128", 0) > 0, where  # 128-bit loads of the logits row
    if cfg["constexprs"]["GRAD"]:
        assert f["instructions"].get("STG.E.128", 0) > 0, where  # 128-bit in-place gradient stores
    assert f["atomics"] == 0, where
    assert f["i64_muls"] > 0, where  # row * stride in 64 bits


test_compile_gate_sm90, _ = gate_tests(lce.KERNEL_CONFIGS, [], _check_facts)
