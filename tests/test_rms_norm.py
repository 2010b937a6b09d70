"""Tests for nanofast.kernels.rms_norm.

The Triton kernels run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)
and are compared with an fp64 evaluation of the same maths on the same (rounded) inputs, under
FlashAttention-style budgets: |kernel - ref64| <= FACTOR * |torch_lowprec - ref64| + ATOL * scale,
where torch_lowprec is the plain-torch reference run in the input dtype and scale = max(1, max|ref64|).
The same kernels are compiled for sm_90 / sm_80 and their machine code is checked (compile gate).
"""
from __future__ import annotations

import functools
import importlib

import pytest
import torch
import torch.nn.functional as F

from nanofast.kernels.rms_norm import (KERNEL_CONFIGS, RMSNorm, default_eps, rms_norm, rms_norm_bwd_triton,
                                       rms_norm_fwd_triton, rms_norm_reference)
from compile_gate_helpers import check_common_facts, gate_facts_fixture, gate_tests
from cuda_emu_helpers import emu  # noqa: F401 (emu: the fixture building the CUDA sources' CPU emulation)
from error_budget import check_budget
from oob_guard import GuardedAlloc

# The module itself (the package re-exports a *function* named rms_norm, which shadows the
# submodule attribute, so `import nanofast.kernels.rms_norm as rn` would bind the function).
rn = importlib.import_module("nanofast.kernels.rms_norm")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_ID = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# (FACTOR, ATOL) per dtype and direction. fp32/fp16: the kernel rounds exactly where the torch
# reference does (fp32 maths, one rounding), so twice torch's error plus a little fp32 slack.
# bf16: the Triton interpreter converts fp32 -> bf16 by truncation (round toward zero; the GPU's
# cvt rounds to nearest even), so a bf16 output may sit one bf16 ulp (2^-7 relative) from the
# exact value even where torch's rounding happens to be exact: ATOL = 2^-7 covers that ulp.
# Measured worst ATOL needed over this file's cases: fwd 0 (fp32, fp16), bwd 1.7e-8 (fp32) and
# 3.9e-8 (fp16), bf16 7.2e-3 (< 2^-7).
BUDGET = {
    "fwd": {torch.float32: (2.0, 1e-7), torch.float16: (2.0, 1e-6), torch.bfloat16: (2.0, 2.0 ** -7)},
    # Backward: the row reduction mean(g * hhat) and the dW column sums are fp32 sums in a
    # different order from torch's, an error that grows like sqrt(D) resp. sqrt(N) fp32 ulps.
    "bwd": {torch.float32: (2.0, 2e-7), torch.float16: (2.0, 1e-6), torch.bfloat16: (2.0, 2.0 ** -7)},
}

SHAPES = [(1, 1), (3, 5), (7, 33), (2, 3, 129), (4, 1000), (40, 64), (33, 100), (3, 2048), (2, 3000)]
# (weight, residual)
VARIANTS = [(False, False), (True, False), (False, True), (True, True)]
VAR_ID = {(False, False): "plain", (True, False): "w", (False, True): "res", (True, True): "w+res"}


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype, gen, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def _ref64(h: torch.Tensor, weight, eps: float, dy: torch.Tensor, dh):
    """Exact maths (fp64) on the rounded inputs: y, dh_total (= dx), dw."""
    h64 = h.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_() if weight is not None else None
    y64 = h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + eps)
    if w64 is not None:
        y64 = y64 * w64
    y64.backward(dy.double())
    dx64 = h64.grad + (dh.double() if dh is not None else 0)
    return y64.detach(), dx64, (w64.grad if w64 is not None else None)


_check_budget = functools.partial(check_budget, BUDGET)


def _run(backend, x, w, r, eps, dy, dh):
    """Forward + backward through the functional API; returns outputs and gradients."""
    xs = x.detach().clone().requires_grad_()
    ws = w.detach().clone().requires_grad_() if w is not None else None
    rs = r.detach().clone().requires_grad_() if r is not None else None
    out = rms_norm(xs, ws, eps, rs, backend=backend)
    if rs is None:
        y, h = out, None
        torch.autograd.backward([y], [dy])
    else:
        y, h = out
        torch.autograd.backward([y, h], [dy, dh])
    return (y.detach(), None if h is None else h.detach(), xs.grad, None if ws is None else ws.grad,
            None if rs is None else rs.grad)


