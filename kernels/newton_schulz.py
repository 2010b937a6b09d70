"""Newton-Schulz / Polar Express orthogonalisation (plain torch reference).

Given a matrix G = U S V^T, the iteration drives every singular value towards 1 with an odd
matrix polynomial, so the result approximates the orthogonal polar factor U V^T without an SVD.
Each step is three matmuls on the small Gram matrix, which is why Muon can afford it every step:

    A = X X^T,  B = b A + c A^2,  X <- a X + B X       (wide, m <= n)
    A = X^T X,  B = b A + c A^2,  X <- a X + X B       (tall, m > n: same maths on X^T)

Working on the side with the smaller Gram matrix keeps the cost at O(min(m, n)^2 max(m, n)).
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
from torch import Tensor

from .backend import resolve_backend
from .op import Op
from .tile_config import select_config

# Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv:2505.16932), optimised for exactly
# five iterations on singular values in (0, 1]: the early steps have a steep slope at zero to
# lift tiny singular values fast; the later ones pull the spectrum into a narrow band around 1.
POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

# Keller Jordan's quintic for Muon: one tuple applied at every step. It maximises the slope at
# zero rather than converging to exactly 1, so singular values end up spread around 1.
CLASSIC_NS_COEFFS: tuple[tuple[float, float, float], ...] = ((3.4445, -4.7750, 2.0315),)

__all__ = ["newton_schulz", "newton_schulz_reference", "resolve_coefficients", "default_iteration_dtype",
           "nesterov_normalize_", "nesterov_normalize_reference", "row_scales",
           "POLAR_EXPRESS_COEFFS", "CLASSIC_NS_COEFFS", "zeropower_via_newtonschulz5"]

_NAMED = {"polar_express": POLAR_EXPRESS_COEFFS, "classic": CLASSIC_NS_COEFFS}


def _check_input(G: Tensor) -> None:
    if not isinstance(G, Tensor):
        raise TypeError(f"G must be a torch.Tensor of shape (..., m, n), got {type(G).__name__}")
    if G.ndim < 2:
        raise ValueError(f"G must have shape (..., m, n) with at least 2 dims, got shape {tuple(G.shape)}")
    if not G.is_floating_point():
        raise TypeError(f"G must have a floating dtype (float16/bfloat16/float32/float64), got {G.dtype}")


def resolve_coefficients(
    coefficients: str | Sequence[tuple[float, float, float]], steps: int
) -> list[tuple[float, float, float]]:
    """Return the `steps` (a, b, c) tuples to apply, one per iteration.

    "polar_express": its 5 tuples are tuned as a set, so steps must be 1..5 (steps < 5 uses the
    first `steps`; there is no principled continuation past 5, hence an error rather than a guess).
    "classic": its single tuple is repeated `steps` times. An explicit sequence of (a, b, c) is
    used in order and must hold at least `steps` tuples (repeat a tuple yourself to cycle it).
    """
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be an int >= 1, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps}")
    if isinstance(coefficients, str):
        if coefficients not in _NAMED:
            raise ValueError(f"coefficients must be one of {sorted(_NAMED)} or a sequence of (a, b, c), "
                             f"got {coefficients!r}")
        if coefficients == "classic":
            return [CLASSIC_NS_COEFFS[0]] * steps
        if steps > len(POLAR_EXPRESS_COEFFS):
            raise ValueError(f"steps must be <= {len(POLAR_EXPRESS_COEFFS)} for coefficients='polar_express' "
                             f"(its tuples are tuned for that many iterations), got {steps}")
        return list(POLAR_EXPRESS_COEFFS[:steps])
    if not isinstance(coefficients, Sequence) or len(coefficients) == 0:
        raise TypeError("coefficients must be a name or a non-empty sequence of (a, b, c) float tuples, "
                        f"got {coefficients!r}")
    out = []
    for t in coefficients:
        if (not isinstance(t, Sequence) or isinstance(t, str) or len(t) != 3
                or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in t)):
            raise ValueError(f"coefficients must be a sequence of (a, b, c) float tuples, got element {t!r}")
        out.append((float(t[0]), float(t[1]), float(t[2])))
    if steps > len(out):
        raise ValueError(f"steps ({steps}) exceeds the {len(out)} explicit coefficient tuples given")
    return out[:steps]


def default_iteration_dtype(G: Tensor) -> torch.dtype:
    """bf16 on CUDA (tensor-core matmuls; the iteration is robust to bf16 rounding), else at
    least fp32 (CPU has no fast bf16 matmul, and fp64 inputs keep their precision)."""
    if G.device.type == "cuda":
        return torch.bfloat16
    return torch.promote_types(G.dtype, torch.float32)


def _check_dtype(dtype) -> None:
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")


def _validate(G, steps, coefficients, dtype) -> list[tuple[float, float, float]]:
    """newton_schulz's arguments checked; returns the resolved coefficients (one tuple per step)."""
    _check_input(G)
    coeffs = resolve_coefficients(coefficients, steps)
    _check_dtype(dtype)
    return coeffs


