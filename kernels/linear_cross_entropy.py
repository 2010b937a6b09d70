"""Fused, chunked linear + cross-entropy (the language-model head's loss) that never materialises
the (tokens x vocab) logits or their gradient, in Hugging Face's / PyTorch's conventions
(`linear_cross_entropy`: ignore_index -100, optional bias, softcap, label smoothing, z-loss) and in
nanofast's own (`linear_softcap_cross_entropy`: ignore -1, an explicit softcap). Layered kernel ->
per-chunk step -> chunked launcher -> autograd (an autograd.Function eagerly, custom ops under
torch.compile) -> functional API -> modules. Liger-Kernel's FusedLinearCrossEntropy is the design
anchor (written here, not copied).

Maths, per token row with hidden state x (C,), weight W (V, C), bias b (V,)?, target y:

    z    = x @ W^T + b                    (the GEMM in x's dtype, W and b cast to it, as F.linear)
    c    = s * tanh(z / s)                (fp32; s = softcap, None or 0 = no cap: c = z)
    lse  = log(sum_v exp(c_v))
    loss = (1 - eps) (lse - c_y) + eps (lse - mean_v c_v) + zl lse^2      (0 for y = ignore_index)
    dc   = softmax(c) (1 + 2 zl lse) - (1 - eps) onehot(y) - eps / V
    dz   = row_scale * dc * (1 - (c / s)^2)                               (0 for y = ignore_index)
    dx   = dz @ W,  dW = dz^T @ x,  db = sum_rows dz   (dW, db accumulated in fp32 over chunks)

eps = label_smoothing as F.cross_entropy defines it; zl = z_loss (PaLM's auxiliary loss, which
keeps lse near 0 so bf16 logits keep their precision). "mean" divides the summed loss (z-loss
included) by the number of rows whose target is not ignore_index, as F.cross_entropy does.

The rows are processed in chunks of R rows: the chunk's logits (R, V) are one GEMM, the per-row
kernel turns them into loss, lse and (in place) dz, and two more GEMMs give the chunk's dx and its
dW contribution. Only one (R, V) buffer is alive at a time (the unfused path holds the (N, V)
logits in the compute dtype, their fp32 capped copy, and gradients of both).

For reduction "mean"/"sum" the gradients are computed IN THE FORWARD (Liger-style: 3 GEMMs per
chunk, where forward + recomputing backward would need 4) and the backward only scales the saved
dx / dW / db by the incoming scalar gradient. Reduction "none" has a per-row upstream gradient that
is unknown in the forward: it saves lse (N,) and recomputes each chunk's logits in the backward.
"""
from __future__ import annotations

import math
import numbers
from types import SimpleNamespace
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backend import resolve_backend
from .compile_gate import gate_signature
from .op import Op
from .launch import TL_DTYPE as _TL_DTYPE, alloc as _alloc, device_ctx as _device_ctx, next_pow2 as _next_pow2

try:  # triton is optional: backend="torch" works without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on installs without triton
    triton = None
    tl = None

__all__ = ["linear_cross_entropy", "linear_cross_entropy_reference", "LinearCrossEntropyLoss",
           "linear_softcap_cross_entropy", "linear_softcap_cross_entropy_reference", "LinearSoftcapCrossEntropy",
           "KERNEL_CONFIGS", "default_chunk_rows"]

_REDUCTIONS = ("mean", "sum", "none")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Elements of one chunk's (R, V) logits buffer. CPU: 2^25 elements (128 MiB in fp32; 1024 rows at
# V = 32768). Small chunks lose in a whole training step: each chunk's dW += dlogits^T x re-reads
# and re-writes the full fp32 (V, C) accumulator (32 MiB at V = 32768, C = 256) with only R rows of
# work, and GEMMs of few rows run below the CPU's peak; at this size a training step runs as fast
# as the unfused head with a quarter of its logits memory (bench/test_bench_linear_cross_entropy.py).
# GPU: 2^27 elements (256 MiB in bf16: 2048 rows at V = 65536) keep every GEMM at >= 2048 x 65536
# x C, enough 128x256 tiles (>= 4096) to fill an H100's 132 SMs many times over, while bounding the
# logits memory to an eighth of what N = 16384 unfused rows take (2 GiB bf16 logits + 4 GiB fp32
# capped copy, and their gradients).
_CPU_CHUNK_ELEMS = 1 << 25
_GPU_CHUNK_ELEMS = 1 << 27

# Kernel tiling: one program per row streams the row through BLOCK_V-wide blocks, twice (online
# max/sum-exp, then the in-place gradient). Register arithmetic for the widest block, 4096 values
# over 8 warps (256 threads): 16 values per thread per live tile. Pass 2 keeps about three tiles
# live at once (the loaded logits, tanh, the probability/gradient): <= 48 registers of data plus
# addressing and the row's scalars, under the 64 that keep >= 1024 threads (50% occupancy,
# 65536 registers per SM) resident; 16 bf16 values per thread are two 128-bit loads. The compile
# gate measures 39-47 registers, no spills, for V = 256 .. 65536. A 8192-wide block would double
# the data to ~96 registers (25% occupancy) for a loop that is bandwidth-bound either way, and
# more warps per row would only add reduction traffic (at V = 65536 a GPU chunk has 2048 rows,
# i.e. >= 15 programs for each of an H100's 132 SMs). Narrow rows (small V) shrink the block to
# next_pow2(V) (>= 16) and the warps to keep ~16 values per thread (>= 1 warp).
_MAX_BLOCK_V = 4096
_MIN_BLOCK_V = 16
_VALUES_PER_THREAD = 16
_NUM_WARPS_MAX = 8


class _Loss(NamedTuple):
    """The per-row loss's options, validated: ignore_index (any int), softcap (0.0 = no cap),
    label_smoothing in [0, 1], z_loss >= 0."""
    ignore_index: int
    softcap: float
    label_smoothing: float
    z_loss: float