# ------------------------------------------------------------------------------------------------
# Reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("with_weight", [False, True])
def test_reference_reproduces_f_rms_norm(dtype, with_weight):
    g = _seeded(1)
    # Small-norm rows make eps visible: fp16/bf16 inputs must use fp32's epsilon, as ATen does.
    x = torch.cat([_randn((5, 77), dtype, g), _randn((3, 77), dtype, g, scale=3e-4)])
    w = _randn((77,), dtype, g) if with_weight else None
    expected = F.rms_norm(x, (77,), w)
    assert torch.equal(rms_norm_reference(x, w), expected)
    assert torch.equal(rms_norm(x, w, backend="torch"), expected)
    assert default_eps(dtype) == (torch.finfo(torch.float64).eps if dtype == torch.float64
                                  else torch.finfo(torch.float32).eps)


def test_reference_residual_and_fp64():
    g = _seeded(2)
    x, r = _randn((4, 9), torch.float64, g), _randn((4, 9), torch.float64, g)
    y, h = rms_norm_reference(x, None, 1e-6, r)
    assert torch.equal(h, x + r)
    torch.testing.assert_close(y, F.rms_norm(x + r, (9,), eps=1e-6), rtol=1e-15, atol=1e-15)
    assert default_eps(torch.float64) == torch.finfo(torch.float64).eps


# ------------------------------------------------------------------------------------------------
# Triton kernels (interpreted) vs reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS, ids=VAR_ID.get)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_reference(shape, dtype, variant):
    with_weight, with_residual = variant
    D = shape[-1]
    g = _seeded(hash((shape, variant)) % 1000)
    x = _randn(shape, dtype, g)
    w = (1 + 0.5 * torch.randn(D, generator=g)).to(dtype) if with_weight else None
    r = _randn(shape, dtype, g) if with_residual else None
    dy, dh = _randn(shape, dtype, g), (_randn(shape, dtype, g) if with_residual else None)
    eps = 1e-5

    y_k, h_k, dx_k, dw_k, dr_k = _run("triton", x, w, r, eps, dy, dh)
    y_t, h_t, dx_t, dw_t, dr_t = _run("torch", x, w, r, eps, dy, dh)

    h = x if r is None else x + r  # contract: h rounded in x's dtype
    if r is not None:
        assert h_k.dtype == dtype and h_k.shape == x.shape
        if dtype == torch.bfloat16:  # interpreter truncates fp32 -> bf16 (see BUDGET)
            torch.testing.assert_close(h_k, h, rtol=2.0 ** -7, atol=0)
        else:
            assert torch.equal(h_k, h)
    y64, dx64, dw64 = _ref64(h, w, eps, dy, dh)
    _check_budget("fwd", dtype, "y", y_k, y_t, y64)
    _check_budget("bwd", dtype, "dx", dx_k, dx_t, dx64)
    if with_residual:
        assert torch.equal(dr_k, dx_k)  # x and residual enter through h = x + residual
    if with_weight:
        _check_budget("bwd", dtype, "dw", dw_k, dw_t, dw64)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DT_ID.get)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_fp32_weight_with_16_bit_activations_and_an_offset(backend, dtype, offset, request):
    """Mixed precision as Hugging Face models and autocast hold it: fp32 weight, 16-bit x. The
    statistics and the product are fp32, the result is x's dtype, the weight's gradient fp32; the
    scale is (offset + w) summed in fp32 (Gemma: offset 1). Against fp64, within the budgets."""
    if backend == "cuda":
        request.getfixturevalue("emu")
    g = _seeded(7)
    shape, D = (3, 5, 96), 96
    x, r = _randn(shape, dtype, g), _randn(shape, dtype, g)
    w = 0.5 * torch.randn(D, generator=g)  # fp32
    dy, dh = _randn(shape, dtype, g), _randn(shape, dtype, g)

    def run(be):
        xs, rs, ws = (t.clone().requires_grad_() for t in (x, r, w))
        y, h = rms_norm(xs, ws, 1e-6, rs, backend=be, offset=offset)
        torch.autograd.backward([y, h], [dy, dh])
        assert y.dtype == dtype and h.dtype == dtype and ws.grad.dtype == torch.float32
        return y.detach(), xs.grad, ws.grad

    y_k, dx_k, dw_k = run(backend)
    y_t, dx_t, dw_t = run("torch")
    y64, dx64, dw64 = _ref64(x + r, w.double() + offset, 1e-6, dy, dh)
    _check_budget("fwd", dtype, "y", y_k, y_t, y64)
    _check_budget("bwd", dtype, "dx", dx_k, dx_t, dx64)
    # dw is fp32, summed over rows of the h the forward rounded to x's dtype: the input dtype's
    # budget (the interpreter truncates that bf16 h, see BUDGET).
    _check_budget("bwd", dtype, "dw", dw_k, dw_t, dw64)


