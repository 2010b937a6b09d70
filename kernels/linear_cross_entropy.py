"""Fused, chunked linear + softcap + cross-entropy (the language-model head's loss) that never
materialises the (tokens x vocab) logits or their gradient. Layered kernel -> per-chunk step ->
chunked launcher -> autograd.Function -> functional API -> module. Liger-Kernel's
FusedLinearCrossEntropy is the design anchor (written here, not copied).

Maths, per token row with hidden state x (C,), lm_head weight W (V, C), target y (-1 = ignored):

    z    = x @ W^T                        (the GEMM in x's dtype, W cast to it: nanofast.ops.linear)
    c    = s * tanh(z / s)                (fp32; s = softcap, None or 0 = no cap: c = z)
    lse  = log(sum_v exp(c_v))
    loss = lse - c_y                      (0 for y = -1)
    dz   = row_scale * (softmax(c) - onehot(y)) * (1 - (c / s)^2)     (0 for y = -1)
    dx   = dz @ W,  dW = dz^T @ x         (dW accumulated in fp32 over chunks)

The rows are processed in chunks of R rows: the chunk's logits (R, V) are one GEMM, the per-row
kernel turns them into loss, lse and (in place) dz, and two more GEMMs give the chunk's dx and its
dW contribution. Only one (R, V) buffer is alive at a time (the unfused path holds the (N, V)
logits in the compute dtype, their fp32 capped copy, and gradients of both).

For reduction "mean"/"sum" the gradients are computed IN THE FORWARD (Liger-style: 3 GEMMs per
chunk, where forward + recomputing backward would need 4) and the backward only scales the saved
dx / dW by the incoming scalar gradient. Reduction "none" has a per-row upstream gradient that is
unknown in the forward: it saves lse (N,) and recomputes each chunk's logits in the backward.
"""
from __future__ import annotations

import numbers
from types import SimpleNamespace
from typing import Optional

import torch
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

__all__ = ["linear_softcap_cross_entropy", "linear_softcap_cross_entropy_reference", "LinearSoftcapCrossEntropy",
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
# Reference
# --------------------------------------------------------------------------------------------

def linear_softcap_cross_entropy_reference(x: Tensor, weight: Tensor, targets: Tensor,
                                           softcap: Optional[float] = 15.0, reduction: str = "mean") -> Tensor:
    """Plain, unfused torch: logits = F.linear(x, weight.to(x.dtype)) in x's dtype, then fp32
    softcap * tanh(logits / softcap) (softcap None or 0: no cap), then F.cross_entropy with
    ignore_index=-1. x (..., C); weight (V, C); targets (...) int64. "none" returns targets' shape.
    Exactly what nanofast's model computes today (ops.linear + ops.softcap_cross_entropy)."""
    logits = torch.nn.functional.linear(x, weight.to(x.dtype)).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                             ignore_index=-1, reduction=reduction)
    return loss.view(targets.shape) if reduction == "none" else loss


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
    def _lce_row_kernel(LOGITS, TARGETS, LOSS, LSE, SCALE, stride_l, stride_s, V, softcap,
                        BLOCK_V: tl.constexpr, HAS_CAP: tl.constexpr, FORWARD: tl.constexpr,
                        GRAD: tl.constexpr):
        """Row r of LOGITS (R, V) in the compute dtype. FORWARD: LOSS[r] = lse - capped[target]
        (0 for target -1), LSE[r] = lse (fp32). GRAD: overwrite the row with
        SCALE[r * stride_s] * (softmax - onehot) * tanh', in LOGITS' dtype (0 for target -1); without
        FORWARD the row's lse is read from LSE."""
        row = tl.program_id(0).to(tl.int64)
        ptr = LOGITS + row * stride_l  # int64: R * V may exceed 2^31 elements
        target = tl.load(TARGETS + row)
        valid = target != -1
        cap = tl.cast(softcap, tl.float32)
        if FORWARD:
            m = tl.cast(float("-inf"), tl.float32)
            s = tl.cast(0.0, tl.float32)
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                mask = offs < V
                z = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
                if HAS_CAP:
                    z = cap * _tanh(z / cap)
                z = tl.where(mask, z, float("-inf"))
                m_new = tl.maximum(m, tl.max(z, axis=0))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
                m = m_new
            lse = m + tl.log(s)
            # A target outside [-1, V) is never dereferenced: its loss is NaN (on CUDA the launcher
            # does not check targets, which would cost a device sync; F.cross_entropy asserts).
            in_range = (target >= 0) & (target < V)
            zt = tl.load(ptr + tl.where(in_range, target, 0)).to(tl.float32)
            if HAS_CAP:
                zt = cap * _tanh(zt / cap)
            loss = tl.where(in_range, lse - zt, float("nan"))
            tl.store(LOSS + row, tl.where(valid, loss, 0.0))
            tl.store(LSE + row, lse)
        else:
            lse = tl.load(LSE + row)
        if GRAD:
            scale = tl.where(valid, tl.load(SCALE + row * stride_s), 0.0)
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                mask = offs < V
                z = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
                if HAS_CAP:
                    t = _tanh(z / cap)
                    p = tl.exp(cap * t - lse)
                    g = (p - tl.where(offs == target, 1.0, 0.0)) * (1.0 - t * t)
                else:
                    p = tl.exp(z - lse)
                    g = p - tl.where(offs == target, 1.0, 0.0)
                tl.store(ptr + offs, (g * scale).to(LOGITS.dtype.element_ty), mask=mask)