def _meta(V: int) -> dict:
    """BLOCK_V and num_warps of the per-row kernel for vocabulary size V."""
    block_v = max(_MIN_BLOCK_V, min(_next_pow2(V), _MAX_BLOCK_V))
    warps = max(1, min(_NUM_WARPS_MAX, block_v // (32 * _VALUES_PER_THREAD)))
    return dict(BLOCK_V=block_v, num_warps=warps)


def default_chunk_rows(N: int, V: int, device: torch.device) -> int:
    """Rows per chunk: clamp(budget // V, 1, N), budget _GPU_CHUNK_ELEMS on CUDA, else _CPU_CHUNK_ELEMS."""
    budget = _GPU_CHUNK_ELEMS if device.type == "cuda" else _CPU_CHUNK_ELEMS
    return max(1, min(max(N, 1), budget // max(V, 1)))


# --------------------------------------------------------------------------------------------
# References (plain, unfused torch)
# --------------------------------------------------------------------------------------------

def _reference(x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], ignore_index: int,
               softcap: Optional[float], label_smoothing: float, z_loss: float, reduction: str) -> Tensor:
    """The unvalidated maths of both references."""
    logits = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype)).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits.reshape(-1, logits.size(-1))
    flat = target.reshape(-1)
    loss = F.cross_entropy(logits, flat, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction=reduction)
    if z_loss:
        valid = flat != ignore_index
        z = torch.where(valid, torch.logsumexp(logits, dim=-1).square(), 0.0) * z_loss
        loss = loss + (z if reduction == "none" else z.sum() / valid.sum() if reduction == "mean" else z.sum())
    return loss.view(target.shape) if reduction == "none" else loss


def linear_cross_entropy_reference(x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, *,
                                   ignore_index: int = -100, softcap: Optional[float] = None,
                                   label_smoothing: float = 0.0, z_loss: float = 0.0, reduction: str = "mean",
                                   backend: Optional[str] = None, chunk_rows: Optional[int] = None) -> Tensor:
    """`linear_cross_entropy` in plain, unfused torch, the definition the fused op is tested against:

        logits = F.linear(x, weight.to(x.dtype), bias.to(x.dtype)).float()
        logits = softcap * tanh(logits / softcap)                      (if softcap)
        loss   = F.cross_entropy(logits, target, ignore_index=..., label_smoothing=..., reduction=...)
               + z_loss * lse^2 of the non-ignored rows, reduced the same way

    Same arguments and result as `linear_cross_entropy` (validated alike); `backend` and
    `chunk_rows` are accepted so the two are interchangeable, and ignored (plain torch, unchunked).
    Holds the whole (N, V) logits and their fp32 copy.
    """
    OP.checks["linear_cross_entropy"](x, weight, target, bias, ignore_index, softcap, label_smoothing, z_loss,
                                      reduction, chunk_rows)
    return _reference(x, weight, target, bias, int(ignore_index), softcap, float(label_smoothing), float(z_loss),
                      reduction)


def linear_softcap_cross_entropy_reference(x: Tensor, weight: Tensor, targets: Tensor, softcap: Optional[float],
                                           reduction: str = "mean") -> Tensor:
    """Plain, unfused torch: logits = F.linear(x, weight.to(x.dtype)) in x's dtype, then fp32
    softcap * tanh(logits / softcap) (softcap None or 0: no cap), then F.cross_entropy with
    ignore_index=-1. x (..., C); weight (V, C); targets (...) int64. "none" returns targets' shape.
    Exactly what nanofast's model computes (ops.linear + ops.softcap_cross_entropy).
    Validated like `linear_softcap_cross_entropy`."""
    OP.checks["linear_softcap_cross_entropy"](x, weight, targets, softcap, reduction, None)
    return _reference(x, weight, targets, None, -1, softcap, 0.0, 0.0, reduction)


# --------------------------------------------------------------------------------------------
# Triton kernel: one program per row of a chunk
# --------------------------------------------------------------------------------------------

if triton is not None:
    @triton.jit
    def _tanh(u):
        # tl has no tanh: tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2|u|), which never overflows.
        # Below |u| = 1/8 (where 1 - e cancels) a degree-7 Taylor polynomial, error < 2e-9 relative.
        a = tl.abs(u)
        e = tl.exp(-2.0 * a)
        big = (1.0 - e) / (1.0 + e)
        a2 = a * a
        small = a * (1.0 + a2 * (-0.3333333333333333 + a2 * (0.13333333333333333 + a2 * -0.05396825396825397)))
        t = tl.where(a < 0.125, small, big)
        return tl.where(u < 0, -t, t)

    @triton.jit
    def _lce_row_kernel(LOGITS, TARGETS, LOSS, LSE, SCALE, stride_l, stride_s, V, ignore_index, softcap,
                        smoothing, z_loss, BLOCK_V: tl.constexpr, HAS_CAP: tl.constexpr,
                        HAS_SMOOTH: tl.constexpr, HAS_ZLOSS: tl.constexpr, FORWARD: tl.constexpr,
                        GRAD: tl.constexpr):
        """Row r of LOGITS (R, V) in the compute dtype. FORWARD: LOSS[r] = the row's loss (0 for
        target == ignore_index), LSE[r] = lse (fp32). GRAD: overwrite the row with
        SCALE[r * stride_s] * dloss/dlogits, in LOGITS' dtype (0 for an ignored target); without
        FORWARD the row's lse is read from LSE. Label smoothing and z-loss are constexpr branches:
        without them the kernel is instruction for instruction the plain softcapped one."""
        row = tl.program_id(0).to(tl.int64)
        ptr = LOGITS + row * stride_l  # int64: R * V may exceed 2^31 elements
        target = tl.load(TARGETS + row)
        valid = target != ignore_index
        cap = tl.cast(softcap, tl.float32)
        if FORWARD:
            m = tl.cast(float("-inf"), tl.float32)
            s = tl.cast(0.0, tl.float32)
            total = tl.cast(0.0, tl.float32)
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                mask = offs < V
                z = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
                if HAS_CAP:
                    z = cap * _tanh(z / cap)
                if HAS_SMOOTH:
                    # Masked lanes hold 0 (tanh(0) = 0 too): they add nothing to the row's sum.
                    total += tl.sum(z, axis=0)
                z = tl.where(mask, z, float("-inf"))
                m_new = tl.maximum(m, tl.max(z, axis=0))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
                m = m_new
            lse = m + tl.log(s)
            # A target outside [0, V) (other than ignore_index) is never dereferenced: its loss is
            # NaN (on CUDA the launcher does not check targets, which would cost a device sync;
            # F.cross_entropy asserts).
            in_range = (target >= 0) & (target < V)
            zt = tl.load(ptr + tl.where(in_range, target, 0)).to(tl.float32)
            if HAS_CAP:
                zt = cap * _tanh(zt / cap)
            loss = lse - zt
            if HAS_SMOOTH:
                eps = tl.cast(smoothing, tl.float32)
                loss = (1.0 - eps) * loss + eps * (lse - total / V)
            if HAS_ZLOSS:
                loss += tl.cast(z_loss, tl.float32) * lse * lse
            loss = tl.where(in_range, loss, float("nan"))
            tl.store(LOSS + row, tl.where(valid, loss, 0.0))
            tl.store(LSE + row, lse)
        else:
            lse = tl.load(LSE + row)
        if GRAD:
            scale = tl.where(valid, tl.load(SCALE + row * stride_s), 0.0)
            if HAS_ZLOSS:
                # d(zl lse^2)/dc_v = 2 zl lse softmax_v: the softmax's coefficient, once per row.
                p_coef = 1.0 + 2.0 * tl.cast(z_loss, tl.float32) * lse
            if HAS_SMOOTH:
                on = 1.0 - tl.cast(smoothing, tl.float32)
                off = tl.cast(smoothing, tl.float32) / V
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                mask = offs < V
                z = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
                if HAS_CAP:
                    t = _tanh(z / cap)
                    p = tl.exp(cap * t - lse)
                else:
                    p = tl.exp(z - lse)
                if HAS_ZLOSS:
                    p = p * p_coef
                if HAS_SMOOTH:
                    g = p - tl.where(offs == target, on, 0.0) - off
                else:
                    g = p - tl.where(offs == target, 1.0, 0.0)
                if HAS_CAP:
                    g = g * (1.0 - t * t)
                tl.store(ptr + offs, (g * scale).to(LOGITS.dtype.element_ty), mask=mask)


def _step_triton(logits: Tensor, targets: Tensor, loss: Tensor, lse: Tensor, scale: Tensor, opts: _Loss,
                 forward: bool, grad: bool) -> None:
    """The per-chunk step through the Triton kernel: logits (R, V) with unit column stride, targets
    (R,) int64, loss / lse (R,) fp32 outputs (lse an input without `forward`), scale () or (R,) fp32."""
    R, V = logits.shape
    if R == 0:
        return
    meta = _meta(V)
    with _device_ctx(logits):
        _lce_row_kernel[(R,)](
            logits, targets, loss, lse, scale, logits.stride(0), scale.stride(0) if scale.ndim else 0, V,
            opts.ignore_index, float(opts.softcap), float(opts.label_smoothing), float(opts.z_loss),
            BLOCK_V=meta["BLOCK_V"], HAS_CAP=opts.softcap > 0, HAS_SMOOTH=opts.label_smoothing > 0,
            HAS_ZLOSS=opts.z_loss > 0, FORWARD=forward, GRAD=grad, num_warps=meta["num_warps"])


# --------------------------------------------------------------------------------------------
# The same step in torch (the "torch" backend: CPU, or anywhere without triton)
# --------------------------------------------------------------------------------------------

def _step_torch(logits: Tensor, targets: Tensor, loss: Tensor, lse: Tensor, scale: Tensor, opts: _Loss,
                forward: bool, grad: bool) -> None:
    """The kernel's maths on a chunk with torch ops, in place where it can be (fp32 temporaries of
    the chunk's size: at most two, the capped logits and tanh). Without label smoothing and z-loss
    the op sequence is exactly the plain softcapped one (nanofast's model loss stays bit-identical)."""
    softcap, eps, zl = opts.softcap, opts.label_smoothing, opts.z_loss
    z = logits.float()  # the logits themselves when fp32
    alias = logits.dtype == torch.float32 and not softcap
    if softcap:
        t = z.div(softcap).tanh_()
        c = t.mul(softcap)
    else:
        c = z
    valid = targets != opts.ignore_index
    tgt = torch.where(valid, targets, 0)[:, None]  # ignored rows gather column 0, then get 0
    if forward:
        m = torch.logsumexp(c, dim=1)
        lse.copy_(m)
        row = m - c.gather(1, tgt)[:, 0]
        if eps:
            row = (1.0 - eps) * row + eps * (m - c.mean(dim=1))
        if zl:
            row = row + zl * m.square()
        loss.copy_(torch.where(valid, row, 0.0))
    if grad:
        p = c.sub_(lse[:, None]).exp_()  # overwrites the fp32 logits (alias) or a temporary
        if zl:
            p.mul_((1.0 + 2.0 * zl * lse)[:, None])
        hit = valid.to(p.dtype)
        p.scatter_add_(1, tgt, (-(1.0 - eps) * hit if eps else -hit)[:, None])
        if eps:
            p.sub_(eps / logits.shape[1])
        if softcap:
            p.mul_(t.square_().neg_().add_(1.0))
        p.mul_(torch.where(valid, scale, 0.0)[:, None])
        if not alias:
            logits.copy_(p)


# --------------------------------------------------------------------------------------------
# The chunked launcher
# --------------------------------------------------------------------------------------------

def _chunked(x: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, opts: _Loss, backend: str,
             chunk_rows: Optional[int], scale: Optional[Tensor], want_x: bool, want_w: bool, want_b: bool,
             lse_in: Optional[Tensor] = None):
    """The chunk loop, inputs validated. x (N, C) float, any strides; weight (V, C); bias (V,) or
    None; targets (N,).

    scale None: forward only -> (loss (N,), lse (N,), None, None, None).
    scale given (() or (N,) fp32): gradients for the rows, dx (N, C) in x's dtype if want_x,
    dW (V, C) fp32 if want_w, db (V,) fp32 if want_b. With lse_in (the backward of reduction
    "none") the forward pass is skipped and each row's lse is read from it.

    Rows whose target is ignore_index have zero loss and zero gradient, yet their (R, V) logits cost
    as much as any row's: three or four GEMMs and the vocabulary-wide softcap / exp passes. Where
    counting them needs no device sync (CPU tensors) and no trace is being recorded, only the kept
    rows go through the loop: RL's policy loss (eager; its prompts masked) keeps about 40% of its
    rows. A compiled training step (the cpu preset's pretraining, mid-training and SFT) runs every
    row. The kept rows' values are what the full loop computes for them (each row's maths reads
    only its own logits row); ignored rows get loss 0, lse 0 (never read: they
    are dropped again in the backward) and dx 0. On CUDA a count is a host sync per call, and under
    torch.compile or a CUDA graph the row count must stay static: the full loop runs there.
    """
    if x.device.type == "cpu" and not torch.compiler.is_compiling() and x.shape[0]:
        keep = (targets != opts.ignore_index).nonzero()[:, 0]
        if keep.numel() < x.shape[0]:
            return _compacted(keep, x, weight, bias, targets, opts, backend, chunk_rows, scale, want_x, want_w,
                              want_b, lse_in)
    return _chunk_loop(x, weight, bias, targets, opts, backend, chunk_rows, scale, want_x, want_w, want_b, lse_in)


def _compacted(keep: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, opts: _Loss,
               backend: str, chunk_rows: Optional[int], scale: Optional[Tensor], want_x: bool, want_w: bool,
               want_b: bool, lse_in: Optional[Tensor]):
    """_chunk_loop over the rows `keep` (int64 (K,)), its per-row results scattered back to N rows."""
    N = x.shape[0]
    sub = lambda t: None if t is None or t.ndim == 0 else t.index_select(0, keep)  # noqa: E731
    loss, lse, gx, gw, gb = _chunk_loop(x.index_select(0, keep), weight, bias, targets.index_select(0, keep), opts,
                                        backend, chunk_rows, scale if scale is None or scale.ndim == 0 else sub(scale),
                                        want_x, want_w, want_b, sub(lse_in))

    def scatter(t: Optional[Tensor]) -> Optional[Tensor]:
        if t is None:
            return None
        full = t.new_zeros((N,) + t.shape[1:])
        return full.index_copy_(0, keep, t)
    return scatter(loss), (lse_in if lse_in is not None else scatter(lse)), scatter(gx), gw, gb


def _chunk_loop(x: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, opts: _Loss, backend: str,
                chunk_rows: Optional[int], scale: Optional[Tensor], want_x: bool, want_w: bool, want_b: bool,
                lse_in: Optional[Tensor]):
    """_chunked's loop over every row."""
    step = _step_torch if backend == "torch" else OP.launcher(backend).step
    N, C = x.shape
    V = weight.shape[0]
    wc = weight.to(x.dtype)  # the GEMM in x's dtype, as nanofast.ops.linear and F.linear under autocast
    bc = None if bias is None else bias.to(x.dtype)
    forward = lse_in is None
    grad = scale is not None and (want_x or want_w or want_b)
    loss = _alloc((N,), torch.float32, x.device) if forward else None
    lse = _alloc((N,), torch.float32, x.device) if forward else lse_in
    gx = _alloc((N, C), x.dtype, x.device) if grad and want_x else None
    gw = torch.zeros((V, C), dtype=torch.float32, device=x.device) if grad and want_w else None
    gb = torch.zeros((V,), dtype=torch.float32, device=x.device) if grad and want_b else None
    rows = chunk_rows or default_chunk_rows(N, V, x.device)
    dummy = lse  # an fp32 pointer for the kernel's unused arguments
    for s in range(0, N, rows):
        e = min(s + rows, N)
        xc = x[s:e]
        # (R, V) contiguous, x's dtype; the bias added in the GEMM's epilogue, as F.linear does.
        logits = torch.mm(xc, wc.t()) if bc is None else torch.addmm(bc, xc, wc.t())
        sc = scale if scale is None or scale.ndim == 0 else scale[s:e]
        step(logits, targets[s:e], loss[s:e] if forward else dummy, lse[s:e], sc if grad else dummy, opts,
             forward, grad)
        if grad:
            if gb is not None:
                gb.add_(logits.sum(0, dtype=torch.float32))
            if gx is not None:
                torch.mm(logits, wc, out=gx[s:e])
            if gw is not None:
                if logits.dtype == torch.float32:
                    gw.addmm_(logits.t(), xc)
                else:
                    gw.add_(torch.mm(logits.t(), xc))
    return loss, lse, gx, gw, gb


# --------------------------------------------------------------------------------------------
# Autograd: shared by the eager autograd.Function and the custom ops torch.compile sees
# --------------------------------------------------------------------------------------------

def _fwd_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, opts: _Loss, reduction: str,
              backend: str, chunk_rows: Optional[int], want_x: bool, want_w: bool, want_b: bool):
    """(loss, lse, dx, dW, db): loss () or (N,) fp32; lse (N,) fp32; for "mean"/"sum" the wanted
    gradients for a unit upstream gradient (dx in x's dtype, dW and db fp32), else None."""
    if reduction == "none":
        loss, lse, _, _, _ = _chunked(x, weight, bias, targets, opts, backend, chunk_rows, None, False, False, False)
        return loss, lse, None, None, None
    valid = (targets != opts.ignore_index).sum()
    scale = None
    if want_x or want_w or want_b:  # gradients now, while the chunk's logits exist (3 GEMMs, not 4)
        scale = (1.0 / valid.float()) if reduction == "mean" else torch.ones((), device=x.device)
    loss, lse, gx, gw, gb = _chunked(x, weight, bias, targets, opts, backend, chunk_rows, scale, want_x, want_w,
                                     want_b)
    total = loss.sum()
    return (total / valid if reduction == "mean" else total), lse, gx, gw, gb