def test_module_under_autocast_keeps_fp32_parameters():
    """nanofast's RMSNorm in the standard mixed-precision set-up: fp32 parameters, bf16 autocast."""
    m = RMSNorm(16, eps=1e-6)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x.bfloat16())
    assert y.dtype == torch.bfloat16 and m.weight.dtype == torch.float32
    torch.testing.assert_close(y, rms_norm_reference(x.bfloat16(), m.weight, 1e-6))
    gemma = RMSNorm(16, eps=1e-6, offset=1.0)
    assert torch.equal(gemma.weight, torch.zeros(16)) and torch.equal(gemma(x), rms_norm_reference(x, None, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_triton_wide_rows_chunked_paths(dtype):
    """D > 8192 takes the chunked backward (row-dot kernel + column-chunk grid); D > 16384 the
    two-pass forward. Few rows: the interpreter costs ~1 ms per 4096 columns."""
    g = _seeded(3)
    for shape in [(3, 9001), (2, 16500)]:
        D = shape[-1]
        x, r = _randn(shape, dtype, g), _randn(shape, dtype, g)
        w = (1 + 0.5 * torch.randn(D, generator=g)).to(dtype)
        # dy correlated with h makes mean(g * hhat) O(1) rather than O(1/sqrt(D)), so an error in
        # the row reduction (the separate row-dot kernel on this path) is visible in dx.
        dy, dh = (0.5 * (x.float() + r.float()) + torch.randn(shape, generator=g)).to(dtype), _randn(shape, dtype, g)
        y_k, h_k, dx_k, dw_k, _ = _run("triton", x, w, r, 1e-6, dy, dh)
        y_t, _, dx_t, dw_t, _ = _run("torch", x, w, r, 1e-6, dy, dh)
        y64, dx64, dw64 = _ref64(x + r, w, 1e-6, dy, dh)
        _check_budget("fwd", dtype, f"y {shape}", y_k, y_t, y64)
        _check_budget("bwd", dtype, f"dx {shape}", dx_k, dx_t, dx64)
        _check_budget("bwd", dtype, f"dw {shape}", dw_k, dw_t, dw64)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_triton_default_eps_matches_f_rms_norm(dtype):
    """nanochat's F.rms_norm(x, (D,)): default eps, tiny-norm rows where eps matters."""
    g = _seeded(4)
    x = torch.cat([_randn((3, 96), dtype, g), _randn((2, 96), dtype, g, scale=1e-4)])
    y_k = rms_norm(x, backend="triton")
    y_f = F.rms_norm(x, (96,))
    y64 = (lambda h: h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + default_eps(dtype)))(x.double())
    _check_budget("fwd", dtype, "y", y_k, y_f, y64)


def test_non_contiguous_rows_bitwise_equal_contiguous():
    """Row strides (padded rows, stride-0 rows, strided leading dims) change addressing only: the
    results must be bitwise those of contiguous copies."""
    g = _seeded(5)
    N, D = 9, 37
    dtype = torch.float16
    x = _randn((N, D + 11), dtype, g)[:, 5:5 + D]
    r = _randn((N, 2 * D), dtype, g)[:, :D]
    w = _randn((D,), dtype, g)
    dy = _randn((N, D + 3), dtype, g)[:, 1:1 + D]
    dh = _randn((N, D + 8), dtype, g)[:, :D]
    assert not x.is_contiguous() and not dy.is_contiguous()
    got = _run("triton", x, w, r, 1e-6, dy, dh)
    want = _run("triton", x.contiguous(), w, r.contiguous(), 1e-6, dy.contiguous(), dh.contiguous())
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    # Launcher level with stride-0 (broadcast) rows and an odd row stride.
    row = _randn((1, D), dtype, g)
    y0, rstd0, _ = rms_norm_fwd_triton(row.expand(4, D), None, None, 1e-6)
    y1, rstd1, _ = rms_norm_fwd_triton(row.repeat(4, 1), None, None, 1e-6)
    assert torch.equal(y0, y1) and torch.equal(rstd0, rstd1)
    # Strided leading dims (reshape has to copy) and a transposed 3-D input.
    x3 = _randn((4, 3, D), dtype, g)[::2]
    xt = _randn((3, 2, D), dtype, g).transpose(0, 1)
    for t in (x3, xt):
        assert torch.equal(rms_norm(t, w, backend="triton"), rms_norm(t.contiguous(), w, backend="triton"))


def test_expanded_gradient_from_sum():
    """y.sum().backward() hands the op an all-stride-0 gradient; it must be accepted."""
    x = torch.randn(5, 24, requires_grad=True)
    w = torch.randn(24, requires_grad=True)
    rms_norm(x, w, backend="triton").sum().backward()
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    rms_norm_reference(xr, wr).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-5, atol=1e-5)