def _step_triton(logits: Tensor, targets: Tensor, loss: Tensor, lse: Tensor, scale: Tensor, softcap: float,
                 forward: bool, grad: bool) -> None:
    """The per-chunk step through the Triton kernel: logits (R, V) contiguous, targets (R,) int64,
    loss / lse (R,) fp32 outputs (lse an input without `forward`), scale () or (R,) fp32."""
    R, V = logits.shape
    if R == 0:
        return
    meta = _meta(V)
    with _device_ctx(logits):
        _lce_row_kernel[(R,)](
            logits, targets, loss, lse, scale, logits.stride(0), scale.stride(0) if scale.ndim else 0, V,
            float(softcap), BLOCK_V=meta["BLOCK_V"], HAS_CAP=softcap > 0, FORWARD=forward, GRAD=grad,
            num_warps=meta["num_warps"])


# --------------------------------------------------------------------------------------------
# The same step in torch (the "torch" backend: CPU, or anywhere without triton)
# --------------------------------------------------------------------------------------------

def _step_torch(logits: Tensor, targets: Tensor, loss: Tensor, lse: Tensor, scale: Tensor, softcap: float,
                forward: bool, grad: bool) -> None:
    """The kernel's maths on a chunk with torch ops, in place where it can be (fp32 temporaries of
    the chunk's size: at most two, the capped logits and tanh)."""
    z = logits.float()  # the logits themselves when fp32
    alias = logits.dtype == torch.float32 and not softcap
    if softcap:
        t = z.div(softcap).tanh_()
        c = t.mul(softcap)
    else:
        c = z
    valid = targets != -1
    tgt = targets.clamp(min=0)[:, None]
    if forward:
        m = torch.logsumexp(c, dim=1)
        lse.copy_(m)
        loss.copy_(torch.where(valid, m - c.gather(1, tgt)[:, 0], 0.0))
    if grad:
        p = c.sub_(lse[:, None]).exp_()  # overwrites the fp32 logits (alias) or a temporary
        p.scatter_add_(1, tgt, -valid.to(p.dtype)[:, None])
        if softcap:
            p.mul_(t.square_().neg_().add_(1.0))
        p.mul_(torch.where(valid, scale, 0.0)[:, None])
        if not alias:
            logits.copy_(p)


# --------------------------------------------------------------------------------------------
# The chunked launcher
# --------------------------------------------------------------------------------------------

