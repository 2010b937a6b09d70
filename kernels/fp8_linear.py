"""FP8 linear layer: `y = x @ weight.T (+ bias)` with every GEMM in FP8, forward and backward.

Recipes (dynamic scaling, computed from the current tensors):
  * "tensorwise": one scale per tensor. The quantisation also writes the transposed copy the
    backward GEMMs need (same scale), so each tensor is read once for both layouts.
  * "rowwise": one scale per row of each GEMM operand (per token for activations, per output
    feature for weights): more accurate for outlier rows, but the backward GEMMs reduce over the
    other dimension, so x and weight are re-quantised transposed there (their column scales differ).

Formats: e4m3 (more mantissa) for activations and weights in the forward, e5m2 (more range) for the
output gradient in the backward, as Transformer Engine and torchao do. Accumulation is always fp32;
Hopper's fast (reduced-precision) accumulation is used only in the forward GEMM, where the errors
do not compound through the backward. The weight gradient comes out in fp32, so fp32 master
weights accumulate it without another rounding.

Shapes: the GEMMs need K and N multiples of 16 (FP8 tensor-core MMAs and `torch._scaled_mm` read
16-byte aligned rows): other shapes are rejected with a ValueError rather than silently padded (the
model's layers all satisfy it; pad the layer, not every call). M (tokens) is free: the weight
gradient reduces over M, which CUDA's `_scaled_mm` also wants a multiple of 16, so M is padded with
zero rows to the next multiple of 16 (zero rows add nothing to the weight gradient; their outputs
are dropped). That copies x only when M % 16 != 0.

Output dtypes follow `torch._scaled_mm`'s CUDA contract (`vendor.SCALED_MM_RULES`) on every
backend, so every backend computes the same roundings and a CPU run predicts the GPU's: row-wise
GEMMs write bf16 (the one output the CUTLASS row-wise path takes; cast to x's dtype or fp32
after: the bf16 rounding, 2^-9 relative, is small beside fp8's own 2^-4 / 2^-3), and a bias is
fused into the GEMM only when the GEMM writes x's 16-bit dtype, else added after it.

backend: "torch" (the plain-torch references of the quantisation and the GEMM: the same
algorithm, readable), "scaled_mm" (`torch._scaled_mm` for the GEMMs through
`vendor.scaled_mm`: cuBLASLt on GPU; on CPU torch's own kernel, held to the CUDA contract),
"triton" (nanofast's Triton quantisation and GEMM kernels), "triton_persistent" (the same
quantisation, the persistent TMA GEMM; TMA needs 16-byte aligned operand rows, and a GEMM whose
operands are not, e.g. views at odd offsets, runs the pointer kernel), None (Triton on CUDA
tensors, torch on CPU).
"""
from __future__ import annotations

import functools
import operator
from types import SimpleNamespace

import torch
from torch import Tensor

from .backend import resolve_backend
from .op import Op
from .fp8_gemm import fp8_gemm, tma_aligned
from .fp8_quant import quantize_fp8

__all__ = ["fp8_linear", "FP8Linear", "FP8_BACKENDS", "FP8_RECIPES"]

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_RECIPES = ("tensorwise", "rowwise")


def _resolve(backend: str | None, x: Tensor) -> tuple[str, str]:
    """(quantisation backend, GEMM backend) for fp8_linear's `backend`."""
    be = resolve_backend(backend, x, OP.choices)  # a Triton backend on CPU needs the interpreter
    if be == "torch":
        return "torch", "torch"
    if be == "scaled_mm":
        # cuBLASLt does the GEMMs; the quantisation is the device's default (Triton on GPU).
        return resolve_backend(None, x), "scaled_mm"
    launch = OP.launcher(be)
    return launch.quantize, launch.gemm


def _gemm(a: Tensor, b: Tensor, sa: Tensor, sb: Tensor, gb: str, **kwargs) -> Tensor:
    """fp8_gemm on GEMM backend `gb`; the persistent kernel only where its operands are TMA-aligned."""
    if gb == "triton_persistent" and not (tma_aligned(a) and tma_aligned(b)):
        gb = "triton"
    return fp8_gemm(a, b, sa, sb, backend=gb, **kwargs)


