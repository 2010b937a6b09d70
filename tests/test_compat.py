"""The compatibility branches that keep the lowest torch and triton setup.py allows working (issue 31).

Each branch is probed, not chosen by version number, so on the .venv's torch 2.13 + triton 3.9
these tests make the older behaviour happen (a triton 3.6 style interpreter, a CPU `_scaled_mm`
without row-wise scales) and check the branch repairs it; `make compat` runs them under triton 3.6
itself, where the first branch is the live one.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

from nanofast.kernels import interpreter as nf_interpreter
from nanofast.kernels import vendor


@triton.jit
def _persistent_fill(Out, n):
    # The persistent-grid loop of rms_norm's and qk_norm_rope's kernels: range() over tensors.
    pid = tl.program_id(0)
    for i in range(pid, n, tl.num_programs(0)):
        tl.store(Out + i, i * 10 + pid)


def _fill(programs: int, n: int) -> torch.Tensor:
    out = torch.full((n,), -1, dtype=torch.int32)
    _persistent_fill[(programs,)](out, n)
    return out


def _numpy_refuses_one_element_arrays_as_int() -> bool:
    try:
        int(np.array([3]))
    except TypeError:
        return True
    return False


def test_a_persistent_grid_loop_runs_in_the_interpreter():
    want = torch.tensor([i * 10 + i % 3 for i in range(10)], dtype=torch.int32)
    assert torch.equal(_fill(3, 10), want)
    # Whatever this triton is, its interpreter's __index__ works now (patched where it did not).
    works = nf_interpreter._index_of_one_element_tensors_works(interpreter._patch_lang_tensor,
                                                               interpreter._LangPatchScope)
    assert works, triton.__version__


def test_the_scalar_index_patch_repairs_a_triton_36_interpreter(monkeypatch):
    if not _numpy_refuses_one_element_arrays_as_int():
        pytest.skip(f"NumPy {np.__version__} still converts one-element arrays to int: nothing to repair")
    current = interpreter._patch_lang_tensor

    def like_triton_36(tensor, scope):  # triton 3.6's definition of __index__
        current(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", like_triton_36)
    assert not nf_interpreter._index_of_one_element_tensors_works(like_triton_36, interpreter._LangPatchScope)
    with pytest.raises(triton.runtime.errors.InterpreterError, match="0-dimensional"):
        _fill(3, 10)
    nf_interpreter.patch_scalar_index()
    patched = interpreter._patch_lang_tensor
    assert patched is not like_triton_36 and patched._nanofast_index
    nf_interpreter.patch_scalar_index()  # idempotent
    assert interpreter._patch_lang_tensor is patched
    assert torch.equal(_fill(4, 9), torch.tensor([i * 10 + i % 4 for i in range(9)], dtype=torch.int32))


def test_the_scalar_index_patch_leaves_a_working_interpreter_alone(monkeypatch):
    def working(tensor, scope):  # triton 3.9's
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", working)
    nf_interpreter.patch_scalar_index()
    assert interpreter._patch_lang_tensor is working


def _rowwise_case(m: int, k: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(m, k, generator=g) * 3).to(vendor.E4M3)
    b = (torch.randn(n, k, generator=g) * 3).to(vendor.E4M3).t()  # (K, N) column-major
    sa, sb = torch.rand(m, 1, generator=g) + 0.1, torch.rand(1, n, generator=g) + 0.1
    return a, b, sa, sb, torch.randn(n, generator=g).to(torch.bfloat16)


@pytest.mark.parametrize("shape", [(37, 64, 48), (130, 96, 64), (1, 32, 16)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_bias", [False, True])
def test_rowwise_scaled_mm_without_cpu_support_is_torchs_own_cpu_rowwise(monkeypatch, shape, with_bias):
    """torch 2.11's CPU _scaled_mm has tensor-wise scales only; vendor.scaled_mm then computes the
    row-wise product itself, bit for bit what torch 2.13's CPU kernel returns."""
    a, b, sa, sb, bias = _rowwise_case(*shape, seed=sum(shape))
    bias = bias if with_bias else None
    native = vendor._probe_cpu_scaled_mm_rowwise()
    want = vendor.scaled_mm(a, b, sa, sb, bias=bias)
    monkeypatch.setattr(vendor, "_cpu_scaled_mm_takes_rowwise", lambda: False)
    got = vendor.scaled_mm(a, b, sa, sb, bias=bias)
    assert got.dtype == torch.bfloat16 and got.shape == (shape[0], shape[2])
    assert torch.equal(got, want), f"torch {torch.__version__}, CPU row-wise _scaled_mm: {native}"
    if native:
        assert torch.equal(got, torch._scaled_mm(a, b, sa, sb, bias=bias, out_dtype=torch.bfloat16))
