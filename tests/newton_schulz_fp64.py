"""The fp64 Newton-Schulz reference of the tests (tests/test_newton_schulz.py, tests/test_optim.py),
written from the iteration's definition with explicit loops, independent of nanofast's code."""
import math

import torch


def fro(X: torch.Tensor) -> float:
    """Frobenius norm as an explicit sum over the entries."""
    return math.sqrt(sum(float(v) ** 2 for v in X.flatten()))


def orthogonalise(U: torch.Tensor, coeffs) -> torch.Tensor:
    """One (m, n) matrix in fp64: X = U / (1.01 ||U||_F + 1e-6), then per (a, b, c) step
    X <- a X + (b A + c A^2) X with A = X X^T; a tall matrix uses A = X^T X on the right
    (X <- a X + X (b A + c A^2)), not a transpose."""
    U = U.to(torch.float64)
    m, n = U.shape
    X = U / (fro(U) * 1.01 + 1e-6)
    for a, b, c in coeffs:
        if m > n:
            A = X.T @ X
            X = a * X + X @ (b * A + c * (A @ A))
        else:
            A = X @ X.T
            X = a * X + (b * A + c * (A @ A)) @ X
    return X