def _chunked(x: Tensor, weight: Tensor, targets: Tensor, softcap: float, backend: str, chunk_rows: Optional[int],
             scale: Optional[Tensor], want_x: bool, want_w: bool, lse_in: Optional[Tensor] = None):
    """The chunk loop, inputs validated. x (N, C) float, any strides; weight (V, C); targets (N,).

    scale None: forward only -> (loss (N,), lse (N,), None, None).
    scale given (() or (N,) fp32): gradients for the rows, dx (N, C) in x's dtype if want_x and
    dW (V, C) fp32 if want_w. With lse_in (the backward of reduction "none") the forward pass is
    skipped and each row's lse is read from it.
    """
    step = _step_torch if backend == "torch" else OP.launcher(backend).step
    N, C = x.shape
    V = weight.shape[0]
    wc = weight.to(x.dtype)  # the GEMM in x's dtype, as nanofast.ops.linear
    forward = lse_in is None
    grad = scale is not None and (want_x or want_w)
    loss = _alloc((N,), torch.float32, x.device) if forward else None
    lse = _alloc((N,), torch.float32, x.device) if forward else lse_in
    gx = _alloc((N, C), x.dtype, x.device) if grad and want_x else None
    gw = torch.zeros((V, C), dtype=torch.float32, device=x.device) if grad and want_w else None
    rows = chunk_rows or default_chunk_rows(N, V, x.device)
    dummy = lse  # an fp32 pointer for the kernel's unused arguments
    for s in range(0, N, rows):
        e = min(s + rows, N)
        xc = x[s:e]
        logits = torch.mm(xc, wc.t())  # (R, V) contiguous, x's dtype
        sc = scale if scale is None or scale.ndim == 0 else scale[s:e]
        step(logits, targets[s:e], loss[s:e] if forward else dummy, lse[s:e], sc if grad else dummy, softcap,
             forward, grad)
        if grad:
            if gx is not None:
                torch.mm(logits, wc, out=gx[s:e])
            if gw is not None:
                if logits.dtype == torch.float32:
                    gw.addmm_(logits.t(), xc)
                else:
                    gw.add_(torch.mm(logits.t(), xc))
    return loss, lse, gx, gw


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------

class _LinearSoftcapCE(torch.autograd.Function):
    """x (N, C), weight (V, C), targets (N,) -> scalar loss ("mean"/"sum") or (N,) ("none")."""

    @staticmethod
    def forward(ctx, x, weight, targets, softcap, reduction, backend, chunk_rows, want_x, want_w):
        ctx.softcap, ctx.reduction, ctx.backend, ctx.chunk_rows = softcap, reduction, backend, chunk_rows
        ctx.want_x, ctx.want_w, ctx.w_dtype = want_x, want_w, weight.dtype
        wants = want_x or want_w
        if reduction == "none":
            loss, lse, _, _ = _chunked(x, weight, targets, softcap, backend, chunk_rows, None, False, False)
            if wants:
                ctx.save_for_backward(x, weight, targets, lse)
            return loss
        valid = (targets != -1).sum()
        scale = None
        if wants:  # gradients now, while the chunk's logits exist (Liger-style: 3 GEMMs, not 4)
            scale = (1.0 / valid.float()) if reduction == "mean" else torch.ones((), device=x.device)
        loss, _, gx, gw = _chunked(x, weight, targets, softcap, backend, chunk_rows, scale, want_x, want_w)
        ctx.save_for_backward(gx, gw)
        total = loss.sum()
        return total / valid if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            x, weight, targets, lse = ctx.saved_tensors
            # Per-row upstream gradient: any strides (an expanded .sum() gradient is stride 0).
            _, _, gx, gw = _chunked(x, weight, targets, ctx.softcap, ctx.backend, ctx.chunk_rows,
                                    grad_out.float(), ctx.want_x, ctx.want_w, lse_in=lse)
        else:
            gx, gw = ctx.saved_tensors
            g = grad_out.float()  # the scalar stays fp32: multiplied in fp32, rounded once to x's dtype
            gx = (gx.float() * g).to(gx.dtype) if gx is not None else None
            gw = gw * g if gw is not None else None
        gw = gw.to(ctx.w_dtype) if gw is not None else None
        return gx if ctx.want_x else None, gw if ctx.want_w else None, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# Validation, functional API, module
