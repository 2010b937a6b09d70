"""Newton-Schulz / Polar Express orthogonalisation (plain torch reference).

Given a matrix G = U S V^T, the iteration drives every singular value towards 1 with an odd
matrix polynomial, so the result approximates the orthogonal polar factor U V^T without an SVD.
Each step is three matmuls on the small Gram matrix, which is why Muon can afford it every step:

    A = X X^T,  B = b A + c A^2,  X <- a X + B X       (wide, m <= n)
    A = X^T X,  B = b A + c A^2,  X <- a X + X B       (tall, m > n: same maths on X^T)

Working on the side with the smaller Gram matrix keeps the cost at O(min(m, n)^2 max(m, n)).
"""
from __future__ import annotations

import numbers
from typing import Sequence

import torch
from torch import Tensor

from .backend import resolve_backend

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
           "POLAR_EXPRESS_COEFFS", "CLASSIC_NS_COEFFS"]

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


def _prepare(G: Tensor, steps: int, coefficients, eps: float, dtype: torch.dtype | None
             ) -> tuple[Tensor, list[tuple[float, float, float]], bool]:
    """Validate, resolve coefficients and normalise: shared by every backend so they iterate on the
    same X_0. Returns (X_0 as (..., min, max) wide matrices in the iteration dtype, coeffs, tall)."""
    _check_input(G)
    coeffs = resolve_coefficients(coefficients, steps)
    if dtype is None:
        dtype = default_iteration_dtype(G)
    elif not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")

    X = G.to(dtype)
    # Norm accumulated in >= fp32: a bf16 sum of squares over a large matrix loses digits.
    norm_dtype = torch.promote_types(dtype, torch.float32)
    norm = torch.linalg.matrix_norm(X.to(norm_dtype), keepdim=True)
    X = X / (norm * 1.01 + eps).to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    return X, coeffs, tall


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
) -> Tensor:
    """Approximately orthogonalise each matrix of G with a quintic Newton-Schulz iteration.

    Args:
        G: (..., m, n) floating tensor; leading dims are a batch of independent matrices
            (a stack of same-shape gradients is the normal call). Wide or tall.
        steps: number of iterations (see `resolve_coefficients` for the limits per set).
        coefficients: "polar_express" (default), "classic", or an explicit sequence of (a, b, c).
        eps: added to the scaled Frobenius norm, so an all-zero matrix maps to zero (not NaN).
        dtype: iteration dtype; default bf16 on CUDA, else max(G.dtype, fp32).
    Returns:
        (..., m, n) tensor in G's dtype: X_0 = G / (||G||_F * 1.01 + eps) per matrix (the 1.01
        keeps every singular value strictly inside (0, 1), where the polynomials are designed),
        then `steps` updates X <- a X + (b A + c A^2) X with A = X X^T (transposed for tall).
    """
    X, coeffs, tall = _prepare(G, steps, coefficients, eps, dtype)
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
) -> Tensor:
    """Orthogonalise each (m, n) matrix of G (..., m, n); see `newton_schulz_reference`.

    backend: "torch" (the reference), "triton" (batched Triton kernels, `newton_schulz_triton`;
    iteration dtype float16 / bfloat16 / float32, default bf16 on CUDA and fp32 on CPU) or None
    (Triton on CUDA tensors, torch on CPU). There is no CUDA-source version: "cuda" raises.
    Returns a (..., m, n) tensor in G's dtype whose singular values are pulled towards 1 while the
    singular vectors of G are kept. Raises TypeError/ValueError naming G, steps, coefficients,
    dtype or backend on bad input.
    """
    _check_input(G)
    backend = resolve_backend(backend, G)
    if backend == "torch":
        return newton_schulz_reference(G, steps=steps, coefficients=coefficients, eps=eps, dtype=dtype)
    if backend == "cuda":
        raise ValueError("backend='cuda' is not available for newton_schulz (no CUDA-source kernel exists); "
                         "use backend='triton' or 'torch'")
    from .newton_schulz_triton import TRITON_DTYPES, newton_schulz_triton

    if dtype is None:
        # fp64 inputs on CPU would default to an fp64 iteration, which the kernels do not run.
        dtype = default_iteration_dtype(G)
        dtype = dtype if dtype in TRITON_DTYPES else torch.float32
    elif dtype not in TRITON_DTYPES:
        raise TypeError(f"dtype must be float16, bfloat16 or float32 for backend='triton', got {dtype!r}")
    X, coeffs, tall = _prepare(G, steps, coefficients, eps, dtype)
    return _finish(newton_schulz_triton(X, coeffs, dtype), G, tall)