def _bwd_impl(grad: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor,
              opts: _Loss, backend: str, chunk_rows: Optional[int], want_x: bool, want_w: bool, want_b: bool):
    """Reduction "none": (dx, dW fp32, db fp32) under the per-row fp32 gradient `grad` (N,), any
    strides (an expanded .sum() gradient is stride 0), recomputing each chunk's logits."""
    _, _, gx, gw, gb = _chunked(x, weight, bias, targets, opts, backend, chunk_rows, grad, want_x, want_w, want_b,
                                lse_in=lse)
    return gx, gw, gb


def _save(ctx, inputs, output) -> None:
    (x, weight, bias, targets, ignore_index, softcap, smoothing, z_loss, reduction, backend, chunk_rows,
     want_x, want_w, want_b) = inputs[:14]
    _, lse, gx, gw, gb = output
    ctx.opts = _Loss(ignore_index, softcap, smoothing, z_loss)
    ctx.reduction, ctx.backend, ctx.chunk_rows = reduction, backend, chunk_rows
    ctx.want = (want_x, want_w, want_b)
    ctx.n_options = len(inputs) - 3
    ctx.w_dtype, ctx.b_dtype = weight.dtype, (None if bias is None else bias.dtype)
    if reduction == "none":
        ctx.save_for_backward(x, weight, bias, targets, lse)
    else:
        ctx.save_for_backward(gx, gw, gb)


