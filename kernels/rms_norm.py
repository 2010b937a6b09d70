"""RMSNorm, optionally fused with the residual add that precedes it: plain-torch reference and
Triton kernels, layered kernel -> launcher -> custom op (+ autograd) -> functional API -> module.

Maths, per row of D features (statistics always in fp32):

    h    = x + residual              (rounded to x's dtype, exactly what `x + residual` gives)
    rstd = 1 / sqrt(mean(h^2) + eps)
    y    = (h * rstd) * weight       (one rounding to x's dtype at the end)

    hhat = h * rstd, g = dy * weight
    dx   = rstd * (g - hhat * mean(g * hhat)) + dh      (dh: gradient arriving at the returned h)
    dw   = sum over rows of dy * hhat

RMSNorm moves ~2 bytes per element per direction and does a handful of flops per byte, so on an
H100 it is purely bandwidth-bound: every design choice below is about touching each byte once,
with 128-bit loads, without register spills, and without a second pass over memory.

Supported by the Triton kernels: fp16 / bf16 / fp32 inputs (fp64 only through backend="torch"),
any D >= 1. The forward is single-pass (row in registers) up to D = 16384, the backward up to
D = 8192; wider rows are processed in column chunks at the cost of one extra read (forward: x and
residual; backward: dy and h, in a separate row-reduction kernel). nanochat's d_model widths
(768 .. 1664) and head dim (128) are single-pass both ways.
"""
from __future__ import annotations

import math
import numbers
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor, nn

from .backend import resolve_backend
from .compile_gate import gate_signature
from .op import Op
from .launch import TL_DTYPE as _TL_DTYPE, alloc as _alloc, device_ctx as _device_ctx, next_pow2 as _next_pow2, \
    row_stride as _row_stride, sm_count as _sm_count

try:  # triton is optional: backend="torch" (and "cuda") work without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on installs without triton
    triton = None
    tl = None

