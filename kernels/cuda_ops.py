"""Launchers of the CUDA-source kernels in csrc/: RMSNorm, fused QK-norm + rotary, paged decode attention.

Each public `*_cuda` function checks its arguments, then hands over to a `_`-prefixed launcher
that trusts them (kernels/rms_norm.py and qk_norm_rope.py call those directly, having validated at
their own public entries). The launchers fill the launch function's argument struct (cuda_abi.py,
the mirror of csrc/nf_abi.h) and cuda_build.launch runs it on the tensors' device: the real kernels
for CUDA tensors, the CPU emulation of the same source for CPU tensors.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .cuda_abi import (DTYPE_CODES, PagedAttentionArgs, PagedKvWriteArgs, QkNormRopeBwdArgs, QkNormRopeFwdArgs,
                       RmsNormBwdArgs, RmsNormFwdArgs)
from . import vendor
from .cuda_build import launch
from .launch import sm_count
from .paged_attention import _check_plan, _plan_tensors, host_lengths, plan_paged_decode

__all__ = [
    "rms_norm_fwd_cuda", "rms_norm_bwd_cuda", "qk_norm_rope_fwd_cuda", "qk_norm_rope_bwd_cuda",
    "qk_norm_rope_inplace_cuda", "paged_decode_attention_cuda", "paged_kv_write_cuda",
]

_WARPS_PER_BLOCK_QK = 4  # kWarps in csrc/qk_norm_rope.cu: the backward's partial rows per block
_EMU_PERSISTENT_BLOCKS = 3  # CPU emulation: a few persistent blocks, so each one loops over rows/items


# ----------------------------------------------------------------------------------------------------------
# argument checks

def _check_tensor(name: str, t, ndim: int, *, float_dtype: bool = True) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if float_dtype and t.dtype not in DTYPE_CODES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be on a CPU or CUDA device, got {t.device}")
    if t.ndim and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {t.stride()}")


def _check_opt_tensor(name: str, t, ndim: int) -> None:
    if t is not None:
        _check_tensor(name, t, ndim)


def _check_shape(name: str, t: Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_same_dtype(name: str, t: Tensor, dtype: torch.dtype, ref: str) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name} must have the dtype of {ref} ({dtype}), got {t.dtype}")


def _check_like(name: str, t: Tensor, ref: Tensor, ref_name: str) -> None:
    """t is read alongside ref element for element (a gradient and its primal, a residual and x):
    same shape, same dtype."""
    _check_shape(name, t, tuple(ref.shape))
    _check_same_dtype(name, t, ref.dtype, ref_name)


def _check_rstd(name: str, r: Tensor, shape: tuple) -> None:
    """A forward's saved 1/rms handed back to its backward."""
    _check_shape(name, r, shape)
    if r.dtype != torch.float32:
        raise TypeError(f"{name} must be float32 (as the forward returns it), got {r.dtype}")