def _grads(ctx, grad_out: Tensor, bwd) -> tuple:
    want_x, want_w, want_b = ctx.want
    if ctx.reduction == "none":
        x, weight, bias, targets, lse = ctx.saved_tensors
        gx, gw, gb = bwd(grad_out.float(), x, weight, bias, targets, lse, ctx.opts, ctx.backend, ctx.chunk_rows,
                         want_x, want_w, want_b)
    else:
        gx, gw, gb = ctx.saved_tensors
        g = grad_out.float()  # the scalar stays fp32: multiplied in fp32, rounded once to x's dtype
        gx = (gx.float() * g).to(gx.dtype) if want_x else None
        gw = gw * g if want_w else None
        gb = gb * g if want_b else None
    gw = gw.to(ctx.w_dtype) if want_w else None
    gb = gb.to(ctx.b_dtype) if want_b else None
    # (the custom op has one more non-tensor input than the autograd.Function: its target_name)
    return (gx if want_x else None, gw, gb) + (None,) * ctx.n_options


class _LinearCE(torch.autograd.Function):
    """Eager calls (and the traced "torch" backend under torch.compile): x (N, C), weight (V, C),
    bias (V,)?, targets (N,) -> scalar loss ("mean"/"sum") or (N,) ("none"). An autograd.Function
    dispatches several times cheaper than a custom op; both share _fwd_impl / _save / _grads."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets, ignore_index, softcap, smoothing, z_loss, reduction, backend,
                chunk_rows, want_x, want_w, want_b):
        out = _fwd_impl(x, weight, bias, targets, _Loss(ignore_index, softcap, smoothing, z_loss), reduction,
                        backend, chunk_rows, want_x, want_w, want_b)
        _save(ctx, (x, weight, bias, targets, ignore_index, softcap, smoothing, z_loss, reduction, backend,
                    chunk_rows, want_x, want_w, want_b), out)
        return out[0]

    @staticmethod
    def backward(ctx, grad_out):
        return _grads(ctx, grad_out, _bwd_impl)


# Under torch.compile a kernel backend goes through these custom ops (Dynamo does not trace into
# Triton launches; a graph break would refuse fullgraph=True). Custom ops cannot return None: an
# absent gradient is an empty (0,) tensor, each its own (outputs must not alias).

def _empty(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.new_empty((0,), dtype=dtype)


@torch.library.custom_op("nanofast::linear_cross_entropy_fwd", mutates_args=())
def _lce_fwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, ignore_index: int,
                softcap: float, smoothing: float, z_loss: float, reduction: str, backend: str,
                chunk_rows: Optional[int], want_x: bool, want_w: bool, want_b: bool, target_name: str
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x (N, C), weight (V, C), bias (V,)?, targets (N,) -> loss (() or (N,) fp32), lse (N,) fp32,
    dx (N, C) x.dtype, dW (V, C) fp32, db (V,) fp32 (each (0,) when not computed). target_name:
    the entry's name of targets, for the error of the value check below."""
    # The traced entry cannot read target values (a data-dependent guard breaks fullgraph); the op
    # runs outside the trace, so CPU targets are still checked here.
    _check_target_range(x, weight, targets, target_name, ignore_index)
    loss, lse, gx, gw, gb = _fwd_impl(x, weight, bias, targets, _Loss(ignore_index, softcap, smoothing, z_loss),
                                      reduction, backend, chunk_rows, want_x, want_w, want_b)
    f32 = torch.float32
    return (loss, lse, _empty(x, x.dtype) if gx is None else gx, _empty(x, f32) if gw is None else gw,
            _empty(x, f32) if gb is None else gb)