__all__ = ["rms_norm", "RMSNorm", "rms_norm_reference", "rms_norm_fwd_triton", "rms_norm_bwd_triton",
           "KERNEL_CONFIGS", "default_eps"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Register-file limits, not taste: a CTA holds its whole tile in registers (that is what makes the
# kernel single-pass), and a 1024-thread CTA may use at most 64 registers per thread (65536 per
# SM). The forward keeps x (and h) plus w live: 16384 values over 1024 threads is 16 + 16 per
# thread (measured 34 registers). The backward keeps dy, h, w and the dW accumulator live (4 tiles):
# 8192 over 1024 threads is 4 x 8 per thread (measured 54); 16384 would be 4 x 16, > 64: spills.
_MAX_FWD_BLOCK_D = 16384
_MAX_BWD_BLOCK_D = 8192
# Narrow rows (head-dim norms, D = 128) are grouped so a CTA still moves ~4096 elements: with one
# 128-wide row per CTA, launch and reduction overhead would dominate the 256 bytes it reads.
_TILE_ELEMS = 4096


def default_eps(dtype: torch.dtype) -> float:
    """The eps F.rms_norm uses when given none: machine epsilon of the *computation* dtype.

    F.rms_norm (ATen) takes `numeric_limits<opmath_t>::epsilon()`, and the opmath type of fp16 and
    bf16 is fp32, so fp16/bf16 inputs get fp32's 1.19e-7 (NOT torch.finfo(torch.bfloat16).eps =
    7.8e-3, which would change outputs for small-norm rows); fp64 keeps fp64's epsilon.
    """
    return torch.finfo(torch.promote_types(dtype, torch.float32)).eps


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------

def rms_norm_reference(x: Tensor, weight: Optional[Tensor] = None, eps: Optional[float] = None,
                       residual: Optional[Tensor] = None, offset: float = 0.0):
    """Plain-torch RMSNorm over the last dim (differentiable through torch autograd).

    Args:
        x: (..., D) floating tensor, any layout.
        weight: (D,) of any floating dtype, or None (no affine scale).
        eps: added to mean(h^2); None -> `default_eps(x.dtype)`, which reproduces
            `F.rms_norm(x, (D,))` bit for bit.
        residual: (..., D) like x, or None. When given, h = x + residual (in x's dtype) is
            normalised and also returned.
        offset: the scale is (offset + weight), formed in fp32 (Gemma's 1 + w: in bf16 the sum
            would round); 0 (default) scales by the weight itself.
    Returns:
        y (x's shape and dtype), or (y, h) when residual is given. Statistics and the weight
        product are computed in fp32 (fp64 for fp64 inputs) and rounded once.
    """
    if eps is None:
        eps = default_eps(x.dtype)
    h = x if residual is None else x + residual
    opmath = torch.promote_types(h.dtype, torch.float32)
    hf = h.to(opmath)
    rstd = torch.rsqrt(hf.pow(2).mean(dim=-1, keepdim=True) + eps)
    y = hf * rstd
    if weight is not None:
        y = y * (weight.to(opmath) + offset if offset else weight.to(opmath))
    y = y.to(x.dtype)
    return y if residual is None else (y, h)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _load_h(x_rows, R, rows64, stride_r, c, mask, HAS_RESIDUAL: tl.constexpr):
        """The (rows, c) tile of the normalised input h: x, or x + r rounded once to x's dtype
        (fp32 add then one rounding == the correctly rounded 16-bit add torch does, since fp32 has
        more than 2p + 2 mantissa bits; the interpreter cannot add bf16 natively)."""
        x = tl.load(x_rows + c[None, :], mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(R + rows64[:, None] * stride_r + c[None, :], mask=mask, other=0.0)
            return (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        return x

    @triton.jit
    def _rms_norm_fwd_kernel(X, R, W, Y, H, RSTD, stride_x, stride_r, stride_y, stride_h, N, D, eps,
                             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NUM_CHUNKS: tl.constexpr,
                             HAS_WEIGHT: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
        """One CTA normalises BLOCK_N rows. X/R (inputs), Y/H (outputs): (N, D) with row strides
        stride_x/stride_r/stride_y/stride_h and unit column stride; RSTD: (N,) fp32; W: (D,)."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        # int64 row offsets: N * D exceeds 2^31 elements for long sequences x wide models.
        rows64 = rows.to(tl.int64)
        x_rows = X + rows64[:, None] * stride_x
        y_rows = Y + rows64[:, None] * stride_y
        # Scalar args arrive as fp32 compiled but as Python floats interpreted; the cast makes
        # both paths (and Inductor-traced calls, which promote scalars to fp64) compute in fp32.
        eps32 = tl.cast(eps, tl.float32)
        cols = tl.arange(0, BLOCK_D)
        if NUM_CHUNKS == 1:
            # Single pass: the whole row lives in registers between the reduction and the store.
            col_mask = cols < D
            mask = row_mask[:, None] & col_mask[None, :]
            h = _load_h(x_rows, R, rows64, stride_r, cols, mask, HAS_RESIDUAL)
            if HAS_RESIDUAL:
                tl.store(H + rows64[:, None] * stride_h + cols[None, :], h, mask=mask)
            hf = h.to(tl.float32)
            rstd = tl.rsqrt(tl.sum(hf * hf, axis=1) / D + eps32)
            tl.store(RSTD + rows, rstd, mask=row_mask)
            y = hf * rstd[:, None]
            if HAS_WEIGHT:
                w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
                y = y * w[None, :]
            tl.store(y_rows + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
        else:
            # Rows too wide for registers: accumulate squares chunk by chunk (elementwise into a
            # tile, reduced once, so the summation order does not depend on the chunk count),
            # then re-read x (L2-resident for one CTA's row) to scale it. Costs one extra read.
            acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            for k in range(NUM_CHUNKS):
                c = k * BLOCK_D + cols
                mask = row_mask[:, None] & (c < D)[None, :]
                h = _load_h(x_rows, R, rows64, stride_r, c, mask, HAS_RESIDUAL)
                if HAS_RESIDUAL:
                    tl.store(H + rows64[:, None] * stride_h + c[None, :], h, mask=mask)
                hf = h.to(tl.float32)
                acc += hf * hf
            rstd = tl.rsqrt(tl.sum(acc, axis=1) / D + eps32)
            tl.store(RSTD + rows, rstd, mask=row_mask)
            for k in range(NUM_CHUNKS):
                c = k * BLOCK_D + cols
                mask = row_mask[:, None] & (c < D)[None, :]
                # Recompute h from x and r rather than reading back H: re-reading H written by
                # other threads of this CTA would need a barrier to be race-free.
                h = _load_h(x_rows, R, rows64, stride_r, c, mask, HAS_RESIDUAL)
                y = h.to(tl.float32) * rstd[:, None]
                if HAS_WEIGHT:
                    w = tl.load(W + c, mask=c < D, other=0.0).to(tl.float32)
                    y = y * w[None, :]
                tl.store(y_rows + c[None, :], y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_bwd_rowdot_kernel(DY, Hs, RSTD, W, C, stride_dy, stride_h, N, D,
                                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NUM_CHUNKS: tl.constexpr,
                                    HAS_WEIGHT: tl.constexpr):
        """Wide rows only: C[n] = mean_j(dy * w * hhat)[n], the one row-wide reduction the
        backward needs, so the dx/dW kernel can then split the row into column chunks."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        rows64 = rows.to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for k in range(NUM_CHUNKS):
            c = k * BLOCK_D + cols
            mask = row_mask[:, None] & (c < D)[None, :]
            dy = tl.load(DY + rows64[:, None] * stride_dy + c[None, :], mask=mask, other=0.0).to(tl.float32)
            h = tl.load(Hs + rows64[:, None] * stride_h + c[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                dy = dy * tl.load(W + c, mask=c < D, other=0.0).to(tl.float32)[None, :]
            acc += dy * h
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        tl.store(C + rows, tl.sum(acc, axis=1) * rstd / D, mask=row_mask)

    @triton.jit
    def _rms_norm_bwd_kernel(DY, Hs, RSTD, W, DH, DX, DW_PARTIAL, C, stride_dy, stride_h, stride_dh, stride_dx,
                             stride_dw, N, D,
                             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                             HAS_DH: tl.constexpr, PRECOMPUTED_C: tl.constexpr):
        """Grid (G, column chunks). CTA (p, k) handles row blocks p, p + G, p + 2G, ... over
        columns [k * BLOCK_D, (k + 1) * BLOCK_D), writes dx there, and writes its dW partial sum
        (fp32) to DW_PARTIAL[p, cols]: each element is written by exactly one CTA, no atomics,
        so the later fixed-order sum over p is bitwise reproducible.

        DY/Hs/DH (inputs) and DX (output, Hs's dtype): (N, D) with row strides, unit column stride;
        DW_PARTIAL: (G, D) fp32, row stride stride_dw; RSTD: (N,) fp32; C: (N,) fp32 row reductions
        when PRECOMPUTED_C (wide rows), else unused.
        """
        pid = tl.program_id(0)
        num_progs = tl.num_programs(0)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        if HAS_WEIGHT:
            # Loaded once per CTA and reused for every row it visits (the persistent grid's point).
            w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
            dw_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for rb in range(pid, tl.cdiv(N, BLOCK_N), num_progs):
            rows = rb * BLOCK_N + tl.arange(0, BLOCK_N)
            row_mask = rows < N
            rows64 = rows.to(tl.int64)
            mask = row_mask[:, None] & col_mask[None, :]
            dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            h = tl.load(Hs + rows64[:, None] * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            # Masked rows read rstd = 0, so they contribute exactly 0 to dW.
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            hhat = h * rstd[:, None]
            if HAS_WEIGHT:
                g = dy * w[None, :]
                dw_acc += dy * hhat
            else:
                g = dy
            if PRECOMPUTED_C:
                c = tl.load(C + rows, mask=row_mask, other=0.0)
            else:
                c = tl.sum(g * hhat, axis=1) / D
            dx = (g - hhat * c[:, None]) * rstd[:, None]
            if HAS_DH:
                dx += tl.load(DH + rows64[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_WEIGHT:
            # Rows summed in-register first (BLOCK_N > 1 for narrow D), then one store per column.
            tl.store(DW_PARTIAL + pid.to(tl.int64) * stride_dw + cols, tl.sum(dw_acc, axis=0), mask=col_mask)


# --------------------------------------------------------------------------------------------
# Launch meta-parameters (shared by the launchers and KERNEL_CONFIGS, so the compile gate checks
# exactly what runs)
# --------------------------------------------------------------------------------------------

def _warps_for(elems: int, elems_per_thread: int) -> int:
    # 4..32 warps (a CTA holds at most 1024 threads), sized so each thread owns `elems_per_thread`
    # elements of the tile: whole 128-bit loads of 16-bit data, and few enough live registers
    # (<= 64, measured by the compile gate) for >= 1024 resident threads (50% occupancy) per SM.
    return max(4, min(32, elems // (32 * elems_per_thread)))


def _fwd_meta(D: int) -> dict:
    """BLOCK_N, BLOCK_D, NUM_CHUNKS and num_warps of the forward kernel for row width D."""
    block_d = min(_next_pow2(D), _MAX_FWD_BLOCK_D)
    block_n = max(1, _TILE_ELEMS // block_d)
    # Forward: 16 elements/thread (two 128-bit loads per tensor) keeps x, r, w live in 32 registers.
    return dict(BLOCK_N=block_n, BLOCK_D=block_d, NUM_CHUNKS=-(-D // block_d),
                num_warps=_warps_for(block_n * block_d, 16))


def _bwd_meta(D: int) -> dict:
    """BLOCK_N, BLOCK_D, NUM_CHUNKS and num_warps of the backward kernels for row width D."""
    block_d = min(_next_pow2(D), _MAX_BWD_BLOCK_D)
    block_n = max(1, _TILE_ELEMS // block_d)
    # Backward: dy, h, dh, w and the dW accumulator are live at once; at 16 elements/thread that
    # measured ~100 registers (25% occupancy), at 8 elements/thread <= 64 (50%).
    return dict(BLOCK_N=block_n, BLOCK_D=block_d, NUM_CHUNKS=-(-D // block_d),
                num_warps=_warps_for(block_n * block_d, 8))


# Programs of the persistent backward grid on CPU (interpreter): small, so that tests with a few
# dozen rows already make every CTA loop over several row blocks.
_CPU_BWD_PROGRAMS = 4


def _bwd_programs(x: Tensor, num_row_blocks: int, num_warps: int) -> int:
    """Rows of the dW partial buffer: enough CTAs to fill every SM to 2048 resident threads, no
    more (more would only make the partial buffer, and its final sum, bigger)."""
    if x.is_cuda:
        per_sm = max(1, 2048 // (32 * num_warps))
        cap = _sm_count(x.device) * per_sm
    else:
        cap = _CPU_BWD_PROGRAMS
    return max(1, min(num_row_blocks, cap))


def _check_launch(name: str, t: Tensor, shape: tuple[int, ...], dtype: Optional[torch.dtype] = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if t.numel() == 0:
        return  # no element is addressed: strides are irrelevant (autograd hands out stride-0 empties)
    if t.ndim == 2 and t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}")
    if t.ndim == 1 and t.shape[0] > 1 and t.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous, got stride {t.stride()}")


def _check_lead(launcher: str, name: str, t: Tensor) -> tuple[int, int]:
    """Check a launcher's leading tensor (x forward, h backward), whose (N, D) and dtype every other
    argument follows; returns (N, D)."""
    if triton is None:
        raise RuntimeError(f"{launcher} needs triton installed")
    if not isinstance(t, Tensor) or t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D tensor (N, D), got {getattr(t, 'shape', type(t).__name__)}")
    if t.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32 for the triton backend, got {t.dtype}")
    N, D = t.shape
    if D == 0:
        raise ValueError(f"{name} must have a non-empty last dim D, got shape (N, 0)")
    _check_launch(name, t, (N, D))
    return N, D


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _check_weight(weight: Tensor, D: int) -> None:
    _check_launch("weight", weight, (D,))
    if weight.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"weight must be float16, bfloat16 or float32, got {weight.dtype}")


def rms_norm_fwd_triton(x: Tensor, weight: Optional[Tensor], residual: Optional[Tensor],
                        eps: float) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Triton forward. x: (N, D) fp16/bf16/fp32, any row stride, unit column stride; weight: (D,)
    contiguous fp16/bf16/fp32 (read in fp32) or None; residual: (N, D) in x's dtype (any row
    stride) or None.

    Returns (y, rstd, h): y (N, D) contiguous in x's dtype; rstd (N,) fp32; h = x + residual
    (N, D) contiguous in x's dtype, or None without residual. Inputs are never written.
    """
    N, D = _check_lead("rms_norm_fwd_triton", "x", x)
    if weight is not None:
        _check_weight(weight, D)
    if residual is not None:
        _check_launch("residual", residual, (N, D), x.dtype)
    return _fwd_triton(x, weight, residual, eps)


def _fwd_triton(x: Tensor, weight: Optional[Tensor], residual: Optional[Tensor],
                eps: float) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """rms_norm_fwd_triton for callers that validated the inputs (rms_norm's autograd path)."""
    N, D = x.shape
    y = _alloc((N, D), x.dtype, x.device)
    rstd = _alloc((N,), torch.float32, x.device)
    h = _alloc((N, D), x.dtype, x.device) if residual is not None else None
    if N == 0:
        return y, rstd, h
    meta = _fwd_meta(D)
    grid = (triton.cdiv(N, meta["BLOCK_N"]),)
    with _device_ctx(x):
        _rms_norm_fwd_kernel[grid](
            x, residual, weight, y, h, rstd, _row_stride(x), _row_stride(residual) if residual is not None else 0,
            _row_stride(y), _row_stride(h) if h is not None else 0, N, D, float(eps),
            BLOCK_N=meta["BLOCK_N"], BLOCK_D=meta["BLOCK_D"], NUM_CHUNKS=meta["NUM_CHUNKS"],
            HAS_WEIGHT=weight is not None, HAS_RESIDUAL=residual is not None,
            num_warps=meta["num_warps"])
    return y, rstd, h


def rms_norm_bwd_triton(dy: Tensor, h: Tensor, rstd: Tensor, weight: Optional[Tensor],
                        dh: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """Triton backward. dy, h: (N, D) in h's dtype, any row stride, unit column stride; rstd (N,)
    fp32 from the forward; weight (D,) fp16/bf16/fp32 or None; dh (N, D) or None: gradient arriving
    at the h the forward returned (the residual stream).

    Returns (dx, dw): dx (N, D) contiguous in h's dtype (also the residual's gradient); dw (D,) in
    weight's dtype, summed deterministically (per-CTA fp32 partials, then a fixed-order sum), or
    None without weight.
    """
    N, D = _check_lead("rms_norm_bwd_triton", "h", h)
    _check_launch("dy", dy, (N, D), h.dtype)
    _check_launch("rstd", rstd, (N,), torch.float32)
    if weight is not None:
        _check_weight(weight, D)
    if dh is not None:
        _check_launch("dh", dh, (N, D), h.dtype)
    return _bwd_triton(dy, h, rstd, weight, dh)


def _bwd_triton(dy: Tensor, h: Tensor, rstd: Tensor, weight: Optional[Tensor],
                dh: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """rms_norm_bwd_triton for callers that validated the inputs (rms_norm's autograd path)."""
    N, D = h.shape
    dx = _alloc((N, D), h.dtype, h.device)
    if N == 0:
        return dx, (torch.zeros_like(weight) if weight is not None else None)
    meta = _bwd_meta(D)
    num_row_blocks = triton.cdiv(N, meta["BLOCK_N"])
    G = _bwd_programs(h, num_row_blocks, meta["num_warps"])
    partial = _alloc((G, D), torch.float32, h.device) if weight is not None else None
    precomputed = meta["NUM_CHUNKS"] > 1
    c = _alloc((N,), torch.float32, h.device) if precomputed else None
    with _device_ctx(h):
        if precomputed:
            _rms_norm_bwd_rowdot_kernel[(num_row_blocks,)](
                dy, h, rstd, weight, c, _row_stride(dy), _row_stride(h), N, D,
                BLOCK_N=meta["BLOCK_N"], BLOCK_D=meta["BLOCK_D"], NUM_CHUNKS=meta["NUM_CHUNKS"],
                HAS_WEIGHT=weight is not None, num_warps=meta["num_warps"])
        _rms_norm_bwd_kernel[(G, meta["NUM_CHUNKS"])](
            dy, h, rstd, weight, dh, dx, partial, c, _row_stride(dy), _row_stride(h),
            _row_stride(dh) if dh is not None else 0, _row_stride(dx), _row_stride(partial) if partial is not None else 0,
            N, D,
            BLOCK_N=meta["BLOCK_N"], BLOCK_D=meta["BLOCK_D"], HAS_WEIGHT=weight is not None,
            HAS_DH=dh is not None, PRECOMPUTED_C=precomputed, num_warps=meta["num_warps"])
    dw = partial.sum(dim=0).to(weight.dtype) if weight is not None else None
    return dx, dw


# The Triton backend's launchers, in the op's launcher protocol (fwd, bwd on 2-D tensors, inputs
# trusted: `rms_norm` validated them once). The CUDA backend's are rms_norm_cuda.fwd / .bwd.
TRITON_LAUNCHERS = SimpleNamespace(fwd=_fwd_triton, bwd=_bwd_triton)


# --------------------------------------------------------------------------------------------
# Autograd: one forward/backward implementation, reached two ways. torch.compile needs custom ops
# (opaque graph nodes with fake shapes: Dynamo must not trace into a Triton launch); in eager mode
# the custom-op dispatcher costs several times an autograd.Function's dispatch, more than the whole
# kernel at nanochat's smaller shapes.
# --------------------------------------------------------------------------------------------

def _fwd_impl(x: Tensor, weight: Optional[Tensor], residual: Optional[Tensor], eps: float,
              backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(y, rstd, h) of the 2-D launcher; h is an empty (0,) tensor without residual (custom ops
    cannot return None)."""
    y, rstd, h = OP.launcher(backend).fwd(x, weight, residual, eps)
    return y, rstd, (h if h is not None else x.new_empty((0,)))


def _bwd_impl(dy: Tensor, h: Tensor, rstd: Tensor, weight: Optional[Tensor], dh: Optional[Tensor],
              backend: str) -> tuple[Tensor, Tensor]:
    """(dx, dw) of the 2-D launcher; dw is an empty (0,) tensor without weight."""
    dx, dw = OP.launcher(backend).bwd(dy, h, rstd, weight, dh)
    return dx, (dw if dw is not None else h.new_empty((0,)))


def _unit_last_stride(t: Tensor) -> Tensor:
    # Autograd hands over expanded gradients (e.g. from .sum(): all strides 0); the kernels need a
    # unit column stride, and any row stride is fine.
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _save_for_backward(ctx, inputs, output) -> None:
    x, weight, residual, eps, backend = inputs
    y, rstd, h = output
    ctx.mark_non_differentiable(rstd)  # a statistic for the backward, not a model output
    ctx.has_residual = residual is not None
    ctx.has_weight = weight is not None
    ctx.backend = backend
    # Without residual the normalised input is x itself: save it rather than a copy.
    ctx.save_for_backward(h if residual is not None else x, rstd, weight)


def _grads(ctx, dy: Tensor, dh: Optional[Tensor], bwd) -> tuple:
    hs, rstd, weight = ctx.saved_tensors
    dh = _unit_last_stride(dh.to(hs.dtype)) if (ctx.has_residual and dh is not None) else None
    dx, dw = bwd(_unit_last_stride(dy.to(hs.dtype)), hs, rstd, weight, dh, ctx.backend)
    # x and residual enter through h = x + residual: both receive the same gradient.
    return dx, (dw if ctx.has_weight else None), (dx if ctx.has_residual else None), None, None


@torch.library.custom_op("nanofast::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd_op(x: Tensor, weight: Optional[Tensor], residual: Optional[Tensor], eps: float,
                     backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """x (N, D), weight (D,)?, residual (N, D)? -> y (N, D), rstd (N,) fp32, h (N, D) or (0,)."""
    return _fwd_impl(x, weight, residual, eps, backend)


@_rms_norm_fwd_op.register_fake
def _(x, weight, residual, eps, backend):
    N, D = x.shape
    h = x.new_empty((N, D)) if residual is not None else x.new_empty((0,))
    return x.new_empty((N, D)), x.new_empty((N,), dtype=torch.float32), h


@torch.library.custom_op("nanofast::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(dy: Tensor, h: Tensor, rstd: Tensor, weight: Optional[Tensor], dh: Optional[Tensor],
                     backend: str) -> tuple[Tensor, Tensor]:
    """dy, h (N, D), rstd (N,), weight (D,)?, dh (N, D)? -> dx (N, D), dw (D,) or (0,)."""
    return _bwd_impl(dy, h, rstd, weight, dh, backend)


@_rms_norm_bwd_op.register_fake
def _(dy, h, rstd, weight, dh, backend):
    dw = weight.new_empty(weight.shape) if weight is not None else h.new_empty((0,))
    return h.new_empty(h.shape), dw


torch.library.register_autograd(
    "nanofast::rms_norm_fwd",
    lambda ctx, dy, _drstd, dh: _grads(ctx, dy, dh, torch.ops.nanofast.rms_norm_bwd),
    setup_context=_save_for_backward)


class _RMSNormFunction(torch.autograd.Function):
    """Eager-mode twin of the custom op: same impl functions, no dispatcher round trip."""

    @staticmethod
    def forward(ctx, x, weight, residual, eps, backend):
        out = _fwd_impl(x, weight, residual, eps, backend)
        _save_for_backward(ctx, (x, weight, residual, eps, backend), out)
        return out

    @staticmethod
    def backward(ctx, dy, _drstd, dh):
        return _grads(ctx, dy, dh, _bwd_impl)


# --------------------------------------------------------------------------------------------
# Functional API and module
# --------------------------------------------------------------------------------------------

def _check_with_x(name: str, t: Tensor, x: Tensor) -> None:
    """residual is read in x's dtype on x's device."""
    if t.dtype != x.dtype:
        raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


def _validate(x, weight, eps, residual, offset=0.0) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (..., D), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must have a floating dtype (float16/bfloat16/float32), got {x.dtype}")
    if x.ndim == 0:
        raise ValueError("x must have shape (..., D) with at least 1 dim, got a 0-d tensor")
    D = x.shape[-1]
    if D == 0:
        raise ValueError(f"x must have a non-empty last dim D, got shape {tuple(x.shape)}")
    if D > 1 and x.stride(-1) != 1:
        raise ValueError(f"x must have a contiguous last dim (stride 1), got strides {x.stride()}; "
                         "call .contiguous() first")
    if weight is not None:
        if not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a torch.Tensor of shape ({D},) or None, got {type(weight).__name__}")
        if tuple(weight.shape) != (D,):
            raise ValueError(f"weight must have shape ({D},) (the last dim of x), got {tuple(weight.shape)}")
        # Any floating dtype: an fp32 weight with 16-bit activations (mixed precision, autocast) is
        # read in fp32; the product is fp32 either way and only the result takes x's dtype.
        if not weight.is_floating_point():
            raise TypeError(f"weight must have a floating dtype, got {weight.dtype}")
        if weight.device != x.device:
            raise ValueError(f"weight must be on x's device {x.device}, got {weight.device}")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"residual must be a torch.Tensor of shape {tuple(x.shape)} or None, "
                            f"got {type(residual).__name__}")
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        _check_with_x("residual", residual, x)
        if D > 1 and residual.stride(-1) != 1:
            raise ValueError(f"residual must have a contiguous last dim (stride 1), got strides {residual.stride()}")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0):
        raise ValueError(f"eps must be a real number >= 0 or None, got {eps!r}")
    if isinstance(offset, bool) or not isinstance(offset, numbers.Real) or not math.isfinite(offset):
        raise ValueError(f"offset must be a finite real number, got {offset!r}")
    if offset and weight is None:
        raise ValueError(f"offset={offset} scales by (offset + weight): it needs a weight")


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: Optional[float] = None,
             residual: Optional[Tensor] = None, backend: Optional[str] = None, offset: float = 0.0):
    """RMSNorm over the last dim of x, optionally fused with a preceding residual add.

    Args:
        x: (..., D) fp16/bf16/fp32 (fp64 with backend="torch"), any leading shape and strides, but
            the last dim must be contiguous.
        weight: (D,) on x's device in any floating dtype (fp16/bf16/fp32 on the kernel backends),
            e.g. fp32 parameters under 16-bit autocast: read in fp32, the product in fp32, the
            result in x's dtype, its gradient in the weight's dtype. None: nanochat's
            parameter-free norm.
        eps: None -> `default_eps(x.dtype)`, matching `F.rms_norm(x, (D,))` exactly; pass the
            model's own (Hugging Face's `variance_epsilon`, e.g. 1e-6) to match it.
        residual: (..., D) like x, or None. When given, h = x + residual is normalised.
        backend: "torch" | "triton" | "cuda" | None (triton on CUDA tensors, torch on CPU).
        offset: scale by (offset + weight), summed in fp32 (Gemma's norms: offset=1.0); needs a
            weight. The gradient still reaches `weight`.
    Returns:
        y of x's shape and dtype; or (y, h) with residual, h = x + residual (the new residual
        stream, contiguous). Differentiable w.r.t. x, weight, residual. Under
        torch.compile(fullgraph=True) the call goes through the `nanofast::rms_norm_fwd/bwd` custom
        ops; eager calls through an autograd.Function around the same launchers.
    Raises:
        TypeError / ValueError naming the offending argument and the expected shape/dtype.
    """
    OP.checks["rms_norm"](x, weight, eps, residual, offset)
    eps = default_eps(x.dtype) if eps is None else float(eps)
    be = resolve_backend(backend, x, OP.choices)
    if be == "torch":
        return rms_norm_reference(x, weight, eps, residual, offset)
    if x.dtype not in _KERNEL_DTYPES or (weight is not None and weight.dtype not in _KERNEL_DTYPES):
        raise TypeError(f"x and weight must be float16, bfloat16 or float32 for backend={be!r}, got {x.dtype}"
                        f"{'' if weight is None else f' and {weight.dtype}'}")
    if offset:
        # (offset + w) in fp32, the kernels' fp32 weight; autograd carries its gradient to w.
        weight = weight.float() + offset
    D = x.shape[-1]
    if weight is not None:
        weight = weight.contiguous()  # (D,) only: a copy is cheap if it is ever needed
    fwd = torch.ops.nanofast.rms_norm_fwd if torch.compiler.is_compiling() else _RMSNormFunction.apply
    # reshape keeps a view (any row stride) whenever the leading dims allow it, else copies once.
    y, _, h = fwd(x.reshape(-1, D), weight, None if residual is None else residual.reshape(-1, D), eps, be)
    y = y.view(x.shape)
    return y if residual is None else (y, h.view(x.shape))


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, with an optional learned (D,) scale: the scale is (offset +
    weight), the weight initialised so that it starts at 1 (ones, or zeros with Gemma's offset=1).

    forward(x, residual=None) -> y, or (y, h) with residual; see `rms_norm`. Parameters in another
    dtype than x (fp32 under 16-bit autocast) are read in fp32.
    """

    def __init__(self, dim: int, eps: Optional[float] = None, elementwise_affine: bool = True,
                 backend: Optional[str] = None, device=None, dtype=None, offset: float = 0.0) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if isinstance(offset, bool) or not isinstance(offset, numbers.Real) or not math.isfinite(offset):
            raise ValueError(f"offset must be a finite real number, got {offset!r}")
        if offset and not elementwise_affine:
            raise ValueError(f"offset={offset} scales by (offset + weight): it needs elementwise_affine=True")
        self.dim = int(dim)
        self.eps = eps
        self.backend = backend
        self.offset = float(offset)
        if elementwise_affine:
            self.weight = nn.Parameter(torch.full((self.dim,), 1.0 - self.offset, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        return rms_norm(x, self.weight, self.eps, residual, self.backend, self.offset)

    def extra_repr(self) -> str:
        return (f"{self.dim}, eps={self.eps}, elementwise_affine={self.weight is not None}, backend={self.backend}"
                + (f", offset={self.offset}" if self.offset else ""))


# --------------------------------------------------------------------------------------------
# What an H100 compiles for nanochat: the compile gate (tests, report) compiles exactly these.
# --------------------------------------------------------------------------------------------



def _fwd_config(D: int, dtype: torch.dtype, weight: bool, residual: bool,
                weight_dtype: Optional[torch.dtype] = None) -> dict:
    t = _TL_DTYPE[dtype]
    w_types = {"W": "*" + _TL_DTYPE[weight_dtype]} if weight and weight_dtype is not None else {}
    w_label = f" w:{_TL_DTYPE[weight_dtype]}" if w_types else ""
    m = _fwd_meta(D)
    const = {"BLOCK_N": m["BLOCK_N"], "BLOCK_D": m["BLOCK_D"], "NUM_CHUNKS": m["NUM_CHUNKS"],
             "HAS_WEIGHT": weight, "HAS_RESIDUAL": residual}
    if not residual:
        const.update(R=None, H=None)
    if not weight:
        const["W"] = None
    sig = gate_signature(_rms_norm_fwd_kernel, const, t, {"RSTD": "*fp32", **w_types})
    # What Triton's launcher specialises for contiguous nanochat activations: 16-byte aligned
    # pointers, row strides and D multiples of 16 (every nanochat width is).
    aligned = tuple(a for a in ("X", "R", "W", "Y", "H", "stride_x", "stride_r", "stride_y", "stride_h", "D")
                    if sig[a] != "constexpr")
    return dict(fn=_rms_norm_fwd_kernel, signature=sig, constexprs=const, num_warps=m["num_warps"],
                num_stages=3, aligned=aligned,
                config=f"fwd D={D} {t}{' +w' if weight else ''}{w_label}{' +res' if residual else ''} "
                       f"BLOCK={m['BLOCK_N']}x{m['BLOCK_D']}x{m['NUM_CHUNKS']} warps={m['num_warps']}")


def _bwd_config(D: int, dtype: torch.dtype, weight: bool, dh: bool,
                weight_dtype: Optional[torch.dtype] = None) -> dict:
    t = _TL_DTYPE[dtype]
    w_types = {"W": "*" + _TL_DTYPE[weight_dtype]} if weight and weight_dtype is not None else {}
    w_label = f" w:{_TL_DTYPE[weight_dtype]}" if w_types else ""
    m = _bwd_meta(D)
    pre = m["NUM_CHUNKS"] > 1
    const = {"BLOCK_N": m["BLOCK_N"], "BLOCK_D": m["BLOCK_D"], "HAS_WEIGHT": weight, "HAS_DH": dh,
             "PRECOMPUTED_C": pre}
    for name, used in (("W", weight), ("DH", dh), ("DW_PARTIAL", weight), ("C", pre)):
        if not used:
            const[name] = None
    sig = gate_signature(_rms_norm_bwd_kernel, const, t, {"RSTD": "*fp32", "DW_PARTIAL": "*fp32", "C": "*fp32",
                                                         **w_types})
    aligned = tuple(a for a in ("DY", "Hs", "W", "DH", "DX", "DW_PARTIAL", "stride_dy", "stride_h", "stride_dh",
                                "stride_dx", "stride_dw", "D") if sig[a] != "constexpr")
    return dict(fn=_rms_norm_bwd_kernel, signature=sig, constexprs=const, num_warps=m["num_warps"],
                num_stages=3, aligned=aligned,
                config=f"bwd D={D} {t}{' +w' if weight else ''}{w_label}{' +dh' if dh else ''} "
                       f"BLOCK={m['BLOCK_N']}x{m['BLOCK_D']}x{m['NUM_CHUNKS']} warps={m['num_warps']}")


def _rowdot_config(D: int, dtype: torch.dtype, weight: bool) -> dict:
    t = _TL_DTYPE[dtype]
    m = _bwd_meta(D)
    const = {"BLOCK_N": m["BLOCK_N"], "BLOCK_D": m["BLOCK_D"], "NUM_CHUNKS": m["NUM_CHUNKS"], "HAS_WEIGHT": weight}
    if not weight:
        const["W"] = None
    sig = gate_signature(_rms_norm_bwd_rowdot_kernel, const, t, {"RSTD": "*fp32", "C": "*fp32"})
    aligned = tuple(a for a in ("DY", "Hs", "W", "C", "stride_dy", "stride_h", "D") if sig[a] != "constexpr")
    return dict(fn=_rms_norm_bwd_rowdot_kernel, signature=sig, constexprs=const, num_warps=m["num_warps"],
                num_stages=3, aligned=aligned,
                config=f"bwd-rowdot D={D} {t}{' +w' if weight else ''} "
                       f"BLOCK={m['BLOCK_N']}x{m['BLOCK_D']}x{m['NUM_CHUNKS']} warps={m['num_warps']}")


def _kernel_configs() -> list[dict]:
    if triton is None:
        return []
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    cfgs = [
        # Head-dim QK norm (parameter-free, as nanochat's F.rms_norm on q and k).
        _fwd_config(128, bf16, weight=False, residual=False),
        _bwd_config(128, bf16, weight=False, dh=False),
        # d_model norms of depth 12 .. 26 (parameter-free).
        _fwd_config(768, bf16, weight=False, residual=False),
        _bwd_config(768, bf16, weight=False, dh=False),
        _fwd_config(1280, bf16, weight=False, residual=False),
        _bwd_config(1280, bf16, weight=False, dh=False),
        _fwd_config(1536, bf16, weight=False, residual=False),
        _bwd_config(1536, bf16, weight=False, dh=False),
        _fwd_config(1664, bf16, weight=False, residual=False),
        _bwd_config(1664, bf16, weight=False, dh=False),
        # Fused residual add + learned scale: the full-feature variants.
        _fwd_config(1536, bf16, weight=True, residual=True),
        _bwd_config(1536, bf16, weight=True, dh=True),
        _fwd_config(768, fp16, weight=True, residual=True),
        _bwd_config(768, fp16, weight=True, dh=True),
        # Mixed precision (Hugging Face models, autocast): fp32 weight, bf16 activations.
        _fwd_config(2048, bf16, weight=True, residual=False, weight_dtype=fp32),
        _bwd_config(2048, bf16, weight=True, dh=False, weight_dtype=fp32),
        _fwd_config(128, fp16, weight=False, residual=False),
        # fp32 (CPU-parity / debugging runs).
        _fwd_config(768, fp32, weight=True, residual=False),
        _bwd_config(768, fp32, weight=True, dh=False),
        # Wide rows: 4096 single-pass both ways; 16384 single-pass forward, chunked backward.
        _fwd_config(4096, bf16, weight=True, residual=False),
        _bwd_config(4096, bf16, weight=True, dh=False),
        _fwd_config(16384, bf16, weight=True, residual=True),
        _rowdot_config(16384, bf16, weight=True),
        _bwd_config(16384, bf16, weight=True, dh=True),
    ]
    return cfgs


KERNEL_CONFIGS: list[dict] = _kernel_configs()
"""Each entry: keyword arguments of `compile_gate.compile_triton` (fn, signature, constexprs,
num_warps, num_stages, aligned, config), built from the same `_fwd_meta` / `_bwd_meta` the
launchers use, so `compile_triton(**cfg, arch=90)` compiles exactly what an H100 launches.
Compile them in a process without TRITON_INTERPRET=1: under the interpreter, triton.language's own
@jit helpers (tl.sum, tl.cdiv) are interpreter functions the compiler cannot inline."""


def cost(tokens: int, d: int, mode: str = "fwd", weight: bool = False, itemsize: int = 2) -> dict:
    """Bytes and FLOPs of one call on (tokens, d), each tensor moved once. Forward: read x, write y,
    write rstd (fp32) [, read w]. Backward ("fwd+bwd"): read dy, x, rstd, write dx [, read w, write
    dw]. A handful of FLOPs per element: far below any GPU's ridge point."""
    nd = tokens * d * itemsize
    fwd = 2 * nd + 4 * tokens + (d * itemsize if weight else 0)
    if mode == "fwd":
        return {"bytes": fwd, "flops": 4 * tokens * d}
    if mode != "fwd+bwd":
        raise ValueError(f"mode must be 'fwd' or 'fwd+bwd', got {mode!r}")
    return {"bytes": fwd + 3 * nd + 4 * tokens + (2 * d * itemsize if weight else 0), "flops": 10 * tokens * d}


def _vendor(x: Tensor, weight: Optional[Tensor] = None, eps: Optional[float] = None,
            residual: Optional[Tensor] = None):
    h = x if residual is None else x + residual
    y = torch.nn.functional.rms_norm(h, (h.shape[-1],), weight, eps)
    return y if residual is None else (y, h)


OP = Op(name="rms_norm", vendor="torch", kernels=("triton", "cuda"), unmeasured="triton",
        why="memory-bound: the fused kernel reads and writes each element once",
        checks={"rms_norm": _validate}, references={"rms_norm": rms_norm_reference}, vendor_path=_vendor,
        launchers={"triton": TRITON_LAUNCHERS, "cuda": "rms_norm_cuda"}, cost=cost, configs=lambda arch=90: KERNEL_CONFIGS)
