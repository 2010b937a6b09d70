"""csrc/rms_norm.cu: the CUDA RMSNorm (forward with optional residual and weight, backward with the
dw column sum), executed on the CPU through the emulation (csrc/cuda_emu.h) against fp64 references
written here and against nanofast.kernels.rms_norm(..., backend="cuda"), on awkward shapes and
layouts, fp32/fp16/bf16, with NaN guard bands around outputs, NaN-poisoned row padding around inputs,
determinism and no-mutation checks. Its nvcc facts, argument errors and empty-input launches are in
tests/test_cuda_kernels.py with the other sources'.

Error budget: max|kernel - ref_fp64| <= 2 * max|torch_lowprec - ref_fp64| + atol(dtype) * max|ref|,
where torch_lowprec is the same maths done by torch in fp32 and rounded to the input dtype once
(tests/cuda_emu_helpers.py).
"""
from __future__ import annotations

import pytest
import torch

from nanofast.kernels import rms_norm_cuda as rn_cuda

from cuda_emu_helpers import (DT_ID, DTYPES, _assert_budget, _assert_guards, _bits, _case_id, _guarded, _module,
                              _rows_view, _weight, emu)  # noqa: F401 (emu: the fixture)


# ------------------------------------------------------------------------------------------------ RMSNorm

def rms_ref64(x, weight, residual, eps):
    """fp64 reference on the contract's h (x + residual rounded to x's dtype, as torch does)."""
    h = x if residual is None else x + residual
    h64 = h.double()
    rstd = torch.rsqrt(h64.pow(2).mean(-1) + eps)
    y = h64 * rstd[:, None]
    if weight is not None:
        y = y * weight.double()
    return y, rstd, h


def rms_lowp(x, weight, residual, eps):
    h = x if residual is None else x + residual
    hf = h.float()
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def rms_bwd_ref(dy, h, weight, dh, eps, dtype):
    """(dx, dw) in fp64 and through torch fp32 autograd rounded to the output dtypes."""
    res = []
    for prec in (torch.float64, torch.float32):
        hp = h.to(prec).requires_grad_()
        wp = weight.to(prec).requires_grad_() if weight is not None else None
        y = hp * torch.rsqrt(hp.pow(2).mean(-1, keepdim=True) + eps)
        if wp is not None:
            y = y * wp
        y.backward(dy.to(prec))
        dx = hp.grad + (dh.to(prec) if dh is not None else 0)
        dw = wp.grad if wp is not None else None
        if prec == torch.float32:
            dx = dx.to(dtype)
            dw = dw.to(weight.dtype) if dw is not None else None
        res.append((dx, dw))
    return res


# (N, D, layout). The CPU emulation runs 3 persistent backward blocks, so N > 3 makes blocks loop over
# rows and accumulate dw; D covers one and two register chunks per thread and the streaming path
# (> 512 chunks), vectorised (contig / padded) and scalar (odd).
RMS_CASES = [(1, 1, "contig"), (3, 7, "odd"), (4, 64, "contig"), (4, 64, "padded"), (5, 37, "odd"),
             (2, 520, "padded"), (7, 1030, "odd"), (2, 2304, "contig"), (5, 4100, "padded")]
RMS_VARIANTS = [(None, False), ("same", True), ("fp32", False), ("bf16", True)]  # (weight dtype, residual)