def _prepare(G: Tensor, eps: float, dtype: torch.dtype | None, normalized: bool = False) -> tuple[Tensor, bool]:
    """Normalise, shared by every backend so they iterate on the same X_0. Returns (X_0 as
    (..., min, max) wide matrices in the iteration dtype, tall)."""
    if dtype is None:
        dtype = default_iteration_dtype(G)

    X = G.to(dtype)
    if not normalized:
        # Norm accumulated in >= fp32: a bf16 sum of squares over a large matrix loses digits.
        norm_dtype = torch.promote_types(dtype, torch.float32)
        norm = torch.linalg.matrix_norm(X.to(norm_dtype), keepdim=True)
        X = X / (norm * 1.01 + eps).to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    return X, tall


def _finish(X: Tensor, G: Tensor, tall: bool) -> Tensor:
    if tall:
        X = X.mT
    return X.to(G.dtype).contiguous()


def newton_schulz_reference(
    G: Tensor,
    steps: int = 5,
    coefficients: str | Sequence[tuple[float, float, float]] = "polar_express",
    eps: float = 1e-6,
    dtype: torch.dtype | None = None,
    normalized: bool = False,
) -> Tensor:
    """Approximately orthogonalise each matrix of G with a quintic Newton-Schulz iteration.

    Args:
        G: (..., m, n) floating tensor; leading dims are a batch of independent matrices
            (a stack of same-shape gradients is the normal call). Wide or tall.
        steps: number of iterations (see `resolve_coefficients` for the limits per set).
        coefficients: "polar_express" (default), "classic", or an explicit sequence of (a, b, c).
        eps: added to the scaled Frobenius norm, so an all-zero matrix maps to zero (not NaN).
        dtype: iteration dtype; default bf16 on CUDA, else max(G.dtype, fp32).
        normalized: G is already X_0 (e.g. from `nesterov_normalize_`): skip the normalisation.
    Returns:
        (..., m, n) tensor in G's dtype: X_0 = G / (||G||_F * 1.01 + eps) per matrix (the 1.01
        keeps every singular value strictly inside (0, 1), where the polynomials are designed),
        then `steps` updates X <- a X + (b A + c A^2) X with A = X X^T (transposed for tall).
    """
    return _reference(G, _validate(G, steps, coefficients, dtype), eps, dtype, normalized)


def _reference(G: Tensor, coeffs, eps: float, dtype: torch.dtype | None, normalized: bool) -> Tensor:
    """newton_schulz_reference for validated arguments (`coeffs`: one (a, b, c) per step)."""
    X, tall = _prepare(G, eps, dtype, normalized)
    for a, b, c in coeffs:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return _finish(X, G, tall)


