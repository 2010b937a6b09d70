"""Which backend runs each kernel-backed op on a GPU, decided from measurements.

nanofast ships its own kernels for ops a user could otherwise run through a vendor path (plain
torch, cuBLAS through torch.matmul, torch._scaled_mm). A kernel is only worth running where it was
measured to be correct and faster on that kind of GPU, so the choice comes from a committed table
of measured results, `nanofast/dispatch_tables/<device class>.json` (the `gpu_check.json` that
`python -m bench.gpu_check` wrote on such a GPU), and falls back to a per-op default where nothing was measured:

- memory-bound fused kernels (norms, QK-norm + rotary, paged attention, the fused loss head)
  default to nanofast's Triton kernel: fusing removes HBM round trips, which is where their time
  goes, so the kernel wins without a measurement to say so;
- GEMM-class ops (Muon's Newton-Schulz, the fp8 linears) default to the vendor GEMM: cuBLAS and
  torch._scaled_mm are known to be correct and fast, and nanofast's GEMMs have not been measured
  on a GPU yet.

On CPU every op runs plain torch (the kernels run there only when forced, through Triton's
interpreter or the CUDA sources' emulation: a correctness tool, not a fast path).

The table file's key "dispatch" holds `{op: {backend: {"ms": float | None, "ok": bool}}}`:
the median time of one call and whether that backend passed the numerics checks within budget on
that device. `NANOFAST_DISPATCH_TABLE` (a path to such a JSON file) replaces the committed table.
"""
from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from nanofast.kernels import registry
from nanofast.kernels.op import Op

TABLE_ENV = "NANOFAST_DISPATCH_TABLE"
# Inside the package (package data), so an installed nanofast finds the measured tables too.
TABLES = Path(__file__).resolve().parent / "dispatch_tables"

# The short GPU names a device class uses; the first one found in the device name wins, which is
# why "L40S" comes before "L4" (every L40S name contains "L4").
_GPU_SHORT_NAMES = ("H200", "H100", "H800", "A100", "L40S", "L4", "B200")


# Each op's vendor path, kernels, unmeasured default and the reason for it are declared with the
# op itself (nanofast.kernels.registry): a new op or backend needs no change here.
# fp8_gemm and fp8_quant are not dispatched on their own: fp8_linear's backend names theirs.
OPS: Mapping[str, Op] = {name: op for name, op in registry.OPS.items() if op.part_of is None}


def _spec(op: str) -> Op:
    try:
        return OPS[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}: the known ops are {sorted(OPS)}") from None


