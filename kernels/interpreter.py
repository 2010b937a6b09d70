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


def _index_of_one_element_tensors_works(patch_lang_tensor, scope_cls) -> bool:
    """Whether the interpreter's `tl.tensor.__index__` turns a scalar (held as a one-element 1-d
    array, as `tl.program_id` returns it) into a Python int."""
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    class Probe:
        pass

    scope = scope_cls()
    try:
        patch_lang_tensor(Probe, scope)
        probe = Probe.__new__(Probe)
        probe.handle = TensorHandle(np.array([3], dtype=np.int32), tl.int32)
        return Probe.__index__(probe) == 3
    except TypeError:  # NumPy's "only 0-dimensional arrays can be converted to Python scalars"
        return False
    except Exception:  # an interpreter this probe does not understand: leave it alone
        return True
    finally:
        scope.restore()


def patch_scalar_index() -> None:
    """Make the interpreter's `tl.tensor.__index__` accept scalars held as one-element arrays.

    Compatibility with triton 3.6 (kept while setup.py allows triton>=3.6): its interpreter defines
    `__index__` as `int(self.handle.data)`, and the scalars it makes (`tl.program_id`,
    `tl.num_programs`, arithmetic on them) are one-element 1-d arrays, which NumPy no longer
    converts to int (deprecated since 1.25; a TypeError in NumPy 2.4, the .venv's 2.4.6). So every
    kernel that loops with `range(pid, n, tl.num_programs(0))` (the persistent grids of rms_norm,
    qk_norm_rope, ...) fails under triton 3.6 + NumPy >= 2.4. Triton 3.9 squeezes the array first;
    this does the same for the versions that do not, and does nothing where `__index__` already
    works (probed, not decided by version number). Interpreter only; compiled kernels are
    untouched. Idempotent.
    """
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    scope_cls = getattr(interpreter, "_LangPatchScope", None)
    if original is None or scope_cls is None or getattr(original, "_nanofast_index", False):
        return
    if _index_of_one_element_tensors_works(original, scope_cls):
        return

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0])
                       if self.handle.data.size == 1 else int(self.handle.data))

    _patch_lang_tensor._nanofast_index = True
    interpreter._patch_lang_tensor = _patch_lang_tensor
