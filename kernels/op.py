"""One kernel-backed op, declared once: what validates a call, what defines the result, what runs
it on each backend, and what it costs.

Each op module (rms_norm.py, qk_norm_rope.py, ...) ends with its `OP = Op(...)`; `registry.OPS`
collects them. Everything that needs to know about ops (the public entries, nanofast's dispatch,
the GPU check, the benchmarks' byte models, the compile gate) reads these declarations instead of
naming ops by hand, so adding a backend to one op is one launcher file plus one entry here:

    launchers={"triton": TRITON_LAUNCHERS, "cuda": "rms_norm_cuda", "cute": "rms_norm_cute"}

A launcher is a module of this package named by string (imported on first use, so an optional
backend's build never runs at import time) or any object, exposing the op's launcher protocol (e.g.
rms_norm's `fwd`/`bwd`). Launchers trust their inputs: the public entry ran its check once. An op
with a "cuda" backend has its CUDA source at csrc/<name>.cu.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping


@dataclass(eq=False)
class Op:
    """A kernel-backed op.

    name: the op's key (nanofast's dispatch tables and the GPU check use it).
    vendor: the backend name of what a user runs without nanofast's kernels ("torch": plain torch
        and cuBLAS; "scaled_mm": torch._scaled_mm). "torch" always names the reference too.
    kernels: nanofast's kernel backends of the op, in order of preference when untimed.
    unmeasured: the backend a GPU that was never measured runs, and `why`.
    checks: public entry name -> the validation of its arguments (raises TypeError/ValueError
        naming the argument). Run once per public call (tests/test_registry.py counts it).
    references: public entry name -> its plain-torch definition, which the kernels are tested
        against (as public functions they validate too; the entries call them unvalidated).
    launchers: backend -> launcher (module name in this package, or an object).
    vendor_path: the callable a user would otherwise call (the main entry's arguments).
    cost: the byte/FLOP model of one call: keyword shape arguments -> {"bytes": int, "flops": int}.
    configs: the compile-gate configurations of its Triton kernels: configs(arch=90) -> the
        `compile_gate.compile_triton` keyword arguments of what sm_`arch` launches.
    part_of: the op whose backend decides this one's (fp8_linear runs fp8_quant and fp8_gemm on
        the pair its own backend names); None for an op the model dispatches itself.
    """

    name: str
    vendor: str
    kernels: tuple[str, ...]
    unmeasured: str
    why: str
    checks: Mapping[str, Callable[..., Any]]
    references: Mapping[str, Callable[..., Any]]
    launchers: Mapping[str, Any]
    vendor_path: Callable[..., Any] | None = None
    cost: Callable[..., dict] | None = None
    configs: Callable[..., list] | None = None
    part_of: str | None = None
    _loaded: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        missing = set(self.kernels) - set(self.launchers)
        if missing:
            raise ValueError(f"op {self.name!r}: kernel backends {sorted(missing)} have no launcher")
        if self.unmeasured not in self.backends:
            raise ValueError(f"op {self.name!r}: unmeasured {self.unmeasured!r} is not one of {self.backends}")

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends a dispatch chooses among: the vendor path first, then nanofast's kernels."""
        return (self.vendor, *self.kernels)

    @property
    def choices(self) -> tuple[str, ...]:
        """Every backend a caller may name: "torch" (the reference) and `backends`."""
        return tuple(dict.fromkeys(("torch", *self.backends)))

    def launcher(self, backend: str) -> Any:
        """The launcher object of a kernel backend (its module imported on first use)."""
        got = self._loaded.get(backend)
        if got is None:
            spec = self.launchers.get(backend)
            if spec is None:
                raise ValueError(f"op {self.name!r} has no {backend!r} launcher; its kernel backends are "
                                 f"{self.kernels}")
            got = importlib.import_module(f"{__package__}.{spec}") if isinstance(spec, str) else spec
            self._loaded[backend] = got
        return got