def test_empty_rows():
    for shape in [(0, 16), (2, 0, 8)]:
        x = torch.randn(shape, requires_grad=True)
        y = rms_norm(x, backend="triton")
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape


# ------------------------------------------------------------------------------------------------
# Out-of-bounds protection: poisoned guard bands
# ------------------------------------------------------------------------------------------------

GUARD_SENTINEL = -4096.0  # exact in fp32, fp16 and bf16; far from any RMSNorm output


def _poisoned(t: torch.Tensor) -> torch.Tensor:
    """t's values in a view whose surroundings (pad columns, rows before/after) are NaN: a read
    outside the view poisons the result."""
    if t.ndim == 2:
        n, d = t.shape
        buf = torch.full((n + 2, d + 7), float("nan"), dtype=t.dtype)
        view = buf[1:n + 1, 3:3 + d]
    else:
        buf = torch.full((t.shape[0] + 8,), float("nan"), dtype=t.dtype)
        view = buf[4:4 + t.shape[0]]
    view.copy_(t)
    return view


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("N,D", [(1, 1), (33, 100), (5, 129), (3, 9001), (2, 16500)])
def test_poisoned_guard_bands(monkeypatch, N, D, dtype):
    g = _seeded(6)
    x, r, dy, dh = (_randn((N, D), dtype, g) for _ in range(4))
    w = _randn((D,), dtype, g)
    # Unpoisoned run first (plain allocator, contiguous inputs): the expected values.
    y0, rstd0, h0 = rms_norm_fwd_triton(x, w, r, 1e-6)
    dx0, dw0 = rms_norm_bwd_triton(dy, h0, rstd0, w, dh)
    alloc = GuardedAlloc(GUARD_SENTINEL, require_finite=True)
    monkeypatch.setattr(rn, "_alloc", alloc)
    y, rstd, h = rms_norm_fwd_triton(_poisoned(x), _poisoned(w), _poisoned(r), 1e-6)
    dx, dw = rms_norm_bwd_triton(_poisoned(dy), _poisoned(h), _poisoned(rstd), _poisoned(w), _poisoned(dh))
    alloc.check()
    for got, want in [(y, y0), (rstd, rstd0), (h, h0), (dx, dx0), (dw, dw0)]:
        assert torch.equal(got, want)
    # The plain variants (no weight / residual / dh): pointers are None, nothing else may change.
    yp, rstdp, hp = rms_norm_fwd_triton(_poisoned(x), None, None, 1e-6)
    dxp, dwp = rms_norm_bwd_triton(_poisoned(dy), _poisoned(x), _poisoned(rstdp), None, None)
    assert hp is None and dwp is None
    alloc.check()


# ------------------------------------------------------------------------------------------------
# Determinism, purity
# ------------------------------------------------------------------------------------------------