def newton_schulz(
    G: Tensor,
    steps: int = 5,
    coefficients: str | Sequence[tuple[float, float, float]] = "polar_express",
    eps: float = 1e-6,
    dtype: torch.dtype | None = None,
    backend: str | None = None,
    normalized: bool = False,
    config: str | None = None,
) -> Tensor:
    """Orthogonalise each (m, n) matrix of G (..., m, n); see `newton_schulz_reference`.

    backend: "torch" (the reference), "triton" (batched Triton kernels, `newton_schulz_triton`;
    iteration dtype float16 / bfloat16 / float32, default bf16 on CUDA and fp32 on CPU) or None
    (Triton on CUDA tensors, torch on CPU). There is no CUDA-source version: "cuda" raises.
    config: the Triton kernels' tiles, a name from `newton_schulz_triton.NS_ITERATION_CONFIGS`
    (e.g. "128x128x64-w8-s3"; bf16 / fp16 iteration only), or None for the default of the shape
    class. No GPU has measured one entry against another; the default is what ran before the space
    existed. A config with the torch backend raises ValueError.
    Returns a (..., m, n) tensor in G's dtype whose singular values are pulled towards 1 while the
    singular vectors of G are kept. Raises TypeError/ValueError naming G, steps, coefficients,
    dtype, backend or config on bad input.
    """
    coeffs = OP.checks["newton_schulz"](G, steps, coefficients, dtype)
    backend = resolve_backend(backend, G, OP.choices)
    if config is not None and backend != "triton":
        raise ValueError(f"config={config!r} picks the Triton kernels' tiles, but backend resolved to {backend!r} "
                         "(pass backend='triton')")
    if backend == "torch":
        return _reference(G, coeffs, eps, dtype, normalized)
    kernel = OP.launcher(backend)

    if dtype is None:
        # fp64 inputs on CPU would default to an fp64 iteration, which the kernels do not run.
        dtype = default_iteration_dtype(G)
        dtype = dtype if dtype in kernel.TRITON_DTYPES else torch.float32
    elif dtype not in kernel.TRITON_DTYPES:
        raise TypeError(f"dtype must be float16, bfloat16 or float32 for backend='triton', got {dtype!r}")
    if config is not None:
        # Checked before any work: a name of the space (the op takes the name) and a gated dtype.
        config = select_config(config, kernel.NS_ITERATION_CONFIGS, "config", "newton_schulz (square tiles)").name
        if dtype not in kernel.GATED_DTYPES:
            raise ValueError(f"config={config!r} is compile-gated for bfloat16 / float16 iterations only, got "
                             f"dtype={dtype}")
    X, tall = _prepare(G, eps, dtype, normalized)
    return _finish(kernel.newton_schulz_iterate_op(X, [v for abc in coeffs for v in abc], config), G, tall)


# --------------------------------------------------------------------------------------------
# Muon's prologue: Nesterov momentum, row equilibration and the normalisation, fused
# --------------------------------------------------------------------------------------------

