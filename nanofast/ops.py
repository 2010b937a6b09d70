"""The model's compute boundaries in training: every op a kernel plugs into is one plain function
here (the inference engine's paged attention lives in `nanofast.attention`, on the same choices).

Each function below is the plain-torch implementation the model runs on CPU; `nanofast.kernels`
implementations swap in behind the same signatures, so the CPU test suite keeps executing the same
call sites the GPU runs. The ops, their backends and their unmeasured defaults are declared in
`nanofast.kernels.registry`. Who runs an op (`decide_backend`): a backend forced with set_kernel_backend
(or set_fp8_backend for the fp8 linears) wins; otherwise plain torch on CPU, and on CUDA the backend
`nanofast.dispatch` picks from the measured table of this kind of GPU: nanofast's kernel where it
passed its checks and beat the vendor path, the vendor path where it did not, and where nothing was
measured, Triton for the memory-bound fused ops and the vendor GEMMs for Newton-Schulz and fp8.
Layouts follow flash-attn: activations (B, T, H, D), so no transposes are needed around attention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nanofast import dispatch, kernels
from nanofast.common import DTYPES
from nanofast.kernels import vendor

# The torch paths' stand-in for "no window" (flash-attn's -1): larger than any position, so the
# window term of a mask never excludes a key.
_NO_WINDOW = 1 << 62


def _mask_window(window: int) -> int:
    """`window` validated by flash-attn's rule (vendor.left_window: an int >= -1, -1 unlimited), as
    the left reach the torch paths' masks use."""
    w = vendor.left_window(window)
    return _NO_WINDOW if w is None else w


_KERNEL_BACKEND: str | None = None
_DISPATCH_AS: str | None = None
KERNEL_BACKEND_HELP = ("who runs the kernel-backed ops (default: on GPU, each op's backend from the measured dispatch "
                       "table, see nanofast.dispatch; torch on CPU); on CPU, triton runs Triton's interpreter "
                       "(TRITON_INTERPRET=1) and cuda the CUDA sources' CPU emulation")


def set_kernel_backend(backend: str | None, device: str | None = None, dispatch_as: str | None = None) -> None:
    """Choose who computes every kernel-backed op of the model, engine and optimizer.

    None (default): plain torch on CPU tensors; on CUDA tensors each op's backend from the measured
    dispatch table (`nanofast.dispatch.backend_for`): the fastest of nanofast's kernels that passed
    its checks and beats the vendor path, else the vendor path, and where the GPU was never
    measured, nanofast's Triton kernels for the memory-bound fused ops and the vendor GEMMs
    (torch.matmul, torch._scaled_mm) for Newton-Schulz and the fp8 linears.
    "torch", "triton" or "cuda" force one for every op, table or not; on CPU tensors "triton" runs
    Triton's interpreter and "cuda" the CPU emulation build of the CUDA source: slow, but the same
    kernels the GPU runs. "cuda" applies to the ops with CUDA sources (norm, qk_norm_rope, paged
    attention); the fused loss head, the fp8 linears and Newton-Schulz then run their Triton kernels.
    device: where the model runs, if known: "triton" on "cpu" without the interpreter (which must
    be chosen before triton is imported) is refused here rather than at the first kernel launch.
    dispatch_as: a GPU class (e.g. "gpu-H100") whose per-op choices CPU tensors get too: each op
    runs the backend the dispatch picks on that GPU (its table, or the unmeasured defaults), the
    kernels through the interpreter and the CUDA emulation. The rehearsal preset uses it so that a
    CPU run executes the choices an 8xH100 run makes. A forced `backend` wins over it.
    """
    if backend not in (None, *kernels.BACKENDS):
        raise ValueError(f"kernel backend must be None or one of {kernels.BACKENDS}, got {backend!r}")
    if dispatch_as is not None and not dispatch_as.startswith("gpu-"):
        raise ValueError(f"dispatch_as must be a GPU device class such as 'gpu-H100', got {dispatch_as!r}")
    if (backend == "triton" or dispatch_as) and device == "cpu" and not kernels.backend.triton_interpreting():
        raise ValueError(f"{'kernel backend triton' if backend else 'dispatch_as'} on CPU runs Triton's interpreter: "
                         "set TRITON_INTERPRET=1 in the environment")
    global _KERNEL_BACKEND, _DISPATCH_AS
    _KERNEL_BACKEND, _DISPATCH_AS = backend, dispatch_as


def op_backend(op: str, x: torch.Tensor) -> str:
    """The backend that runs `op` (a key of nanofast.dispatch.OPS) on tensor `x`: see decide_backend."""
    return decide_backend(op, x.device)


