"""Which implementation runs a kernel call: "torch" (the reference), "triton" or "cuda".

The default follows the tensor's device: the Triton kernel on CUDA tensors, the torch reference
on CPU. Both kernel backends also execute on CPU tensors, so every kernel runs without a GPU:
"triton" through Triton's interpreter (TRITON_INTERPRET=1 must be set before triton is imported,
which is why it is checked here rather than failing deep inside a launch), and "cuda" through the
CPU emulation build of the very same CUDA source.

Why "before triton is imported": `@triton.jit` picks the interpreter or the compiler when it
decorates a function, and triton.language's own helpers (tl.sum, tl.cdiv, ...) are decorated when
triton is imported. Setting TRITON_INTERPRET=1 later changes what triton's knob reports (it reads
the environment on every access) but not what was decorated: a CPU launch then dies inside Triton
("0 active drivers" when the kernels were compiled functions, "Cannot call @triton.jit'd outside of
the scope of a kernel" when only triton's helpers were). `resolve_backend` detects that state and
says what to do instead.
"""
from __future__ import annotations

import os
import sys

import torch

BACKENDS = ("torch", "triton", "cuda")


def _interpret_requested() -> bool:
    """Whether the environment (or triton's knob, set in code) asks for the interpreter now."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    if "triton" not in sys.modules:
        return False
    from triton import knobs

    return bool(knobs.runtime.interpret)


def triton_interpreting() -> bool:
    """True when Triton runs kernels through its interpreter.

    Before triton is imported: whether TRITON_INTERPRET=1 is set (what the import will decide).
    After: whether triton's own @jit helpers were decorated as interpreter functions when triton was
    imported, which is what decides whether a launch can run on CPU. Not triton's knob: it reads the
    environment on every access, so it turns True when TRITON_INTERPRET=1 is set after the import,
    although nothing already decorated changes (module docstring).
    """
    standard = sys.modules.get("triton.language.standard")
    if standard is None:  # triton not imported (nor its language): the environment decides the import
        return _interpret_requested()
    # By class name: importing triton.runtime.interpreter just to isinstance-check would be a side
    # effect of asking. The interpreter's class has had this name since triton 2.x (3.6 .. 3.9 too).
    return type(standard.cdiv).__name__ == "InterpretedFunction"


def resolve_backend(backend: str | None, x: torch.Tensor, choices: tuple[str, ...] = BACKENDS) -> str:
    """The backend to run on tensor `x`: `backend` if given (validated against `choices`, an op's
    `Op.choices`), else by device."""
    if torch.compiler.is_compiling():
        return _resolve_constant(backend, x.device, choices)
    return _resolve(backend, x.device, choices)


@torch.compiler.assume_constant_result
def _resolve_constant(backend: str | None, device: torch.device, choices: tuple[str, ...]) -> str:
    # Whether Triton interprets is a knob Dynamo cannot trace; it is fixed when triton is
    # imported, so under torch.compile the whole choice is a trace-time constant.
    return _resolve(backend, device, choices)


def _resolve(backend: str | None, device: torch.device, choices: tuple[str, ...]) -> str:
    is_cuda = device.type == "cuda"
    if backend is None:
        return "triton" if is_cuda else "torch"
    if backend not in choices:
        if backend in BACKENDS:  # a backend of other ops that this one has no kernel for
            kind = "CUDA-source" if backend == "cuda" else backend
            raise ValueError(f"backend={backend!r} is not available for this op (no {kind} kernel exists for it): "
                             f"backend must be one of {choices} or None")
        raise ValueError(f"backend must be one of {choices} or None, got {backend!r}")
    if backend.startswith("triton") and not is_cuda and not triton_interpreting():
        if _interpret_requested():
            # The reported trap: the variable (or knob) was set after the import, so the kernels
            # are compiled functions and the launch would fail deep inside Triton (module docstring).
            raise RuntimeError(f"backend={backend!r} on CPU tensors: TRITON_INTERPRET=1 is set now, but triton was "
                               "imported without it, and triton chooses its interpreter at import time (the kernels "
                               "already defined are compiled GPU functions). Set TRITON_INTERPRET=1 in the "
                               "environment before the first import of triton (or of nanofast.kernels, which "
                               "imports triton), e.g. `TRITON_INTERPRET=1 python ...`")
        raise RuntimeError(f"backend={backend!r} on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                           "in the environment before triton is imported")
    return backend


def target_arch(x: torch.Tensor) -> int:
    """SM version (e.g. 90) the kernels launched on `x` compile for; CPU tensors run through the
    interpreter, which the kernels treat as sm_90 (their tile choices are the H100's)."""
    if not x.is_cuda:
        return 90
    major, minor = torch.cuda.get_device_capability(x.device)
    return 10 * major + minor