def device_class(device: torch.device | str) -> str:
    """"gpu-<short name>" for a CUDA device (e.g. "gpu-H100"), "cpu" for the CPU, else the device
    type. The same rule names the benchmark baselines' folders (bench/conftest.py's machine_class),
    so a table measured on one kind of GPU is found again on that kind."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device)
    short = next((k for k in _GPU_SHORT_NAMES if k in name), name)
    return "gpu-" + short.replace(" ", "-")


def table_path(cls: str) -> Path:
    """The committed table of device class `cls`, or the file `NANOFAST_DISPATCH_TABLE` names."""
    override = os.environ.get(TABLE_ENV)
    if override:
        return Path(override)
    return TABLES / f"{cls}.json"


def table(cls: str) -> dict[str, dict[str, dict[str, Any]]]:
    """The measured results for device class `cls`: {op: {backend: {"ms": ..., "ok": ...}}}.

    {} when there is no table (every op unmeasured). A file named by NANOFAST_DISPATCH_TABLE must
    exist: the user asked for it, so a typo in the path is an error, not a silent fallback.
    Loads are cached per path; `clear_cache()` forgets them.
    """
    path = table_path(cls)
    if os.environ.get(TABLE_ENV) and not path.is_file():
        raise ValueError(f"{TABLE_ENV}={path}: no such file")
    return _load(str(path))


def clear_cache() -> None:
    """Forget the loaded tables and the choices made from them (tests that write or point at
    another table call this)."""
    _load.cache_clear()
    _choice.cache_clear()


@functools.lru_cache(maxsize=None)
def _load(path: str) -> dict[str, dict[str, dict[str, Any]]]:
    # A malformed table raises rather than falling back: silently running the unmeasured defaults
    # on a GPU someone measured would hide the mistake behind a slower (or unchecked) backend.
    p = Path(path)
    if not p.is_file():
        return {}
    try:
        doc = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"dispatch table {p}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"dispatch table {p}: the top level must be a JSON object, got {type(doc).__name__}")
    if "dispatch" not in doc:
        return {}
    return _validate(doc["dispatch"], p)


def _validate(entries: Any, p: Path) -> dict[str, dict[str, dict[str, Any]]]:
    where = f"dispatch table {p}"
    if not isinstance(entries, dict):
        raise ValueError(f"{where}: \"dispatch\" must be an object {{op: {{backend: {{ms, ok}}}}}}, "
                         f"got {type(entries).__name__}")
    for op, results in entries.items():
        if op not in OPS:
            raise ValueError(f"{where}: unknown op {op!r} (known: {sorted(OPS)})")
        if not isinstance(results, dict):
            raise ValueError(f"{where}: dispatch[{op!r}] must be an object {{backend: {{ms, ok}}}}")
        for backend, r in results.items():
            if backend not in OPS[op].backends:
                raise ValueError(f"{where}: dispatch[{op!r}] has unknown backend {backend!r} "
                                 f"(known: {list(OPS[op].backends)})")
            if not isinstance(r, dict) or not {"ms", "ok"} <= set(r):
                raise ValueError(f"{where}: dispatch[{op!r}][{backend!r}] must be an object with \"ms\" and \"ok\"")
            ms, ok = r["ms"], r["ok"]
            if not isinstance(ok, bool):
                raise ValueError(f"{where}: dispatch[{op!r}][{backend!r}][\"ok\"] must be true or false, got {ok!r}")
            if ms is not None and (isinstance(ms, bool) or not isinstance(ms, (int, float))
                                   or not math.isfinite(ms) or ms < 0):
                raise ValueError(f"{where}: dispatch[{op!r}][{backend!r}][\"ms\"] must be a finite number >= 0 "
                                 f"or null, got {ms!r}")
    return entries


def choose(op: str, measured: Mapping[str, Mapping[str, Any]] | None) -> str:
    """The backend for `op` given its measured results {backend: {"ms": ..., "ok": ...}}.

    Nothing measured: the op's unmeasured default. Otherwise the fastest of nanofast's kernels that
    passed its checks ("ok") and has a time, provided it beats the vendor's time when the vendor
    passed and was timed (else the fastest such kernel); when no kernel qualifies, the vendor: a
    kernel is only run where it was measured to be right and, where a comparison exists, faster.
    """
    spec = _spec(op)
    if not measured:
        return spec.unmeasured
    timed = [(float(r["ms"]), i, name) for i, name in enumerate(spec.kernels)
             if (r := measured.get(name)) and r.get("ok") is True and r.get("ms") is not None]
    vendor = measured.get(spec.vendor)
    if vendor and vendor.get("ok") is True and vendor.get("ms") is not None:
        timed = [t for t in timed if t[0] < float(vendor["ms"])]
    return min(timed)[2] if timed else spec.vendor


def backend_for(op: str, device: torch.device, rehearse: str | None = None) -> str:
    """The backend `op` runs on for tensors on `device` when the user forced none.

    CUDA: `choose` on this device class's table. CPU (and any non-CUDA device): the op's vendor path
    ("torch"; for the fp8 linears torch._scaled_mm, the call a GPU makes, held to its CUDA contract
    by nanofast.kernels.vendor), or with `rehearse` (a device class such as "gpu-H100") what
    `choose` picks on that class's table: a CPU run that executes a GPU run's per-op choices (the
    rehearsal preset). Safe under torch.compile:
    the answer is computed once at trace time and is a constant of the graph (Dynamo cannot trace
    file reads or the device-name query; both are fixed for a process).
    """
    _spec(op)
    if torch.device(device).type != "cuda":
        if rehearse is None:
            return OPS[op].vendor
        if torch.compiler.is_compiling():
            return _choose_constant(op, rehearse)
        return _choose_for_class(op, rehearse)
    if torch.compiler.is_compiling():
        return _backend_for_constant(op, device)
    return _backend_for(op, device)


@torch.compiler.assume_constant_result
def _backend_for_constant(op: str, device: torch.device) -> str:
    return _backend_for(op, device)


def _backend_for(op: str, device: torch.device) -> str:
    return _choose_for_class(op, device_class(device))


@torch.compiler.assume_constant_result
def _choose_constant(op: str, cls: str) -> str:
    return _choose_for_class(op, cls)


def _choose_for_class(op: str, cls: str) -> str:
    return _choice(op, cls, os.environ.get(TABLE_ENV))


@functools.lru_cache(maxsize=None)
def _choice(op: str, cls: str, table_env: str | None) -> str:
    # Eager inference asks once per op and layer on every step: the answer is fixed per (op, device
    # class, table file), so it is worked out once instead of re-resolving the table path each call.
    return choose(op, table(cls).get(op))
