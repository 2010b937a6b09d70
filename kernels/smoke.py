"""`python -m nanofast.kernels.smoke`: does this install of nanofast.kernels compute the right numbers?

Runs every public entry of every op in `registry.OPS` once, on small CPU tensors, on each backend
of the op that this machine can run, and compares the outputs (and, for the differentiable entries,
the input gradients) with the op's reference (`Op.references`). One line per entry and backend;
exit status 1 if any result differs from its reference, fails, or an entry has no case here.

Backends on CPU:
  torch                     always (the public entry on its plain-torch path);
  scaled_mm                 torch._scaled_mm, the fp8 ops' vendor path;
  triton, triton_persistent through Triton's interpreter: TRITON_INTERPRET=1 must be in the
                            environment before triton is imported (before this command starts);
  cuda                      the CPU emulation of the csrc/ sources (kernels/cuda_build.py): needs a
                            C++20 compiler (g++, or $CXX) and the CUDA sources shipped with the
                            package; the first run builds each source (about a minute, then cached).
A backend this machine cannot run is skipped with its reason, never counted as a failure; a part
of the install that is missing (the CUDA sources, a public entry) is a failure.

    TRITON_INTERPRET=1 python -m nanofast.kernels.smoke            # every backend this machine has
    python -m nanofast.kernels.smoke --ops rms_norm paged_attention
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import registry
from .backend import triton_interpreting

E4M3 = torch.float8_e4m3fn


@dataclass
class Case:
    """One call of a public entry: `run(fn, backend)` calls `fn` (the entry with backend=..., or the
    reference when backend is None) on fresh inputs built from a fixed seed and returns what to
    compare: outputs, in-place results and input gradients. Tolerance: |got - ref| <= atol + rtol * |ref|."""
    run: Callable[[Callable, str | None], list]
    atol: float = 1e-5
    rtol: float = 1e-4


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _call(fn: Callable, backend: str | None, *args, **kwargs):
    return fn(*args, **kwargs) if backend is None else fn(*args, backend=backend, **kwargs)


def _grads(out: torch.Tensor, *inputs: torch.Tensor) -> list:
    """The output, then the gradients of (output * fixed weights).sum() w.r.t. `inputs`."""
    g = _gen(99)
    w = torch.randn(out.shape, generator=g, dtype=torch.float32).to(out.dtype)
    grads = torch.autograd.grad((out * w).sum(), inputs)
    return [out.detach(), *grads]


def _rms_norm(fn, be):
    g = _gen(0)
    x = torch.randn(3, 40, generator=g, requires_grad=True)
    w = (1 + 0.5 * torch.randn(40, generator=g)).requires_grad_()
    return _grads(_call(fn, be, x, w, 1e-6), x, w)


def _qk_norm_rope(fn, be):
    g = _gen(1)
    q = torch.randn(1, 3, 2, 8, generator=g, requires_grad=True)
    k = torch.randn(1, 3, 1, 8, generator=g, requires_grad=True)
    angle = torch.rand(3, 4, generator=g) * 3
    qo, ko = _call(fn, be, q, k, angle.cos(), angle.sin())
    return _grads(torch.cat([qo.flatten(), ko.flatten()]), q, k)


def _qk_norm_rope_inplace(fn, be):
    g = _gen(2)
    qkv = torch.randn(3, (2 + 2 * 1) * 8, generator=g)
    angle = torch.rand(5, 4, generator=g) * 3
    cache = torch.cat([angle.cos(), angle.sin()], dim=-1)  # (max_pos, D): cos | sin
    _call(fn, be, qkv, torch.tensor([0, 4, 1]), cache, 2, 1)
    return [qkv]


def _hf_tables(g: torch.Generator, t: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face's (1, T, D) cos and sin: the half-width angles repeated, cat(f, f)."""
    angle = torch.rand(1, t, d // 2, generator=g) * 3
    angle = torch.cat([angle, angle], dim=-1)
    return angle.cos(), angle.sin()


def _apply_rotary_pos_emb(fn, be):
    g = _gen(13)
    q = torch.randn(1, 2, 3, 8, generator=g, requires_grad=True)  # (B, Hq, T, D): HF's unsqueeze_dim=1
    k = torch.randn(1, 1, 3, 8, generator=g, requires_grad=True)
    qo, ko = _call(fn, be, q, k, *_hf_tables(g, 3, 8))
    return _grads(torch.cat([qo.flatten(), ko.flatten()]), q, k)


def _rotary_embedding(fn, be):
    g = _gen(14)
    x = torch.randn(1, 2, 3, 8, generator=g, requires_grad=True)
    return _grads(_call(fn, be, x, *_hf_tables(g, 3, 8)), x)


def _paged_inputs(seed: int) -> dict:
    g = _gen(seed)
    return dict(k_cache=torch.randn(4, 2, 1, 8, generator=g), v_cache=torch.randn(4, 2, 1, 8, generator=g),
                block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
                seq_lens=torch.tensor([3, 4], dtype=torch.int32), q=torch.randn(2, 2, 8, generator=g))


def _paged_decode_attention(fn, be):
    p = _paged_inputs(3)
    return [_call(fn, be, p["q"], p["k_cache"], p["v_cache"], p["block_table"], p["seq_lens"])]


def _paged_kv_write(fn, be):
    p = _paged_inputs(4)
    g = _gen(5)
    k, v = torch.randn(2, 1, 8, generator=g), torch.randn(2, 1, 8, generator=g)
    _call(fn, be, k, v, p["k_cache"], p["v_cache"], torch.tensor([5, -1]))
    return [p["k_cache"], p["v_cache"]]


def _linear_softcap_cross_entropy(fn, be):
    g = _gen(6)
    x = torch.randn(3, 8, generator=g, requires_grad=True)
    w = torch.randn(5, 8, generator=g, requires_grad=True)
    loss = _call(fn, be, x, w, torch.tensor([1, -1, 4]), 15.0)
    return [loss.detach(), *torch.autograd.grad(loss, (x, w))]


def _linear_cross_entropy(fn, be):
    g = _gen(12)
    x = torch.randn(4, 8, generator=g, requires_grad=True)
    w = torch.randn(5, 8, generator=g, requires_grad=True)
    loss = _call(fn, be, x, w, torch.tensor([1, -100, 4, 0]), softcap=15.0)
    return [loss.detach(), *torch.autograd.grad(loss, (x, w))]


def _newton_schulz(fn, be):
    return [_call(fn, be, torch.randn(4, 6, generator=_gen(7)))]


def _nesterov_normalize_(fn, be):
    g = _gen(8)
    grad, buf = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    out = _call(fn, be, grad, buf, 0.9)
    return [out, grad, buf]


def _fp8_linear(fn, be):
    g = _gen(9)
    x = torch.randn(5, 16, generator=g, requires_grad=True)
    w = (0.25 * torch.randn(16, 16, generator=g)).requires_grad_()
    return _grads(_call(fn, be, x, w), x, w)


def _fp8_gemm(fn, be):
    g = _gen(10)
    a, b = torch.randn(16, 32, generator=g).to(E4M3), torch.randn(16, 32, generator=g).to(E4M3)  # (M, K), (N, K)
    return [_call(fn, be, a, b, torch.tensor(0.5), torch.tensor(0.25)).float()]


def _quantize_fp8(fn, be):
    x = torch.randn(4, 16, generator=_gen(11)) * 3
    q, scale, qt, amax = _call(fn, be, x, transpose=True)
    return [q.float(), scale, qt.float(), amax]


# public entry -> its case. The fp8 entries round to fp8 (3 mantissa bits) on every backend alike;
# the tolerance allows the accumulation order to differ after the rounding.
CASES: dict[str, Case] = {
    "rms_norm": Case(_rms_norm),
    "qk_norm_rope": Case(_qk_norm_rope),
    "qk_norm_rope_inplace": Case(_qk_norm_rope_inplace),
    "apply_rotary_pos_emb": Case(_apply_rotary_pos_emb),
    "rotary_embedding": Case(_rotary_embedding),
    "paged_decode_attention": Case(_paged_decode_attention),
    "paged_kv_write": Case(_paged_kv_write, atol=0.0, rtol=0.0),  # a copy: exact
    "linear_cross_entropy": Case(_linear_cross_entropy),
    "linear_softcap_cross_entropy": Case(_linear_softcap_cross_entropy),
    "newton_schulz": Case(_newton_schulz, atol=1e-4, rtol=1e-3),  # five iterations: rounding compounds
    "nesterov_normalize_": Case(_nesterov_normalize_),
    "fp8_linear": Case(_fp8_linear, atol=1e-2, rtol=1e-2),
    "fp8_gemm": Case(_fp8_gemm, atol=1e-2, rtol=1e-2),  # bf16 output
    "quantize_fp8": Case(_quantize_fp8, atol=0.0, rtol=0.0),  # the same rounding everywhere: exact
}


def skip_reason(backend: str) -> str | None:
    """Why `backend` cannot run on CPU tensors here, or None."""
    if backend.startswith("triton"):
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (its wheels are Linux only)"
        if not triton_interpreting():
            return "set TRITON_INTERPRET=1 in the environment (before triton is imported) to run Triton on CPU"
    if backend == "cuda":
        cxx = os.environ.get("CXX") or "g++"
        if shutil.which(cxx) is None:
            return f"the CPU emulation of csrc/ needs a C++20 compiler: {cxx!r} not found (install g++ or set CXX)"
    return None  # the CUDA sources ship with the package: their absence is a failure, not a skip


def _max_err(got: list, ref: list, case: Case) -> tuple[float, str | None]:
    """The largest |got - ref| over all compared tensors, and the first violation (None if none)."""
    if len(got) != len(ref):
        return float("inf"), f"{len(got)} results, the reference gave {len(ref)}"
    worst = 0.0
    for i, (a, b) in enumerate(zip(got, ref)):
        if a is None or b is None:
            if a is not b:
                return float("inf"), f"result {i}: {a is None and 'None' or 'a tensor'} where the reference gives " \
                                     f"{b is None and 'None' or 'a tensor'}"
            continue
        if a.shape != b.shape:
            return float("inf"), f"result {i}: shape {tuple(a.shape)}, the reference's {tuple(b.shape)}"
        a, b = a.detach().double(), b.detach().double()
        if not torch.equal(torch.isnan(a), torch.isnan(b)):
            return float("inf"), f"result {i}: NaN where the reference has none (or the reverse)"
        a, b = a.nan_to_num(), b.nan_to_num()
        err = (a - b).abs()
        worst = max(worst, err.max().item() if err.numel() else 0.0)
        bad = err > case.atol + case.rtol * b.abs()
        if bad.any():
            return worst, (f"result {i}: {int(bad.sum())} of {bad.numel()} elements off by up to "
                           f"{err.max().item():.3g} (atol {case.atol:g}, rtol {case.rtol:g})")
    return worst, None


def run(ops: list[str] | None = None, out=sys.stdout) -> int:
    """Print one line per (entry, backend); return the number of failures."""
    failures = 0
    names = ops or list(registry.OPS)
    for name in names:
        op = registry.op(name)
        for entry in op.checks:
            case = CASES.get(entry)
            if case is None:
                print(f"{name}.{entry}: FAIL no smoke case for this public entry (add one to CASES in "
                      "nanofast.kernels.smoke)", file=out, flush=True)
                failures += 1
                continue
            fn = getattr(importlib.import_module(__package__), entry, None)  # the package's public entry
            if not callable(fn):
                print(f"{name}.{entry}: FAIL nanofast.kernels.{entry} is not the entry's function", file=out, flush=True)
                failures += 1
                continue
            try:
                ref = case.run(op.references[entry], None)
            except Exception as exc:  # noqa: BLE001
                print(f"{name}.{entry} [reference]: FAIL {type(exc).__name__}: {exc}", file=out, flush=True)
                failures += 1
                continue
            for backend in op.choices:
                label = f"{name}.{entry} [{backend}]"
                reason = skip_reason(backend)
                if reason is not None:
                    print(f"{label}: skipped: {reason}", file=out, flush=True)
                    continue
                t0 = time.perf_counter()
                try:
                    got = case.run(fn, backend)
                except Exception as exc:  # noqa: BLE001 (every failure is reported, then counted)
                    print(f"{label}: FAIL {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                          file=out, flush=True)
                    failures += 1
                    continue
                worst, problem = _max_err(got, ref, case)
                took = time.perf_counter() - t0
                if problem is None:
                    print(f"{label}: ok (max |err| {worst:.2g}, {took:.1f} s)", file=out, flush=True)
                else:
                    print(f"{label}: FAIL {problem}", file=out, flush=True)
                    failures += 1
    return failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", nargs="+", choices=sorted(registry.OPS), default=None, help="only these ops")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    import nanofast

    print(f"nanofast {getattr(nanofast, '__version__', '?')} kernels smoke: torch {torch.__version__}, "
          f"Triton interpreter {'on' if triton_interpreting() else 'off'}", flush=True)
    t0 = time.perf_counter()
    failures = run(args.ops)
    verdict = "FAILED" if failures else "passed"
    print(f"smoke {verdict}: {failures} failure(s) in {time.perf_counter() - t0:.0f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
