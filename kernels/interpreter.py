"""Triton's CPU interpreter, taught bf16 dots, so bf16 kernels execute on CPU as they do on a GPU.

The interpreter stores bf16 tiles as their raw uint16 bit patterns, and its `tl.dot` multiplies
those integers (errors ~1e9; upstream declined the fix, triton issues 11584 and 4972). Element-wise
code is unaffected because casts are exact, but every kernel with a bf16 `tl.dot` (paged decode
attention's q.k and p.v, the Newton-Schulz iteration) silently returned garbage for bf16 inputs.

The fix widens bf16 operands to fp32 before the matmul: bf16 -> fp32 is exact (a 16-bit shift),
and bf16 x bf16 products are exact in fp32 (8-bit significands), so the result is what a Hopper
tensor core computes (bf16 operands, fp32 accumulation) up to summation order. Only the
interpreter's dot changes; kernels and their compiled code are untouched. Applied by
`nanofast.kernels` on import when TRITON_INTERPRET=1, and idempotent.
"""
from __future__ import annotations

import numpy as np


def _bf16_to_fp32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def patch_bf16_dot() -> None:
    """Make the interpreter's `tl.dot` treat bf16 operands as numbers, not bit patterns."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    original = InterpreterBuilder.create_dot
    if getattr(original, "_nanofast_bf16", False):
        return

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            if a.dtype.scalar != b.dtype.scalar:
                raise TypeError(f"tl.dot operands must share a dtype, got {a.dtype.scalar} and {b.dtype.scalar}")
            a = TensorHandle(_bf16_to_fp32(a.data), tl.float32)
            b = TensorHandle(_bf16_to_fp32(b.data), tl.float32)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot._nanofast_bf16 = True
    InterpreterBuilder.create_dot = create_dot