# --------------------------------------------------------------------------------------------

def _validate(x, weight, targets, softcap, reduction, chunk_rows) -> None:
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
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor of shape {tuple(x.shape[:-1])}, got {type(targets).__name__}")
    if targets.dtype != torch.int64:
        raise TypeError(f"targets must have dtype torch.int64, got {targets.dtype}")
    if targets.shape != x.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(x.shape[:-1])} (x's leading dims), got {tuple(targets.shape)}")
    if targets.device != x.device:
        raise ValueError(f"targets must be on x's device {x.device}, got {targets.device}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, numbers.Real)
                                or not softcap >= 0 or softcap == float("inf")):
        raise ValueError(f"softcap must be a finite real number >= 0 or None, got {softcap!r}")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, numbers.Integral)
                                   or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be an int >= 1 or None, got {chunk_rows!r}")
    if not x.is_cuda and not torch.compiler.is_compiling() and targets.numel():
        # On CPU the check is free (no device sync). On CUDA it is skipped: the Triton kernel never
        # reads outside the row for such a target and gives it a NaN loss.
        lo, hi = int(targets.min()), int(targets.max())
        if lo < -1 or hi >= weight.shape[0]:
            raise ValueError(f"targets must be -1 (ignored) or in [0, {weight.shape[0]}), got values in [{lo}, {hi}]")


def linear_softcap_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, softcap: Optional[float] = 15.0,
                                 reduction: str = "mean", backend: Optional[str] = None,
                                 chunk_rows: Optional[int] = None) -> Tensor:
    """Cross-entropy of softcap * tanh((x @ weight^T) / softcap), without the (N, V) logits.

    Equals `linear_softcap_cross_entropy_reference` (nanofast's model head: ops.linear then
    ops.softcap_cross_entropy) within the error budget of tests/test_linear_cross_entropy.py.

    Args:
        x: (..., C) fp16/bf16/fp32 hidden states (fp64 with backend="torch"), any strides.
        weight: (V, C) any float dtype, e.g. an fp32 master or a row slice lm_head.weight[:vocab]
            of a padded head (the pad rows then get zero gradient); cast to x's dtype for the GEMMs.
        targets: (...) = x.shape[:-1], int64, -1 = no loss at that position.
        softcap: None or 0: plain logits; else s * tanh(logits / s) in fp32 (nanochat: 15).
        reduction: "mean" (over targets != -1; nan when all are ignored, as F.cross_entropy),
            "sum", or "none" (fp32 loss of targets' shape).
        backend: None (Triton on CUDA tensors, torch on CPU), "torch" or "triton" (on CPU through
            Triton's interpreter). "cuda" has no implementation here.
        chunk_rows: rows per chunk; None -> `default_chunk_rows` (bounded chunk logits).
    Returns:
        fp32 loss: a scalar, or targets' shape for "none". Differentiable w.r.t. x (gradient in x's
        dtype) and weight (accumulated in fp32, returned in weight's dtype). With "mean"/"sum" and
        gradients wanted, they are computed during the forward (memory: dx (N, C) and fp32 dW (V, C)
        held until backward); with no input requiring grad (or under no_grad) only the loss is.
    Raises:
        TypeError / ValueError naming the offending argument and the expected shape/dtype.
    """
    OP.checks["linear_softcap_cross_entropy"](x, weight, targets, softcap, reduction, chunk_rows)
    be = resolve_backend(backend, x, OP.choices)
    if be == "triton" and x.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32 for backend='triton', got {x.dtype}")
    softcap = float(softcap) if softcap else 0.0
    C = x.shape[-1]
    grad_on = torch.is_grad_enabled()
    want_x, want_w = grad_on and x.requires_grad, grad_on and weight.requires_grad
    args = (x.reshape(-1, C), weight, targets.reshape(-1), softcap, reduction, be, chunk_rows, want_x, want_w)
    if be == "triton" and torch.compiler.is_compiling():
        loss = _apply_eager(*args)  # a graph break: Dynamo does not trace into the Triton launches
    else:
        loss = _LinearSoftcapCE.apply(*args)
    return loss.view(targets.shape) if reduction == "none" else loss