# The forward and backward maths, shared by the eager autograd.Function and the custom ops that
# torch.compile traces. Tensorwise saves the quantised transposes (made in the forward's one read
# of x and W); rowwise saves x and W, whose backward scales run along the other dimension.

def _linear_out(x: Tensor, gemm, bias: Tensor | None, gemm_dtype: torch.dtype) -> Tensor:
    """gemm(out_dtype, bias) in x's dtype with `bias` added: fused when the GEMM writes x's 16-bit
    dtype (the only case `_scaled_mm` takes a bias), else after the GEMM in x's dtype."""
    if bias is not None and gemm_dtype == x.dtype != torch.float32:
        return gemm(gemm_dtype, bias.to(x.dtype))
    out = gemm(gemm_dtype, None).to(x.dtype)
    return out if bias is None else out + bias.to(x.dtype)


def _forward_tensorwise(x: Tensor, weight: Tensor, bias: Tensor | None, qb: str, gb: str):
    xq, xs, xq_t, _ = quantize_fp8(x, E4M3, transpose=True, backend=qb)
    wq, ws, wq_t, _ = quantize_fp8(weight, E4M3, transpose=True, backend=qb)
    out = _linear_out(x, lambda dt, b: _gemm(xq, wq, xs, ws, gb, out_dtype=dt, bias=b, use_fast_accum=True),
                      bias, x.dtype)
    return out, xq_t, xs, wq_t, ws


def _backward_tensorwise(gy: Tensor, xq_t: Tensor, xs: Tensor, wq_t: Tensor, ws: Tensor, x_dtype: torch.dtype,
                         qb: str, gb: str) -> tuple[Tensor, Tensor]:
    gq, gs, gq_t, _ = quantize_fp8(gy.contiguous(), E5M2, transpose=True, backend=qb)
    dx = _gemm(gq, wq_t, gs, ws, gb, out_dtype=x_dtype)          # (M,N)(N,K): B = W^T rows
    dw = _gemm(gq_t, xq_t, gs, xs, gb, out_dtype=torch.float32)  # (N,M)(M,K): B = x^T rows, K = M % 16 == 0
    return dx, dw


# Row-wise GEMMs write bf16, the only output CUDA's row-wise _scaled_mm takes on every build.
_ROWWISE_OUT = torch.bfloat16


def _forward_rowwise(x: Tensor, weight: Tensor, bias: Tensor | None, qb: str, gb: str) -> Tensor:
    xq, xs, _, _ = quantize_fp8(x, E4M3, recipe="rowwise", backend=qb)
    wq, ws, _, _ = quantize_fp8(weight, E4M3, recipe="rowwise", backend=qb)
    return _linear_out(x, lambda dt, b: _gemm(xq, wq, xs, ws.t(), gb, out_dtype=dt, bias=b, use_fast_accum=True),
                       bias, _ROWWISE_OUT)


def _backward_rowwise(gy: Tensor, x: Tensor, weight: Tensor, qb: str, gb: str) -> tuple[Tensor, Tensor]:
    gy = gy.contiguous()
    gq, gs, _, _ = quantize_fp8(gy, E5M2, recipe="rowwise", backend=qb)
    wtq, wts, _, _ = quantize_fp8(weight.t().contiguous(), E4M3, recipe="rowwise", backend=qb)
    dx = _gemm(gq, wtq, gs, wts.t(), gb, out_dtype=_ROWWISE_OUT).to(x.dtype)
    gtq, gts, _, _ = quantize_fp8(gy.t().contiguous(), E5M2, recipe="rowwise", backend=qb)
    xtq, xts, _, _ = quantize_fp8(x.t().contiguous(), E4M3, recipe="rowwise", backend=qb)
    dw = _gemm(gtq, xtq, gts, xts.t(), gb, out_dtype=_ROWWISE_OUT).float()
    return dx, dw