@_lce_fwd_op.register_fake
def _(x, weight, bias, targets, ignore_index, softcap, smoothing, z_loss, reduction, backend, chunk_rows,
      want_x, want_w, want_b, target_name):
    N, C = x.shape
    V = weight.shape[0]
    f32 = torch.float32
    grads = reduction != "none"
    return (x.new_empty((N,) if reduction == "none" else (), dtype=f32), x.new_empty((N,), dtype=f32),
            x.new_empty((N, C) if grads and want_x else (0,)),
            x.new_empty((V, C) if grads and want_w else (0,), dtype=f32),
            x.new_empty((V,) if grads and want_b else (0,), dtype=f32))


@torch.library.custom_op("nanofast::linear_cross_entropy_bwd", mutates_args=())
def _lce_bwd_op(grad: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor,
                ignore_index: int, softcap: float, smoothing: float, z_loss: float, backend: str,
                chunk_rows: Optional[int], want_x: bool, want_w: bool, want_b: bool
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Reduction "none": grad (N,) fp32 -> dx (N, C) x.dtype, dW (V, C) fp32, db (V,) fp32 ((0,) when not wanted)."""
    gx, gw, gb = _bwd_impl(grad, x, weight, bias, targets, lse, _Loss(ignore_index, softcap, smoothing, z_loss),
                           backend, chunk_rows, want_x, want_w, want_b)
    f32 = torch.float32
    return (_empty(x, x.dtype) if gx is None else gx, _empty(x, f32) if gw is None else gw,
            _empty(x, f32) if gb is None else gb)


@_lce_bwd_op.register_fake
def _(grad, x, weight, bias, targets, lse, ignore_index, softcap, smoothing, z_loss, backend, chunk_rows,
      want_x, want_w, want_b):
    N, C = x.shape
    V = weight.shape[0]
    f32 = torch.float32
    return (x.new_empty((N, C) if want_x else (0,)), x.new_empty((V, C) if want_w else (0,), dtype=f32),
            x.new_empty((V,) if want_b else (0,), dtype=f32))


def _setup_op(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(*output[1:])  # lse and the precomputed gradients: not model outputs
    _save(ctx, inputs, output)


def _bwd_op(grad, x, weight, bias, targets, lse, opts, backend, chunk_rows, want_x, want_w, want_b):
    return torch.ops.nanofast.linear_cross_entropy_bwd(grad, x, weight, bias, targets, lse, *opts, backend,
                                                       chunk_rows, want_x, want_w, want_b)


_lce_fwd_op.register_autograd(lambda ctx, dloss, *_: _grads(ctx, dloss, _bwd_op), setup_context=_setup_op)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

def _is_real(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, numbers.Real)


def _check_tensors(x, weight, target, tname: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (..., C), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must have a floating dtype (float16/bfloat16/float32), got {x.dtype}")
    if x.ndim == 0:
        raise ValueError("x must have shape (..., C) with at least 1 dim, got a 0-d tensor")
    C = x.shape[-1]
    if C == 0:
        raise ValueError(f"x must have a non-empty last dim C, got shape {tuple(x.shape)}")
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor of shape (V, {C}), got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must have a floating dtype, got {weight.dtype}")
    if weight.ndim != 2 or weight.shape[1] != C or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape (V, {C}) with V >= 1 (C = x.size(-1)), got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight must be on x's device {x.device}, got {weight.device}")
    if not isinstance(target, Tensor):
        raise TypeError(f"{tname} must be a torch.Tensor of shape {tuple(x.shape[:-1])}, got {type(target).__name__}")
    if target.dtype != torch.int64:
        raise TypeError(f"{tname} must have dtype torch.int64 (class indices), got {target.dtype}")
    if target.shape != x.shape[:-1]:
        raise ValueError(f"{tname} must have shape {tuple(x.shape[:-1])} (x's leading dims), got {tuple(target.shape)}")
    if target.device != x.device:
        raise ValueError(f"{tname} must be on x's device {x.device}, got {target.device}")


def _check_bias(bias, x, weight) -> None:
    if bias is None:
        return
    V = weight.shape[0]
    if not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a torch.Tensor of shape ({V},) or None, got {type(bias).__name__}")
    if not bias.is_floating_point():
        raise TypeError(f"bias must have a floating dtype, got {bias.dtype}")
    if tuple(bias.shape) != (V,):
        raise ValueError(f"bias must have shape ({V},) (weight's rows V), got {tuple(bias.shape)}")
    if bias.device != x.device:
        raise ValueError(f"bias must be on x's device {x.device}, got {bias.device}")


def _check_options(ignore_index, softcap, label_smoothing, z_loss, reduction, chunk_rows) -> None:
    """The non-tensor arguments (also checked by the modules' constructors)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if softcap is not None and (not _is_real(softcap) or not softcap >= 0 or softcap == float("inf")):
        raise ValueError(f"softcap must be a finite real number >= 0 or None, got {softcap!r}")
    if not _is_real(label_smoothing) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a real number in [0, 1], got {label_smoothing!r}")
    if not _is_real(z_loss) or not math.isfinite(z_loss) or z_loss < 0:
        raise ValueError(f"z_loss must be a finite real number >= 0, got {z_loss!r}")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, numbers.Integral)
                                   or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be an int >= 1 or None, got {chunk_rows!r}")


def _check_target_range(x, weight, target, tname: str, ignore_index: int) -> None:
    if not x.is_cuda and not torch.compiler.is_compiling() and target.numel():
        # On CPU the check is cheap (no device sync). On CUDA it is skipped: the Triton kernel never
        # reads outside the row for such a target and gives it a NaN loss.
        V = weight.shape[0]
        kept = target != ignore_index
        if not bool((((target >= 0) & (target < V)) | ~kept).all()):
            bad = target[kept]
            raise ValueError(f"{tname} must be {ignore_index} (ignored) or in [0, {V}), got values in "
                             f"[{int(bad.min())}, {int(bad.max())}]")


def _validate(x, weight, target, bias, ignore_index, softcap, label_smoothing, z_loss, reduction, chunk_rows) -> None:
    """The check of `linear_cross_entropy` (and its reference)."""
    _check_tensors(x, weight, target, "target")
    _check_bias(bias, x, weight)
    _check_options(ignore_index, softcap, label_smoothing, z_loss, reduction, chunk_rows)
    _check_target_range(x, weight, target, "target", int(ignore_index))


def _validate_softcap(x, weight, targets, softcap, reduction, chunk_rows) -> None:
    """The check of `linear_softcap_cross_entropy` (and its reference): ignore -1, no bias."""
    _check_tensors(x, weight, targets, "targets")
    _check_options(-1, softcap, 0.0, 0.0, reduction, chunk_rows)
    _check_target_range(x, weight, targets, "targets", -1)


# --------------------------------------------------------------------------------------------
# Functional API and modules
# --------------------------------------------------------------------------------------------

def _run(x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], opts: _Loss, reduction: str,
         backend: Optional[str], chunk_rows: Optional[int], target_name: str) -> Tensor:
    """Both entries after their check: backend, gradient flags, autograd route."""
    be = resolve_backend(backend, x, OP.choices)
    if be == "triton" and x.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32 for backend='triton', got {x.dtype}")
    C = x.shape[-1]
    grad_on = torch.is_grad_enabled()
    wants = (grad_on and x.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    args = (x.reshape(-1, C), weight, bias, target.reshape(-1), *opts, reduction, be,
            None if chunk_rows is None else int(chunk_rows), *wants)
    if be != "torch" and torch.compiler.is_compiling():
        loss = torch.ops.nanofast.linear_cross_entropy_fwd(*args, target_name)[0]
    else:  # eager; and the "torch" step, which Dynamo traces whole (Inductor fuses it)
        loss = _LinearCE.apply(*args)
    return loss.view(target.shape) if reduction == "none" else loss


def linear_cross_entropy(x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, *,
                         ignore_index: int = -100, softcap: Optional[float] = None, label_smoothing: float = 0.0,
                         z_loss: float = 0.0, reduction: str = "mean", backend: Optional[str] = None,
                         chunk_rows: Optional[int] = None) -> Tensor:
    """Cross-entropy of `F.linear(x, weight, bias)` in PyTorch's / Hugging Face's conventions,
    fused and chunked: the (N, V) logits and their gradient never exist whole.

    Computes `F.cross_entropy(logits.float(), target, ignore_index=ignore_index,
    label_smoothing=label_smoothing, reduction=reduction)` on the logits `F.linear(x, weight, bias)`
    (the GEMM in x's dtype, weight and bias cast to it; then `softcap * tanh(logits / softcap)` in
    fp32 when softcap is given), plus `z_loss * logsumexp(logits)^2` per non-ignored row (PaLM's
    z-loss), reduced like the cross-entropy. Equals `linear_cross_entropy_reference` within the
    error budget of tests/test_linear_cross_entropy.py. Nothing changes the maths unless asked.

    Args:
        x: (..., C) fp16/bf16/fp32 hidden states (fp64 with backend="torch"), any strides.
        weight: (V, C) any float dtype (e.g. an fp32 master of lm_head.weight, or a row slice of a
            padded head: the pad rows then get zero gradient); cast to x's dtype for the GEMMs.
        target: (...) = x.shape[:-1], int64 class indices in [0, V), or ignore_index (no loss, no
            gradient there). Other values raise ValueError on CPU; on CUDA (unchecked, a check
            would sync) such a row's loss is NaN.
        bias: (V,) any float dtype on x's device, or None. Its gradient is accumulated in fp32 over
            the chunks and returned in bias's dtype.
        ignore_index: any int (HF: -100). It may also be a valid class index, as in F.cross_entropy.
        softcap: None (default) or 0: no cap; s > 0: logits = s * tanh(logits / s) in fp32
            (Gemma 2's final_logit_softcapping, nanochat's 15).
        label_smoothing: in [0, 1], as F.cross_entropy: (1 - eps) * CE + eps * (lse - mean_v logit_v).
        z_loss: >= 0, the weight of lse^2 (0: off).
        reduction: "mean" (over non-ignored targets; nan when all are ignored, as F.cross_entropy),
            "sum", or "none" (fp32 loss of target's shape, 0 at ignored positions).
        backend: None (Triton on CUDA tensors, torch on CPU), "torch" or "triton" (on CPU through
            Triton's interpreter).
        chunk_rows: rows per chunk; None -> `default_chunk_rows` (bounded chunk logits).
    Returns:
        fp32 loss: a scalar, or target's shape for "none". Differentiable w.r.t. x (gradient in x's
        dtype), weight and bias (fp32-accumulated, returned in their dtypes). With "mean"/"sum" and
        gradients wanted they are computed during the forward (dx (N, C) and fp32 dW (V, C) held
        until backward); with no input requiring grad (or under no_grad) only the loss is. Works
        under torch.compile(fullgraph=True): the Triton backend through the
        `nanofast::linear_cross_entropy_fwd/bwd` custom ops, the torch backend traced.
    Raises:
        TypeError / ValueError naming the offending argument and what was expected.
    """
    OP.checks["linear_cross_entropy"](x, weight, target, bias, ignore_index, softcap, label_smoothing, z_loss,
                                      reduction, chunk_rows)
    opts = _Loss(int(ignore_index), float(softcap) if softcap else 0.0, float(label_smoothing), float(z_loss))
    return _run(x, weight, target, bias, opts, reduction, backend, chunk_rows, "target")


def linear_softcap_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, softcap: Optional[float],
                                 reduction: str = "mean", backend: Optional[str] = None,
                                 chunk_rows: Optional[int] = None) -> Tensor:
    """nanofast's loss head: cross-entropy of softcap * tanh((x @ weight^T) / softcap), target -1
    ignored, without the (N, V) logits. The same implementation as `linear_cross_entropy` with
    ignore_index=-1, no bias, no label smoothing, no z-loss.

    Equals `linear_softcap_cross_entropy_reference` (nanofast's model head: ops.linear then
    ops.softcap_cross_entropy) within the error budget of tests/test_linear_cross_entropy.py.

    Args:
        x: (..., C) fp16/bf16/fp32 hidden states (fp64 with backend="torch"), any strides.
        weight: (V, C) any float dtype, e.g. an fp32 master or a row slice lm_head.weight[:vocab]
            of a padded head (the pad rows then get zero gradient); cast to x's dtype for the GEMMs.
        targets: (...) = x.shape[:-1], int64, -1 = no loss at that position.
        softcap: required, no default: None or 0 = plain logits; else s * tanh(logits / s) in fp32
            (nanochat: 15).
        reduction: "mean" (over targets != -1; nan when all are ignored, as F.cross_entropy),
            "sum", or "none" (fp32 loss of targets' shape).
        backend: None (Triton on CUDA tensors, torch on CPU), "torch" or "triton" (on CPU through
            Triton's interpreter). "cuda" has no implementation here.
        chunk_rows: rows per chunk; None -> `default_chunk_rows` (bounded chunk logits).
    Returns:
        fp32 loss: a scalar, or targets' shape for "none". Differentiable w.r.t. x (gradient in x's
        dtype) and weight (accumulated in fp32, returned in weight's dtype); see
        `linear_cross_entropy` for memory and torch.compile.
    Raises:
        TypeError / ValueError naming the offending argument and the expected shape/dtype.
    """
    OP.checks["linear_softcap_cross_entropy"](x, weight, targets, softcap, reduction, chunk_rows)
    opts = _Loss(-1, float(softcap) if softcap else 0.0, 0.0, 0.0)
    return _run(x, weight, targets, None, opts, reduction, backend, chunk_rows, "targets")