@pytest.mark.parametrize("variant", RMS_VARIANTS, ids=lambda v: f"w{v[0]}-res{int(v[1])}")
@pytest.mark.parametrize("case", RMS_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_rms_norm_forward_backward(emu, dtype, case, variant):
    N, D, layout = case
    wkind, with_res = variant
    gen = torch.Generator().manual_seed(N * 1000 + D)
    x, xbuf = _rows_view(N, D, dtype, layout, gen)
    if N == 3 and D == 7:
        x[1] = 0  # an all-zero row: rstd = 1/sqrt(eps), y = 0
    res, rbuf = _rows_view(N, D, dtype, layout, gen) if with_res else (None, None)
    w = _weight(wkind, D, dtype, gen)
    eps = 1e-5
    before = [_bits(t) for t in (xbuf, rbuf, w) if t is not None]

    y, rstd, h = rn_cuda.rms_norm_fwd_cuda(x, w, res, eps)
    y64, rstd64, h_ref = rms_ref64(x, w, res, eps)
    assert y.dtype == dtype and y.is_contiguous() and rstd.dtype == torch.float32 and rstd.shape == (N,)
    _assert_budget(y, y64, rms_lowp(x, w, res, eps), dtype, "y")
    hf = (x if res is None else x + res).float()
    _assert_budget(rstd, rstd64, torch.rsqrt(hf.pow(2).mean(-1) + eps), torch.float32, "rstd")
    if with_res:
        assert h.dtype == dtype and h.is_contiguous()
        assert torch.equal(_bits(h), _bits(h_ref)), "h must be x + residual rounded exactly as torch rounds it"
    else:
        assert h is None

    # backward: dy with its own padded layout, dh when there is a residual stream
    dy, dybuf = _rows_view(N, D, dtype, layout, gen)
    dh = _rows_view(N, D, dtype, "contig", gen)[0] if with_res else None
    hs = h if with_res else x
    before += [_bits(t) for t in (dybuf, rstd, dh) if t is not None]
    dx, dw = rn_cuda.rms_norm_bwd_cuda(dy, hs, rstd, w, dh)
    (dx64, dw64), (dx32, dw32) = rms_bwd_ref(dy, hs, w, dh, eps, dtype)
    assert dx.dtype == dtype and dx.is_contiguous()
    _assert_budget(dx, dx64, dx32, dtype, "dx")
    if w is None:
        assert dw is None
    else:
        assert dw.dtype == w.dtype and dw.shape == (D,)
        _assert_budget(dw, dw64, dw32, w.dtype, "dw")
        dx2, dw2 = rn_cuda.rms_norm_bwd_cuda(dy, hs, rstd, w, dh)  # deterministic: bit-identical reruns
        assert torch.equal(_bits(dw2), _bits(dw)) and torch.equal(_bits(dx2), _bits(dx))
    after = [_bits(t) for t in (xbuf, rbuf, w, dybuf, rstd, dh) if t is not None]
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "an input was modified"


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("D,pad", [(64, 8), (37, 3), (1030, 8), (2304, 3)])
def test_rms_norm_writes_only_its_outputs(emu, dtype, D, pad):
    """Outputs inside NaN guard bands (row padding, a guard row before and after, rstd/dw guards):
    every output element is written, no guard element is."""
    N = 5
    gen = torch.Generator().manual_seed(D)
    x = torch.randn(N, D, generator=gen).to(dtype)
    res = torch.randn(N, D, generator=gen).to(dtype)
    w = torch.randn(D, generator=gen).to(dtype)
    y, ybuf, ymask = _guarded((N, D), dtype, pad)
    h, hbuf, hmask = _guarded((N, D), dtype, pad)
    rstd, rbuf, rmask = _guarded((N,), torch.float32, 0)
    rn_cuda.fwd_into(x, w, res, 1e-5, y, rstd, h)
    for buf, mask, name in ((ybuf, ymask, "y"), (hbuf, hmask, "h"), (rbuf, rmask, "rstd")):
        _assert_guards(buf, mask, name)
    # Padding that keeps rows 16-byte aligned keeps the launch identical to the contiguous one (bit
    # equality); other padding takes the scalar path, whose reduction order differs in the last bits.
    same_path = pad % (16 // x.element_size()) == 0

    def same(a, b):
        if same_path:
            assert torch.equal(_bits(a), _bits(b))
        else:
            torch.testing.assert_close(a, b)

    y_ref, rstd_ref, h_ref = rn_cuda.rms_norm_fwd_cuda(x, w, res, 1e-5)
    same(y, y_ref)
    same(rstd, rstd_ref)
    assert torch.equal(_bits(h), _bits(h_ref))  # an elementwise add: no reduction order

    dy = torch.randn(N, D, generator=gen).to(dtype)
    dx, dxbuf, dxmask = _guarded((N, D), dtype, pad)
    dw, dwbuf, dwmask = _guarded((D,), dtype, 0)
    rn_cuda.bwd_into(dy, h_ref, rstd_ref, w, res, dx, dw)
    _assert_guards(dxbuf, dxmask, "dx")
    _assert_guards(dwbuf, dwmask, "dw")
    dx_ref, dw_ref = rn_cuda.rms_norm_bwd_cuda(dy, h_ref, rstd_ref, w, res)
    same(dx, dx_ref)
    same(dw, dw_ref)


@pytest.mark.parametrize("D", [40, 3000])
def test_rms_norm_dw_partials_any_block_count(emu, D):
    """dw is the same sum whatever the number of persistent blocks (1 block = one sequential sum)."""
    N = 9
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(N, D, generator=gen)
    dy = torch.randn(N, D, generator=gen)
    w = torch.randn(D, generator=gen)
    _, rstd, _ = rn_cuda.rms_norm_fwd_cuda(h, w, None, 1e-6)
    results = []
    for g in (1, 2, 9):
        dx = torch.empty(N, D)
        dw = torch.empty(D)
        rn_cuda.bwd_into(dy, h, rstd, w, None, dx, dw, num_partials=g)
        results.append((dx, dw))
    for dx, dw in results[1:]:
        assert torch.equal(dx, results[0][0])  # rows are independent of the partition
        torch.testing.assert_close(dw, results[0][1], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ vs the Triton engineers' modules

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("shape,with_res", [((3, 37), False), ((2, 3, 64), True), ((4, 1030), True)])
def test_rms_norm_public_api_cuda_backend(emu, dtype, shape, with_res):
    """nanofast.kernels.rms_norm(..., backend="cuda") forward and autograd backward, against that
    module's own reference in fp64 (the yardstick) and in the input dtype (torch_lowprec)."""
    m = _module("rms_norm")
    gen = torch.Generator().manual_seed(7)
    D = shape[-1]
    x = torch.randn(*shape, generator=gen).to(dtype).requires_grad_()
    res = torch.randn(*shape, generator=gen).to(dtype).requires_grad_() if with_res else None
    w = (1 + 0.5 * torch.randn(D, generator=gen)).to(dtype).requires_grad_()
    eps = 1e-5
    out = m.rms_norm(x, w, eps, res, backend="cuda")
    y = out[0] if with_res else out
    h = (x + res if with_res else x).detach()  # the contract normalises h rounded to x's dtype
    if with_res:
        assert torch.equal(out[1], h)
    dy = torch.randn(*shape, generator=gen).to(dtype)
    (y.float() * dy.float()).sum().backward()
    refs = {}
    for prec in (torch.float64, dtype):
        hp = h.to(prec).requires_grad_()
        wp = w.detach().to(prec).requires_grad_()
        yp = m.rms_norm_reference(hp, wp, eps)
        (yp.double() * dy.double()).sum().backward()
        refs[prec] = (yp.detach(), hp.grad, wp.grad)
    _assert_budget(y, refs[torch.float64][0], refs[dtype][0], dtype, "rms_norm(backend='cuda') y")
    _assert_budget(x.grad, refs[torch.float64][1], refs[dtype][1], dtype, "rms_norm(backend='cuda') dx")
    _assert_budget(w.grad, refs[torch.float64][2], refs[dtype][2], dtype, "rms_norm(backend='cuda') dw")
    if with_res:  # x and residual enter through h = x + residual: the same gradient
        assert torch.equal(res.grad, x.grad)