class _FP8Linear(torch.autograd.Function):
    """Eager autograd: calls the maths directly (no custom-op dispatch per GEMM)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, recipe: str, qb: str, gb: str) -> Tensor:
        ctx.recipe, ctx.qb, ctx.gb, ctx.has_bias = recipe, qb, gb, bias is not None
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        if recipe == "tensorwise":
            out, *saved = _forward_tensorwise(x, weight, bias, qb, gb)
            ctx.save_for_backward(*saved)
            return out
        ctx.save_for_backward(x, weight)
        return _forward_rowwise(x, weight, bias, qb, gb)

    @staticmethod
    def backward(ctx, gy: Tensor):
        if ctx.recipe == "tensorwise":
            dx, dw = _backward_tensorwise(gy, *ctx.saved_tensors, ctx.x_dtype, ctx.qb, ctx.gb)
        else:
            dx, dw = _backward_rowwise(gy, *ctx.saved_tensors, ctx.qb, ctx.gb)
        db = gy.float().sum(0) if ctx.has_bias else None
        return dx, dw.to(ctx.w_dtype), db, None, None, None


# torch.compile: Dynamo cannot trace into a Triton launch under the interpreter (nor should it
# re-trace the quantisation on a GPU), so the compiled graph sees opaque custom ops. Their fake
# implementations run the same maths on the torch backend, which gives the shapes, dtypes and
# strides of the kernels' outputs (opcheck in the tests holds them to it).

@torch.library.custom_op("nanofast::fp8_linear_tensorwise_fwd", mutates_args=())
def _tensorwise_fwd_op(x: Tensor, weight: Tensor, bias: Tensor | None, qb: str, gb: str
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _forward_tensorwise(x, weight, bias, qb, gb)


@_tensorwise_fwd_op.register_fake
def _(x, weight, bias, qb, gb):
    return _forward_tensorwise(x, weight, bias, "torch", "torch")


@torch.library.custom_op("nanofast::fp8_linear_tensorwise_bwd", mutates_args=())
def _tensorwise_bwd_op(gy: Tensor, xq_t: Tensor, xs: Tensor, wq_t: Tensor, ws: Tensor, w_dtype: torch.dtype,
                       qb: str, gb: str) -> tuple[Tensor, Tensor]:
    dx, dw = _backward_tensorwise(gy, xq_t, xs, wq_t, ws, gy.dtype, qb, gb)
    return dx, dw.to(w_dtype)


@_tensorwise_bwd_op.register_fake
def _(gy, xq_t, xs, wq_t, ws, w_dtype, qb, gb):
    dx, dw = _backward_tensorwise(gy, xq_t, xs, wq_t, ws, gy.dtype, "torch", "torch")
    return dx, dw.to(w_dtype)


def _tensorwise_setup(ctx, inputs, output) -> None:
    x, weight, bias, qb, gb = inputs
    ctx.save_for_backward(*output[1:])
    ctx.w_dtype, ctx.has_bias, ctx.qb, ctx.gb = weight.dtype, bias is not None, qb, gb


def _tensorwise_backward(ctx, gy, *_unused):
    dx, dw = torch.ops.nanofast.fp8_linear_tensorwise_bwd(gy, *ctx.saved_tensors, ctx.w_dtype, ctx.qb, ctx.gb)
    return dx, dw, gy.float().sum(0) if ctx.has_bias else None, None, None


_tensorwise_fwd_op.register_autograd(_tensorwise_backward, setup_context=_tensorwise_setup)


@torch.library.custom_op("nanofast::fp8_linear_rowwise_fwd", mutates_args=())
def _rowwise_fwd_op(x: Tensor, weight: Tensor, bias: Tensor | None, qb: str, gb: str) -> Tensor:
    return _forward_rowwise(x, weight, bias, qb, gb)


@_rowwise_fwd_op.register_fake
def _(x, weight, bias, qb, gb):
    return _forward_rowwise(x, weight, bias, "torch", "torch")


@torch.library.custom_op("nanofast::fp8_linear_rowwise_bwd", mutates_args=())
def _rowwise_bwd_op(gy: Tensor, x: Tensor, weight: Tensor, qb: str, gb: str) -> tuple[Tensor, Tensor]:
    dx, dw = _backward_rowwise(gy, x, weight, qb, gb)
    return dx, dw.to(weight.dtype)


@_rowwise_bwd_op.register_fake
def _(gy, x, weight, qb, gb):
    dx, dw = _backward_rowwise(gy, x, weight, "torch", "torch")
    return dx, dw.to(weight.dtype)


def _rowwise_setup(ctx, inputs, output) -> None:
    x, weight, bias, qb, gb = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias, ctx.qb, ctx.gb = bias is not None, qb, gb


def _rowwise_backward(ctx, gy):
    dx, dw = torch.ops.nanofast.fp8_linear_rowwise_bwd(gy, *ctx.saved_tensors, ctx.qb, ctx.gb)
    return dx, dw, gy.float().sum(0) if ctx.has_bias else None, None, None


_rowwise_fwd_op.register_autograd(_rowwise_backward, setup_context=_rowwise_setup)


def _check(x, weight, bias, recipe) -> None:
    if not isinstance(x, Tensor) or x.ndim < 1 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"x must be a float32/bfloat16/float16 tensor (..., K), got "
                        f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(weight, Tensor) or weight.ndim != 2 or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating (N, K) tensor as in F.linear, got "
                        f"{tuple(getattr(weight, 'shape', ()))}")
    N, K = weight.shape
    if x.size(-1) != K:
        raise ValueError(f"x's last dim ({x.size(-1)}) must equal weight's K ({K}); weight is (N, K) = {(N, K)}")
    if K % 16 or N % 16:
        raise ValueError(f"fp8_linear needs K and N multiples of 16 (FP8 MMA / _scaled_mm row alignment), got "
                         f"weight (N, K) = {(N, K)}: pad the layer's dimensions or keep it in bf16")
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (N,)):
        raise ValueError(f"bias must be None or a ({N},) tensor, got {tuple(getattr(bias, 'shape', ()))}")
    if recipe not in FP8_RECIPES:
        raise ValueError(f"recipe must be one of {FP8_RECIPES}, got {recipe!r}")
    if weight.device != x.device or (bias is not None and bias.device != x.device):
        raise ValueError(f"x, weight and bias must be on one device, got {x.device}, {weight.device}")


def fp8_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, recipe: str = "tensorwise",
               backend: str | None = None) -> Tensor:
    """F.linear with FP8 GEMMs (see the module docstring).

    Args:
        x: (..., K) fp32/bf16/fp16 activations, any leading dims.
        weight: (N, K) as in F.linear (fp32 master weights are quantised directly).
        bias: optional (N,).
        recipe: "tensorwise" or "rowwise" dynamic scaling.
        backend: "torch", "scaled_mm", "triton", "triton_persistent" or None.
    Returns:
        (..., N) in x's dtype; differentiable in x, weight and bias (weight's gradient in its dtype,
        computed in fp32).
    """
    OP.checks["fp8_linear"](x, weight, bias, recipe)
    qb, gb = _resolve(backend, x)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.size(-1))
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    m = x2d.size(0)
    if m % 16:  # the weight gradient reduces over M: zero rows up to a multiple of 16 (module docstring)
        x2d = torch.nn.functional.pad(x2d, (0, 0, 0, -m % 16))
    if not torch.compiler.is_compiling():
        out = _FP8Linear.apply(x2d, weight, bias, recipe, qb, gb)
    elif recipe == "tensorwise":
        out = torch.ops.nanofast.fp8_linear_tensorwise_fwd(x2d, weight, bias, qb, gb)[0]
    else:
        out = torch.ops.nanofast.fp8_linear_rowwise_fwd(x2d, weight, bias, qb, gb)
    return out[:m].reshape(*lead, weight.size(0))


def cost(m: int, n: int, k: int, itemsize: int = 2) -> dict:
    """One training step of an (M, K) x (N, K) layer: the three GEMMs' 6 M N K FLOPs, and the bytes
    of the tensorwise recipe with each tensor moved once: x, W and the output gradient read in
    16 bits and written in fp8 with their transposes, the fp8 operands read by the GEMMs, y and dx
    written in 16 bits, dW in fp32."""
    mk, nk, mn = m * k, n * k, m * n
    quant = (mk + nk + mn) * (itemsize + 2)
    gemms = 2 * (mk + nk + mn)
    return {"bytes": quant + gemms + (mn + mk) * itemsize + 4 * nk, "flops": 6 * m * n * k}


def _feature_count(name: str, value) -> int:
    """in_features / out_features as an int >= 16 and a multiple of 16 (fp8_linear's K and N)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if n < 16 or n % 16:
        raise ValueError(f"{name} must be a positive multiple of 16 (fp8_linear's FP8 GEMMs need K and N "
                         f"multiples of 16), got {n}: pad the layer or keep it an nn.Linear")
    return n


def _check_recipe_backend(recipe, backend) -> None:
    if recipe not in FP8_RECIPES:
        raise ValueError(f"recipe must be one of {FP8_RECIPES}, got {recipe!r}")
    if backend is not None and backend not in OP.choices:
        raise ValueError(f"backend must be one of {OP.choices} or None, got {backend!r}")


class FP8Linear(torch.nn.Linear):
    """Drop-in for `nn.Linear(in_features, out_features, bias)` whose forward is `fp8_linear`.

    An nn.Linear subclass: the same constructor (recipe and backend are keyword-only additions),
    parameters (`weight` (out_features, in_features), `bias` (out_features,) or None, in the
    high-precision `dtype` you give, fp32 by default, initialised as nn.Linear does), state_dict
    keys, and `isinstance(m, nn.Linear)`, so optimizers, checkpoints and code that walks a
    model's Linear layers see no difference. Only the GEMMs change: the forward quantises x and
    weight to fp8 on every call (dynamic scaling, `recipe`), and the backward quantises the output
    gradient (see `fp8_linear` and this module's docstring for the formats and roundings).

    forward(x): x (..., in_features) fp32/bf16/fp16, any leading dims, last dim contiguous or not
    (a copy is made where needed) -> (..., out_features) in x's dtype. The bias is fused into the
    GEMM where the GEMM writes x's 16-bit dtype, else added after it in x's dtype; its gradient is
    the fp32 sum of the output gradient. The weight gradient is computed in fp32 and stored in the
    weight's dtype.

    Args:
        in_features, out_features: ints, multiples of 16 (the FP8 GEMMs' K and N: a ValueError
            otherwise, rather than silent padding on every call).
        bias, device, dtype: as nn.Linear.
        recipe: "tensorwise" or "rowwise" (FP8_RECIPES).
        backend: "torch", "scaled_mm", "triton", "triton_persistent" (FP8_BACKENDS) or None
            (Triton on CUDA tensors, the torch reference on CPU).
    Raises TypeError / ValueError naming in_features, out_features, recipe or backend.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 recipe: str = "tensorwise", backend: str | None = None) -> None:
        in_features = _feature_count("in_features", in_features)
        out_features = _feature_count("out_features", out_features)
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool (as in nn.Linear), got {type(bias).__name__}")
        _check_recipe_backend(recipe, backend)
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.recipe, self.backend = recipe, backend

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, *, recipe: str = "tensorwise",
                    backend: str | None = None) -> "FP8Linear":
        """An FP8Linear that SHARES `linear`'s parameters (the same nn.Parameter objects: no copy,
        an optimizer built on the old layer keeps updating the new one, and training either trains
        both). Copy first (`copy.deepcopy(linear)`) for an independent layer. Any nn.Linear
        (subclasses included, e.g. a model's own Linear that casts its weight to x's dtype: fp8_linear
        quantises the weight from its stored dtype, which the cast would only have rounded).
        The training/eval mode is carried over."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        # Built on the meta device: its own parameters are placeholders, replaced at once by linear's.
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta",
                     recipe=recipe, backend=backend)
        module.weight = linear.weight
        module.bias = linear.bias
        return module.train(linear.training)

    def forward(self, x: Tensor) -> Tensor:
        return fp8_linear(x, self.weight, self.bias, self.recipe, self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe!r}, backend={self.backend!r}"


# A kernel backend of fp8_linear is a pair: the quantisation's backend and the GEMM's.
OP = Op(name="fp8_linear", vendor="scaled_mm", kernels=("triton", "triton_persistent"), unmeasured="scaled_mm",
        why="GEMM-class: torch._scaled_mm (cuBLASLt) is known correct and fast; the Triton fp8 GEMMs are unmeasured "
            "on a GPU",
        checks={"fp8_linear": _check}, references={"fp8_linear": functools.partial(fp8_linear, backend="torch")},
        vendor_path=functools.partial(fp8_linear, backend="scaled_mm"),
        launchers={"triton": SimpleNamespace(quantize="triton", gemm="triton"),
                   "triton_persistent": SimpleNamespace(quantize="triton", gemm="triton_persistent")},
        cost=cost)
FP8_BACKENDS = OP.choices  # ("torch", "scaled_mm", "triton", "triton_persistent")