def _check_backend_name(backend) -> None:
    if backend is not None and backend not in OP.choices:
        raise ValueError(f"backend must be one of {OP.choices} or None, got {backend!r}")


class LinearCrossEntropyLoss(nn.Module):
    """The fused LM-head loss as a module, for models that own their lm_head:
    forward(x (..., C), weight (V, C), target (...), bias (V,) = None) -> fp32 loss; see
    `linear_cross_entropy` for every option (all fixed at construction; defaults are
    F.cross_entropy's: ignore_index -100, no softcap, no smoothing, no z-loss, mean). Stateless:
    pass the head's own parameters, e.g. `loss_fn(hidden, model.lm_head.weight, labels)`.
    """

    def __init__(self, ignore_index: int = -100, softcap: Optional[float] = None, label_smoothing: float = 0.0,
                 z_loss: float = 0.0, reduction: str = "mean", backend: Optional[str] = None,
                 chunk_rows: Optional[int] = None) -> None:
        super().__init__()
        _check_options(ignore_index, softcap, label_smoothing, z_loss, reduction, chunk_rows)
        _check_backend_name(backend)
        self.ignore_index, self.softcap, self.label_smoothing, self.z_loss = ignore_index, softcap, label_smoothing, z_loss
        self.reduction, self.backend, self.chunk_rows = reduction, backend, chunk_rows

    def forward(self, x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return linear_cross_entropy(x, weight, target, bias, ignore_index=self.ignore_index, softcap=self.softcap,
                                    label_smoothing=self.label_smoothing, z_loss=self.z_loss,
                                    reduction=self.reduction, backend=self.backend, chunk_rows=self.chunk_rows)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, softcap={self.softcap}, label_smoothing={self.label_smoothing}, "
                f"z_loss={self.z_loss}, reduction={self.reduction!r}, backend={self.backend}")