def decide_backend(op: str, device: torch.device) -> str:
    """The backend that runs `op` on `device`, as the rule of set_kernel_backend/set_fp8_backend says.

    A function of (op, device) and the forced choices only, so it can be asked about a device this
    process has no tensors on. Under torch.compile the choice is a trace-time constant: the forced
    choices are module globals Dynamo guards on, and dispatch.backend_for answers at trace time.
    """
    spec = dispatch.OPS.get(op)
    if spec is None:
        raise ValueError(f"unknown op {op!r}: the known ops are {sorted(dispatch.OPS)}")
    if op == "fp8_linear" and _FP8_BACKEND is not None:
        return _FP8_BACKEND
    if _KERNEL_BACKEND is not None:  # forced wins over the table; a kernel backend the op lacks means Triton
        if _KERNEL_BACKEND == "torch":
            return "torch"
        return _KERNEL_BACKEND if _KERNEL_BACKEND in spec.kernels else "triton"
    return dispatch.backend_for(op, device, rehearse=_DISPATCH_AS)


def norm(x: torch.Tensor, residual: torch.Tensor | None = None):
    """Parameter-free RMSNorm over the last dim (F.rms_norm's default eps), any leading shape and float dtype.

    residual: None -> returns y = rms_norm(x). A tensor of x's shape and dtype -> returns (y, h) with
    h = x + residual (the new residual stream) and y = rms_norm(h): on a kernel backend one fused
    pass (kernels.rms_norm(x, residual=...): h is x + residual rounded to x's dtype, exactly the
    plain add; its autograd sends h's gradient to x and residual alike), on torch the plain
    add then F.rms_norm, the same ops the unfused model runs.
    """
    backend = op_backend("rms_norm", x)
    if backend == "torch":
        if residual is None:
            return F.rms_norm(x, (x.size(-1),))
        h = residual + x
        return F.rms_norm(h, (h.size(-1),)), h
    if residual is None:
        return kernels.rms_norm(x, backend=backend)
    return kernels.rms_norm(x, residual=residual, backend=backend)


_FP8_BACKEND: str | None = None


def set_fp8_backend(backend: str | None) -> None:
    """Who runs fp8 linears: one of kernels.FP8_BACKENDS ("torch", "scaled_mm" = torch._scaled_mm,
    "triton", "triton_persistent"), which wins over everything else, or None (default): the forced
    kernel backend if set_kernel_backend chose one ("torch" -> torch, "triton"/"cuda" -> "triton"),
    else the torch reference on CPU and, on CUDA, the dispatch table's choice for "fp8_linear"
    (torch._scaled_mm where the GPU was never measured)."""
    if backend is not None and backend not in kernels.FP8_BACKENDS:
        raise ValueError(f"fp8 backend must be None or one of {kernels.FP8_BACKENDS}, got {backend!r}")
    global _FP8_BACKEND
    _FP8_BACKEND = backend


def linear(x: torch.Tensor, weight: torch.Tensor, precision: str | None = None,
           recipe: str = "tensorwise") -> torch.Tensor:
    """y = x @ weight.T, the GEMM in `precision`, the result in x's dtype.

    x: (..., in) in the compute dtype; weight: (out, in), usually fp32. Casting the weight (not
    autocasting) keeps the optimizer on fp32 masters while the matmul runs in bf16/fp16.
    precision: None (x's dtype), "fp32", "bf16", "fp16" (cast both operands, cast the result back),
    or "fp8" (kernels.fp8_linear with `recipe`: e4m3 forward, e5m2 gradients, fp32 accumulation).
    """
    if precision is None:
        weight = weight.to(dtype=x.dtype)
        if _few_rows_large_weight(x, weight):
            return _few_rows_linear(x, weight)
        return F.linear(x, weight)
    if precision == "fp8":
        return kernels.fp8_linear(x, weight, recipe=recipe, backend=op_backend("fp8_linear", x))
    dt = DTYPES[precision]
    return F.linear(x.to(dt), weight.to(dt)).to(x.dtype)


# Inference on CPU multiplies a few rows (one per decoding sequence) by the lm_head (32768 x 256
# fp32: 32 MiB at vocab 32768). F.linear (x @ W^T) runs that as a GEMV or a small-M GEMM that is
# slow in torch's CPU BLAS; (W @ x^T)^T streams W as the large operand (one row is padded to two:
# a single column falls back to the same slow GEMV). bench/test_bench_decode_linear.py times both.
# Training (autograd on) keeps F.linear: its gradients want x @ W^T's layout.
_MAX_ROWS, _LARGE_WEIGHT = 1024, 1 << 20


def _few_rows_large_weight(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and not torch.is_grad_enabled() and weight.numel() >= _LARGE_WEIGHT
            and x.numel() <= _MAX_ROWS * x.size(-1))


def _few_rows_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.size(-1))
    n = rows.size(0)
    if n == 1:
        rows = torch.cat([rows, rows])
    return (weight @ rows.T).T[:n].contiguous().reshape(*x.shape[:-1], weight.size(0))


