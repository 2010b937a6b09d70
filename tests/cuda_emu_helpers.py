"""What the CUDA kernel families' test files share (tests/test_rms_norm_cuda.py,
tests/test_qk_norm_rope_cuda.py, tests/test_paged_attention_cuda.py) and tests/test_cuda_kernels.py
(the infrastructure shared by all of them): the dtypes under test, the error budget, bit patterns,
NaN-padded operands and guarded outputs, and one `emu` fixture that builds the CPU emulation
library of every csrc/*.cu. A test file takes the fixture by importing it by name.

Error budget: max|kernel - ref_fp64| <= FACTOR * max|torch_lowprec - ref_fp64| + ATOL[dtype] * max|ref|,
where torch_lowprec is the same maths done by torch in fp32 and rounded to the input dtype once.
"""
from __future__ import annotations

import concurrent.futures
import os
import shutil

import pytest
import torch

from nanofast.kernels import cuda_build

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_ID = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
ATOL = {torch.float32: 2e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}  # relative to max|ref|
FACTOR = 2.0
CSRC = cuda_build.csrc_dir()
SOURCES = sorted(p.name for p in CSRC.glob("*.cu"))
HAVE_NVCC = shutil.which("nvcc") is not None or bool(os.environ.get("NVCC"))
HAVE_CXX = shutil.which(os.environ.get("CXX") or "g++") is not None
needs_cxx = pytest.mark.skipif(not HAVE_CXX, reason="no C++20 compiler (g++ / $CXX) to build the CPU emulation")


@pytest.fixture(scope="session")
def emu() -> dict:
    """{source: ctypes library}: the CPU emulation build of every csrc/*.cu, two at a time (2 cores);
    cached by cuda_build, so every test file that imports this fixture loads the same libraries."""
    if not HAVE_CXX:
        pytest.skip("no C++20 compiler (g++ / $CXX) to build the CPU emulation")
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(SOURCES, pool.map(cuda_build.emulation_library, SOURCES)))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern copy (NaN-safe equality)."""
    t = t.detach().contiguous()
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).clone()


def _assert_budget(out: torch.Tensor, ref64: torch.Tensor, lowp: torch.Tensor, dtype: torch.dtype, what: str,
                   factor: float = FACTOR, nonfinite_hint: str = "read outside the operands?") -> None:
    """The error budget above; `nonfinite_hint` only words the failure of the finiteness check."""
    assert out.shape == ref64.shape, what
    assert torch.isfinite(out.double()).all(), f"{what}: non-finite output ({nonfinite_hint})"
    err = (out.double() - ref64).abs().max().item()
    base = (lowp.double() - ref64).abs().max().item()
    atol = ATOL[dtype] * max(1.0, ref64.abs().max().item())
    assert err <= factor * base + atol, f"{what}: max err {err:.3g} > {factor} * {base:.3g} + {atol:.3g}"


def _rows_view(N: int, D: int, dtype, layout: str, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) view and its storage buffer: contiguous, or rows padded with NaN (pad 16 keeps every
    row 16-byte aligned, the vectorised path; pad 5 breaks alignment, the scalar path)."""
    pad = {"contig": 0, "padded": 16, "odd": 5}[layout]
    buf = torch.full((N, D + pad), float("nan"), dtype=dtype)
    view = buf[:, :D]
    view.copy_(torch.randn(N, D, generator=gen))
    return view, buf


def _guarded(shape: tuple, dtype, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NaN-filled buffer with guard rows/columns around an output view of `shape` (last dim padded
    by `pad`, one guard row before and after along the first dim); returns (view, buffer, mask)."""
    lead, D = shape[:-1], shape[-1]
    first = lead[0] if lead else 1
    buf = torch.full((first + 2, *lead[1:], D + pad), float("nan"), dtype=dtype)
    view = buf[1:1 + first, ..., :D] if lead else buf[1, :D]
    mask = torch.zeros(buf.shape, dtype=torch.bool)
    if lead:
        mask[1:1 + first, ..., :D] = True
    else:
        mask[1, :D] = True
    return view, buf, mask


def _assert_guards(buf: torch.Tensor, mask: torch.Tensor, what: str) -> None:
    assert torch.isnan(buf[~mask].float()).all(), f"{what}: a guard element was written"
    assert torch.isfinite(buf[mask].float()).all(), f"{what}: an output element was not written"


# ------------------------------------------------------------------------------------------------ RMSNorm and QK-norm

def _weight(kind, D, dtype, gen):
    if kind is None:
        return None
    wd = {"same": dtype, "fp32": torch.float32, "bf16": torch.bfloat16}[kind]
    return (1 + 0.5 * torch.randn(D, generator=gen)).to(wd)


def _case_id(case):
    return "x".join(str(c) for c in case)


def _module(name):
    try:
        return __import__(f"nanofast.kernels.{name}", fromlist=["_"])
    except ImportError as exc:  # pragma: no cover - only while the module is being written
        pytest.skip(f"nanofast.kernels.{name} is not available: {exc}")