class LinearSoftcapCrossEntropy(nn.Module):
    """forward(x, weight, targets) -> loss; see `linear_softcap_cross_entropy` (stateless: the
    weight is the caller's lm_head, e.g. `lm_head.weight[:vocab_size]`). softcap is required
    (None = no cap)."""

    def __init__(self, softcap: Optional[float], reduction: str = "mean", backend: Optional[str] = None,
                 chunk_rows: Optional[int] = None) -> None:
        super().__init__()
        _check_options(-1, softcap, 0.0, 0.0, reduction, chunk_rows)
        _check_backend_name(backend)
        self.softcap, self.reduction, self.backend, self.chunk_rows = softcap, reduction, backend, chunk_rows

    def forward(self, x: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
        return linear_softcap_cross_entropy(x, weight, targets, self.softcap, self.reduction, self.backend,
                                            self.chunk_rows)

    def extra_repr(self) -> str:
        return f"softcap={self.softcap}, reduction={self.reduction!r}, backend={self.backend}"


# --------------------------------------------------------------------------------------------
# What an H100 compiles: the compile gate (tests) compiles exactly these.
# --------------------------------------------------------------------------------------------

def _config(V: int, dtype: torch.dtype, softcap: bool, forward: bool, grad: bool, smooth: bool = False,
            zloss: bool = False) -> dict:
    t = _TL_DTYPE[dtype]
    m = _meta(V)
    const = {"BLOCK_V": m["BLOCK_V"], "HAS_CAP": softcap, "HAS_SMOOTH": smooth, "HAS_ZLOSS": zloss,
             "FORWARD": forward, "GRAD": grad}
    sig = gate_signature(_lce_row_kernel, const, t, {"TARGETS": "*i64", "LOSS": "*fp32", "LSE": "*fp32",
                                                     "SCALE": "*fp32", "V": "i32", "ignore_index": "i32",
                                                     "softcap": "fp32", "smoothing": "fp32", "z_loss": "fp32"})
    # Chunk logits from torch.mm: 16-byte aligned, row stride V (a multiple of 16 for these V).
    aligned = ("LOGITS", "stride_l", "V")
    mode = "+".join(n for n, on in (("fwd", forward), ("grad", grad)) if on)
    opts = "".join(s for s, on in ((" cap", softcap), (" smooth", smooth), (" zloss", zloss)) if on)
    return dict(fn=_lce_row_kernel, signature=sig, constexprs=const, num_warps=m["num_warps"], num_stages=3,
                aligned=aligned, config=f"{mode} V={V} {t}{opts} BLOCK={m['BLOCK_V']} warps={m['num_warps']}")


def _kernel_configs() -> list[dict]:
    if triton is None:
        return []
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    return [
        _config(65536, bf16, True, True, True),    # nanochat's vocabulary, training (mean/sum)
        _config(65536, bf16, True, True, False),   # no-grad evaluation / reduction "none" forward
        _config(65536, bf16, True, False, True),   # reduction "none" backward
        _config(50304, fp16, True, True, True),
        _config(32768, fp32, False, True, True),   # CPU-parity runs, no cap
        _config(256, bf16, True, True, True),      # a narrow row: BLOCK 256, 1 warp
        # Hugging Face training (Llama 3's vocabulary, no cap) with label smoothing and z-loss: the
        # forward's extra row sum and the gradient's per-row coefficients.
        _config(128256, bf16, False, True, True, smooth=True, zloss=True),
        _config(128256, bf16, False, False, True, smooth=True, zloss=True),  # its "none" backward
        # Gemma 3's vocabulary with its final softcap and both options: the most live registers.
        _config(262144, bf16, True, True, True, smooth=True, zloss=True),
    ]


KERNEL_CONFIGS: list[dict] = _kernel_configs()
"""Keyword arguments of `compile_gate.compile_triton` built from the launcher's own `_meta`."""


def cost(N: int, V: int, C: int, itemsize: int = 2, backward: bool = True) -> dict:
    """One call on N rows, vocabulary V, width C: x and the weight read once per pass (the chunk
    logits stay on chip), the fp32 gradients written once; the GEMMs' 2 N V C FLOPs per pass (the
    forward, then the backward's logit recompute and its two gradient GEMMs). A bias adds O(V)
    bytes and O(N V) FLOPs: nothing at these sizes."""
    passes = 4 if backward else 1
    io = (N * C + V * C) * itemsize + 8 * N
    return {"bytes": io + ((N * C * itemsize + V * C * 4) if backward else 0), "flops": passes * 2 * N * V * C}


# The Triton backend's launcher: one chunk's cross-entropy (and its gradient) on the chunk's
# logits; the "torch" backend runs `_step_torch` in the same chunk loop.
TRITON_LAUNCHERS = SimpleNamespace(step=_step_triton)

OP = Op(name="linear_cross_entropy", vendor="torch", kernels=("triton",), unmeasured="triton",
        why="the (tokens x vocab) logits never reach HBM",
        checks={"linear_cross_entropy": _validate, "linear_softcap_cross_entropy": _validate_softcap},
        references={"linear_cross_entropy": linear_cross_entropy_reference,
                    "linear_softcap_cross_entropy": linear_softcap_cross_entropy_reference},
        vendor_path=linear_cross_entropy_reference,
        launchers={"triton": TRITON_LAUNCHERS}, cost=cost, configs=lambda arch=90: KERNEL_CONFIGS)