# The model's rotary tables, defined beside the kernel that takes them.
rotary_tables = kernels.rotary_tables


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary in nanochat's half-split convention (a rotation by -theta, kept for checkpoint parity).

    x: (B, T, H, D); cos, sin: (T, D/2) in x's dtype. y1 = x1 cos + x2 sin; y2 = -x1 sin + x2 cos.
    """
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary, then parameter-free RMSNorm over D, then multiply by `scale`, for q and k.

    q: (B, T, Hq, D), k: (B, T, Hk, D); cos, sin: (T, D/2). A rotation preserves each pair's norm,
    so norm-then-rotate equals rotate-then-norm: the fused kernel normalises first.
    """
    backend = op_backend("qk_norm_rope", q)
    if backend != "torch":
        return kernels.qk_norm_rope(q, k, cos, sin, scale=scale, backend=backend)
    # The vendor path is plain torch throughout (what the dispatch table measured as "torch").
    q = F.rms_norm(apply_rotary(q, cos, sin), (q.size(-1),)) * scale
    k = F.rms_norm(apply_rotary(k, cos, sin), (k.size(-1),)) * scale
    return q, k


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Causal attention with a left sliding window, default softmax scale 1/sqrt(D).

    q: (B, T, Hq, D); k, v: (B, T, Hkv, D) with Hq % Hkv == 0 (GQA). Query i sees keys j with
    i - window <= j <= i (flash-attn's window_size=(window, 0)); window -1 means unlimited (full
    causal), as in flash-attn; below -1 raises. Returns (B, T, Hq, D). Runs flash-attn (FA3 on
    Hopper, else FA2, through vendor.flash_attn_func and its contract) on fp16/bf16 CUDA tensors
    where installed, else SDPA (vendor.attention_backend says which).
    """
    w = _mask_window(window)
    fa = vendor.flash_attn_module(q)
    if fa is not None:
        return vendor.flash_attn_func(q, k, v, causal=True, window_size=(int(window), 0), module=fa)
    return _sdpa_attention(q, k, v, w)


def _sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    T = q.size(1)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D) views
    gqa = q.size(1) != k.size(1)
    if window >= T - 1:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return y.transpose(1, 2)
    # Banded attention without a (T, T) mask: each block of `window` queries only needs keys from
    # [block_start - window, block_end), so the work and the mask are O(T * window), not O(T^2).
    chunk = max(window, 1)
    outs = []
    for start in range(0, T, chunk):
        end = min(start + chunk, T)
        kstart = max(0, start - window)
        qi = torch.arange(start, end, device=q.device)[:, None]
        kj = torch.arange(kstart, end, device=q.device)[None, :]
        mask = (kj <= qi) & (kj >= qi - window)
        outs.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, kstart:end], v[:, :, kstart:end],
                                                   attn_mask=mask, enable_gqa=gqa))
    return torch.cat(outs, dim=2).transpose(1, 2)


def linear_softcap_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                                 softcap: float = 15.0, reduction: str = "mean", precision: str | None = None,
                                 recipe: str = "tensorwise") -> torch.Tensor:
    """The training head: cross-entropy of the softcapped logits `(x @ weight.T)[..., :vocab_size]`,
    as `linear` then `softcap_cross_entropy` compute them.

    x: (..., C) in the compute dtype; weight: (V_padded, C), the lm_head (rows past vocab_size are
    padding); targets (...) int64, -1 ignored. A head in the activations' dtype (precision None)
    runs fused and chunked on the weight's first vocab_size rows (kernels.linear_softcap_cross_entropy,
    on Triton or its torch path as op_backend decides), so the (tokens x vocab) logits and their
    gradient never exist whole: at 4,096 tokens x 32,768 those are 512 MiB each in fp32. A head in another
    precision (fp8 in the speedrun) runs unfused over the padded weight, whose aligned width fp8
    GEMMs need.
    """
    if precision is None:
        return kernels.linear_softcap_cross_entropy(x, weight[:vocab_size], targets, softcap, reduction,
                                                    backend=op_backend("linear_cross_entropy", x))
    logits = linear(x, weight, precision, recipe)[..., :vocab_size]
    return softcap_cross_entropy(logits, targets, softcap, reduction)


def softcap_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, softcap: float = 15.0,
                          reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of `softcap * tanh(logits / softcap)` computed in fp32, ignore_index -1.

    logits: (..., V) any float dtype; targets: (...) int64 with -1 for positions without a loss.
    reduction "mean" (over non-ignored positions), "sum" or "none" (shape of targets).
    """
    capped = softcap_logits(logits, softcap)
    loss = F.cross_entropy(capped.reshape(-1, capped.size(-1)), targets.reshape(-1), ignore_index=-1,
                           reduction=reduction)
    return loss.view(targets.shape) if reduction == "none" else loss


def softcap_logits(logits: torch.Tensor, softcap: float = 15.0) -> torch.Tensor:
    """`softcap * tanh(logits / softcap)` in fp32: bounds logits smoothly to (-softcap, softcap)."""
    logits = logits.float()
    if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # inference: one buffer instead of three (the decode step's (rows, vocab) logits)
        if logits.device.type == "cpu":
            # tanh(y) = 2 sigmoid(2y) - 1, and torch's CPU sigmoid is several times faster than its
            # tanh (bench/test_bench_sampling.py::test_bench_softcap); the two agree within 1e-5 in
            # fp32 (tests/test_ops.py), sigmoid's rounding near 1/2 being the larger error.
            return logits.mul(2 / softcap).sigmoid_().mul_(2 * softcap).sub_(softcap)
        return logits.div(softcap).tanh_().mul_(softcap)
    return softcap * torch.tanh(logits / softcap)