def test_dw_deterministic_partials(monkeypatch):
    """dW = fixed-order sum of per-CTA fp32 partials: every partial row written once (no NaN left
    in a poisoned buffer), dw equals their sum bitwise, and two runs agree bitwise."""
    g = _seeded(7)
    N, D = 300, 48  # BLOCK_N = 64 rows -> 5 row blocks over 4 CPU programs: CTA 0 visits 2 blocks
    dy, h = _randn((N, D), torch.bfloat16, g), _randn((N, D), torch.bfloat16, g)
    w = _randn((D,), torch.bfloat16, g)
    _, rstd, _ = rms_norm_fwd_triton(h, w, None, 1e-6)
    alloc = GuardedAlloc(GUARD_SENTINEL, require_finite=True)
    monkeypatch.setattr(rn, "_alloc", alloc)
    dx1, dw1 = rms_norm_bwd_triton(dy, h, rstd, w, None)
    alloc.check()
    partials = [v for _, v in alloc.buffers if v.dtype == torch.float32 and v.ndim == 2]
    assert len(partials) == 1 and partials[0].shape == (rn._CPU_BWD_PROGRAMS, D)
    assert torch.equal(dw1, partials[0].sum(0).to(torch.bfloat16))
    dx2, dw2 = rms_norm_bwd_triton(dy, h, rstd, w, None)
    assert torch.equal(dx1, dx2) and torch.equal(dw1, dw2)


def test_inputs_not_mutated():
    g = _seeded(8)
    x, r, w = _randn((6, 50), torch.float16, g), _randn((6, 50), torch.float16, g), _randn((50,), torch.float16, g)
    dy, dh = _randn((6, 50), torch.float16, g), _randn((6, 50), torch.float16, g)
    before = [t.clone() for t in (x, r, w, dy, dh)]
    y, rstd, h = rms_norm_fwd_triton(x, w, r, 1e-6)
    h_before, rstd_before = h.clone(), rstd.clone()
    rms_norm_bwd_triton(dy, h, rstd, w, dh)
    rms_norm_bwd_triton(dy, x, rstd, None, None)
    _run("triton", x, w, r, 1e-6, dy, dh)
    for a, b in zip((x, r, w, dy, dh, h, rstd), before + [h_before, rstd_before]):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

