"""Checks of FP8 quantisation run by Triton's interpreter, whose own fp32 -> fp8 conversion is not
IEEE round-to-nearest-even (characterised in tests/test_fp8_quant.py's module docstring and its
conversion-defect test): shared by the quantisation tests and the kernel-defaults tests."""
from __future__ import annotations

import numpy as np
import torch

from nanofast.kernels.fp8_quant import FP8_MAX

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def interp_cast(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The Triton interpreter's own fp32 -> fp8 conversion (RTNE mode, as `.to()` requests it) of
    fp32 values y: uint8 codes."""
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime.interpreter import _convert_float

    out = _convert_float(y.float().contiguous().numpy(), tl.float32, {E4: tl.float8e4nv, E5: tl.float8e5}[dtype],
                         ir.ROUNDING_MODE.RTNE)
    return torch.from_numpy(np.ascontiguousarray(out).astype(np.uint8)).reshape(y.shape)


def precast(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The definition's fp32 value before the fp8 rounding."""
    return (x.float() / scale).clamp(-FP8_MAX[dtype], FP8_MAX[dtype])


def check_q(q: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, name: str) -> float:
    """q from the Triton interpreter: bitwise the interpreter's conversion of the reference
    pre-cast values; bitwise torch's cast wherever the two conversions agree. Returns the fraction
    of elements where they disagree (the interpreter defect, not the kernel)."""
    y = precast(x, scale, dtype)
    assert q.dtype == dtype and q.shape == x.shape and q.is_contiguous(), name
    expect_interp = interp_cast(y, dtype)
    assert torch.equal(bits(q), expect_interp), f"{name}: q differs from the interpreter's conversion of x / scale"
    torch_q = bits(y.to(dtype))
    agree = expect_interp == torch_q
    assert torch.equal(bits(q)[agree], torch_q[agree]), name
    return 1.0 - agree.float().mean().item() if q.numel() else 0.0
