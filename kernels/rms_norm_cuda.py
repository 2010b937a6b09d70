"""RMSNorm (with a fused residual add) by csrc/rms_norm.cu.

`rms_norm_fwd_cuda / rms_norm_bwd_cuda` check their arguments (a drop-in API of their own); `fwd /
bwd` trust them: the op's "cuda" launchers, which its public entry runs after validating once (see
cuda_args.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .cuda_abi import DTYPE_CODES, RmsNormBwdArgs, RmsNormFwdArgs
from .cuda_args import (check_device, check_like, check_opt_tensor, check_real, check_rstd, check_shape,
                        check_tensor, persistent_blocks, ptr, wcode)
from .cuda_build import launch


def fwd_into(x: Tensor, weight: Tensor | None, residual: Tensor | None, eps: float, y: Tensor,
                       rstd: Tensor, h: Tensor | None) -> None:
    """Forward into caller-provided outputs (row strides free, last dim contiguous; rstd contiguous)."""
    N, D = x.shape
    if N == 0:
        return
    launch("nf_rms_norm_fwd", x.device, RmsNormFwdArgs(
        dtype=DTYPE_CODES[x.dtype], N=N, D=D, x=x.data_ptr(), x_stride=x.stride(0), residual=ptr(residual),
        residual_stride=residual.stride(0) if residual is not None else 0, weight=ptr(weight),
        weight_dtype=wcode(weight), y=y.data_ptr(), y_stride=y.stride(0), h=ptr(h),
        h_stride=h.stride(0) if h is not None else 0, rstd=rstd.data_ptr(), eps=eps))


def _check_fwd(x, weight, residual, eps) -> float:
    check_tensor("x", x, 2)
    if x.shape[1] == 0:
        raise ValueError(f"x must have a non-empty last dimension D, got shape {tuple(x.shape)}")
    check_opt_tensor("weight", weight, 1)
    check_opt_tensor("residual", residual, 2)
    check_device(x.device, weight=weight, residual=residual)
    if weight is not None:
        check_shape("weight", weight, (x.shape[1],))
    if residual is not None:
        check_like("residual", residual, x, "x")
    return check_real("eps", eps, nonneg=True)


def rms_norm_fwd_cuda(x: Tensor, weight: Tensor | None, residual: Tensor | None,
                      eps: float) -> tuple[Tensor, Tensor, Tensor | None]:
    """RMSNorm forward with an optional fused residual add, by the csrc/rms_norm.cu kernel.

    x: (N, D) float32/float16/bfloat16, any row stride, last dim contiguous. weight: (D,) of any of
    those dtypes, or None. residual: (N, D) in x's dtype, or None. Returns new contiguous tensors
    y (N, D) in x's dtype = (h * rstd) * weight, rstd (N,) float32 = 1 / sqrt(mean(h^2) + eps), and
    h = x + residual (N, D) in x's dtype, or None without a residual (then h is x itself). CPU
    tensors run through the CPU emulation of the same source.
    """
    return fwd(x, weight, residual, _check_fwd(x, weight, residual, eps))


def fwd(x: Tensor, weight: Tensor | None, residual: Tensor | None,
                  eps: float) -> tuple[Tensor, Tensor, Tensor | None]:
    """rms_norm_fwd_cuda for callers that validated the inputs (rms_norm's autograd path)."""
    N, D = x.shape
    if N > 2**31 - 1:  # a launch fact, not input validation: the grid has one block per row
        raise ValueError(f"x has {N} rows; one block per row allows at most 2**31 - 1")
    y = torch.empty((N, D), dtype=x.dtype, device=x.device)
    rstd = torch.empty((N,), dtype=torch.float32, device=x.device)
    h = torch.empty((N, D), dtype=x.dtype, device=x.device) if residual is not None else None
    fwd_into(x, weight, residual, eps, y, rstd, h)
    return y, rstd, h


def bwd_into(dy: Tensor, h: Tensor, rstd: Tensor, weight: Tensor | None, dh: Tensor | None, dx: Tensor,
                       dw: Tensor | None, num_partials: int | None = None) -> None:
    """Backward into caller-provided dx (row stride free) and dw (contiguous; required with weight)."""
    N, D = h.shape
    if N == 0:
        if dw is not None:
            dw.zero_()
        return
    G = num_partials if num_partials is not None else persistent_blocks(h.device, N, 2)
    partial = torch.empty((G, D), dtype=torch.float32, device=h.device) if weight is not None else None
    launch("nf_rms_norm_bwd", h.device, RmsNormBwdArgs(
        dtype=DTYPE_CODES[h.dtype], N=N, D=D, dy=dy.data_ptr(), dy_stride=dy.stride(0), h=h.data_ptr(),
        h_stride=h.stride(0), rstd=rstd.data_ptr(), weight=ptr(weight), weight_dtype=wcode(weight), dh=ptr(dh),
        dh_stride=dh.stride(0) if dh is not None else 0, dx=dx.data_ptr(), dx_stride=dx.stride(0),
        dw_partial=ptr(partial), num_partials=G, dw=ptr(dw)))


def _check_bwd(dy, h, rstd, weight, dh) -> Tensor:
    check_tensor("h", h, 2)
    if h.shape[1] == 0:
        raise ValueError(f"h must have a non-empty last dimension D, got shape {tuple(h.shape)}")
    check_tensor("dy", dy, 2)
    check_tensor("rstd", rstd, 1)
    check_opt_tensor("weight", weight, 1)
    check_opt_tensor("dh", dh, 2)
    check_device(h.device, dy=dy, rstd=rstd, weight=weight, dh=dh)
    check_like("dy", dy, h, "h")
    check_rstd("rstd", rstd, (h.shape[0],))
    if weight is not None:
        check_shape("weight", weight, (h.shape[1],))
    if dh is not None:
        check_like("dh", dh, h, "h")
    return rstd.contiguous()


def rms_norm_bwd_cuda(dy: Tensor, h: Tensor, rstd: Tensor, weight: Tensor | None,
                      dh: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """RMSNorm backward by the csrc/rms_norm.cu kernel.

    dy, h: (N, D) of one dtype (h as returned by the forward: x, or x + residual), any row stride,
    last dim contiguous; rstd (N,) float32 from the forward; weight (D,) or None; dh (N, D) in h's
    dtype or None: the gradient arriving at the returned residual stream. Returns dx (N, D) in h's
    dtype = rstd * (dy*w - hhat * mean(dy*w*hhat)) + dh with hhat = h * rstd, and dw (D,) in
    weight's dtype = sum over rows of dy * hhat (None without weight), summed deterministically:
    fp32 per-block partials added in a fixed order, no atomics.
    """
    return bwd(dy, h, _check_bwd(dy, h, rstd, weight, dh), weight, dh)


def bwd(dy: Tensor, h: Tensor, rstd: Tensor, weight: Tensor | None,
                  dh: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """rms_norm_bwd_cuda for callers that validated the inputs (rstd contiguous, as the forward makes it)."""
    N, D = h.shape
    dx = torch.empty((N, D), dtype=h.dtype, device=h.device)
    dw = torch.empty((D,), dtype=weight.dtype, device=h.device) if weight is not None else None
    bwd_into(dy, h, rstd, weight, dh, dx, dw)
    return dx, dw