def _check_prologue(grad, momentum_buf, momentum, eps, dtype) -> torch.dtype:
    _check_input(grad)
    if not isinstance(momentum_buf, Tensor) or momentum_buf.shape != grad.shape or momentum_buf.dtype != grad.dtype:
        raise ValueError(f"momentum_buf must be a tensor of grad's shape {tuple(grad.shape)} and dtype {grad.dtype}, "
                         f"got {tuple(momentum_buf.shape) if isinstance(momentum_buf, Tensor) else momentum_buf!r}"
                         f"{' ' + str(momentum_buf.dtype) if isinstance(momentum_buf, Tensor) else ''}")
    if momentum_buf.device != grad.device:
        raise ValueError(f"momentum_buf must be on grad's device {grad.device}, got {momentum_buf.device}")
    for name, t in (("grad", grad), ("momentum_buf", momentum_buf)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is updated in place as rows), got strides {t.stride()}")
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be a float in [0, 1], got {momentum!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or eps < 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    _check_dtype(dtype)
    return default_iteration_dtype(grad) if dtype is None else dtype


def row_scales(row_sq: Tensor, equilibrate_rows: bool, eps: float) -> Tensor:
    """Per-row factors that equilibrate and normalise, from each row's sum of squares.

    row_sq: (..., m) fp32, sum of u^2 over each row of (..., m, n). Returns (..., m, 1) fp32 s with
    X_0 = s * u. Equilibration scales row i to the mean row norm ||u||_F / sqrt(m) (rows of exactly
    zero stay zero: their norm is clamped to 1e-6, as in the reference); the normalisation is then
    NS's X / (||X||_F * 1.01 + eps), with ||X||_F computed from the same row sums, so no second pass
    over the matrix is needed.
    """
    if equilibrate_rows:
        target = row_sq.sum(-1, keepdim=True).sqrt() / math.sqrt(row_sq.size(-1))
        factor = target / row_sq.sqrt().clamp_min(1e-6)
    else:
        factor = torch.ones_like(row_sq)
    frob = (factor.square() * row_sq).sum(-1, keepdim=True).sqrt()
    return (factor / (frob * 1.01 + eps)).unsqueeze(-1)


def nesterov_normalize_reference(grad: Tensor, momentum_buf: Tensor, momentum: float, *,
                                 equilibrate_rows: bool = True, eps: float = 1e-6,
                                 dtype: torch.dtype | None = None) -> Tensor:
    """Plain-torch definition of `nesterov_normalize_` (same arguments, same in-place effects)."""
    dtype = _check_prologue(grad, momentum_buf, momentum, eps, dtype)
    return _prologue_reference(grad, momentum_buf, momentum, equilibrate_rows, eps, dtype)


def _prologue_reference(grad, momentum_buf, momentum, equilibrate_rows, eps, dtype) -> Tensor:
    """nesterov_normalize_reference for validated arguments (dtype resolved)."""
    momentum_buf.lerp_(grad, 1 - momentum)
    u = grad.lerp_(momentum_buf, momentum)
    row_sq = u.float().square().sum(-1)
    return (u.float() * row_scales(row_sq, equilibrate_rows, eps)).to(dtype)


# Under torch.compile the kernel backend's two launches are custom ops (Dynamo cannot trace into a
# Triton launch); eager calls run the launchers directly, without the op dispatcher.

@torch.library.custom_op("nanofast::nesterov_rows_", mutates_args=("grad", "momentum_buf"))
def _nesterov_rows_op(grad: Tensor, momentum_buf: Tensor, momentum: float, backend: str) -> Tensor:
    """In place: momentum_buf <- lerp(m, g, 1 - mu), grad <- lerp(g, m', mu); returns (..., m) fp32 row sums of u^2."""
    return OP.launcher(backend).nesterov_rows_triton(grad, momentum_buf, momentum)


@_nesterov_rows_op.register_fake
def _(grad, momentum_buf, momentum, backend):
    return grad.new_empty(grad.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("nanofast::scale_rows", mutates_args=())
def _scale_rows_op(u: Tensor, scales: Tensor, dtype: torch.dtype, backend: str) -> Tensor:
    """u (..., m, n) * scales (..., m, 1), contiguous, in `dtype`."""
    return OP.launcher(backend).scale_rows_triton(u, scales, dtype)


@_scale_rows_op.register_fake
def _(u, scales, dtype, backend):
    return u.new_empty(u.shape, dtype=dtype)


def nesterov_normalize_(grad: Tensor, momentum_buf: Tensor, momentum: float, *, equilibrate_rows: bool = True,
                        eps: float = 1e-6, dtype: torch.dtype | None = None, backend: str | None = None) -> Tensor:
    """Muon's prologue in two passes over the data: Nesterov momentum, row equilibration and
    Newton-Schulz's input normalisation, returning X_0 for `newton_schulz(X_0, normalized=True)`.

    Args:
        grad: (..., m, n) contiguous fp32/fp16/bf16 gradients; overwritten with the Nesterov
            direction u = lerp(g, m', mu).
        momentum_buf: like grad; updated in place to m' = lerp(m, g, 1 - mu).
        momentum: mu in [0, 1].
        equilibrate_rows: scale every row of u to the mean row norm first (MuonEq).
        eps, dtype: as in `newton_schulz` (dtype: the iteration dtype X_0 is returned in).
        backend: "torch", "triton" or None (Triton on CUDA tensors).
    Returns:
        X_0: (..., m, n) in `dtype`, every matrix scaled to ||X_0||_F = ||.||_F / (||.||_F * 1.01 + eps).

    Unfused, this is ~15 fp32-sized passes over the matrices (two lerps, a cast, three norms, two
    scalings); the Triton path reads g and m once (writing m' and u plus each row's sum of squares),
    forms the per-row factors on the tiny (..., m) vector, and reads u once more to write X_0: 5.5
    passes. X_0 is rounded to `dtype` once, where the unfused path rounds before normalising.
    Under torch.compile(fullgraph=True) the two Triton launches are the custom ops
    `nanofast::nesterov_rows_` (in place on grad and momentum_buf) and `nanofast::scale_rows`.
    """
    dtype = OP.checks["nesterov_normalize_"](grad, momentum_buf, momentum, eps, dtype)
    backend = resolve_backend(backend, grad, OP.choices)
    if backend == "torch":
        return _prologue_reference(grad, momentum_buf, momentum, equilibrate_rows, eps, dtype)
    kernel = OP.launcher(backend)
    for name, dt in (("grad", grad.dtype), ("dtype", dtype)):
        if dt not in kernel.TRITON_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32 for backend='triton', got {dt}")
    if torch.compiler.is_compiling():  # the same launchers as custom ops (see above)
        row_sq = torch.ops.nanofast.nesterov_rows_(grad, momentum_buf, float(momentum), backend)
        return torch.ops.nanofast.scale_rows(grad, row_scales(row_sq, equilibrate_rows, eps), dtype, backend)
    row_sq = kernel.nesterov_rows_triton(grad, momentum_buf, float(momentum))
    return kernel.scale_rows_triton(grad, row_scales(row_sq, equilibrate_rows, eps), dtype)


def cost(shape: tuple[int, ...], steps: int = 5, itemsize: int = 2) -> dict:
    """One call on a (..., m, n) stack: FLOPs of the matmuls (per matrix and step, with s = min(m, n)
    and l = max(m, n): the Gram matrix A (2 s^2 l), A @ A (2 s^3) and B @ X (2 s^2 l); elementwise
    terms are negligible) and bytes, each step's three matmuls moving about two s x l plus two s x s
    matrices each (unfused: every product goes through memory)."""
    *batch, m, n = shape
    count = math.prod(batch)
    s, l = min(m, n), max(m, n)
    return {"flops": count * steps * (4 * s * s * l + 2 * s ** 3),
            "bytes": count * steps * 3 * 2 * (s * l + s * s) * itemsize}


def prologue_cost(shape: tuple[int, ...], out_itemsize: int = 2) -> dict:
    """The fused prologue's minimum traffic for fp32 g and m: read g, m; write m', u; read u; write
    X_0 (`nesterov_normalize_`), and its ~8 FLOPs per element."""
    n = math.prod(shape)
    return {"bytes": n * (6 * 4 + out_itemsize), "flops": 8 * n}


def _triton_configs(arch: int = 90) -> list[dict]:
    # The iteration's tiles depend on the target (an A100 has less shared memory); the prologue's do not.
    kernel = OP.launcher("triton")
    return [*(kernel.KERNEL_CONFIGS_SM80 if arch < 90 else kernel.KERNEL_CONFIGS), *kernel.PROLOGUE_CONFIGS]


# --------------------------------------------------------------------------------------------
# Muon's orthogonaliser under its own name, so a Muon user swaps one import
# --------------------------------------------------------------------------------------------

# Muon adds this to the Frobenius norm (not nanofast's `* 1.01 + eps`): the iteration starts from
# exactly Muon's X_0.
MUON_NORM_EPS = 1e-7


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5, *, backend: str | None = None,
                                dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Keller Jordan's Muon `zeropower_via_newtonschulz5`, run by nanofast's Newton-Schulz kernels.

    Same call and result as Muon's function of that name (replace its import with this one):
        G: (..., m, n) floating tensor (any float dtype, any layout), m, n >= 1; leading dims are a
            batch of independent matrices. Wide, square or tall.
        steps: iterations, an int >= 1 (Muon's default 5), each of the classic quintic
            (a, b, c) = CLASSIC_NS_COEFFS[0] = (3.4445, -4.7750, 2.0315).
    Returns:
        (..., m, n), contiguous, in bf16 (Muon's output dtype; see `dtype`): G's singular vectors
        with its singular values pushed into a band around 1 (the classic coefficients maximise the
        slope at zero instead of converging, so the band is roughly 0.7 to 1.2, as in Muon).

    Maths, per matrix, as Muon computes it: X_0 = bf16(G) / (||bf16(G)||_F + 1e-7), the norm
    rounded to bf16 like Muon's `X.norm()` on a bf16 tensor; a tall matrix (m > n) iterates on its
    transpose (the m x m Gram matrix would be the larger one) and is transposed back; then `steps`
    updates X <- a X + (b A + c A^2) X with A = X X^T. The updates are `newton_schulz(X_0,
    coefficients="classic", normalized=True)`, i.e. nanofast's torch reference or Triton kernels.

    What differs from `newton_schulz(G, coefficients="classic")`: the normalisation (Muon's
    ||G||_F + 1e-7, not ||G||_F * 1.01 + eps), the iteration dtype (bf16 on every device, where
    newton_schulz defaults to fp32 on CPU) and the output dtype (the iteration's, not G's). What
    differs from Muon's code, in bf16 roundings only: Muon writes `c * A @ A`, which Python reads
    as (c A) @ A, rounding c A to bf16 first; nanofast forms A @ A and scales it (the Triton
    kernel in fp32 before one rounding), so bf16 results agree to bf16 rounding, not bitwise
    (tests/test_newton_schulz.py states the budget; in fp32 they agree to ~1e-6).

    backend: "torch" (newton_schulz's plain-torch reference), "triton" (nanofast's batched Triton
        kernels; on CPU through Triton's interpreter) or None (Triton on CUDA tensors, torch on CPU).
    dtype: nanofast's addition (Muon has no such argument): the iteration and output dtype, bf16 by
        default as in Muon; float32 to check the maths without bf16 rounding (and float16 on the
        Triton backend).
    Raises TypeError / ValueError naming G, steps, backend or dtype.
    """
    _check_input(G)
    if G.size(-2) == 0 or G.size(-1) == 0:
        raise ValueError(f"G must have m, n >= 1 in its shape (..., m, n), got {tuple(G.shape)}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype (Muon's is torch.bfloat16), got {dtype!r}")
    coeffs = resolve_coefficients("classic", steps)  # checks steps (an int >= 1) before any work
    backend = resolve_backend(backend, G, OP.choices)
    X = G.to(dtype)
    # Muon's normalisation, in the iteration dtype as Muon does it (vector_norm accumulates in fp32
    # for 16-bit inputs and rounds the norm once). Transpose-invariant, so it is taken before
    # newton_schulz decides which side to iterate on.
    X = X / (torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) + MUON_NORM_EPS)
    return newton_schulz(X, len(coeffs), coefficients="classic", dtype=dtype, backend=backend, normalized=True)


OP = Op(name="newton_schulz", vendor="torch", kernels=("triton",), unmeasured="torch",
        why="GEMM-class: torch.matmul (cuBLAS) is known correct and fast; the Triton GEMMs are unmeasured on a GPU",
        checks={"newton_schulz": _validate, "nesterov_normalize_": _check_prologue},
        references={"newton_schulz": newton_schulz_reference, "nesterov_normalize_": nesterov_normalize_reference},
        vendor_path=newton_schulz_reference, launchers={"triton": "newton_schulz_triton"}, cost=cost,
        configs=_triton_configs)
