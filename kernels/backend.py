"""Which implementation runs a kernel call: "torch" (the reference), "triton" or "cuda".

The default follows the tensor's device: the Triton kernel on CUDA tensors, the torch reference
on CPU. Both kernel backends also execute on CPU tensors, so every kernel runs without a GPU:
"triton" through Triton's interpreter (TRITON_INTERPRET=1 must be set before triton is imported,
which is why it is checked here rather than failing deep inside a launch), and "cuda" through the
CPU emulation build of the very same CUDA source.
"""
from __future__ import annotations

import os
import sys

import torch

BACKENDS = ("torch", "triton", "cuda")


def triton_interpreting() -> bool:
    """True when Triton runs kernels through its interpreter (decided when triton was imported)."""
    if "triton" not in sys.modules:
        return os.environ.get("TRITON_INTERPRET") == "1"
    from triton import knobs

    return bool(knobs.runtime.interpret)


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