@torch.compiler.disable
def _apply_eager(*args):
    return _LinearSoftcapCE.apply(*args)


class LinearSoftcapCrossEntropy(nn.Module):
    """forward(x, weight, targets) -> loss; see `linear_softcap_cross_entropy` (stateless: the
    weight is the caller's lm_head, e.g. `lm_head.weight[:vocab_size]`)."""

    def __init__(self, softcap: Optional[float] = 15.0, reduction: str = "mean", backend: Optional[str] = None,
                 chunk_rows: Optional[int] = None) -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.softcap, self.reduction, self.backend, self.chunk_rows = softcap, reduction, backend, chunk_rows

    def forward(self, x: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
        return linear_softcap_cross_entropy(x, weight, targets, self.softcap, self.reduction, self.backend,
                                            self.chunk_rows)

    def extra_repr(self) -> str:
        return f"softcap={self.softcap}, reduction={self.reduction!r}, backend={self.backend}"


# --------------------------------------------------------------------------------------------
# What an H100 compiles: the compile gate (tests) compiles exactly these.
# --------------------------------------------------------------------------------------------

def _config(V: int, dtype: torch.dtype, softcap: bool, forward: bool, grad: bool) -> dict:
    t = _TL_DTYPE[dtype]
    m = _meta(V)
    const = {"BLOCK_V": m["BLOCK_V"], "HAS_CAP": softcap, "FORWARD": forward, "GRAD": grad}
    sig = gate_signature(_lce_row_kernel, const, t, {"TARGETS": "*i64", "LOSS": "*fp32", "LSE": "*fp32",
                                                     "SCALE": "*fp32", "V": "i32", "softcap": "fp32"})
    # Chunk logits from torch.mm: 16-byte aligned, row stride V (a multiple of 16 for these V).
    aligned = ("LOGITS", "stride_l", "V")
    mode = "+".join(n for n, on in (("fwd", forward), ("grad", grad)) if on)
    return dict(fn=_lce_row_kernel, signature=sig, constexprs=const, num_warps=m["num_warps"], num_stages=3,
                aligned=aligned, config=f"{mode} V={V} {t}{' cap' if softcap else ''} "
                                        f"BLOCK={m['BLOCK_V']} warps={m['num_warps']}")


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
    ]


KERNEL_CONFIGS: list[dict] = _kernel_configs()
"""Keyword arguments of `compile_gate.compile_triton` built from the launcher's own `_meta`."""


def cost(N: int, V: int, C: int, itemsize: int = 2, backward: bool = True) -> dict:
    """One call on N rows, vocabulary V, width C: x and the weight read once per pass (the chunk
    logits stay on chip), the fp32 gradients written once; the GEMMs' 2 N V C FLOPs per pass (the
    forward, then the backward's logit recompute and its two gradient GEMMs)."""
    passes = 4 if backward else 1
    io = (N * C + V * C) * itemsize + 8 * N
    return {"bytes": io + ((N * C * itemsize + V * C * 4) if backward else 0), "flops": passes * 2 * N * V * C}


# The Triton backend's launcher: one chunk's softcapped cross-entropy (and its gradient) on the
# chunk's logits; the "torch" backend runs `_step_torch` in the same chunk loop.
TRITON_LAUNCHERS = SimpleNamespace(step=_step_triton)

OP = Op(name="linear_cross_entropy", vendor="torch", kernels=("triton",), unmeasured="triton",
        why="the (tokens x vocab) logits never reach HBM",
        checks={"linear_softcap_cross_entropy": _validate},
        references={"linear_softcap_cross_entropy": linear_softcap_cross_entropy_reference},
        vendor_path=linear_softcap_cross_entropy_reference,
        launchers={"triton": TRITON_LAUNCHERS}, cost=cost, configs=lambda arch=90: KERNEL_CONFIGS)
