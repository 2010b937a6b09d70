"""The FlashAttention-style error budget of the kernel tests: a kernel's error against an fp64
evaluation of the same maths may be at most FACTOR times the plain-torch low-precision error plus
ATOL * max(1, max|ref64|), with (FACTOR, ATOL) per direction and dtype from the test file's table."""
import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, in fp64 (0 for empty tensors)."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_budget(budget: dict, kind: str, dtype: torch.dtype, name: str, kernel: torch.Tensor,
                 torch_lp: torch.Tensor, ref64: torch.Tensor) -> None:
    """Assert `kernel` (the kernel's output) is within budget[kind][dtype] = (FACTOR, ATOL) of
    `ref64`, measured against `torch_lp` (plain torch in the input dtype), and finite."""
    factor, atol = budget[kind][dtype]
    assert kernel.shape == ref64.shape and kernel.dtype == torch_lp.dtype, name
    assert torch.isfinite(kernel).all(), name
    scale = max(1.0, ref64.abs().max().item() if ref64.numel() else 0.0)
    err_k, err_t = max_err(kernel, ref64), max_err(torch_lp, ref64)
    assert err_k <= factor * err_t + atol * scale, f"{name}: kernel err {err_k:.3e} vs torch err {err_t:.3e}"