def _check_device(device: torch.device, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the other operands are on {device}")


def _check_real(name: str, v, *, nonneg: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v) or (nonneg and v < 0):
        raise ValueError(f"{name} must be a finite{' non-negative' if nonneg else ''} float, got {v}")
    return v


def _check_bool(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    return v


def _check_int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return int(v)


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()



def _wcode(t: Tensor | None) -> int:
    return 0 if t is None else DTYPE_CODES[t.dtype]


def _persistent_blocks(device: torch.device, work: int, per_sm: int) -> int:
    if device.type == "cuda":
        sms = sm_count(device)
        return max(1, min(work, per_sm * sms))
    return max(1, min(work, _EMU_PERSISTENT_BLOCKS))


# ----------------------------------------------------------------------------------------------------------
# RMSNorm

def _rms_norm_fwd_into(x: Tensor, weight: Tensor | None, residual: Tensor | None, eps: float, y: Tensor,
                       rstd: Tensor, h: Tensor | None) -> None:
    """Forward into caller-provided outputs (row strides free, last dim contiguous; rstd contiguous)."""
    N, D = x.shape
    if N == 0:
        return
    launch("nf_rms_norm_fwd", x.device, RmsNormFwdArgs(
        dtype=DTYPE_CODES[x.dtype], N=N, D=D, x=x.data_ptr(), x_stride=x.stride(0), residual=_ptr(residual),
        residual_stride=residual.stride(0) if residual is not None else 0, weight=_ptr(weight),
        weight_dtype=_wcode(weight), y=y.data_ptr(), y_stride=y.stride(0), h=_ptr(h),
        h_stride=h.stride(0) if h is not None else 0, rstd=rstd.data_ptr(), eps=eps))


def _check_rms_fwd(x, weight, residual, eps) -> float:
    _check_tensor("x", x, 2)
    if x.shape[1] == 0:
        raise ValueError(f"x must have a non-empty last dimension D, got shape {tuple(x.shape)}")
    _check_opt_tensor("weight", weight, 1)
    _check_opt_tensor("residual", residual, 2)
    _check_device(x.device, weight=weight, residual=residual)
    if weight is not None:
        _check_shape("weight", weight, (x.shape[1],))
    if residual is not None:
        _check_like("residual", residual, x, "x")
    return _check_real("eps", eps, nonneg=True)


def rms_norm_fwd_cuda(x: Tensor, weight: Tensor | None, residual: Tensor | None,
                      eps: float) -> tuple[Tensor, Tensor, Tensor | None]:
    """RMSNorm forward with an optional fused residual add, by the csrc/rms_norm.cu kernel.

    x: (N, D) float32/float16/bfloat16, any row stride, last dim contiguous. weight: (D,) of any of
    those dtypes, or None. residual: (N, D) in x's dtype, or None. Returns new contiguous tensors
    y (N, D) in x's dtype = (h * rstd) * weight, rstd (N,) float32 = 1 / sqrt(mean(h^2) + eps), and
    h = x + residual (N, D) in x's dtype, or None without a residual (then h is x itself). CPU
    tensors run through the CPU emulation of the same source.
    """
    return _rms_norm_fwd(x, weight, residual, _check_rms_fwd(x, weight, residual, eps))


def _rms_norm_fwd(x: Tensor, weight: Tensor | None, residual: Tensor | None,
                  eps: float) -> tuple[Tensor, Tensor, Tensor | None]:
    """rms_norm_fwd_cuda for callers that validated the inputs (rms_norm's autograd path)."""
    N, D = x.shape
    if N > 2**31 - 1:  # a launch fact, not input validation: the grid has one block per row
        raise ValueError(f"x has {N} rows; one block per row allows at most 2**31 - 1")
    y = torch.empty((N, D), dtype=x.dtype, device=x.device)
    rstd = torch.empty((N,), dtype=torch.float32, device=x.device)
    h = torch.empty((N, D), dtype=x.dtype, device=x.device) if residual is not None else None
    _rms_norm_fwd_into(x, weight, residual, eps, y, rstd, h)
    return y, rstd, h


def _rms_norm_bwd_into(dy: Tensor, h: Tensor, rstd: Tensor, weight: Tensor | None, dh: Tensor | None, dx: Tensor,
                       dw: Tensor | None, num_partials: int | None = None) -> None:
    """Backward into caller-provided dx (row stride free) and dw (contiguous; required with weight)."""
    N, D = h.shape
    if N == 0:
        if dw is not None:
            dw.zero_()
        return
    G = num_partials if num_partials is not None else _persistent_blocks(h.device, N, 2)
    partial = torch.empty((G, D), dtype=torch.float32, device=h.device) if weight is not None else None
    launch("nf_rms_norm_bwd", h.device, RmsNormBwdArgs(
        dtype=DTYPE_CODES[h.dtype], N=N, D=D, dy=dy.data_ptr(), dy_stride=dy.stride(0), h=h.data_ptr(),
        h_stride=h.stride(0), rstd=rstd.data_ptr(), weight=_ptr(weight), weight_dtype=_wcode(weight), dh=_ptr(dh),
        dh_stride=dh.stride(0) if dh is not None else 0, dx=dx.data_ptr(), dx_stride=dx.stride(0),
        dw_partial=_ptr(partial), num_partials=G, dw=_ptr(dw)))


def _check_rms_bwd(dy, h, rstd, weight, dh) -> Tensor:
    _check_tensor("h", h, 2)
    if h.shape[1] == 0:
        raise ValueError(f"h must have a non-empty last dimension D, got shape {tuple(h.shape)}")
    _check_tensor("dy", dy, 2)
    _check_tensor("rstd", rstd, 1)
    _check_opt_tensor("weight", weight, 1)
    _check_opt_tensor("dh", dh, 2)
    _check_device(h.device, dy=dy, rstd=rstd, weight=weight, dh=dh)
    _check_like("dy", dy, h, "h")
    _check_rstd("rstd", rstd, (h.shape[0],))
    if weight is not None:
        _check_shape("weight", weight, (h.shape[1],))
    if dh is not None:
        _check_like("dh", dh, h, "h")
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
    return _rms_norm_bwd(dy, h, _check_rms_bwd(dy, h, rstd, weight, dh), weight, dh)


def _rms_norm_bwd(dy: Tensor, h: Tensor, rstd: Tensor, weight: Tensor | None,
                  dh: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """rms_norm_bwd_cuda for callers that validated the inputs (rstd contiguous, as the forward makes it)."""
    N, D = h.shape
    dx = torch.empty((N, D), dtype=h.dtype, device=h.device)
    dw = torch.empty((D,), dtype=weight.dtype, device=h.device) if weight is not None else None
    _rms_norm_bwd_into(dy, h, rstd, weight, dh, dx, dw)
    return dx, dw


# ----------------------------------------------------------------------------------------------------------
# QK-norm + rotary

def _s3(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _check_qk_common(q, k, cos, sin, q_weight, k_weight, scale, interleaved) -> tuple[float, bool]:
    _check_tensor("q", q, 4)
    _check_tensor("k", k, 4)
    _check_tensor("cos", cos, 2)
    _check_tensor("sin", sin, 2)
    _check_opt_tensor("q_weight", q_weight, 1)
    _check_opt_tensor("k_weight", k_weight, 1)
    _check_device(q.device, k=k, cos=cos, sin=sin, q_weight=q_weight, k_weight=k_weight)
    _check_same_dtype("k", k, q.dtype, "q")
    B, T, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"k must have shape (B, T, Hk, D) = ({B}, {T}, Hk, {D}) to match q, got {tuple(k.shape)}")
    if D == 0 or D % 2:
        raise ValueError(f"the head dimension D of q and k must be even and > 0 (rotary pairs), got {D}")
    if cos.shape[1] != D // 2 or cos.shape[0] < T:
        raise ValueError(f"cos must have shape (T', D/2) with T' >= T = {T}, D/2 = {D // 2}, got {tuple(cos.shape)}")
    _check_like("sin", sin, cos, "cos")
    if q_weight is not None:
        _check_shape("q_weight", q_weight, (D,))
    if k_weight is not None:
        _check_shape("k_weight", k_weight, (D,))
    return _check_real("scale", scale), _check_bool("interleaved", interleaved)


def _qk_grid_ok(items: int, name: str) -> None:
    if -(-items // _WARPS_PER_BLOCK_QK) > 2**31 - 1:
        raise ValueError(f"{name}: {items} (token, head) items exceed the launch grid")


def _qk_norm_rope_fwd_into(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, q_weight: Tensor | None,
                           k_weight: Tensor | None, scale: float, eps: float, interleaved: bool, q_out: Tensor,
                           k_out: Tensor, q_rstd: Tensor | None, k_rstd: Tensor | None) -> None:
    """Forward into caller-provided outputs (any strides but a contiguous last dim; rstd contiguous)."""
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    if B * T * (Hq + Hk) == 0:
        return
    launch("nf_qk_norm_rope_fwd", q.device, QkNormRopeFwdArgs(
        x=(q.data_ptr(), k.data_ptr()), x_s=(_s3(q), _s3(k)), out=(q_out.data_ptr(), k_out.data_ptr()),
        out_s=(_s3(q_out), _s3(k_out)), rstd=(_ptr(q_rstd), _ptr(k_rstd)), weight=(_ptr(q_weight), _ptr(k_weight)),
        w_dtype=(_wcode(q_weight), _wcode(k_weight)), B=B, T=T, H=(Hq, Hk), D=D, cos=cos.data_ptr(),
        sin=sin.data_ptr(), cos_stride=cos.stride(0), sin_stride=sin.stride(0), cs_dtype=DTYPE_CODES[cos.dtype],
        positions=None, scale=scale, eps=eps, interleaved=int(interleaved), dtype=DTYPE_CODES[q.dtype]))


def qk_norm_rope_fwd_cuda(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, q_weight: Tensor | None,
                          k_weight: Tensor | None, scale: float, eps: float,
                          interleaved: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused per-head RMSNorm + rotary + scale of q and k in one launch (csrc/qk_norm_rope.cu).

    q (B, T, Hq, D), k (B, T, Hk, D): one float dtype, any strides but a contiguous last dim, D even.
    cos, sin (T', D/2) with T' >= T, any float dtype (row t is used for position t). q_weight,
    k_weight (D,) or None. Per head: n = x * rsqrt(mean(x^2) + eps) * weight, then rotation of the
    pairs (i, i + D/2) (or (2i, 2i+1) with interleaved=True): (n1 cos + n2 sin, n2 cos - n1 sin),
    times scale. Returns q_out, k_out (new contiguous, input dtype) and q_rstd (B, T, Hq), k_rstd
    (B, T, Hk) float32.
    """
    scale, interleaved = _check_qk_common(q, k, cos, sin, q_weight, k_weight, scale, interleaved)
    return _qk_norm_rope_fwd(q, k, cos, sin, q_weight, k_weight, scale, _check_real("eps", eps, nonneg=True),
                             interleaved)


def _qk_norm_rope_fwd(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, q_weight: Tensor | None,
                      k_weight: Tensor | None, scale: float, eps: float,
                      interleaved: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """qk_norm_rope_fwd_cuda for callers that validated the inputs (qk_norm_rope's autograd path)."""
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    _qk_grid_ok(B * T * (Hq + Hk), "qk_norm_rope_fwd_cuda")
    q_out = torch.empty((B, T, Hq, D), dtype=q.dtype, device=q.device)
    k_out = torch.empty((B, T, Hk, D), dtype=k.dtype, device=k.device)
    q_rstd = torch.empty((B, T, Hq), dtype=torch.float32, device=q.device)
    k_rstd = torch.empty((B, T, Hk), dtype=torch.float32, device=q.device)
    _qk_norm_rope_fwd_into(q, k, cos, sin, q_weight, k_weight, scale, eps, interleaved, q_out, k_out, q_rstd, k_rstd)
    return q_out, k_out, q_rstd, k_rstd


def _qk_norm_rope_bwd_into(dq_out: Tensor, dk_out: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                           q_weight: Tensor | None, k_weight: Tensor | None, q_rstd: Tensor, k_rstd: Tensor,
                           scale: float, interleaved: bool, dq: Tensor, dk: Tensor, dq_weight: Tensor | None,
                           dk_weight: Tensor | None, num_blocks: int | None = None) -> None:
    """Backward into caller-provided dq, dk (free strides) and weight grads (contiguous)."""
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    items = B * T * (Hq + Hk)
    if items == 0:
        for g in (dq_weight, dk_weight):
            if g is not None:
                g.zero_()
        return
    G = num_blocks if num_blocks is not None else _persistent_blocks(q.device, -(-items // _WARPS_PER_BLOCK_QK), 4)
    rows = G * _WARPS_PER_BLOCK_QK

    def partial(w):
        return torch.empty((rows, D), dtype=torch.float32, device=q.device) if w is not None else None

    pq, pk = partial(q_weight), partial(k_weight)
    launch("nf_qk_norm_rope_bwd", q.device, QkNormRopeBwdArgs(
        dout=(dq_out.data_ptr(), dk_out.data_ptr()), dout_s=(_s3(dq_out), _s3(dk_out)), x=(q.data_ptr(), k.data_ptr()),
        x_s=(_s3(q), _s3(k)), dx=(dq.data_ptr(), dk.data_ptr()), dx_s=(_s3(dq), _s3(dk)),
        rstd=(q_rstd.data_ptr(), k_rstd.data_ptr()), weight=(_ptr(q_weight), _ptr(k_weight)),
        w_dtype=(_wcode(q_weight), _wcode(k_weight)), dw_partial=(_ptr(pq), _ptr(pk)), B=B, T=T, H=(Hq, Hk), D=D,
        cos=cos.data_ptr(), sin=sin.data_ptr(), cos_stride=cos.stride(0), sin_stride=sin.stride(0),
        cs_dtype=DTYPE_CODES[cos.dtype], scale=scale, interleaved=int(interleaved),
        dw=(_ptr(dq_weight), _ptr(dk_weight)), num_blocks=G, dtype=DTYPE_CODES[q.dtype]))


def qk_norm_rope_bwd_cuda(dq_out: Tensor, dk_out: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                          q_weight: Tensor | None, k_weight: Tensor | None, q_rstd: Tensor, k_rstd: Tensor,
                          scale: float, interleaved: bool
                          ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Backward of qk_norm_rope_fwd_cuda (csrc/qk_norm_rope.cu).

    dq_out (B, T, Hq, D), dk_out (B, T, Hk, D) in q's dtype (any strides, last dim contiguous); q, k,
    cos, sin, weights, scale, interleaved as given to the forward; q_rstd (B, T, Hq), k_rstd
    (B, T, Hk) float32 from the forward. Returns dq, dk (new contiguous, q's dtype) and dq_weight,
    dk_weight (D,) in the weights' dtypes (None without the weight), each reduced deterministically
    (fp32 per-warp partials, fixed-order sum).
    """
    scale, interleaved = _check_qk_common(q, k, cos, sin, q_weight, k_weight, scale, interleaved)
    _check_tensor("dq_out", dq_out, 4)
    _check_tensor("dk_out", dk_out, 4)
    _check_tensor("q_rstd", q_rstd, 3)
    _check_tensor("k_rstd", k_rstd, 3)
    _check_device(q.device, dq_out=dq_out, dk_out=dk_out, q_rstd=q_rstd, k_rstd=k_rstd)
    _check_like("dq_out", dq_out, q, "q")
    _check_like("dk_out", dk_out, k, "k")
    _check_rstd("q_rstd", q_rstd, tuple(q.shape[:3]))
    _check_rstd("k_rstd", k_rstd, tuple(k.shape[:3]))
    return _qk_norm_rope_bwd(dq_out, dk_out, q, k, cos, sin, q_weight, k_weight, q_rstd.contiguous(),
                             k_rstd.contiguous(), scale, interleaved)


def _qk_norm_rope_bwd(dq_out: Tensor, dk_out: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                      q_weight: Tensor | None, k_weight: Tensor | None, q_rstd: Tensor, k_rstd: Tensor,
                      scale: float, interleaved: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """qk_norm_rope_bwd_cuda for callers that validated the inputs (rstd contiguous, as the forward makes it)."""
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    _qk_grid_ok(B * T * (Hq + Hk), "qk_norm_rope_bwd_cuda")
    dq = torch.empty((B, T, Hq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, T, Hk, D), dtype=k.dtype, device=q.device)
    dq_weight = torch.empty((D,), dtype=q_weight.dtype, device=q.device) if q_weight is not None else None
    dk_weight = torch.empty((D,), dtype=k_weight.dtype, device=q.device) if k_weight is not None else None
    _qk_norm_rope_bwd_into(dq_out, dk_out, q, k, cos, sin, q_weight, k_weight, q_rstd, k_rstd, scale, interleaved,
                           dq, dk, dq_weight, dk_weight)
    return dq, dk, dq_weight, dk_weight


def qk_norm_rope_inplace_cuda(qkv: Tensor, positions: Tensor, cos_sin_cache: Tensor, num_q_heads: int,
                              num_kv_heads: int, q_weight: Tensor | None, k_weight: Tensor | None, scale: float,
                              eps: float, interleaved: bool) -> None:
    """Normalise, rotate and scale the q and k heads of a packed qkv buffer in place (inference).

    qkv: (N, (Hq + 2*Hkv) * D) float32/float16/bfloat16, per token [q heads | k heads | v heads],
    row stride may exceed the width, last dim contiguous. positions: (N,) int64 (int32 accepted),
    the rotary row of each token, 0 <= p < max_position. cos_sin_cache: (max_position, D) float =
    [cos | sin] halves per position. q_weight, k_weight (D,) or None. v heads (and any row padding) are left untouched.
    """
    _check_tensor("qkv", qkv, 2)
    Hq = _check_int("num_q_heads", num_q_heads, 0)
    Hkv = _check_int("num_kv_heads", num_kv_heads, 0)
    if Hq + Hkv == 0:
        raise ValueError("num_q_heads + num_kv_heads must be >= 1")
    heads = Hq + 2 * Hkv
    N, W = qkv.shape
    if W % heads != 0 or W == 0:
        raise ValueError(f"qkv width {W} is not (num_q_heads + 2 * num_kv_heads) = {heads} heads of equal size D")
    D = W // heads
    if D % 2:
        raise ValueError(f"head dimension D = {D} must be even (rotary pairs)")
    if not isinstance(positions, Tensor):
        raise TypeError(f"positions must be a torch.Tensor, got {type(positions).__name__}")
    if positions.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"positions must be int64 (or int32), got {positions.dtype}")
    _check_shape("positions", positions, (N,))
    if N > 1 and qkv.stride(0) < W:
        raise ValueError(f"qkv rows must not overlap: row stride {qkv.stride(0)} < row width {W}")
    _check_tensor("cos_sin_cache", cos_sin_cache, 2)
    _check_opt_tensor("q_weight", q_weight, 1)
    _check_opt_tensor("k_weight", k_weight, 1)
    _check_device(qkv.device, positions=positions, cos_sin_cache=cos_sin_cache, q_weight=q_weight,
                  k_weight=k_weight)
    if cos_sin_cache.shape[1] != D:
        raise ValueError(f"cos_sin_cache must have shape (max_position, D = {D}), got {tuple(cos_sin_cache.shape)}")
    if q_weight is not None:
        _check_shape("q_weight", q_weight, (D,))
    if k_weight is not None:
        _check_shape("k_weight", k_weight, (D,))
    scale = _check_real("scale", scale)
    eps = _check_real("eps", eps, nonneg=True)
    interleaved = _check_bool("interleaved", interleaved)
    max_pos = cos_sin_cache.shape[0]
    if not qkv.is_cuda and N and (int(positions.min()) < 0 or int(positions.max()) >= max_pos):
        raise ValueError(f"positions must lie in [0, {max_pos}) (rows of cos_sin_cache), got "
                         f"[{int(positions.min())}, {int(positions.max())}]")
    _qk_norm_rope_inplace(qkv, positions, cos_sin_cache, Hq, Hkv, q_weight, k_weight, scale, eps, interleaved)


def _qk_norm_rope_inplace(qkv: Tensor, positions: Tensor, cos_sin_cache: Tensor, num_q_heads: int,
                          num_kv_heads: int, q_weight: Tensor | None, k_weight: Tensor | None, scale: float,
                          eps: float, interleaved: bool) -> None:
    """qk_norm_rope_inplace_cuda for callers that validated the inputs (CPU positions range-checked too)."""
    N, W = qkv.shape
    Hq, Hkv = num_q_heads, num_kv_heads
    D = W // (Hq + 2 * Hkv)
    if N == 0:
        return
    _qk_grid_ok(N * (Hq + Hkv), "qk_norm_rope_inplace_cuda")
    positions = positions.to(torch.int64).contiguous()  # the kernel reads int64 rows
    if qkv.is_cuda:
        # A host-side check would synchronise every call; a device assert keeps the launch asynchronous.
        torch._assert_async(((positions >= 0) & (positions < cos_sin_cache.shape[0])).all(),
                            "qk_norm_rope_inplace_cuda: positions out of range of cos_sin_cache")
    es = qkv.element_size()
    base, rs = qkv.data_ptr(), qkv.stride(0)
    k_base = base + Hq * D * es
    cs = cos_sin_cache.data_ptr()
    # Tokens as (B = 1, T = N): head h of token n sits at n * row_stride + h * D; the launch function
    # reads the rotary row from positions[n] and writes each head back where it came from.
    heads = (0, rs, D)
    launch("nf_qk_norm_rope_fwd", qkv.device, QkNormRopeFwdArgs(
        x=(base, k_base), x_s=(heads, heads), out=(base, k_base), out_s=(heads, heads), rstd=(None, None),
        weight=(_ptr(q_weight), _ptr(k_weight)), w_dtype=(_wcode(q_weight), _wcode(k_weight)), B=1, T=N,
        H=(Hq, Hkv), D=D, cos=cs, sin=cs + (D // 2) * cos_sin_cache.element_size(),
        cos_stride=cos_sin_cache.stride(0), sin_stride=cos_sin_cache.stride(0),
        cs_dtype=DTYPE_CODES[cos_sin_cache.dtype], positions=positions.data_ptr(), scale=scale, eps=eps,
        interleaved=int(interleaved), dtype=DTYPE_CODES[qkv.dtype]))


# ----------------------------------------------------------------------------------------------------------
# paged KV-cache decode attention

_PAGED_MAX_D = 256  # kMaxD in csrc/paged_attention.cu: at most 8 elements per lane in registers
_PAGED_MAX_SPLITS = 65535  # explicit num_splits (the uniform plan): B * num_splits units on gridDim.x
_PAGED_MAX_WARPS = 8  # kMaxWarps in csrc/paged_attention.cu: the block size its __launch_bounds__ declares
_SPLIT_MIN_KEYS = 64  # the plan's granule: a split streams about this many keys or more (>= half of it)
# The occupancy the plan targets: 16 resident warps per SM, each with one ~1 KB step of K/V rows in
# flight (2 x 32 lanes x 16 B), ~16 KB per SM: Little's law on an H100 wants ~3.35 TB/s x ~600 ns /
# 132 SMs ~= 15 KB. 16 warps of every instantiation fit an SM's 64 K registers (<= 128 registers per
# thread, __launch_bounds__(256, 2); asserted from the nvcc facts). See csrc/paged_attention.cu.
_PAGED_WARPS_PER_SM = 16
_PAGED_REGS_PER_SM = 65536


def _check_index_tensor(name: str, t, ndim: int, dtypes: tuple) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {' or '.join(str(d).replace('torch.', '') for d in dtypes)}, got {t.dtype}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be on a CPU or CUDA device, got {t.device}")


def _unit_last(t):
    """t with a unit last-dim stride (the kernels vectorise along D): small operands (q, new k/v)
    are copied when needed; the caches are never copied (written in place, and far too big)."""
    if isinstance(t, Tensor) and t.ndim and t.shape[-1] > 1 and t.stride(-1) != 1:
        return t.contiguous()
    return t


def _check_cache_pair(k_cache, v_cache) -> tuple[int, int, int, int]:
    _check_tensor("k_cache", k_cache, 4)
    _check_tensor("v_cache", v_cache, 4)
    if min(k_cache.shape) < 1:
        raise ValueError(f"k_cache must have shape (num_pages, page_size, Hkv, D) with every size >= 1, got "
                         f"{tuple(k_cache.shape)}")
    _check_like("v_cache", v_cache, k_cache, "k_cache")
    return tuple(k_cache.shape)


def _paged_heads_layout(G: int) -> tuple[int, int, int]:
    """(heads per warp, warps, blocks per KV head) for the G query heads of a KV head.

    The one place of this policy: the launch passes the first two in its argument struct (the C side
    only checks them against what it compiled) and the split count and grid check use the third.
    A warp loads each K/V row into registers once for all its heads; more than 4 heads per warp
    would cost registers that the 8 elements per lane of q and the accumulator already claim at D = 256.
    """
    hpw = 1 if G == 1 else 2 if G == 2 else 4
    warps = min(-(-G // hpw), _PAGED_MAX_WARPS)
    return hpw, warps, -(-G // (hpw * warps))


def _paged_plan(device: torch.device, seq_lens: Tensor, window: int, max_len: int, Hkv: int, G: int) -> list[int]:
    """Splits per sequence from the actual lengths (`paged_attention.plan_paged_decode`, the rule the
    Triton backend uses), sized so that units x Hkv x head blocks x warps ~ _PAGED_WARPS_PER_SM x SMs.

    On CUDA a device tensor here is read back (one device->host copy of B ints, a sync): callers pass
    host lengths (`host_seq_lens`) or `plan=` to avoid it. The emulation (CPU) runs blocks one
    after another: one split per sequence."""
    if device.type != "cuda":
        return [1] * seq_lens.shape[0]
    _, warps, hblocks = _paged_heads_layout(G)
    lens = seq_lens.to("cpu", torch.int64).clamp(1, max_len)  # the kernel clamps bad lengths the same way
    # waves = resident warps per SM / warps per block: plan_paged_decode aims at waves x SMs / (Hkv x
    # hblocks) units, each unit being Hkv x hblocks blocks of `warps` warps.
    plan = plan_paged_decode(lens, Hkv * hblocks, window=None if window < 0 else window, block_n=_SPLIT_MIN_KEYS,
                             sm_count=sm_count(device), waves=_PAGED_WARPS_PER_SM / warps)
    return [int(x) for x in plan.tolist()]


def _check_paged_attention(q, k_cache, v_cache, block_table, seq_lens, scale, window, num_splits, plan=None,
                           host_seq_lens=None) -> tuple[float, int, list[int]]:
    """Validate the arguments of paged_decode_attention_cuda; returns (scale, window or -1, splits per
    sequence)."""
    _check_tensor("q", q, 3)
    P, ps, Hkv, D = _check_cache_pair(k_cache, v_cache)
    _check_index_tensor("block_table", block_table, 2, (torch.int32,))
    _check_index_tensor("seq_lens", seq_lens, 1, (torch.int32,))
    _check_device(q.device, k_cache=k_cache, v_cache=v_cache, block_table=block_table, seq_lens=seq_lens)
    _check_same_dtype("k_cache", k_cache, q.dtype, "q")
    B, Hq, Dq = q.shape
    if D > _PAGED_MAX_D:
        raise ValueError(f"k_cache head dimension D = {D} exceeds the kernel's maximum {_PAGED_MAX_D}")
    if Dq != D:
        raise ValueError(f"q must have shape (B, Hq, D = {D}) to match k_cache, got {tuple(q.shape)}")
    if Hq < 1 or Hq % Hkv:
        raise ValueError(f"q has Hq = {Hq} heads: must be a positive multiple of the k_cache KV heads Hkv = {Hkv}")
    if block_table.shape[0] != B or block_table.shape[1] < 1:
        raise ValueError(f"block_table must have shape (B = {B}, max_pages >= 1), got {tuple(block_table.shape)}")
    _check_shape("seq_lens", seq_lens, (B,))
    max_len = block_table.shape[1] * ps
    if max_len > 2**31 - 1:
        raise ValueError(f"block_table max_pages * page_size = {max_len} positions exceed int32")
    scale = _check_real("scale", scale)
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    w = -1 if window is None or vendor.left_window(window) is None else int(window)  # -1: full causal
    if w > 2**31 - 1:
        w = -1  # a window longer than any sequence is no window
    if plan is not None and num_splits is not None:
        raise ValueError("pass either num_splits (the same split count for every sequence) or plan "
                         "(splits per sequence), not both")
    if num_splits is not None:
        S = _check_int("num_splits", num_splits, 1)
        if S > _PAGED_MAX_SPLITS:
            raise ValueError(f"num_splits must be <= {_PAGED_MAX_SPLITS}, got {S}")
    elif plan is not None:
        _check_plan(plan, B)
    if Hkv * _paged_heads_layout(Hq // Hkv)[2] > 65535:
        raise ValueError(f"Hkv = {Hkv} KV heads (x head blocks) exceed the launch grid's y dimension")
    if B and not q.is_cuda:
        _check_paged_values(block_table, seq_lens, P, ps, w)
    if num_splits is not None:
        splits = [S] * B
    elif plan is not None:
        splits = [int(x) for x in plan.tolist()]
    else:
        if host_seq_lens is not None and len(host_seq_lens) != B:
            raise ValueError(f"host_seq_lens must hold B = {B} lengths, got {len(host_seq_lens)}")
        lens = host_lengths(seq_lens, host_seq_lens) if B else seq_lens
        splits = _paged_plan(q.device, lens, w, max_len, Hkv, Hq // Hkv) if B else []
    if sum(splits) > 2**31 - 1:
        raise ValueError(f"{sum(splits)} work units exceed the launch grid")
    return scale, w, splits


def _check_paged_values(block_table: Tensor, seq_lens: Tensor, P: int, ps: int, window: int) -> None:
    """CPU tensors: seq_lens in [1, max_pages * page_size]; block-table entries of every page the
    kernel reads in [0, P). Entries of pages it does not read (past the sequence, before its
    window) may be anything. On CUDA this would be a host sync per decode step (and a device assert
    would poison the context), so there the kernel clamps lengths and drops keys of out-of-pool
    pages instead: a wrong result for bad values, never a fault (as the Triton kernel does)."""
    max_len = block_table.shape[1] * ps
    lens = seq_lens.to(torch.int64)
    lo, hi = int(lens.min()), int(lens.max())
    if lo < 1 or hi > max_len:
        raise ValueError(f"seq_lens must lie in [1, max_pages * page_size = {max_len}], got [{lo}, {hi}]")
    last = (lens - 1) // ps
    first = torch.zeros_like(last) if window < 0 else (lens - 1 - window).clamp(min=0) // ps
    idx = torch.arange(block_table.shape[1])
    read = (idx >= first[:, None]) & (idx <= last[:, None])
    bad = read & ((block_table < 0) | (block_table >= P))
    if bool(bad.any()):
        b, p = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"block_table[{b}, {p}] = {int(block_table[b, p])} is a page sequence {b} reads: it must "
                         f"lie in [0, num_pages = {P})")


def _paged_decode_attention_into(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                                 seq_lens: Tensor, scale: float, window: int, splits, out: Tensor) -> None:
    """Attention into a caller-provided out (B, Hq, D) in q's dtype, any strides but a contiguous last
    dim; arguments as _check_paged_attention returns them (window -1: none). `splits`: splits per
    sequence (a list of B ints >= 1), or one int for every sequence (the uniform plan)."""
    B, Hq, D = q.shape
    if B == 0:
        return
    if isinstance(splits, int):
        splits = [splits] * B
    P, ps, Hkv, _ = k_cache.shape
    packed, units = _plan_tensors(list(splits), B, 1, q.device)
    seq_start, unit_seq, unit_idx = packed[:B + 1], packed[B + 1:B + 1 + units], packed[B + 1 + units:]
    part_o = part_lse = None
    if units > B:
        part_o = torch.empty((units, Hq, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((units, Hq), dtype=torch.float32, device=q.device)
    ks, vs = k_cache.stride(), v_cache.stride()
    hpw, warps, _ = _paged_heads_layout(Hq // Hkv)
    launch("nf_paged_attention_fwd", q.device, PagedAttentionArgs(
        dtype=DTYPE_CODES[q.dtype], B=B, Hq=Hq, Hkv=Hkv, D=D, q=q.data_ptr(), q_sb=q.stride(0), q_sh=q.stride(1),
        k=k_cache.data_ptr(), k_sp=ks[0], k_ss=ks[1], k_sh=ks[2], v=v_cache.data_ptr(), v_sp=vs[0], v_ss=vs[1],
        v_sh=vs[2], num_pages=P, page_size=ps, block_table=block_table.data_ptr(), bt_sb=block_table.stride(0),
        bt_sp=block_table.stride(1), max_pages=block_table.shape[1], seq_lens=seq_lens.data_ptr(),
        sl_s=seq_lens.stride(0), window=window, scale=scale, num_units=units, seq_start=seq_start.data_ptr(),
        unit_seq=unit_seq.data_ptr(), unit_idx=unit_idx.data_ptr(), part_o=_ptr(part_o),
        part_lse=_ptr(part_lse), out=out.data_ptr(), o_sb=out.stride(0), o_sh=out.stride(1), heads_per_warp=hpw,
        warps=warps))


def paged_decode_attention_cuda(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                                scale: float, window: int | None, num_splits: int | None,
                                plan: Tensor | None = None, host_seq_lens: list[int] | None = None) -> Tensor:
    """Decode attention of one query token per sequence over a paged KV cache (csrc/paged_attention.cu).

    q: (B, Hq, D) float32/float16/bfloat16, any strides (a non-unit last-dim stride costs a copy of q).
    k_cache, v_cache:
    (num_pages, page_size, Hkv, D) in q's dtype (NHD; any strides, last dim contiguous), D <= 256,
    Hq a multiple of Hkv; query head h uses KV head h // (Hq // Hkv). block_table: (B, max_pages)
    int32, page ids of each sequence's positions in order; entries past a sequence's used pages are
    never read. seq_lens: (B,) int32 in [1, max_pages * page_size], the length including the current
    token. Values (lengths, used page ids) are checked for CPU tensors; on CUDA (no host sync) the
    kernel clamps lengths and skips keys in pages outside the pool instead. scale > 0 multiplies q.k. window None or -1: all keys; w >= 0: keys j with len-1-w <= j <= len-1.
    num_splits: the uniform plan, this many splits of every sequence (1..65535). plan: (B,) int32
    CPU tensor of splits per sequence (`paged_attention.plan_paged_decode`), exclusive with
    num_splits. Both None: planned from the lengths (`_paged_plan`: ~16 warps per SM of similar-sized
    work units, one launch; on CUDA a device->host copy of seq_lens unless host_seq_lens (the same
    lengths as host ints) is given; 1 split each in the emulation).
    Returns (B, Hq, D) in q's dtype; fp32 scores, online softmax, deterministic.
    """
    q = _unit_last(q)
    scale, w, S = _check_paged_attention(q, k_cache, v_cache, block_table, seq_lens, scale, window, num_splits,
                                         plan, host_seq_lens)
    out = torch.empty(tuple(q.shape), dtype=q.dtype, device=q.device)
    _paged_decode_attention_into(q, k_cache, v_cache, block_table, seq_lens, scale, w, S, out)
    return out


def paged_kv_write_cuda(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Store k, v (N, Hkv, D) into the paged caches (num_pages, page_size, Hkv, D) in place.

    k, v: any strides (a non-unit last-dim stride costs a copy); caches: last dim contiguous.
    Token n goes to page slot_mapping[n] // page_size, offset slot_mapping[n] % page_size (int32 or
    int64, < num_pages * page_size: raises for CPU tensors, skipped on CUDA where checking would
    cost a host sync); negative slots are skipped (padding tokens). Values are copied
    bit for bit; every other cache element is left untouched. Slots must be distinct (duplicates race).
    """
    k, v = _unit_last(k), _unit_last(v)
    _check_tensor("k", k, 3)
    _check_tensor("v", v, 3)
    P, ps, Hkv, D = _check_cache_pair(k_cache, v_cache)
    _check_index_tensor("slot_mapping", slot_mapping, 1, (torch.int32, torch.int64))
    _check_device(k.device, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    N = k.shape[0]
    _check_shape("k", k, (N, Hkv, D))
    _check_shape("v", v, (N, Hkv, D))
    _check_same_dtype("v", v, k.dtype, "k")
    _check_same_dtype("k_cache", k_cache, k.dtype, "k")
    _check_shape("slot_mapping", slot_mapping, (N,))
    if N == 0:
        return
    if -(-N * Hkv // 4) > 2**31 - 1:
        raise ValueError(f"N * Hkv = {N * Hkv} rows exceed the launch grid")
    slots = slot_mapping.contiguous()
    if not slots.is_cuda and int(slots.max()) >= P * ps:  # on CUDA the kernel skips them (no host sync)
        raise ValueError(f"slot_mapping entries must be < num_pages * page_size = {P * ps} (or negative: skipped), "
                         f"got {int(slots.max())}")
    kcs, vcs = k_cache.stride(), v_cache.stride()
    launch("nf_paged_kv_write", k.device, PagedKvWriteArgs(
        dtype=DTYPE_CODES[k.dtype], N=N, Hkv=Hkv, D=D, k=k.data_ptr(), k_sn=k.stride(0), k_sh=k.stride(1),
        v=v.data_ptr(), v_sn=v.stride(0), v_sh=v.stride(1), kc=k_cache.data_ptr(), kc_sp=kcs[0], kc_ss=kcs[1],
        kc_sh=kcs[2], vc=v_cache.data_ptr(), vc_sp=vcs[0], vc_ss=vcs[1], vc_sh=vcs[2], num_pages=P, page_size=ps,
        slots=slots.data_ptr(), slots64=int(slots.dtype == torch.int64)))
