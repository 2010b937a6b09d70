"""Every kernel-backed op of nanofast.kernels, by name (each declared once, in its own module)."""
from __future__ import annotations

import importlib

from .op import Op

# Modules, not names: the package re-exports each op's function under its module's name
# (nanofast.kernels.rms_norm is the function), so the modules are looked up by path.
_MODULES = ("rms_norm", "qk_norm_rope", "rotary", "paged_attention", "linear_cross_entropy", "newton_schulz",
            "fp8_linear", "fp8_gemm", "fp8_quant")
OPS: dict[str, Op] = {op.name: op for op in (importlib.import_module(f"{__package__}.{m}").OP for m in _MODULES)}


def op(name: str) -> Op:
    """The declaration of op `name`; ValueError naming the known ops otherwise."""
    try:
        return OPS[name]
    except KeyError:
        raise ValueError(f"unknown op {name!r}: the known ops are {sorted(OPS)}") from None


def triton_configs(arch: int = 90) -> list[dict]:
    """The compile-gate configurations of every op's Triton kernels for sm_`arch`, op by op."""
    return [cfg for op in OPS.values() if op.configs is not None for cfg in op.configs(arch)]


def cuda_sources() -> tuple[str, ...]:
    """The CUDA sources in csrc/: one per op with a "cuda" backend, named after the op."""
    return tuple(f"{op.name}.cu" for op in OPS.values() if "cuda" in op.kernels)