def _bad_cases():
    x = torch.randn(4, 8)
    return [
        (lambda: rms_norm([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
        (lambda: rms_norm(torch.ones(4, 8, dtype=torch.int32)), TypeError, "x must have a floating dtype"),
        (lambda: rms_norm(torch.randn(4, 0)), ValueError, "non-empty last dim"),
        (lambda: rms_norm(torch.tensor(1.0)), ValueError, "at least 1 dim"),
        (lambda: rms_norm(torch.randn(8, 4).t()), ValueError, "contiguous last dim"),
        (lambda: rms_norm(x, torch.randn(7)), ValueError, r"weight must have shape \(8,\)"),
        (lambda: rms_norm(x, torch.randn(8, 1)), ValueError, r"weight must have shape \(8,\)"),
        (lambda: rms_norm(x, torch.ones(8, dtype=torch.int32)), TypeError, "weight must have a floating dtype"),
        (lambda: rms_norm(x, torch.ones(8).double(), backend="triton"), TypeError, "x and weight must be float16"),
        (lambda: rms_norm(x, offset=1.0), ValueError, r"offset=1.0 scales by \(offset \+ weight\): it needs a weight"),
        (lambda: rms_norm(x, torch.ones(8), offset=float("nan")), ValueError, "offset must be a finite"),
        (lambda: RMSNorm(8, offset=1.0, elementwise_affine=False), ValueError, "needs elementwise_affine=True"),
        (lambda: rms_norm_fwd_triton(x, torch.ones(8, dtype=torch.int32), None, 1e-6), TypeError,
         "weight must be float16, bfloat16 or float32"),
        (lambda: rms_norm(x, torch.randn(8, device="meta")), ValueError, "weight must be on x's device"),
        (lambda: rms_norm(x, "w"), TypeError, "weight must be a torch.Tensor"),
        (lambda: rms_norm(x, residual=torch.randn(4, 7)), ValueError, r"residual must have x's shape \(4, 8\)"),
        (lambda: rms_norm(x, residual=torch.randn(4, 8).half()), TypeError, "residual must have x's dtype"),
        (lambda: rms_norm(x, residual=torch.randn(8, 4).t()), ValueError, "residual must have a contiguous last"),
        (lambda: rms_norm(x, eps=-1.0), ValueError, "eps must be a real number >= 0"),
        (lambda: rms_norm(x, eps="1e-6"), ValueError, "eps must be"),
        (lambda: rms_norm(x, backend="cudnn"), ValueError, "backend must be one of"),
        (lambda: rms_norm(x.double(), backend="triton"), TypeError, "backend='triton'"),
        (lambda: rms_norm(x.double(), backend="cuda"), TypeError, "backend='cuda'"),
        (lambda: RMSNorm(0), ValueError, "dim must be an int >= 1"),
        # Launcher level (the 2-D contract).
        (lambda: rms_norm_fwd_triton(torch.randn(8), None, None, 1e-6), ValueError, r"x must be a 2-D tensor"),
        (lambda: rms_norm_fwd_triton(torch.randn(8, 4).t(), None, None, 1e-6), ValueError, "x must have a contiguous"),
        (lambda: rms_norm_fwd_triton(x, torch.randn(3), None, 1e-6), ValueError, r"weight must have shape \(8,\)"),
        (lambda: rms_norm_fwd_triton(x, torch.randn(16)[::2], None, 1e-6), ValueError, "weight must be contiguous"),
        (lambda: rms_norm_bwd_triton(x.half(), x, torch.ones(4), None, None), TypeError, "dy must have dtype"),
        (lambda: rms_norm_bwd_triton(x, x, torch.ones(5), None, None), ValueError, r"rstd must have shape \(4,\)"),
        (lambda: rms_norm_bwd_triton(x, x, torch.ones(4), None, torch.randn(4, 9)), ValueError, r"dh must have shape"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_raises_clear_errors(case):
    fn, exc, match = _bad_cases()[case]
    with pytest.raises(exc, match=match):
        fn()


# ------------------------------------------------------------------------------------------------
# Module
# ------------------------------------------------------------------------------------------------

def test_rms_norm_module():
    g = _seeded(9)
    m = RMSNorm(24, eps=1e-6, backend="triton")
    assert m.weight.shape == (24,) and torch.equal(m.weight.detach(), torch.ones(24))
    with torch.no_grad():
        m.weight.copy_(torch.randn(24, generator=g))
    x = torch.randn(2, 3, 24, generator=g, requires_grad=True)
    r = torch.randn(2, 3, 24, generator=g)
    y, h = m(x, r)
    y_ref, h_ref = rms_norm_reference(x, m.weight, 1e-6, r)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(h, h_ref)
    (y * y_ref.detach()).sum().backward()
    assert m.weight.grad is not None and x.grad is not None
    plain = RMSNorm(24, elementwise_affine=False)
    assert plain.weight is None and list(plain.parameters()) == []
    assert torch.equal(plain(x.detach()), F.rms_norm(x.detach(), (24,)))  # backend None on CPU = torch


# ------------------------------------------------------------------------------------------------
# torch.library registration: opcheck and torch.compile
# ------------------------------------------------------------------------------------------------

def test_opcheck_custom_ops():
    g = _seeded(10)
    x, r = _randn((5, 24), torch.float32, g), _randn((5, 24), torch.float32, g)
    w = _randn((24,), torch.float32, g)
    xs = _randn((5, 40), torch.float16, g)[:, 3:27]  # non-contiguous rows
    fwd, bwd = torch.ops.nanofast.rms_norm_fwd.default, torch.ops.nanofast.rms_norm_bwd.default
    for args in [(x, w, r, 1e-6, "triton"), (x, None, None, 1e-5, "triton"), (xs, None, xs, 1e-6, "triton"),
                 (x.clone().requires_grad_(), w.clone().requires_grad_(), r.clone().requires_grad_(), 1e-6, "triton")]:
        torch.library.opcheck(fwd, args)
    _, rstd, _ = rms_norm_fwd_triton(x, w, None, 1e-6)
    dy = _randn((5, 24), torch.float32, g)
    for args in [(dy, x, rstd, w, r, "triton"), (dy, x, rstd, None, None, "triton")]:
        torch.library.opcheck(bwd, args)


def test_torch_compile_fullgraph_matches_eager(monkeypatch):
    calls = {"fwd": 0, "bwd": 0}

    def counting(name, fn):
        def wrapper(*args):
            calls[name] += 1
            return fn(*args)
        return wrapper

    monkeypatch.setattr(rn.TRITON_LAUNCHERS, "fwd", counting("fwd", rn.TRITON_LAUNCHERS.fwd))
    monkeypatch.setattr(rn.TRITON_LAUNCHERS, "bwd", counting("bwd", rn.TRITON_LAUNCHERS.bwd))

    def block(x, w, r):
        a = rms_norm(x, backend="triton")  # nanochat's parameter-free norm
        y, h = rms_norm(a * 2.0, w, residual=r, backend="triton")
        return (y * y).sum() + (h * 0.5).sum()

    g = _seeded(11)
    inputs = [torch.randn(2, 3, 40, generator=g), torch.randn(40, generator=g), torch.randn(2, 3, 40, generator=g)]
    eager = [t.clone().requires_grad_() for t in inputs]
    comp = [t.clone().requires_grad_() for t in inputs]
    block(*eager).backward()
    calls.update(fwd=0, bwd=0)
    torch._dynamo.reset()
    loss = torch.compile(block, fullgraph=True)(*comp)
    loss.backward()
    assert calls == {"fwd": 2, "bwd": 2}, calls  # the compiled graph ran the Triton ops
    for a, b in zip(comp, eager):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Compile gate: the exact H100 configurations, compiled for sm_90 (and sm_80), machine code read
# ------------------------------------------------------------------------------------------------

# Occupancy bound: <= 64 registers/thread keeps >= 1024 threads (50% of an SM's 2048) resident,
# whatever the CTA size (65536 registers per SM). A memory-bound kernel needs the warps to hide
# DRAM latency; the measured values are 32-64.
MAX_REGISTERS = 64
SM80_CONFIGS = [2, 11]  # fwd D=768 bf16; bwd D=1536 bf16 +w +dh
gate_facts = gate_facts_fixture("nanofast.kernels.rms_norm", sm80=SM80_CONFIGS)


def test_kernel_configs_cover_nanochat_and_match_kernels():
    widths = {c["config"].split()[1] for c in KERNEL_CONFIGS}
    assert widths >= {f"D={d}" for d in (128, 768, 1280, 1536, 1664, 4096, 16384)}
    assert {c["signature"].get("X", c["signature"].get("Hs")) for c in KERNEL_CONFIGS} == {"*bf16", "*fp16", "*fp32"}
    assert 15 <= len(KERNEL_CONFIGS) <= 24
    assert "bwd D=1536 bf16 +w +dh" in KERNEL_CONFIGS[SM80_CONFIGS[1]]["config"]
    for c in KERNEL_CONFIGS:
        # Every kernel argument is described, in order, and the meta-parameters are the launcher's.
        assert list(c["signature"]) == list(c["fn"].arg_names), c["config"]
        D = int(c["config"].split()[1][2:])
        meta = rn._fwd_meta(D) if c["fn"].__name__ == "_rms_norm_fwd_kernel" else rn._bwd_meta(D)
        assert c["num_warps"] == meta["num_warps"]
        assert all(c["constexprs"][k] == meta[k] for k in ("BLOCK_N", "BLOCK_D"))


def _check_facts(cfg: dict, f: dict, arch: int) -> None:
    where = check_common_facts(cfg, f, arch, MAX_REGISTERS)
    # 128-bit vector loads: every config's D and row strides are multiples of 16 and its pointers
    # 16-byte aligned (as Triton specialises real nanochat calls).
    assert f["instructions"].get("LDG.E.128", 0) > 0, where
    if cfg["fn"].__name__ != "_rms_norm_bwd_rowdot_kernel":  # the row-dot kernel stores one float per row
        assert f["instructions"].get("STG.E.128", 0) > 0, where
    # Deterministic dW by construction: stores only, no atomic read-modify-write anywhere.
    assert f["stores"] > 0 and f["atomics"] == 0, where
    # row * row_stride is multiplied in 64 bits (N * D exceeds 2^31 at nanochat scale; the
    # interpreter cannot show this: it would need > 2^31-element tensors).
    assert f["i64_muls"] > 0, where


test_compile_gate_sm90, test_compile_gate_sm80 = gate_tests(KERNEL_CONFIGS, SM80_CONFIGS, _check_facts)
