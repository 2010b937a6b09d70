"""Fused QK-norm + rotary + scale by csrc/qk_norm_rope.cu.

`qk_norm_rope_{fwd,bwd,inplace}_cuda` check their arguments (a drop-in API of their own); `fwd / bwd
/ inplace` trust them: the op's "cuda" launchers, which its public entry runs after validating once
(see cuda_args.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .cuda_abi import DTYPE_CODES, QkNormRopeBwdArgs, QkNormRopeFwdArgs
from .cuda_args import (check_bool, check_device, check_int, check_like, check_opt_tensor, check_real, check_rstd,
                        check_shape, check_same_dtype, check_tensor, persistent_blocks, ptr, wcode)
from .cuda_build import launch

_WARPS_PER_BLOCK_QK = 4  # kWarps in csrc/qk_norm_rope.cu: the backward's partial rows per block


def _s3(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _check_qk_common(q, k, cos, sin, q_weight, k_weight, scale, interleaved) -> tuple[float, bool]:
    check_tensor("q", q, 4)
    check_tensor("k", k, 4)
    check_tensor("cos", cos, 2)
    check_tensor("sin", sin, 2)
    check_opt_tensor("q_weight", q_weight, 1)
    check_opt_tensor("k_weight", k_weight, 1)
    check_device(q.device, k=k, cos=cos, sin=sin, q_weight=q_weight, k_weight=k_weight)
    check_same_dtype("k", k, q.dtype, "q")
    B, T, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"k must have shape (B, T, Hk, D) = ({B}, {T}, Hk, {D}) to match q, got {tuple(k.shape)}")
    if D == 0 or D % 2:
        raise ValueError(f"the head dimension D of q and k must be even and > 0 (rotary pairs), got {D}")
    if cos.shape[1] != D // 2 or cos.shape[0] < T:
        raise ValueError(f"cos must have shape (T', D/2) with T' >= T = {T}, D/2 = {D // 2}, got {tuple(cos.shape)}")
    check_like("sin", sin, cos, "cos")
    if q_weight is not None:
        check_shape("q_weight", q_weight, (D,))
    if k_weight is not None:
        check_shape("k_weight", k_weight, (D,))
    return check_real("scale", scale), check_bool("interleaved", interleaved)


def _qk_grid_ok(items: int, name: str) -> None:
    if -(-items // _WARPS_PER_BLOCK_QK) > 2**31 - 1:
        raise ValueError(f"{name}: {items} (token, head) items exceed the launch grid")


def fwd_into(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, q_weight: Tensor | None,
                           k_weight: Tensor | None, scale: float, eps: float, interleaved: bool, q_out: Tensor,
                           k_out: Tensor, q_rstd: Tensor | None, k_rstd: Tensor | None) -> None:
    """Forward into caller-provided outputs (any strides but a contiguous last dim; rstd contiguous)."""
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    if B * T * (Hq + Hk) == 0:
        return
    launch("nf_qk_norm_rope_fwd", q.device, QkNormRopeFwdArgs(
        x=(q.data_ptr(), k.data_ptr()), x_s=(_s3(q), _s3(k)), out=(q_out.data_ptr(), k_out.data_ptr()),
        out_s=(_s3(q_out), _s3(k_out)), rstd=(ptr(q_rstd), ptr(k_rstd)), weight=(ptr(q_weight), ptr(k_weight)),
        w_dtype=(wcode(q_weight), wcode(k_weight)), B=B, T=T, H=(Hq, Hk), D=D, cos=cos.data_ptr(),
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
    return fwd(q, k, cos, sin, q_weight, k_weight, scale, check_real("eps", eps, nonneg=True),
                             interleaved)


def fwd(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, q_weight: Tensor | None,
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
    fwd_into(q, k, cos, sin, q_weight, k_weight, scale, eps, interleaved, q_out, k_out, q_rstd, k_rstd)
    return q_out, k_out, q_rstd, k_rstd


def bwd_into(dq_out: Tensor, dk_out: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
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
    G = num_blocks if num_blocks is not None else persistent_blocks(q.device, -(-items // _WARPS_PER_BLOCK_QK), 4)
    rows = G * _WARPS_PER_BLOCK_QK

    def partial(w):
        return torch.empty((rows, D), dtype=torch.float32, device=q.device) if w is not None else None

    pq, pk = partial(q_weight), partial(k_weight)
    launch("nf_qk_norm_rope_bwd", q.device, QkNormRopeBwdArgs(
        dout=(dq_out.data_ptr(), dk_out.data_ptr()), dout_s=(_s3(dq_out), _s3(dk_out)), x=(q.data_ptr(), k.data_ptr()),
        x_s=(_s3(q), _s3(k)), dx=(dq.data_ptr(), dk.data_ptr()), dx_s=(_s3(dq), _s3(dk)),
        rstd=(q_rstd.data_ptr(), k_rstd.data_ptr()), weight=(ptr(q_weight), ptr(k_weight)),
        w_dtype=(wcode(q_weight), wcode(k_weight)), dw_partial=(ptr(pq), ptr(pk)), B=B, T=T, H=(Hq, Hk), D=D,
        cos=cos.data_ptr(), sin=sin.data_ptr(), cos_stride=cos.stride(0), sin_stride=sin.stride(0),
        cs_dtype=DTYPE_CODES[cos.dtype], scale=scale, interleaved=int(interleaved),
        dw=(ptr(dq_weight), ptr(dk_weight)), num_blocks=G, dtype=DTYPE_CODES[q.dtype]))


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
    check_tensor("dq_out", dq_out, 4)
    check_tensor("dk_out", dk_out, 4)
    check_tensor("q_rstd", q_rstd, 3)
    check_tensor("k_rstd", k_rstd, 3)
    check_device(q.device, dq_out=dq_out, dk_out=dk_out, q_rstd=q_rstd, k_rstd=k_rstd)
    check_like("dq_out", dq_out, q, "q")
    check_like("dk_out", dk_out, k, "k")
    check_rstd("q_rstd", q_rstd, tuple(q.shape[:3]))
    check_rstd("k_rstd", k_rstd, tuple(k.shape[:3]))
    return bwd(dq_out, dk_out, q, k, cos, sin, q_weight, k_weight, q_rstd.contiguous(),
                             k_rstd.contiguous(), scale, interleaved)


def bwd(dq_out: Tensor, dk_out: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
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
    bwd_into(dq_out, dk_out, q, k, cos, sin, q_weight, k_weight, q_rstd, k_rstd, scale, interleaved,
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
    check_tensor("qkv", qkv, 2)
    Hq = check_int("num_q_heads", num_q_heads, 0)
    Hkv = check_int("num_kv_heads", num_kv_heads, 0)
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
    check_shape("positions", positions, (N,))
    if N > 1 and qkv.stride(0) < W:
        raise ValueError(f"qkv rows must not overlap: row stride {qkv.stride(0)} < row width {W}")
    check_tensor("cos_sin_cache", cos_sin_cache, 2)
    check_opt_tensor("q_weight", q_weight, 1)
    check_opt_tensor("k_weight", k_weight, 1)
    check_device(qkv.device, positions=positions, cos_sin_cache=cos_sin_cache, q_weight=q_weight,
                  k_weight=k_weight)
    if cos_sin_cache.shape[1] != D:
        raise ValueError(f"cos_sin_cache must have shape (max_position, D = {D}), got {tuple(cos_sin_cache.shape)}")
    if q_weight is not None:
        check_shape("q_weight", q_weight, (D,))
    if k_weight is not None:
        check_shape("k_weight", k_weight, (D,))
    scale = check_real("scale", scale)
    eps = check_real("eps", eps, nonneg=True)
    interleaved = check_bool("interleaved", interleaved)
    max_pos = cos_sin_cache.shape[0]
    if not qkv.is_cuda and N and (int(positions.min()) < 0 or int(positions.max()) >= max_pos):
        raise ValueError(f"positions must lie in [0, {max_pos}) (rows of cos_sin_cache), got "
                         f"[{int(positions.min())}, {int(positions.max())}]")
    inplace(qkv, positions, cos_sin_cache, Hq, Hkv, q_weight, k_weight, scale, eps, interleaved)


def inplace(qkv: Tensor, positions: Tensor, cos_sin_cache: Tensor, num_q_heads: int,
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
        weight=(ptr(q_weight), ptr(k_weight)), w_dtype=(wcode(q_weight), wcode(k_weight)), B=1, T=N,
        H=(Hq, Hkv), D=D, cos=cs, sin=cs + (D // 2) * cos_sin_cache.element_size(),
        cos_stride=cos_sin_cache.stride(0), sin_stride=cos_sin_cache.stride(0),
        cs_dtype=DTYPE_CODES[cos_sin_cache.dtype], positions=positions.data_ptr(), scale=scale, eps=eps,
        interleaved=int(interleaved), dtype=DTYPE_CODES[qkv.dtype]))
