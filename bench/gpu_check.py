"""One command on one CUDA GPU: compiled numerics of every kernel config nanofast uses, each kernel's
speed beside what the model runs without it, the model end to end and the speedrun's training
step, in a time budget that includes building the CUDA sources.

    python3 -m bench.gpu_check --out-dir gpu-results   # a bare GPU machine, from the repository root:
                                                     #   no venv, no install, no network (bench/README.md)
    python -m bench.gpu_check                        # make gpu-check: bench/baselines/<class>/gpu_check.json
                                                     #   and the performance page regenerated
    python -m bench.gpu_check --set-floors           # ... and the guard's unmeasured GPU floors set
    python -m bench.gpu_check --dry-run --out x.json # CPU: every check at toy shapes (interpreter)

Why one command: GPUs are lent rarely, for minutes, so a lent GPU must yield everything at once.

The plan: the checks that decide the dispatch table come first (per op, the numerics of each
(op, backend), then the op's speed check), then the model checks, then the speedrun's d24
training step, then what decides nothing (guard floors, the engine's prefill). Each check carries
an estimate of its H100 seconds; before anything runs, the plan names the checks that fit
`--budget-s` (default 540, the CUDA build and the first worker's start included) and those that
will not, and the JSON records it. At run time a check whose estimate no longer fits is skipped.

Faults: the checks run in a worker process (one at a time, results back as JSON lines); the
parent gives each a timeout (max(30 s, 3 x its estimate), capped by what is left of the budget),
kills a worker that hangs ("timeout"), records one that dies ("crashed": exit code, last lines of
its output) and starts a fresh worker for the rest. On a GPU a check that raises ends its worker
too: after an asynchronous CUDA fault the context is unusable. The JSON is rewritten after every
check, so a killed run keeps what it measured.

Numerics use the kernel tests' FlashAttention-style budget: a kernel's max error against an fp64
evaluation may be at most FACTOR x the error of plain torch in the same low precision plus
ATOL x max(1, max|ref|) (tests/error_budget.py; ATOL per dtype below). Quantisation is bitwise.

The output's "dispatch" section ({op: {backend: {"ms", "ok"}}}) is what `nanofast.dispatch`
picks each op's backend from on this device class: speed from the speed checks, "ok" from the
numerics checks of that (op, backend). Each speed check times the backends against what the model
runs without the kernel (the vendor entry of nanofast.dispatch.OPS, called as nanofast.ops calls it).

`--dry-run` is the same code, worker processes included, at toy shapes on CPU tensors: Triton
kernels through the interpreter (TRITON_INTERPRET=1 in the workers), CUDA sources through their
CPU emulation build, torch.compile included. Its timings are CPU timings of toy shapes and mean
nothing; it exists so the tests execute every check's path.
"""
from __future__ import annotations

import argparse
import ctypes
import faulthandler
import functools
import importlib
import importlib.util
import json
import math
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from bench import hf_speed
from bench.render import check_summary, gpu_check_markdown, status_counts

if TYPE_CHECKING:  # torch is imported inside functions: `--help` answers without loading it
    import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BASELINES = BENCH / "baselines"
GPU_FLOORS = BASELINES / "gpu_floors.json"
# A lent machine runs one command for at most 10 minutes: 9 for the plan leaves a minute for the
# parent's start, the page and a worker that must be killed.
BUDGET_S = 540.0
# nvcc of csrc/'s three sources, one process each in parallel: 35 s here where the three share 2
# loaded cores (1.5 per core); with a core each on the GPU machine's 16, about 35 / 1.5.
BUILD_EST_S = 24.0
WORKER_START_S = 10.0  # a worker's torch import and CUDA context, once per worker
WORKER_START_TIMEOUT_S = 120.0
MIN_TIMEOUT_S, TIMEOUT_FACTOR = 30.0, 3.0  # a check's timeout: max(30 s, 3 x its estimate)
DRY_RUN_TIMEOUT_S = 600.0  # the estimates are H100 seconds; the interpreter on 2 loaded cores is not
FLOOR_MARGIN = 0.8  # a floor is 0.8 x the first measured fraction of peak (gpu_floors.json's rule)
ATOL = {"float32": 1e-6, "float16": 1e-5, "bfloat16": 2.0 ** -7}  # the kernel tests' ATOLs
NVCC_FLAGS = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC"]  # kernels.cuda_build's JIT flags, as a plain .so
NO_CUDA = ("gpu_check: no CUDA device (torch.cuda.is_available() is False), nothing checked; "
           "`python -m bench.gpu_check --dry-run` runs every check at tiny shapes on CPU")


@dataclass
class Check:
    """One check: `fn(ctx, **args)` (a module-level function: a worker imports it by name) returns
    a dict with "ok" (numerics/model) or "times_ms" (speed)."""
    name: str
    section: str  # "numerics" | "model" | "speed"
    fn: Callable[..., dict]
    est_s: float  # expected seconds on an H100, compile time included (the plan's guess)
    op: str | None = None  # the dispatch op this check informs
    backend: str | None = None
    floor: tuple[str, str] | None = None  # speed: (gpu_floors.json name, the backend whose fraction sets it)
    args: dict = field(default_factory=dict)
    left_out: str | None = None  # why the default plan leaves it out (it runs with --all or --only)

    def needs_cuda_backend(self) -> bool:
        """Whether it runs nanofast's CUDA sources: a cuda numerics check, or the speed check of an
        op with a CUDA kernel."""
        from nanofast.dispatch import OPS

        return self.backend == "cuda" or (self.section == "speed" and self.op is not None
                                          and "cuda" in OPS[self.op].kernels)


@dataclass
class Ctx:
    """Where and at which size the checks run."""
    device: torch.device
    dry_run: bool
    no_cuda_backend: str | None = None  # why the CUDA sources cannot run here (their build failed)
    table: str | None = None  # this run's JSON: the dispatch table the training steps run with

    def pick(self, full, tiny):
        """The GPU size, or the dry run's toy size of the same case."""
        return tiny if self.dry_run else full

    def backends(self, op: str) -> list[str]:
        """The backends `op` can dispatch to that can run here (the vendor path first)."""
        from nanofast.dispatch import OPS

        return [b for b in OPS[op].backends if not (b == "cuda" and self.no_cuda_backend)]

    def randn(self, *shape: int, dtype=None, seed: int = 0, scale: float = 1.0):
        import torch

        g = torch.Generator().manual_seed(seed)
        return (scale * torch.randn(*shape, generator=g)).to(self.device, dtype or torch.float32)

    def median_ms(self, fn: Callable[[], object]) -> float:
        """Median milliseconds per call: CUDA events on a GPU (up to 25 calls or ~1 s), wall time of
        two calls in a dry run."""
        import torch

        fn()  # warm-up: compilation and autotuning happen outside the timed calls
        if self.device.type != "cuda":
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
            return statistics.median(times)
        torch.cuda.synchronize()
        times, spent = [], 0.0
        while len(times) < 25 and (spent < 1000.0 or len(times) < 3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
            spent += times[-1]
        return statistics.median(times)


def kernels_importable() -> None:
    """Make `nanofast.kernels` importable from a bare checkout. setup.py installs kernels/ as that
    subpackage; a GPU machine that runs this from the repository root has nothing installed, so the
    package is loaded from kernels/ under the same name (what the editable install's finder does)."""
    if importlib.util.find_spec("nanofast.kernels") is not None:
        return
    import nanofast

    init = ROOT / "kernels" / "__init__.py"
    spec = importlib.util.spec_from_file_location("nanofast.kernels", init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["nanofast.kernels"] = module
    spec.loader.exec_module(module)
    nanofast.kernels = module


CHECKS: list[Check] = []


def _add(section: str, name: str, est_s: float, fn: Callable, op: str | None = None, backend: str | None = None,
         args: dict | None = None, floor: tuple[str, str] | None = None, left_out: str | None = None) -> None:
    """Register `fn(ctx, **args)` as a check informing (op, backend) of the dispatch table."""
    CHECKS.append(Check(name, section, fn, est_s, op, backend, floor, args or {}, left_out))


# --------------------------------------------------------------------------------------------
# Numerics: compiled kernels against fp64, with the CPU tests' budgets
# --------------------------------------------------------------------------------------------

def budget(name: str, kernel, torch_lp, ref64, factor: float = 2.0, atol: float | None = None) -> dict:
    """The kernel tests' rule: max|kernel - ref64| <= factor * max|torch_lp - ref64| + atol * scale."""
    import torch

    atol = ATOL[str(torch_lp.dtype).removeprefix("torch.")] if atol is None else atol
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    err_k = (kernel.double() - ref64.double()).abs().max().item() if kernel.numel() else 0.0
    err_t = (torch_lp.double() - ref64.double()).abs().max().item() if kernel.numel() else 0.0
    allowed = factor * err_t + atol * scale
    ok = bool(torch.isfinite(kernel).all()) and err_k <= allowed
    return {"case": name, "ok": ok, "err": err_k, "torch_err": err_t, "allowed": allowed}


def _cases(cases: list[dict]) -> dict:
    return {"ok": all(c["ok"] for c in cases), "cases": cases}


def _norm_grad_pair(fn, x, g):
    """fn(x) and d(fn(x) . g)/dx for a fresh leaf copy of x."""
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    y.backward(g)
    return y.detach(), x.grad


def check_rms_norm(ctx: Ctx, backend: str) -> dict:
    """Forward and backward at the model's (tokens, d_model) in bf16 and fp32, and the fused
    residual + norm forward."""
    import torch
    import torch.nn.functional as F

    from nanofast.kernels import rms_norm

    cases = []
    for rows, d, dtype in ctx.pick([(16384, 1536, torch.bfloat16), (4096, 768, torch.float32)],
                                   [(7, 96, torch.bfloat16), (5, 33, torch.float32)]):
        x, g = ctx.randn(rows, d, dtype=dtype, seed=1), ctx.randn(rows, d, dtype=dtype, seed=2)
        yk, dk = _norm_grad_pair(lambda t: rms_norm(t, backend=backend), x, g)
        yt, dt = _norm_grad_pair(lambda t: F.rms_norm(t, (d,)), x, g)
        y64, d64 = _norm_grad_pair(lambda t: F.rms_norm(t, (d,), eps=torch.finfo(torch.float32).eps), x.double(),
                                   g.double())
        cases += [budget(f"fwd {rows}x{d} {dtype}", yk, yt, y64), budget(f"bwd {rows}x{d} {dtype}", dk, dt, d64)]
        res = ctx.randn(rows, d, dtype=dtype, seed=3)
        out = rms_norm(x, residual=res, backend=backend)
        yk = out[0] if isinstance(out, tuple) else out
        h = (x + res).double()  # the kernel's h is x + residual rounded to x's dtype, as torch's
        cases.append(budget(f"residual fwd {rows}x{d} {dtype}", yk, F.rms_norm((x + res), (d,)),
                            F.rms_norm(h, (d,), eps=torch.finfo(torch.float32).eps)))
    return _cases(cases)


def _qk_torch(q, k, cos, sin, scale):
    import torch.nn.functional as F

    from nanofast import ops

    d = q.size(-1)
    return (F.rms_norm(ops.apply_rotary(q, cos, sin), (d,)) * scale,
            F.rms_norm(ops.apply_rotary(k, cos, sin), (d,)) * scale)


def check_qk_norm_rope(ctx: Ctx, backend: str) -> dict:
    """QK-norm + rotary forward and backward at a d12-like shape (heads of 128, GQA 2:1)."""
    import torch

    from nanofast import ops
    from nanofast.kernels import qk_norm_rope

    B, T, hq, hk, d = ctx.pick((8, 2048, 12, 6, 128), (2, 7, 3, 1, 64))
    dtype = torch.bfloat16
    q, k = ctx.randn(B, T, hq, d, dtype=dtype, seed=1), ctx.randn(B, T, hk, d, dtype=dtype, seed=2)
    gq, gk = ctx.randn(B, T, hq, d, dtype=dtype, seed=3), ctx.randn(B, T, hk, d, dtype=dtype, seed=4)
    cos, sin = (t.to(ctx.device) for t in ops.rotary_tables(T, d))
    outs = {}
    for name, fn, dt in (("kernel", lambda a, b: qk_norm_rope(a, b, cos.to(dtype), sin.to(dtype), scale=1.2,
                                                               backend=backend), dtype),
                         ("torch", lambda a, b: _qk_torch(a, b, cos.to(dtype), sin.to(dtype), 1.2), dtype),
                         ("fp64", lambda a, b: _qk_torch(a, b, cos.to(dtype).double(), sin.to(dtype).double(), 1.2),
                          torch.float64)):
        a, b = q.to(dt).detach().requires_grad_(True), k.to(dt).detach().requires_grad_(True)
        oq, ok_ = fn(a, b)
        torch.autograd.backward([oq, ok_], [gq.to(dt), gk.to(dt)])
        outs[name] = (oq.detach(), ok_.detach(), a.grad, b.grad)
    labels = ("q fwd", "k fwd", "q bwd", "k bwd")
    return _cases([budget(f"{lab} B{B} T{T} {hq}/{hk} heads", kk, tt, rr)
                   for lab, kk, tt, rr in zip(labels, outs["kernel"], outs["torch"], outs["fp64"])])


def _llama_rotary_tables(ctx: Ctx, rows: int, d: int, base: float = 500_000.0):
    """Llama 3's (rows, D) fp32 rotary tables, HF's layout: angle t * base^(-2i/D), both halves equal."""
    import torch

    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = torch.outer(torch.arange(rows, dtype=torch.float32), inv_freq)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(ctx.device), ang.sin().to(ctx.device)


def check_rotary(ctx: Ctx, backend: str) -> dict:
    """HF-convention rotary forward and backward on HF's layout ((B, H, T, D) views transposed from
    the projections) at Llama 3 8B's heads (32 q / 8 kv of 128): per-position (B, T, D) bf16
    tables as HF models pass them, and left-padding position ids into fp32 (L, D) tables."""
    import torch

    from nanofast.kernels.rotary import apply_rotary_pos_emb, apply_rotary_pos_emb_reference

    B, T, hq, hk, d = ctx.pick((4, 2048, 32, 8, 128), (2, 7, 3, 1, 64))
    dtype = torch.bfloat16
    q = ctx.randn(B, T, hq, d, dtype=dtype, seed=1).transpose(1, 2)
    k = ctx.randn(B, T, hk, d, dtype=dtype, seed=2).transpose(1, 2)
    gq, gk = ctx.randn(B, hq, T, d, dtype=dtype, seed=3), ctx.randn(B, hk, T, d, dtype=dtype, seed=4)
    cos, sin = _llama_rotary_tables(ctx, T + 16, d)
    pad = torch.arange(B, device=ctx.device)[:, None] * 3  # sequence b left-padded by 3b tokens
    pos = (torch.arange(T, device=ctx.device)[None] - pad).clamp(min=0) + (torch.arange(T, device=ctx.device) < pad)
    cases = []
    for label, c, s, ids in (("(B, T, D) bf16 tables", cos[:T].to(dtype).expand(B, T, d), sin[:T].to(dtype).expand(
            B, T, d), None), ("position ids, fp32 (L, D) tables", cos, sin, pos)):
        outs = {}
        for name, fn, dt in (
                ("kernel", lambda a, b: apply_rotary_pos_emb(a, b, c, s, ids, backend=backend), dtype),
                # HF's model: tables in q's dtype
                ("torch", lambda a, b: apply_rotary_pos_emb_reference(a, b, c.to(dtype), s.to(dtype), ids), dtype),
                ("fp64", lambda a, b: apply_rotary_pos_emb_reference(a, b, c.double(), s.double(), ids),
                 torch.float64)):
            a, b = q.to(dt).detach().requires_grad_(True), k.to(dt).detach().requires_grad_(True)
            oq, ok_ = fn(a, b)
            torch.autograd.backward([oq, ok_], [gq.to(dt), gk.to(dt)])
            outs[name] = (oq.detach(), ok_.detach(), a.grad, b.grad)
        cases += [budget(f"{lab} B{B} T{T} {hq}/{hk} heads, {label}", kk, tt, rr)
                  for lab, kk, tt, rr in zip(("q fwd", "k fwd", "q bwd", "k bwd"), outs["kernel"], outs["torch"],
                                             outs["fp64"])]
    return _cases(cases)


def _paged_cache(ctx: Ctx, lens: list[int], hkv: int, d: int, page: int, dtype, spare: int = 3):
    """A cache holding sequences of `lens` tokens on shuffled pages, and its block table."""
    import torch

    pages = [-(-n // page) for n in lens]
    num_pages = sum(pages) + spare
    g = torch.Generator().manual_seed(7)
    order = torch.randperm(num_pages, generator=g)
    table = torch.zeros(len(lens), max(pages), dtype=torch.int32)
    at = 0
    for i, n in enumerate(pages):
        table[i, :n] = order[at:at + n]
        at += n
    k = ctx.randn(num_pages, page, hkv, d, dtype=dtype, seed=8)
    v = ctx.randn(num_pages, page, hkv, d, dtype=dtype, seed=9)
    return k, v, table.to(ctx.device), torch.tensor(lens, dtype=torch.int32, device=ctx.device)


def check_paged_decode(ctx: Ctx, backend: str, group: int, page: int) -> dict:
    """Decode attention with `group` query heads per KV head and `page`-token pages over a ragged
    batch (one long sequence, many short), each split count and with/without a sliding window."""
    import torch

    from nanofast.kernels import paged_decode_attention, paged_decode_attention_reference

    hkv, d = 2, ctx.pick(128, 64)
    lens = ctx.pick([2048, 1, 17, 300, 1000, 64, 5, 777, 129, 2000, 33, 256, 1024, 511, 2, 1500],
                    [40, 1, 17])
    dtype = torch.bfloat16
    kc, vc, table, seq_lens = _paged_cache(ctx, lens, hkv, d, page, dtype)
    q = ctx.randn(len(lens), hkv * group, d, dtype=dtype, seed=10)
    cases = []
    splits = (1, None, ctx.pick(256, 4)) if backend == "triton" else (None,)
    for window in (None, ctx.pick(128, 7)):
        ref64 = paged_decode_attention_reference(q.double(), kc.double(), vc.double(), table, seq_lens, window=window)
        lp = paged_decode_attention_reference(q, kc, vc, table, seq_lens, window=window)
        for ns in splits:
            kw = {"num_splits": ns} if backend == "triton" else {}
            out = paged_decode_attention(q, kc, vc, table, seq_lens, window=window, backend=backend, **kw)
            cases.append(budget(f"window={window} splits={ns or 'auto'}", out, lp, ref64))
    return _cases(cases)


def _prefill_step(ctx: Ctx):
    """One engine step's chunks (a long prompt, two short ones, two tool outputs deep in their
    contexts) on shuffled pages: (q, k_cache, v_cache, block_table, chunks, context_lens)."""
    import torch

    shape = ctx.pick([(1024, 1024), (200, 200), (64, 64), (3, 1500), (5, 700)], [(20, 20), (7, 7), (3, 30)])
    hq, hkv, d = ctx.pick((32, 8, 128), (4, 2, 64))
    ctxs = [c for _, c in shape]
    kc, vc, table, _ = _paged_cache(ctx, ctxs, hkv, d, 16, torch.bfloat16)
    starts = [0]
    for n, _ in shape:
        starts.append(starts[-1] + n)
    q = ctx.randn(starts[-1], hq, d, dtype=torch.bfloat16, seed=11)
    return q, kc, vc, table, [(r, starts[r], n) for r, (n, _) in enumerate(shape)], ctxs


def check_paged_prefill(ctx: Ctx) -> dict:
    """The engine's batched prefill (flash-attn varlen where installed, else grouped SDPA) against
    one SDPA per chunk in fp64, with and without a sliding window."""
    from nanofast import attention
    from nanofast.kernels import vendor

    q, kc, vc, table, chunks, ctxs = _prefill_step(ctx)
    cases = []
    for window in (max(ctxs), ctx.pick(128, 5)):
        ref64 = attention.paged_prefill_attention_per_chunk(q.double(), kc.double(), vc.double(), table, chunks,
                                                            ctxs, window)
        lp = attention.paged_prefill_attention_per_chunk(q, kc, vc, table, chunks, ctxs, window)
        out = attention.paged_prefill_attention_batched(q, kc, vc, table, chunks, ctxs, window)
        cases.append(budget(f"window={window} attention={vendor.attention_backend(q.device, q.dtype)}", out, lp, ref64))
    return _cases(cases)


def check_paged_kv_write(ctx: Ctx, backend: str) -> dict:
    """The KV write is a copy: bitwise equal to the reference, slots on shuffled pages."""
    import torch

    from nanofast.kernels import paged_kv_write, paged_kv_write_reference

    n, hkv, d, page, pages = ctx.pick((4096, 8, 128, 16, 400), (9, 2, 64, 4, 5))
    dtype = torch.bfloat16
    slots = torch.randperm(pages * page, generator=torch.Generator().manual_seed(0))[:n].to(ctx.device)
    k, v = ctx.randn(n, hkv, d, dtype=dtype, seed=1), ctx.randn(n, hkv, d, dtype=dtype, seed=2)
    caches = [torch.zeros(pages, page, hkv, d, dtype=dtype, device=ctx.device) for _ in range(4)]
    paged_kv_write(k, v, caches[0], caches[1], slots, backend=backend)
    paged_kv_write_reference(k, v, caches[2], caches[3], slots)
    return {"ok": torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])}


def check_newton_schulz(ctx: Ctx) -> dict:
    """bf16 Newton-Schulz (Triton) against fp64, and the symmetric products bitwise symmetric."""
    import torch

    from nanofast.kernels import newton_schulz, newton_schulz_reference
    from nanofast.kernels.newton_schulz_triton import ns_gram_triton, ns_poly_triton

    cases = []
    for shape in ctx.pick([(4, 1280, 5120), (1536, 1536), (768, 3072)], [(2, 48, 80), (33, 33)]):
        G = ctx.randn(*shape, seed=1)
        out = newton_schulz(G, backend="triton", dtype=torch.bfloat16)
        lp = newton_schulz_reference(G, dtype=torch.bfloat16)
        ref64 = newton_schulz_reference(G.double(), dtype=torch.float64)
        cases.append(budget(f"{shape}", out, lp, ref64, atol=2.0 ** -7))
        X = (G / G.norm(dim=(-2, -1), keepdim=True)).to(torch.bfloat16)
        X = X if X.size(-2) <= X.size(-1) else X.mT.contiguous()
        A = ns_gram_triton(X.reshape(-1, *X.shape[-2:]))
        B = ns_poly_triton(A, -4.7, 2.0)
        symmetric = torch.equal(A, A.mT) and torch.equal(B, B.mT)
        cases.append({"case": f"{shape} A and B bitwise symmetric", "ok": symmetric})
    return _cases(cases)


def _fp8(ctx: Ctx, x, dtype, recipe: str):
    from nanofast.kernels import quantize_fp8_reference

    q, scale, _, _ = quantize_fp8_reference(x, dtype, recipe=recipe)
    return q, scale


def check_fp8_gemm(ctx: Ctx, backend: str) -> dict:
    """e4m3/e5m2 x e4m3, tensorwise/rowwise scales, bias, and a long K with split and fast
    accumulation, against fp64 (and torch._scaled_mm's output, reported, where it runs)."""
    import torch

    from nanofast.kernels import fp8_gemm, fp8_gemm_reference

    E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2
    # K and N multiples of 16 (torch._scaled_mm's CUDA rule, held on every backend); M free
    M, N, K = ctx.pick((4096, 3072, 1536), (40, 48, 96))
    Ml, Nl, Kl = ctx.pick((1024, 1024, 16384), (16, 32, 1024))
    cases = []
    for name, (m, n, k), a_dt, recipe, bias, fast in (
            ("e4m3 tensorwise", (M, N, K), E4, "tensorwise", False, False),
            ("e4m3 rowwise", (M, N, K), E4, "rowwise", False, False),
            ("e5m2 x e4m3 tensorwise", (M, N, K), E5, "tensorwise", False, False),
            ("e4m3 rowwise + bias", (M, N, K), E4, "rowwise", True, False),
            ("long K split accumulation", (Ml, Nl, Kl), E4, "tensorwise", False, False),
            ("long K fast accumulation", (Ml, Nl, Kl), E4, "tensorwise", False, True)):
        a, sa = _fp8(ctx, ctx.randn(m, k, seed=1), a_dt, recipe)
        b, sb = _fp8(ctx, ctx.randn(n, k, seed=2), E4, recipe)
        sb_rows, sb = sb, (sb.reshape(1, n) if recipe == "rowwise" else sb)  # (N, 1) per row of b -> (1, N)
        bias_t = ctx.randn(n, dtype=torch.bfloat16, seed=3) if bias else None
        out = fp8_gemm(a, b, sa, sb, out_dtype=torch.bfloat16, bias=bias_t, use_fast_accum=fast, backend=backend)
        lp = fp8_gemm_reference(a, b, sa, sb, out_dtype=torch.bfloat16, bias=bias_t)
        ref64 = (a.double() * sa.double()) @ (b.double() * sb_rows.double()).T
        ref64 = ref64 + bias_t.double() if bias else ref64
        mag = max(1.0, ref64.abs().max().item())
        # Split accumulation: fp32 sums in another order (~sqrt(K) fp32 ulps) plus one bf16 ulp
        # (2^-7, the kernel tests' bf16 ATOL: the interpreter rounds to bf16 by truncation). Fast
        # accumulation keeps the tensor core's narrower accumulator for all of K: one more ulp.
        atol = 2.0 ** -7 * (2 if fast else 1) + (2 * math.sqrt(k) + 4) * torch.finfo(torch.float32).eps
        case = budget(f"{name} {m}x{n}x{k}", out, lp, ref64, atol=atol)
        case["allowed"] = max(case["allowed"], 2 * case["torch_err"] + atol * mag)
        case["ok"] = case["err"] <= case["allowed"] and bool(torch.isfinite(out).all())
        if backend != "scaled_mm" and ctx.device.type == "cuda":
            try:
                vendor = fp8_gemm(a, b, sa, sb, out_dtype=torch.bfloat16, bias=bias_t, use_fast_accum=fast,
                                  backend="scaled_mm")
                case["max_diff_vs_scaled_mm"] = (out.float() - vendor.float()).abs().max().item()
            except (RuntimeError, ValueError) as e:  # a config _scaled_mm does not take
                case["max_diff_vs_scaled_mm"] = f"scaled_mm: {e}"[:120]
        cases.append(case)
    return _cases(cases)


def _fp8_inputs(ctx: Ctx, rows: int, cols: int, seed: int):
    """bf16 values over every fp8 binade and exact fp8 ties (as the quantisation tests use)."""
    import torch

    x = ctx.randn(rows, cols, seed=seed)
    mag = torch.exp(torch.empty(rows, cols).uniform_(-7.0, 7.0, generator=torch.Generator().manual_seed(seed)))
    return (x * mag.to(ctx.device)).to(torch.bfloat16)


def check_quantize_fp8(ctx: Ctx) -> dict:
    """quantize_fp8 (Triton) bitwise equal to torch's cast: both formats, both recipes, q^T."""
    import torch

    from nanofast.kernels import quantize_fp8, quantize_fp8_reference

    rows, cols = ctx.pick((4096, 6144), (33, 70))
    x = _fp8_inputs(ctx, rows, cols, seed=4)
    cases = []
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        for recipe, transpose in (("tensorwise", True), ("rowwise", False)):
            got = quantize_fp8(x, dtype, recipe=recipe, transpose=transpose, backend="triton")
            want = quantize_fp8_reference(x, dtype, recipe=recipe, transpose=transpose)
            same = [g is w or torch.equal(g.view(torch.uint8) if g.dtype == dtype else g,
                                          w.view(torch.uint8) if w.dtype == dtype else w)
                    for g, w in zip(got, want)]
            differ = (got[0].view(torch.uint8) != want[0].view(torch.uint8)).float().mean().item()
            cases.append({"case": f"{dtype} {recipe}", "ok": all(same), "q_bits_differ_fraction": differ})
    return _cases(cases)


def check_linear_cross_entropy(ctx: Ctx) -> dict:
    """The fused head (Triton) forward and backward against fp64, bf16 inputs, softcap 15."""
    import torch

    from nanofast.kernels import linear_softcap_cross_entropy, linear_softcap_cross_entropy_reference

    N, D, V = ctx.pick((8192, 768, 32768), (37, 64, 300))
    x, w = ctx.randn(N, D, dtype=torch.bfloat16, seed=1), ctx.randn(V, D, seed=2, scale=D ** -0.5)
    t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(3)).to(ctx.device)
    outs = {}
    for name, fn, dt in (("kernel", functools.partial(linear_softcap_cross_entropy, backend="triton"), torch.bfloat16),
                         ("torch", linear_softcap_cross_entropy_reference, torch.bfloat16),
                         ("fp64", linear_softcap_cross_entropy_reference, torch.float64)):
        xi = x.detach().to(dt).requires_grad_(True)
        wi = w.detach().to(torch.float64 if dt == torch.float64 else torch.float32).requires_grad_(True)
        loss = fn(xi, wi, t, 15.0)
        loss.backward()
        outs[name] = (loss.detach().reshape(1), xi.grad, wi.grad)
    return _cases([budget(f"{lab} N{N} D{D} V{V}", k, tt, r, atol=2.0 ** -7)
                   for lab, k, tt, r in zip(("loss", "dx", "dW"), outs["kernel"], outs["torch"], outs["fp64"])])


def check_past_2_31(ctx: Ctx, kernel: str) -> dict:
    """A memory-bound kernel on a tensor of more than 2^31 elements (int32 offsets would wrap):
    the first and last rows against plain torch. The dry run takes the same path at toy size."""
    import torch
    import torch.nn.functional as F

    from nanofast import kernels

    if ctx.device.type == "cuda" and torch.cuda.get_device_properties(0).total_memory < 40 * 2 ** 30:
        return {"ok": True, "skipped": "needs 40 GiB of GPU memory"}
    d = 2048
    rows = ctx.pick((1 << 31) // d + 512, 300)  # 2^31 + 2^20 elements of bf16 = 4 GiB
    x = torch.empty(rows, d, dtype=torch.bfloat16, device=ctx.device)
    edge = [slice(0, 256), slice(rows - 256, rows)]
    for s in edge:
        x[s] = ctx.randn(x[s].size(0), d, dtype=torch.bfloat16, seed=s.start)
    cases = []
    if kernel in ("rms_norm", "rms_norm_cuda"):
        y = kernels.rms_norm(x, backend="cuda" if kernel.endswith("cuda") else "triton")
        for s in edge:
            cases.append(budget(f"rows {s.start}..{s.stop}", y[s], F.rms_norm(x[s], (d,)),
                                F.rms_norm(x[s].double(), (d,), eps=torch.finfo(torch.float32).eps)))
    elif kernel == "quantize_fp8":
        scale = torch.tensor(0.01, device=ctx.device)
        q = kernels.quantize_fp8(x, torch.float8_e4m3fn, scale=scale, backend="triton")[0]
        want = (x[edge[1]].float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        cases.append({"case": "last rows bitwise", "ok": torch.equal(q[edge[1]].view(torch.uint8),
                                                                    want.view(torch.uint8))})
    del x
    return _cases(cases)


def check_qk_norm_rope_past_2_31(ctx: Ctx, backend: str) -> dict:
    """QK-norm + rotary over q and k of more than 2^31 elements each: the last tokens against plain
    torch (the row offsets token * heads * D pass 2^31 there)."""
    import torch

    from nanofast import ops
    from nanofast.kernels import qk_norm_rope

    if ctx.device.type == "cuda" and torch.cuda.get_device_properties(0).total_memory < 40 * 2 ** 30:
        return {"ok": True, "skipped": "needs 40 GiB of GPU memory"}
    H, d = ctx.pick((16, 128), (2, 16))
    T = ctx.pick((1 << 31) // (H * d) + 64, 40)  # 2^31 + 2^17 elements of bf16 per tensor: 4 GiB
    q = torch.empty(1, T, H, d, dtype=torch.bfloat16, device=ctx.device)
    k = torch.empty_like(q)
    tail = slice(T - 32, T)
    q[:, tail] = ctx.randn(1, 32, H, d, dtype=torch.bfloat16, seed=1)
    k[:, tail] = ctx.randn(1, 32, H, d, dtype=torch.bfloat16, seed=2)
    cos, sin = (t.to(ctx.device, torch.bfloat16) for t in ops.rotary_tables(T, d))
    oq, ok_ = qk_norm_rope(q, k, cos, sin, backend=backend)
    c, s_ = cos[tail], sin[tail]
    ref_q, ref_k = _qk_torch(q[:, tail].double(), k[:, tail].double(), c.double(), s_.double(), 1.0)
    lp_q, lp_k = _qk_torch(q[:, tail], k[:, tail], c, s_, 1.0)
    cases = [budget("q last tokens", oq[:, tail], lp_q, ref_q), budget("k last tokens", ok_[:, tail], lp_k, ref_k)]
    del q, k, oq, ok_
    return _cases(cases)


def check_paged_decode_past_2_31(ctx: Ctx, backend: str) -> dict:
    """Decode reading the last pages of a KV pool of more than 2^31 elements."""
    import torch

    from nanofast.kernels import paged_decode_attention, paged_decode_attention_reference

    if ctx.device.type == "cuda" and torch.cuda.get_device_properties(0).total_memory < 40 * 2 ** 30:
        return {"ok": True, "skipped": "needs 40 GiB of GPU memory"}
    page, hkv, d = 16, 8, ctx.pick(128, 16)
    num_pages = ctx.pick((1 << 31) // (page * hkv * d) + 64, 40)
    kc = torch.empty(num_pages, page, hkv, d, dtype=torch.bfloat16, device=ctx.device)
    vc = torch.empty_like(kc)
    used = torch.arange(num_pages - 8, num_pages, dtype=torch.int32, device=ctx.device).view(2, 4)
    kc[-8:], vc[-8:] = ctx.randn(8, page, hkv, d, dtype=torch.bfloat16, seed=1), \
        ctx.randn(8, page, hkv, d, dtype=torch.bfloat16, seed=2)
    seq_lens = torch.tensor([4 * page, 3 * page - 5], dtype=torch.int32, device=ctx.device)
    q = ctx.randn(2, 4 * hkv, d, dtype=torch.bfloat16, seed=3)
    out = paged_decode_attention(q, kc, vc, used, seq_lens, backend=backend)
    # The reference only needs the pages in use: remap them to a small pool.
    small_k, small_v = kc[-8:].double(), vc[-8:].double()
    local = (used - (num_pages - 8)).to(torch.int32)
    ref64 = paged_decode_attention_reference(q.double(), small_k, small_v, local, seq_lens)
    lp = paged_decode_attention_reference(q, kc[-8:], vc[-8:], local, seq_lens)
    del kc, vc
    return _cases([budget("last pages", out, lp, ref64)])


# --------------------------------------------------------------------------------------------
# The model end to end
# --------------------------------------------------------------------------------------------

def _model(ctx: Ctx, depth: int, vocab: int, T: int, head_dim: int, dtype, seed: int = 0):
    import torch

    from nanofast.model import GPT, config_for_depth

    torch.manual_seed(seed)
    model = GPT(config_for_depth(depth, vocab, T, head_dim=head_dim), compute_dtype=dtype).to(ctx.device)
    model.init_weights()
    with torch.no_grad():  # zero-initialised output projections would hide every kernel behind them
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _step_grads(ctx: Ctx, shape: tuple, backend: str, dtype, compiled: bool, x, y):
    """(loss, {name: fp64 gradient}) of one training step of a fresh model with `backend`."""
    import torch

    from nanofast import ops

    torch._dynamo.reset()
    ops.set_kernel_backend(backend)
    try:
        model = _model(ctx, *shape, dtype)
        loss = (torch.compile(model, dynamic=False) if compiled else model)(x, y)
        loss.backward()
        return loss.item(), {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        ops.set_kernel_backend(None)
        torch._dynamo.reset()


def check_train_step(ctx: Ctx) -> dict:
    """One training step, the kernel backend against the torch backend: eager in fp32, compiled in bf16.

    fp32 (TF32 off): the two differ only in summation order, so every gradient, the scalar ones
    included, agrees to 1e-3 relative (a wrong kernel is off by O(1)), plus 1e-6 of the whole
    gradient's norm for a gradient that cancels to nothing. bf16: the loss and each
    matrix gradient may be at most twice as far from the fp32 step as torch's bf16 step plus one
    bf16 ulp (2^-7) of its norm. The model's scalar gradients are sums over every token with heavy
    cancellation, where bf16 rounding alone moves them by percents on either backend (more under
    the interpreter, which rounds to bf16 by truncation): they are judged in fp32 only."""
    import torch

    shape = ctx.pick((4, 32768, 1024, 128), (1, 256, 32, 32))
    B = ctx.pick(4, 2)
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, shape[1], (B, shape[2]), generator=g).to(ctx.device)
    y = torch.randint(0, shape[1], (B, shape[2]), generator=g).to(ctx.device)
    tf32, precision = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        # fp32 eager (the kernels' numerics; one compile fewer for the budget), bf16 compiled (the
        # product's path: Inductor around the kernels)
        l32, g32 = _step_grads(ctx, shape, "torch", torch.float32, False, x, y)
        lk32, gk32 = _step_grads(ctx, shape, "triton", torch.float32, False, x, y)
        lt, gt = _step_grads(ctx, shape, "torch", torch.bfloat16, True, x, y)
        lk, gk = _step_grads(ctx, shape, "triton", torch.bfloat16, True, x, y)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.set_float32_matmul_precision(precision)
    if not set(g32) == set(gk32) == set(gt) == set(gk):
        return {"ok": False, "error": "the backends produced gradients for different parameters"}
    cases = [{"case": "fp32 loss", "ok": abs(lk32 - l32) <= 1e-4 * abs(l32), "err": abs(lk32 - l32)},
             {"case": "bf16 loss", "ok": abs(lk - l32) <= 2 * abs(lt - l32) + 1e-3 * abs(l32), "err": abs(lk - l32),
              "torch_err": abs(lt - l32)}]
    # A gradient that cancels to fp32 noise (backout_lambda's is ~1e-9 at init) is held to the
    # whole gradient's scale instead: 1e-6 of its norm.
    total = math.sqrt(sum(v.norm().item() ** 2 for v in g32.values()))
    for n, ref in g32.items():
        scale = ref.norm().item()
        err32 = (gk32[n] - ref).norm().item()
        cases.append({"case": f"fp32 {n}", "ok": err32 <= 1e-3 * scale + 1e-6 * total, "err": err32, "norm": scale})
        if ref.dim() >= 2:
            err_k, err_t = (gk[n] - ref).norm().item(), (gt[n] - ref).norm().item()
            cases.append({"case": f"bf16 {n}", "ok": err_k <= 2 * err_t + 2.0 ** -7 * scale, "err": err_k,
                          "torch_err": err_t, "norm": scale})
    return _cases(cases)


def check_fp8_training_paths(ctx: Ctx) -> dict:
    """The speedrun's fp8 paths on the backend the model picks (torch._scaled_mm through
    kernels.vendor on an unmeasured GPU): a training step per recipe with a token count that is no
    multiple of 16 (`--seq-len 1000 --device-batch-size 1`), against the bf16 step's loss, then the
    precision report (every setting finite), with the peak memory it added."""
    import torch

    from nanofast.precision import precision_report

    depth, vocab, T, hd = ctx.pick((4, 32768, 1000, 128), (1, 256, 25, 32))
    g = torch.Generator().manual_seed(9)
    x = torch.randint(0, vocab, (1, T), generator=g).to(ctx.device)
    dtype = torch.bfloat16
    cases = []
    losses = {}
    for recipe in (None, "tensorwise", "rowwise"):
        model = _model(ctx, depth, vocab, T, hd, dtype).train()
        if recipe is not None:
            model.set_linear_precision({"attn": "fp8", "mlp": "fp8", "lm_head": "fp8"}, recipe)
        loss = model(x, x)
        loss.backward()
        grads_ok = all(torch.isfinite(p.grad).all().item() for p in model.parameters() if p.grad is not None)
        losses[recipe] = loss.item()
        if recipe is not None:  # fp8's e4m3 products move the loss by ~1e-2 relative at most
            err = abs(losses[recipe] - losses[None])
            cases.append({"case": f"fp8 {recipe} step, {T} tokens", "ok": grads_ok and err <= 0.02 * abs(losses[None]),
                          "err": err, "bf16_loss": losses[None]})
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if ctx.device.type == "cuda" else 0
    report = precision_report(model, x, x)
    added = (torch.cuda.max_memory_allocated() - before) if ctx.device.type == "cuda" else None
    finite = all(math.isfinite(r["loss"]) and math.isfinite(r["logits_rel_err"]) for r in report["settings"].values())
    cases.append({"case": "precision report", "ok": finite, "peak_bytes_added": added,
                  "settings": {k: r["loss_delta"] for k, r in report["settings"].items()}})
    return _cases(cases)


def check_engine(ctx: Ctx) -> dict:
    """The engine's greedy tokens (paged prefill + decode kernels, prefix cache, chunking) equal
    the model's full-recompute `generate`, fp32 (TF32 off: near-ties must not flip)."""
    import torch

    from nanofast import ops

    from nanofast.engine import Engine, SamplingParams

    depth, vocab, T, hd, n_new = ctx.pick((2, 4096, 512, 64, 24), (1, 300, 48, 16, 6))
    model = _model(ctx, depth, vocab, T, hd, torch.float32).eval()
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in ctx.pick((200, 3, 77, 31), (9, 1, 14))]
    prompts.append(prompts[0][:5] + prompts[-1])  # a shared-prefix request
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    ops.set_kernel_backend(None if ctx.device.type == "cuda" else "triton")
    try:
        with torch.no_grad():
            want = [list(model.generate(p, n_new)) for p in prompts]
        got = Engine(model, page_size=16).generate(prompts, SamplingParams(max_tokens=n_new, temperature=0.0))
    finally:
        ops.set_kernel_backend(None)
        torch.backends.cuda.matmul.allow_tf32 = tf32
    same = sum(a == b for a, b in zip(got, want))
    return {"ok": got == want, "requests": len(prompts), "identical": same}


# --------------------------------------------------------------------------------------------
# Speed: each kernel beside what the model runs without it, same run
# --------------------------------------------------------------------------------------------

def _peaks(precision: str = "bf16") -> tuple[float | None, float | None]:
    """(DRAM bytes/s, dense FLOP/s in `precision`) of this GPU; (None, None) on CPU or an unknown GPU."""
    import torch

    if not torch.cuda.is_available():
        return None, None
    from bench.gpu_peaks import peak_bandwidth_gbps
    from nanofast.common import peak_flops

    gbps = peak_bandwidth_gbps()
    return (gbps * 1e9 if gbps else None), peak_flops("cuda", precision)


def speed(ctx: Ctx, impls: dict[str, Callable[[], object]], nbytes: int = 0, flops: int = 0,
          precision: str = "bf16", extras: dict[str, Callable[[], object]] | None = None,
          not_timed: dict[str, str] | None = None) -> dict:
    """Time each implementation (CUDA events), and each one's fraction of the DRAM peak (bytes
    given) or the FLOP peak in `precision` (flops given). `impls` are the op's dispatch
    backends: one that raises fails the check. `extras` are the page's comparisons (flash-attn,
    Liger, ...): one that raises is reported in "not_timed" beside those `not_timed` names."""
    bw, fl = _peaks(precision)
    times, fractions, missing = {}, {}, dict(not_timed or {})
    for name, fn in {**impls, **(extras or {})}.items():
        try:
            ms = ctx.median_ms(fn)
        except Exception as e:
            if name in impls:
                raise
            missing[name] = f"{type(e).__name__}: {e}"[:300]
            continue
        times[name] = ms
        if nbytes and bw:
            fractions[name] = nbytes / (ms / 1e3) / bw
        elif flops and fl:
            fractions[name] = flops / (ms / 1e3) / fl
    out = {"times_ms": times, "fraction_of_peak": fractions, "bytes": nbytes, "flops": flops}
    return out | ({"not_timed": missing} if missing else {})


def _compiled(fn):
    import torch

    return torch.compile(fn, dynamic=False)


def _optional(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        return None


def _no_cuda(ctx: Ctx) -> dict[str, str]:
    return {"cuda": ctx.no_cuda_backend} if ctx.no_cuda_backend else {}


def _forced(backend: str, fn: Callable[[], object]) -> Callable[[], object]:
    """fn() with nanofast.ops forced onto `backend`: the model's own call on the path the dispatch
    would pick (host-side work included)."""
    from nanofast import ops

    def run():
        ops.set_kernel_backend(backend)
        try:
            return fn()
        finally:
            ops.set_kernel_backend(None)
    return run


def speed_rms_norm(ctx: Ctx) -> dict:
    """The kernels against F.rms_norm compiled, as it runs inside the compiled model."""
    import torch
    import torch.nn.functional as F

    from nanofast.kernels import rms_norm

    rows, d = ctx.pick((16384, 1536), (64, 96))
    x = ctx.randn(rows, d, dtype=torch.bfloat16)
    vendor = _compiled(lambda t: F.rms_norm(t, (d,)))
    impls = {b: (lambda b=b: rms_norm(x, backend=b)) if b != "torch" else (lambda: vendor(x))
             for b in ctx.backends("rms_norm")}
    return speed(ctx, impls, nbytes=2 * rows * d * 2 + 4 * rows, not_timed=_no_cuda(ctx))


def speed_qk_norm_rope(ctx: Ctx) -> dict:
    """The kernels against the model's torch path (rotary, F.rms_norm, scale) compiled."""
    import torch

    from nanofast import ops
    from nanofast.kernels import qk_norm_rope

    B, T, H, d = ctx.pick((32, 2048, 10, 128), (2, 16, 2, 64))
    q, k = ctx.randn(B, T, H, d, dtype=torch.bfloat16, seed=1), ctx.randn(B, T, H, d, dtype=torch.bfloat16, seed=2)
    cos, sin = (t.to(ctx.device, torch.bfloat16) for t in ops.rotary_tables(T, d))
    vendor = _compiled(lambda a, b: _qk_torch(a, b, cos, sin, 1.2))
    impls = {b: (lambda b=b: qk_norm_rope(q, k, cos, sin, scale=1.2, backend=b)) if b != "torch"
             else (lambda: vendor(q, k)) for b in ctx.backends("qk_norm_rope")}
    return speed(ctx, impls, nbytes=4 * B * T * H * d * 2, not_timed=_no_cuda(ctx))


def speed_rotary(ctx: Ctx) -> dict:
    """The kernel against HF's formula (`q * cos + rotate_half(q) * sin`) compiled, as in a compiled
    HF model; HF's eager formula (a model's default) and Liger-Kernel's rope, when installed, for
    the page. Llama 3 8B's heads at 8 x 2048 tokens, HF's layout and (B, T, D) bf16 tables."""
    import torch

    from nanofast.kernels.registry import OPS
    from nanofast.kernels.rotary import apply_rotary_pos_emb, apply_rotary_pos_emb_reference

    B, T, hq, hk, d = ctx.pick((8, 2048, 32, 8, 128), (2, 16, 3, 1, 64))
    q = ctx.randn(B, T, hq, d, dtype=torch.bfloat16, seed=1).transpose(1, 2)
    k = ctx.randn(B, T, hk, d, dtype=torch.bfloat16, seed=2).transpose(1, 2)
    cos, sin = (t[:T].to(torch.bfloat16).expand(B, T, d) for t in _llama_rotary_tables(ctx, T, d))
    vendor = _compiled(lambda a, b: apply_rotary_pos_emb_reference(a, b, cos, sin))
    impls = {b: (lambda b=b: apply_rotary_pos_emb(q, k, cos, sin, backend=b)) if b != "torch"
             else (lambda: vendor(q, k)) for b in ctx.backends("rotary")}
    extras = {"torch_eager": lambda: apply_rotary_pos_emb_reference(q, k, cos, sin)}
    liger = _optional("liger_kernel.transformers.rope")
    if liger is not None:
        extras["liger"] = lambda: liger.liger_rotary_pos_emb(q, k, cos, sin)
    nbytes = OPS["rotary"].cost(B=B, T=T, HQ=hq, HK=hk, D=d, itemsize=2)["bytes"]
    return speed(ctx, impls, nbytes=nbytes, extras=extras,
                 not_timed=None if liger is not None else {"liger": "liger-kernel is not installed"})


def speed_paged_decode(ctx: Ctx) -> dict:
    """One decode step of 64 sequences of 2048 tokens as the engine calls it
    (attention.paged_decode_attention with the host's lengths) on each backend: the kernels, and "torch",
    the model's own path without them (gather the pages, one SDPA); flash-attn's paged decode too
    where it is installed."""
    import inspect

    import torch

    from nanofast import attention
    from nanofast.kernels import vendor

    B, ctx_len, hq, hkv, d = ctx.pick((64, 2048, 32, 8, 128), (3, 40, 4, 2, 64))
    kc, vc, table, lens = _paged_cache(ctx, [ctx_len] * B, hkv, d, 16, torch.bfloat16)
    q = ctx.randn(B, hq, d, dtype=torch.bfloat16)
    host = [ctx_len] * B
    impls = {b: _forced(b, lambda: attention.paged_decode_attention(q, kc, vc, table, lens, -1, host_seq_lens=host))
             for b in ctx.backends("paged_attention")}
    extras, not_timed = {}, _no_cuda(ctx)
    fa = vendor.flash_attn_module(q)
    if fa is not None and hasattr(fa, "flash_attn_with_kvcache"):
        call = fa.flash_attn_with_kvcache
        pages_kw = "page_table" if "page_table" in inspect.signature(call).parameters else "block_table"  # FA3, FA2
        # FA2's paged KV takes pages of a multiple of 256 tokens; FA3 takes these too.
        kc2, vc2, table2, _ = _paged_cache(ctx, [ctx_len] * B, hkv, d, 256, torch.bfloat16)
        extras["flash_attn"] = lambda: call(q[:, None], kc2, vc2, cache_seqlens=lens, **{pages_kw: table2})
    else:
        not_timed["flash_attn"] = vendor.attention_backend(q.device, q.dtype)
    return speed(ctx, impls, nbytes=(2 * B * ctx_len * hkv * d + 2 * B * hq * d) * 2, extras=extras,
                 not_timed=not_timed)


def speed_paged_prefill(ctx: Ctx) -> dict:
    from nanofast import attention

    q, kc, vc, table, chunks, ctxs = _prefill_step(ctx)
    w = max(ctxs)
    args = (q, kc, vc, table, chunks, ctxs, w)
    return speed(ctx, {"batched": lambda: attention.paged_prefill_attention_batched(*args),
                       "per_chunk": lambda: attention.paged_prefill_attention_per_chunk(*args)})


def speed_newton_schulz(ctx: Ctx) -> dict:
    import torch

    from nanofast.kernels import newton_schulz

    shape = ctx.pick((5120, 1280), (80, 48))
    G = ctx.randn(*shape, dtype=torch.bfloat16)
    s, l = min(shape), max(shape)
    flops = 5 * (2 * s * s * l + 2 * s ** 3 + 2 * s * s * l)  # 5 steps of X X^T, A @ A and B @ X
    return speed(ctx, {b: (lambda b=b: newton_schulz(G, backend=b, dtype=torch.bfloat16)) for b in ("triton", "torch")},
                 flops=flops)


def _speedrun(ctx: Ctx, depth: int = 24):
    """nanofast.presets' "speedrun" settings at `depth`; in a dry run at toy sizes."""
    from nanofast.presets import PRESETS

    s = replace(PRESETS["speedrun"], depth=depth)
    return ctx.pick(s, replace(s, depth=1, head_dim=32, seq_len=32, device_batch_size=2, vocab_size=256))


def _fp8_linear_shapes(s) -> Counter:
    """{(out, in): how many} of the model's fp8 linears under settings `s`, from the model itself."""
    import torch

    from nanofast.model import GPT, config_for_depth, parse_linear_precision

    spec = parse_linear_precision(s.linear_precision)
    with torch.device("meta"):
        model = GPT(config_for_depth(s.depth, s.vocab_size, s.seq_len, s.aspect_ratio, s.head_dim,
                                     window_pattern=s.window_pattern))
    return Counter(tuple(layer.weight.shape) for cls, layers in model.linears().items() if spec.get(cls) == "fp8"
                   for layer in layers)


def speed_fp8_linear(ctx: Ctx) -> dict:
    """The fp8 linears' GEMMs of one speedrun training step (d24, device batch 16 x 2048 tokens),
    laid out as kernels/fp8_linear.py's tensorwise recipe runs them: forward x_q @ W_q^T (fast
    accumulation, bf16 out), input gradient dY_q @ W (its B operand W_q^T, rows of length N, bf16
    out), weight gradient dY_q^T @ X (B operand X_q^T, rows of length M, fp32 out), dY in e5m2.
    Each backend's time is the sum over the three GEMMs and every fp8 layer (shape x count), so
    the choice follows the step's own mix; bf16 torch.matmul of the same products is beside it."""
    import torch

    from nanofast.kernels import fp8_gemm, quantize_fp8_reference

    E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2
    s = _speedrun(ctx)
    M = s.device_batch_size * s.seq_len
    backends = ctx.backends("fp8_linear")
    totals = dict.fromkeys([*backends, "bf16_matmul"], 0.0)
    per_layer, flops = {}, 0
    for (N, K), count in sorted(_fp8_linear_shapes(s).items()):
        x, w = ctx.randn(M, K, dtype=torch.bfloat16, seed=1), ctx.randn(N, K, dtype=torch.bfloat16, seed=2)
        g = ctx.randn(M, N, dtype=torch.bfloat16, seed=3)
        xq, xs, xq_t, _ = quantize_fp8_reference(x, E4, transpose=True)
        wq, ws, wq_t, _ = quantize_fp8_reference(w, E4, transpose=True)
        gq, gs, gq_t, _ = quantize_fp8_reference(g, E5, transpose=True)
        gemms = {be: (lambda be=be: fp8_gemm(xq, wq, xs, ws, out_dtype=torch.bfloat16, use_fast_accum=True, backend=be),
                      lambda be=be: fp8_gemm(gq, wq_t, gs, ws, out_dtype=torch.bfloat16, backend=be),
                      lambda be=be: fp8_gemm(gq_t, xq_t, gs, xs, out_dtype=torch.float32, backend=be))
                 for be in backends}
        gemms["bf16_matmul"] = (lambda: torch.matmul(x, w.t()), lambda: torch.matmul(g, w),
                                lambda: torch.matmul(g.t(), x))
        row = per_layer[f"{N}x{K} x{count}"] = {}
        for name, (fwd, dgrad, wgrad) in gemms.items():
            row[name] = [ctx.median_ms(f) for f in (fwd, dgrad, wgrad)]
            totals[name] += count * sum(row[name])
        flops += count * 3 * 2 * M * N * K
    peaks = {"bf16": _peaks("bf16")[1], "fp8": _peaks("fp8")[1]}
    fractions = {b: flops / (ms / 1e3) / peak for b, ms in totals.items()
                 if (peak := peaks["bf16" if b == "bf16_matmul" else "fp8"]) is not None}
    return {"times_ms": totals, "fraction_of_peak": fractions, "flops": flops, "tokens": M,
            "gemm_ms": per_layer, "gemm_order": ["forward", "input gradient", "weight gradient"]}


def speed_fp8_gemm(ctx: Ctx) -> dict:
    """One large e4m3 GEMM (the throughput guard's shape, whose floor it sets)."""
    import torch

    from nanofast.kernels import fp8_gemm

    M, N, K = ctx.pick((32768, 5120, 1280), (64, 48, 96))
    a, sa = _fp8(ctx, ctx.randn(M, K, seed=1), torch.float8_e4m3fn, "tensorwise")
    b, sb = _fp8(ctx, ctx.randn(N, K, seed=2), torch.float8_e4m3fn, "tensorwise")
    backends = ("triton", "triton_persistent", "scaled_mm")
    return speed(ctx, {be: (lambda be=be: fp8_gemm(a, b, sa, sb, backend=be)) for be in backends},
                 flops=2 * M * N * K, precision="fp8")


def speed_quantize_fp8(ctx: Ctx) -> dict:
    import torch

    from nanofast.kernels import quantize_fp8

    rows, cols = ctx.pick((16384, 6144), (64, 96))
    x = ctx.randn(rows, cols, dtype=torch.bfloat16)
    return speed(ctx, {b: (lambda b=b: quantize_fp8(x, torch.float8_e4m3fn, transpose=True, backend=b))
                       for b in ("triton", "torch")},
                 nbytes=rows * cols * (2 + 1 + 1))


def speed_muon_prologue(ctx: Ctx) -> dict:
    import torch

    from nanofast.kernels import nesterov_normalize_

    shape = ctx.pick((12, 5120, 1280), (2, 48, 80))
    g, m = ctx.randn(*shape, seed=1), ctx.randn(*shape, seed=2)
    n = math.prod(shape)
    return speed(ctx, {b: (lambda b=b: nesterov_normalize_(g, m, 0.95, dtype=torch.bfloat16, backend=b))
                       for b in ("triton", "torch")},
                 nbytes=n * (4 + 4 + 4 + 2))  # read fp32 g and m, write fp32 m and bf16 X_0


def _loss_tensor(out):
    """A loss module's result as a tensor (some versions return (loss, extras))."""
    return out if hasattr(out, "backward") else out[0]


def speed_linear_cross_entropy(ctx: Ctx) -> dict:
    """Forward and backward of the loss head at d12's shape: the Triton kernel (a graph break in
    the compiled model, so eager) against "torch", the chunked torch path compiled as the compiled
    model traces it; the unfused head (lm_head matmul, softcap, cross-entropy) eager and compiled,
    and Liger's fused loss where installed, beside them."""
    import torch

    from nanofast.kernels import linear_softcap_cross_entropy, linear_softcap_cross_entropy_reference

    N, D, V = ctx.pick((16384, 768, 32768), (64, 32, 300))
    x = ctx.randn(N, D, dtype=torch.bfloat16).requires_grad_(True)
    w = ctx.randn(V, D, scale=D ** -0.5).requires_grad_(True)
    t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(1)).to(ctx.device)

    def step(fn):
        def run():
            fn(x, w, t, 15.0).backward()
            x.grad = w.grad = None
        return run

    impls = {"triton": step(functools.partial(linear_softcap_cross_entropy, backend="triton")),
             "torch": step(_compiled(functools.partial(linear_softcap_cross_entropy, backend="torch")))}
    extras = {"unfused": step(linear_softcap_cross_entropy_reference),
              "unfused_compiled": step(_compiled(linear_softcap_cross_entropy_reference))}
    liger = _optional("liger_kernel.transformers") if ctx.device.type == "cuda" else None
    try:  # Liger's fused loss takes (weight, input, target); softcap arrived in later versions
        loss = liger.LigerFusedLinearCrossEntropyLoss(softcap=15.0)
        extras["liger"] = step(lambda a, b, c, _s: _loss_tensor(loss(b.to(a.dtype), a, c)))
    except (AttributeError, TypeError):  # not installed, or a version without softcap
        pass
    return speed(ctx, impls, flops=3 * 2 * N * D * V, extras=extras)


def speed_hf_models(ctx: Ctx) -> dict:
    """Training steps of Hugging Face models as transformers runs them, nanofast-patched and
    Liger-patched (bench/hf_speed.py)."""
    return hf_speed.speed_hf_models(ctx, speed, _optional("transformers"),
                                    _optional("liger_kernel.transformers") if ctx.device.type == "cuda" else None)


def speed_train_step(ctx: Ctx, depth: int) -> dict:
    """Tokens/s and MFU (of the bf16 peak) of the speedrun's training step (nanofast.presets'
    "speedrun": fp8 linears, device batch 16 x 2048 tokens, bf16, compiled, MuonAdamW) at `depth`,
    each op on the backend the dispatch picks from this run's table (what a speedrun gets once this
    record is committed)."""
    import torch

    from nanofast import dispatch, ops
    from nanofast.kernels import vendor
    from nanofast.model import GPT, config_for_depth, parse_linear_precision
    from nanofast.optim import MuonAdamW

    s = _speedrun(ctx, depth)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[s.dtype or "bf16"]
    table_before = os.environ.get(dispatch.TABLE_ENV)
    if ctx.table:
        os.environ[dispatch.TABLE_ENV] = ctx.table
    dispatch.clear_cache()
    torch._dynamo.reset()  # earlier checks' compiled models would count against the recompile limit
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        torch.manual_seed(s.seed)
        with torch.device("meta"):  # as the pipeline builds it: no CPU-side init of the full model
            model = GPT(config_for_depth(s.depth, s.vocab_size, s.seq_len, s.aspect_ratio, s.head_dim,
                                         window_pattern=s.window_pattern), compute_dtype=dtype)
        model.to_empty(device=ctx.device)
        model.init_weights()
        model.set_linear_precision(parse_linear_precision(s.linear_precision), s.fp8_recipe)
        opt = MuonAdamW(model.param_groups())
        run = torch.compile(model, dynamic=False) if s.compile else model
        x = torch.randint(0, s.vocab_size, (s.device_batch_size, s.seq_len),
                          generator=torch.Generator().manual_seed(2)).to(ctx.device)

        def step():
            run(x, x).backward()
            opt.step()
            model.zero_grad(set_to_none=True)

        ms = ctx.median_ms(step)
        backends = {op: ops.decide_backend(op, ctx.device) for op in dispatch.OPS}
    finally:
        if table_before is None:
            os.environ.pop(dispatch.TABLE_ENV, None)
        else:
            os.environ[dispatch.TABLE_ENV] = table_before
        dispatch.clear_cache()
    tok_s = s.device_batch_size * s.seq_len / (ms / 1e3)
    _, peak = _peaks()
    peak_gib = torch.cuda.max_memory_allocated() / 2 ** 30 if ctx.device.type == "cuda" else None
    torch._dynamo.reset()
    return {"times_ms": {"default": ms}, "tokens_per_s": tok_s, "depth": s.depth,
            "mfu": None if peak is None else model.flops_per_token() * tok_s / peak, "peak_gib": peak_gib,
            "settings": {k: getattr(s, k) for k in ("seq_len", "device_batch_size", "linear_precision", "fp8_recipe",
                                                    "compile")} | {"dtype": str(dtype)},
            "backends": backends, "attention": vendor.attention_backend(ctx.device, dtype)}


# --------------------------------------------------------------------------------------------
# The engine's decode step: captured CUDA graphs against the general path
# --------------------------------------------------------------------------------------------

# What the host calls to launch GPU work, as torch.profiler lists them: the runtime's kernel launches
# (torch's own kernels), the driver's (Triton's), and a graph's replay (one call for all its kernels).
LAUNCH_CALLS = frozenset({"cudaLaunchKernel", "cudaLaunchKernelExC", "cudaLaunchCooperativeKernel", "cuLaunchKernel",
                          "cuLaunchKernelEx", "cuLaunchCooperativeKernel", "cudaGraphLaunch", "cuGraphLaunch"})


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _engine_run(engine, prompts: list[list[int]], n_new: int) -> dict:
    """`prompts` run to completion through `engine` as Engine.generate runs them (greedy, `n_new`
    tokens each), the steps up to every request's first token (the prefill) and the decode steps
    after them timed apart: each step reads its tokens back, so the host's clock is the device's.
    {"tokens", "prefill_s", "decode_s", "decode_tokens", "decode_steps", "static_steps"}."""
    from nanofast.engine import SamplingParams

    params = SamplingParams(max_tokens=n_new, temperature=0.0)
    ids = [engine.add_request(p, params) for p in prompts]
    out: dict[int, list[int]] = {i: [] for i in ids}
    static_before = engine.stats["static_steps"]
    _sync(engine.device)
    t0 = time.perf_counter()
    t_first, decode_steps = None, 0
    while engine.has_unfinished():
        for ev in engine.step():
            out[ev.request_id].append(ev.token)
        if t_first is not None:
            decode_steps += 1
        elif all(out.values()):
            _sync(engine.device)
            t_first = time.perf_counter()
    _sync(engine.device)
    end = time.perf_counter()
    tokens = [out[i] for i in ids]
    return {"tokens": tokens, "prefill_s": t_first - t0, "decode_s": end - t_first,
            "decode_tokens": sum(len(t) - 1 for t in tokens), "decode_steps": decode_steps,
            "static_steps": engine.stats["static_steps"] - static_before}


def _launches_per_step(engine, prompts: list[list[int]], steps: int) -> dict:
    """Launch calls per decode step: `prompts` prefilled, then `steps` engine.step() calls of the
    running decode batch under torch.profiler (the last one finishes the requests), each call of
    LAUNCH_CALLS counted (a graph replay is one cudaGraphLaunch). Run after a warm-up of the same
    shapes: a capture inside the profiled steps would count its eager run. {"per_step", "by_name"
    (every profiled call named *Launch*, per step), "static_steps"}; "per_step" is None where the
    profiler recorded no launch call at all (on CPU, where nothing launches, or a profiler that saw
    no CUDA activity), never a count of 0 that was not measured."""
    from torch.profiler import ProfilerActivity, profile

    from nanofast.engine import SamplingParams

    params = SamplingParams(max_tokens=steps + 1, temperature=0.0)
    ids = {engine.add_request(p, params) for p in prompts}
    try:
        started: set[int] = set()
        while started != ids:  # the prefill: every request has its first token
            started |= {ev.request_id for ev in engine.step()}
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
        static_before = engine.stats["static_steps"]
        _sync(engine.device)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                engine.step()
            _sync(engine.device)
        if engine.has_unfinished():
            raise RuntimeError(f"{steps} steps left requests unfinished: the profiled steps were not all decode")
    finally:  # what an error left running must not join the next runs
        for i in ids:
            engine.abort(i)
    calls = Counter()
    for e in prof.key_averages():
        if "Launch" in e.key:
            calls[e.key] += e.count
    launches = sum(n for name, n in calls.items() if name in LAUNCH_CALLS)
    return {"per_step": launches / steps if calls else None,
            "by_name": {name: n / steps for name, n in sorted(calls.items())},
            "static_steps": engine.stats["static_steps"] - static_before}


def speed_decode_step(ctx: Ctx) -> dict:
    """The engine's decode, its decode-only steps replayed as CUDA graphs (Engine(decode_step=
    "graph")) against the general path ("off"): decode tokens/s and ms per decode step at batch 1
    and 64 of a d12 and a d24 model (random weights, bf16, built as the model checks build theirs),
    16-token prompts, 64 new tokens greedy, timed (median of 3) after a warm-up run of the same
    shapes that captures every graph they replay; and the launch calls per decode step of each
    (torch.profiler, LAUNCH_CALLS). The CPU's stand-in for "graph" is "eager" (the same static step
    uncaptured). Each op runs on the backend this checkout's dispatch gives the GPU ("backends").

    Correctness: every run's greedy tokens, both modes, equal the general path's. Every op is the
    same call on the same rows except the paged decode's split plan: the static step plans for its
    bucket's width, the general path from the actual lengths, so a row may get more splits (some
    empty) and its attention output a different bf16 rounding. A flipped token is reported (with
    `identical`), not assumed a bug: it asks whether the rows were near-ties. Also: the graph engine ran every timed decode step static and the
    general one none (else its times are not the graphs'). A failing check leaves `times_ms` out,
    so its summary names the failing cases; each configuration's numbers stay under "configs". A
    launch count the profiler could not take is named under "launches_not_counted"."""
    import torch

    from nanofast import dispatch, ops
    from nanofast.engine import Engine

    depths = ctx.pick((12, 24), (1, 2))
    vocab, T, hd = ctx.pick((32768, 1024, 128), (300, 48, 16))  # the model checks' vocabulary and length
    batches, max_seqs = ctx.pick(((1, 64), 64), ((1, 3), 4))  # the dry run's 3 rows: a bucket with a padding row
    prompt_len, n_new, reps, profiled = ctx.pick((16, 64, 3, 5), (5, 4, 1, 2))
    static = "graph" if ctx.device.type == "cuda" else "eager"
    g = torch.Generator().manual_seed(8)
    prompts = torch.randint(0, vocab, (max(batches), prompt_len), generator=g).tolist()
    configs, captured, not_counted, cases = {}, {}, {}, []
    for depth in depths:
        model = _model(ctx, depth, vocab, T, hd, torch.bfloat16).eval()
        runs: dict[tuple[str, int], list[dict]] = {}
        for mode in (static, "off"):
            engine = Engine(model, page_size=16, max_num_seqs=max_seqs, decode_step=mode)
            for B in batches:
                key = f"{mode} d{depth} b{B}"
                # the first run captures every graph the timed runs and the profiled steps replay
                done = runs[mode, B] = [_engine_run(engine, prompts[:B], n_new) for _ in range(1 + reps)]
                timed = sorted(done[1:], key=lambda r: r["decode_s"])[len(done[1:]) // 2]
                configs[key] = {"decode_tokens_per_s": timed["decode_tokens"] / timed["decode_s"],
                                "ms_per_decode_step": 1e3 * timed["decode_s"] / timed["decode_steps"],
                                "prefill_ms": 1e3 * timed["prefill_s"], "decode_steps": timed["decode_steps"],
                                "static_steps": [r["static_steps"] for r in done]}
                try:
                    launches = _launches_per_step(engine, prompts[:B], profiled)
                except Exception as e:  # the profiler's failure; the engine's own shows in the runs above
                    not_counted[key] = f"{type(e).__name__}: {e}"[:300]
                    continue
                if launches["per_step"] is None:
                    not_counted[key] = "the profiler recorded no launch call" + (
                        "" if ctx.device.type == "cuda" else " (CPU: nothing launches)")
                configs[key] |= {"launches_per_step": launches["per_step"], "launches_by_name": launches["by_name"],
                                 "profiled_static_steps": launches["static_steps"]}
            captured[f"{mode} d{depth}"] = engine.graphs.captures if engine.graphs else 0
            del engine
        for B in batches:
            want = runs["off", B][0]["tokens"]
            got = [r["tokens"] for mode in (static, "off") for r in runs[mode, B]]
            first = runs[static, B][1]["tokens"]
            cases.append({"case": f"d{depth} batch {B}: greedy tokens, {static} == off",
                          "ok": all(t == want for t in got),
                          "identical": sum(a == b for a, b in zip(first, want)), "requests": B})
        static_ok = all(r["static_steps"] == r["decode_steps"] for B in batches for r in runs[static, B])
        none_off = not any(r["static_steps"] for B in batches for r in runs["off", B])
        cases.append({"case": f"d{depth}: {static} ran every decode step static, off none",
                      "ok": static_ok and none_off,
                      "static_steps": {k: v["static_steps"] for k, v in configs.items() if f" d{depth} " in k}})
        del model
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    ok = all(c["ok"] for c in cases)
    speedup = {f"d{d} b{B}": configs[f"off d{d} b{B}"]["ms_per_decode_step"]
               / configs[f"{static} d{d} b{B}"]["ms_per_decode_step"] for d in depths for B in batches}
    out = {"ok": ok, "cases": cases, "configs": configs, "graphs_captured": captured,
           f"speedup_{static}_vs_off": speedup,
           "tokens_per_s": {k: v["decode_tokens_per_s"] for k, v in configs.items()},
           "launches_per_step": {k: v.get("launches_per_step") for k, v in configs.items()},
           "settings": {"depths": depths, "vocab": vocab, "seq_len": T, "head_dim": hd, "dtype": "torch.bfloat16",
                        "batches": batches, "max_num_seqs": max_seqs, "prompt_len": prompt_len, "new_tokens": n_new,
                        "timed_runs": reps, "profiled_steps": profiled, "static_mode": static},
           "backends": {op: ops.decide_backend(op, ctx.device) for op in dispatch.OPS}}
    if not_counted:
        out["launches_not_counted"] = not_counted
    if ok:
        out["times_ms"] = {k: v["ms_per_decode_step"] for k, v in configs.items()}
    return out


# --------------------------------------------------------------------------------------------
# The registry, in plan order
# --------------------------------------------------------------------------------------------
# Estimates are H100 seconds with compile time: ~1 s per Triton kernel specialisation (the guard's
# sm_90 compiles of kernel_facts run at that rate), 5-15 s per torch.compile of a small function,
# a minute or more per compiled model, plus the run itself. They are first guesses until a GPU has
# run this: each result records its "seconds"; replace an estimate with what the first run measured.

# 1. The dispatch table, op by op: every numerics check of each (op, backend), then the op's speed.
for _b, _est in (("triton", 8), ("cuda", 3)):  # the CUDA sources are prebuilt: no compile in the check
    _add("numerics", f"rms_norm[{_b}]", _est, check_rms_norm, "rms_norm", _b, {"backend": _b})
_add("numerics", "past_2^31[rms_norm,triton]", 3, check_past_2_31, "rms_norm", "triton", {"kernel": "rms_norm"})
_add("numerics", "past_2^31[rms_norm,cuda]", 3, check_past_2_31, "rms_norm", "cuda", {"kernel": "rms_norm_cuda"})
_add("speed", "rms_norm", 12, speed_rms_norm, "rms_norm", floor=("rms_norm_fwd_16384x1536", "triton"))
for _b, _est in (("triton", 6), ("cuda", 3)):
    _add("numerics", f"qk_norm_rope[{_b}]", _est, check_qk_norm_rope, "qk_norm_rope", _b, {"backend": _b})
    _add("numerics", f"past_2^31[qk_norm_rope,{_b}]", 4, check_qk_norm_rope_past_2_31, "qk_norm_rope", _b,
         {"backend": _b})
_add("speed", "qk_norm_rope", 15, speed_qk_norm_rope, "qk_norm_rope",
     floor=("qk_norm_rope_fwd_B32_T2048_H10", "triton"))
_add("numerics", "rotary[triton]", 3, check_rotary, "rotary", "triton", {"backend": "triton"})
_add("speed", "rotary", 8, speed_rotary, "rotary")
for _b, _est in (("triton", 3), ("cuda", 1.5)):
    for _g in (1, 4, 8):
        for _p in (16, 256):
            _add("numerics", f"paged_decode[{_b},q/kv={_g},page={_p}]", _est, check_paged_decode, "paged_attention",
                 _b, {"backend": _b, "group": _g, "page": _p})
    _add("numerics", f"paged_kv_write[{_b}]", 2, check_paged_kv_write, "paged_attention", _b, {"backend": _b})
    _add("numerics", f"past_2^31[paged_decode,{_b}]", 3, check_paged_decode_past_2_31, "paged_attention", _b,
         {"backend": _b})
_add("speed", "paged_decode", 15, speed_paged_decode, "paged_attention",
     floor=("paged_decode_B64_ctx2048_q32kv8", "triton"))
_add("numerics", "linear_cross_entropy[triton]", 8, check_linear_cross_entropy, "linear_cross_entropy", "triton")
_add("speed", "linear_cross_entropy", 35, speed_linear_cross_entropy, "linear_cross_entropy")  # two compiles
_add("numerics", "newton_schulz[triton]", 15, check_newton_schulz, "newton_schulz", "triton")
_add("speed", "newton_schulz", 10, speed_newton_schulz, "newton_schulz", floor=("newton_schulz_5120x1280", "triton"))
for _b, _est in (("triton", 10), ("triton_persistent", 10), ("scaled_mm", 4)):
    _add("numerics", f"fp8_gemm[{_b}]", _est, check_fp8_gemm, "fp8_linear", _b, {"backend": _b})
_add("speed", "fp8_linear", 30, speed_fp8_linear, "fp8_linear")
# 2. The model end to end.
_add("model", "train_step[compiled,triton vs torch]", 75, check_train_step)
_add("model", "engine_greedy_vs_generate", 15, check_engine)
_add("model", "fp8_training_paths", 20, check_fp8_training_paths)
# 3. The training steps.
_add("speed", "train_step[d12]", 70, speed_train_step, args={"depth": 12},
     left_out="the speedrun trains d24 (the next check); d12 is a second model compile that the 9-minute budget "
              "cannot hold beside the rest")
_add("speed", "train_step[d24]", 120, speed_train_step, args={"depth": 24})
# 4. What decides no backend: the engine's prefill, the fp8 cast, the guard's remaining floors.
_add("numerics", "paged_prefill[batched]", 4, check_paged_prefill)
_add("numerics", "quantize_fp8[triton]", 5, check_quantize_fp8)
_add("numerics", "past_2^31[quantize_fp8,triton]", 3, check_past_2_31, args={"kernel": "quantize_fp8"})
_add("speed", "fp8_gemm", 8, speed_fp8_gemm, floor=("fp8_gemm_32768x5120x1280", "triton"))
_add("speed", "quantize_fp8", 5, speed_quantize_fp8, floor=("fp8_quant_tensorwise_T_16384x6144", "triton"))
_add("speed", "muon_prologue", 5, speed_muon_prologue, floor=("muon_prologue_12x5120x1280", "triton"))
_add("speed", "paged_prefill", 5, speed_paged_prefill,
     left_out="the batched prefill decides no backend and its numerics run above; its speed is also measured by "
              "bench/test_bench_paged_attention.py on a GPU, and the 9-minute budget is full")
# 5. Hugging Face models, patched (bench/hf_speed.py): transformers and Liger-Kernel are not on a
# bare GPU machine, so this runs on request, after their wheels were carried there (bench/README.md).
_add("speed", "hf_models", 40, speed_hf_models,
     left_out="needs transformers (and Liger-Kernel for its column), which a bare GPU machine lacks: carry their "
              "wheels and run `--only hf_models` (bench/README.md)")
# 6. The engine's decode step, CUDA graphs against the general path: two model builds (d24's ~1.4B
# parameters initialised on the host first, as _model builds), the kernels' compiles at both
# widths, and per depth 2 modes x 2 batches x 4 runs of 64 tokens, the general path's d24 steps
# launch-bound.
_add("speed", "decode_step[graph vs off]", 90, speed_decode_step,
     left_out="decides no backend and the default plan's 9 minutes are full: run `--only decode_step`")


# --------------------------------------------------------------------------------------------
# The CUDA sources, built before the checks
# --------------------------------------------------------------------------------------------

def _launch_symbols(library: ctypes.CDLL) -> dict[str, int]:
    """Addresses of csrc/'s extern "C" functions in `library` (AttributeError if one is missing)."""
    from nanofast.kernels.cuda_abi import ABI, ERROR_FN

    return {name: ctypes.cast(getattr(library, name), ctypes.c_void_p).value for name in [*ABI, *ERROR_FN.values()]}


def build_cuda_library(arch: str, timeout_s: float) -> dict:
    """csrc/*.cu compiled by nvcc for `arch` (e.g. "sm_90") into one shared library, the sources in
    parallel, cached by the sources' digest (a second run on a warm machine loads it). nvcc alone
    builds it: torch's extension builder needs ninja and the pybind11 build, which a bare GPU
    machine may lack, and the kernels are called through ctypes anyway (kernels/cuda_build.py).
    Returns {"how", "path", "cached"}; raises when nvcc fails, runs past `timeout_s` or the library
    lacks a launch function."""
    from nanofast.kernels import cuda_build
    from nanofast.kernels.cuda_facts import nvcc_path

    nvcc = nvcc_path()
    src_dir = cuda_build.csrc_dir()
    sources = sorted(src_dir.glob("*.cu"))
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    flags = [*NVCC_FLAGS, f"-arch={arch}", f"-I{src_dir}"]
    digest = cuda_build.sources_digest([*sources, *cuda_build.csrc_headers(src_dir)], [*flags, version])
    library = cuda_build.cache_dir("cuda_nvcc") / f"nanofast_cuda-{arch}-{digest}.so"
    cached = library.exists()
    if not cached:
        deadline = time.monotonic() + timeout_s
        with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
            objects = [Path(tmp) / f"{s.stem}.o" for s in sources]
            _run_all([[nvcc, *flags, "-c", str(s), "-o", str(o)] for s, o in zip(sources, objects)], deadline, tmp)
            _run_all([[nvcc, f"-arch={arch}", "-shared", *map(str, objects), "-o", f"{tmp}/lib.so"]], deadline, tmp)
            os.replace(f"{tmp}/lib.so", library)  # atomic: a concurrent build of the same digest wins or loses
    _launch_symbols(ctypes.CDLL(str(library)))
    release = next((line.strip() for line in version.splitlines() if "release" in line), "nvcc")
    return {"how": f"nvcc -arch={arch} ({release})", "path": str(library), "cached": cached}


def _run_all(commands: list[list[str]], deadline: float, log_dir: str) -> None:
    """Run `commands` in parallel; RuntimeError naming the first that fails, TimeoutError (all
    killed) when they are not done by `deadline`."""
    procs = []
    for i, cmd in enumerate(commands):
        out = open(f"{log_dir}/cmd{i}.log", "w+")
        procs.append((cmd, out, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)))
    try:
        for cmd, out, p in procs:
            try:
                rc = p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"{Path(cmd[0]).name} did not finish in time: {' '.join(cmd)}") from None
            if rc != 0:
                out.seek(0)
                raise RuntimeError(f"{' '.join(cmd)} failed ({rc}):\n{out.read()[-3000:]}")
    finally:
        for _, out, p in procs:
            if p.poll() is None:
                _kill_group(p)
            out.close()


def build_cuda_backend(dry_run: bool, timeout_s: float) -> dict:
    """What the cuda backend runs on this device, built before any check so that no check spends
    its time (or its timeout) compiling: on a GPU the nvcc library of csrc/ (build_cuda_library)
    unless nanofast._C is installed; in a dry run the sources' CPU emulation (g++). {"status":
    "ready" | "failed", "how" | "reason", "path" (a library for the workers to load), "seconds"}."""
    t0 = time.monotonic()
    try:
        if dry_run:
            from nanofast.kernels import cuda_build
            from nanofast.kernels.cuda_abi import ERROR_FN

            for source in ERROR_FN:
                cuda_build.emulation_library(source)
            rec = {"status": "ready", "how": "the CPU emulation of csrc/ (g++)"}
        elif importlib.util.find_spec("nanofast._C") is not None:
            rec = {"status": "ready", "how": "nanofast._C (installed)"}
        else:
            import torch

            major, minor = torch.cuda.get_device_capability()
            rec = {"status": "ready", **build_cuda_library(f"sm_{major}{minor}", timeout_s)}
    except Exception as e:  # no nvcc, a compile error, a timeout: the cuda checks are skipped, the rest runs
        rec = {"status": "failed", "reason": f"{type(e).__name__}: {e}"[-2000:]}
    return rec | {"seconds": round(time.monotonic() - t0, 1)}


def use_cuda_library(path: str) -> None:
    """Serve the nvcc library as nanofast._C, the module kernels/cuda_build.py takes the launch
    functions' addresses from (its `symbols()`, as setup.py's build of the same sources has it)."""
    library = ctypes.CDLL(path)
    symbols = _launch_symbols(library)
    module = types.ModuleType("nanofast._C")
    module.library = library
    module.symbols = lambda: dict(symbols)
    sys.modules["nanofast._C"] = module


# --------------------------------------------------------------------------------------------
# The worker: runs checks one at a time in its own process, each result one JSON line
# --------------------------------------------------------------------------------------------

def worker_main() -> None:
    """Entry point of a worker process (started by `Worker`). stdin: a setup line, then one line
    per check {"fn": "module:qualname", "args"}; the results pipe: {"ready"} once, then per check
    {"result", "exiting"}. On a GPU a check that raises ends the worker: after an asynchronous CUDA
    fault (illegal address, device assert) every later call in this context fails too."""
    setup = json.loads(sys.stdin.readline())
    sys.path[:0] = [p for p in setup["sys_path"] if p not in sys.path]
    faulthandler.enable()  # a segfault prints the Python stack into the log the parent tails
    results = os.fdopen(setup["results_fd"], "w", buffering=1)
    kernels_importable()
    if setup["cuda_library"]:
        use_cuda_library(setup["cuda_library"])
    import torch

    ctx = Ctx(torch.device("cpu" if setup["dry_run"] else "cuda"), setup["dry_run"], setup["no_cuda_backend"],
              setup["table"])
    on_gpu = ctx.device.type == "cuda"
    if on_gpu:
        torch.zeros(1, device=ctx.device)  # the context now, so its cost is the start's, not the first check's
    results.write(json.dumps({"ready": os.getpid()}) + "\n")
    for line in sys.stdin:
        job = json.loads(line)
        module, _, qualname = job["fn"].partition(":")
        t0 = time.perf_counter()
        fatal = False
        try:
            fn = importlib.import_module(module)
            for part in qualname.split("."):
                fn = getattr(fn, part)
            out = fn(ctx, **job["args"])
            if on_gpu:  # an asynchronous fault surfaces here, in the check that caused it
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            rec = {"status": "pass" if out.get("ok", True) else "fail", **out}
        except Exception as e:  # the failure is the finding: record it and go on
            rec = {"status": "error", "error": f"{type(e).__name__}: {e}"[:500],
                   "traceback": traceback.format_exc(limit=4)[-1500:]}
            fatal = on_gpu
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        results.write(json.dumps({"result": rec, "exiting": fatal}, default=str) + "\n")
        if fatal:
            return


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL `proc` and what it started (it leads its own session: torch.compile's pool, nvcc's
    children), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _exit_reason(rc: int | None) -> str:
    if rc is not None and rc < 0:
        return f"killed by {signal.Signals(-rc).name}"
    return f"exit code {rc}"


class Worker:
    """A worker process, its results pipe read by a thread (so the parent can wait with a timeout)
    and its output appended to `log`."""

    def __init__(self, setup: dict, env: dict, log) -> None:
        read_fd, write_fd = os.pipe()
        self.proc = subprocess.Popen([sys.executable, "-c", "from bench.gpu_check import worker_main; worker_main()"],
                                     cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                     pass_fds=(write_fd,), start_new_session=True, text=True)
        os.close(write_fd)
        self.messages: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(read_fd,), daemon=True).start()
        self.send(setup | {"results_fd": write_fd})

    def _read(self, fd: int) -> None:
        with os.fdopen(fd) as results:
            for line in results:
                self.messages.put(json.loads(line))
        self.messages.put(None)  # the worker is gone

    def send(self, message: dict) -> bool:
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError):  # it died: the reader thread reports the end
            return False

    def receive(self, timeout_s: float) -> dict | None:
        """The next message; None when the worker ended; queue.Empty after `timeout_s`."""
        return self.messages.get(timeout=max(timeout_s, 0.0))

    def exit_code(self) -> int | None:
        """The exit code of a worker whose pipe closed (killed if it lingers 10 s), what it started swept."""
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        _kill_group(self.proc)
        return self.proc.returncode

    def kill(self) -> None:
        _kill_group(self.proc)

    def close(self) -> None:
        """End of input: the worker returns; one that does not within 30 s is killed."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        _kill_group(self.proc)  # also what it left running (a compile pool)


# --------------------------------------------------------------------------------------------
# The plan and the run
# --------------------------------------------------------------------------------------------

def plan(checks: list[Check], budget_s: float | None, build: bool) -> tuple[list[Check], list[Check], float]:
    """(checks that fit `budget_s` by their estimates, in order; those that do not; the estimated
    seconds of the first list with the build and one worker start). A check that does not fit costs
    nothing, so a later, shorter one may still fit, as at run time."""
    spent = WORKER_START_S + (BUILD_EST_S if build else 0.0)
    fits, over = [], []
    for c in checks:
        if budget_s is None or spent + c.est_s <= budget_s:
            fits.append(c)
            spent += c.est_s
        else:
            over.append(c)
    return fits, over, spent


def _plan_lines(fits: list[Check], over: list[Check], left_out: list[Check], planned: float, budget_s: float | None,
                build: bool) -> list[str]:
    head = (f"gpu_check plan: {len(fits)} checks, {planned:.0f} s by their H100 estimates "
            f"(worker start {WORKER_START_S:.0f} s{f', CUDA build {BUILD_EST_S:.0f} s' if build else ''}), "
            + (f"budget {budget_s:.0f} s" if budget_s is not None else "no budget (dry run)"))
    lines = [head, "  runs, in order: " + (", ".join(c.name for c in fits) or "nothing")]
    if over:
        lines.append("  will not run (over the budget by estimate): "
                     + ", ".join(f"{c.name} ({c.est_s:g} s)" for c in over))
    lines += [f"  left out of the default plan: {c.name}: {c.left_out} (--all or --only runs it)" for c in left_out]
    return lines


def _save(record: dict, out: Path | None) -> None:
    """Write the record atomically: a run killed mid-write leaves the previous complete file."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    os.replace(tmp, out)


def _tail(path: Path, offset: int, lines: int = 15) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])


def run(checks: list[Check], record: dict, out: Path | None, log_path: Path, *, dry_run: bool,
        budget_s: float | None, everything: bool = False, timeout_s: float | None = None, log=print) -> list[dict]:
    """Run `checks` in order, in worker processes, within `budget_s` (None: no budget); `record`
    (written to `out` after every step) gets "plan", "cuda_backend", "checks", "dispatch",
    "elapsed_s" and "finished". The plan is logged first. Checks with `left_out` are recorded as
    skipped unless `everything`. A check runs if its estimate (plus a worker start when none is
    running) fits what is left of the budget. Its timeout is `timeout_s` if given, else max(30 s,
    3 x its estimate) (DRY_RUN_TIMEOUT_S in a dry run), capped by what is left of the budget.
    Workers write their output to `log_path`."""
    start = time.monotonic()
    left_out = [] if everything else [c for c in checks if c.left_out]
    planned = [c for c in checks if c not in left_out]
    build = any(c.needs_cuda_backend() for c in planned)
    fits, over, estimate = plan(planned, budget_s, build)
    for line in _plan_lines(fits, over, left_out, estimate, budget_s, build):
        log(line)
    results: list[dict] = []
    record.update(budget_s=budget_s, checks=results, dispatch={}, elapsed_s=0.0, finished=False,
                  plan={"runs": [c.name for c in fits], "over_budget": [c.name for c in over],
                        "left_out": {c.name: c.left_out for c in left_out}, "estimate_s": round(estimate, 1)})
    _save(record, out)

    def left() -> float:
        return math.inf if budget_s is None else budget_s - (time.monotonic() - start)

    cuda = (build_cuda_backend(dry_run, min(TIMEOUT_FACTOR * BUILD_EST_S, left())) if build
            else {"status": "not needed", "how": "no check in this run runs the CUDA sources"})
    record["cuda_backend"] = cuda
    _save(record, out)
    log(f"cuda backend: {cuda['status']}: {cuda.get('how') or cuda.get('reason')} ({cuda.get('seconds', 0)} s)")
    no_cuda = None if cuda["status"] != "failed" else f"the CUDA sources did not build: {cuda['reason'][:300]}"
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # the log holds a crashed worker's last lines
    if dry_run:
        env["TRITON_INTERPRET"] = "1"  # before the worker imports triton
    setup = {"sys_path": sys.path, "dry_run": dry_run, "cuda_library": cuda.get("path"), "no_cuda_backend": no_cuda,
             "table": None if dry_run or out is None else str(out)}
    worker = None
    with open(log_path, "a") as log_file:
        try:
            for c in checks:
                rec = {"name": c.name, "section": c.section, "op": c.op, "backend": c.backend, "est_s": c.est_s}
                if c.floor:
                    rec["floor"] = {"name": c.floor[0], "backend": c.floor[1]}
                if c in left_out:
                    rec.update(status="skipped", reason=f"left out of the default plan: {c.left_out}")
                elif c.backend == "cuda" and no_cuda:
                    rec.update(status="skipped", reason=no_cuda)
                elif (need := c.est_s + (WORKER_START_S if worker is None else 0.0)) > left():  # as planned
                    rec.update(status="skipped", reason=f"time budget: {budget_s - left():.0f} s spent of "
                                                        f"{budget_s:.0f}, this check needs {need:g} s by estimate")
                else:
                    if worker is None:  # a start that fails is this check's result
                        worker, failed_start = _start_worker(setup, env, log_file, log_path, c, left())
                        rec.update(failed_start or {})
                    if worker is not None:
                        limit = timeout_s or (DRY_RUN_TIMEOUT_S if dry_run else max(MIN_TIMEOUT_S,
                                                                                     TIMEOUT_FACTOR * c.est_s))
                        outcome, worker = _run_one(worker, c, min(limit, left()), log_file, log_path)
                        rec.update(outcome)
                results.append(rec)
                record.update(dispatch=build_dispatch(results), elapsed_s=round(time.monotonic() - start, 1))
                _save(record, out)
                log(f"{rec['status']:8} {c.section:9} {c.name} ({rec.get('seconds', 0):.1f} s){check_summary(rec)}")
        finally:
            if worker is not None:
                worker.close()
    record.update(elapsed_s=round(time.monotonic() - start, 1), finished=True)
    _save(record, out)
    return results


def _start_worker(setup: dict, env: dict, log_file, log_path: Path, first: Check,
                  left_s: float) -> tuple[Worker | None, dict | None]:
    """(a started worker, None), or (None, the failed start as the result of `first`, the check it
    was started for)."""
    t0 = time.monotonic()
    log_file.write(f"=== worker for {first.name}\n")
    log_file.flush()
    offset = log_path.stat().st_size
    worker = Worker(setup, env, log_file)
    limit = min(WORKER_START_TIMEOUT_S, left_s)
    try:
        message = worker.receive(limit)
    except queue.Empty:
        worker.kill()
        return None, {"status": "timeout", "error": f"the worker did not start within {limit:.0f} s",
                      "output_tail": _tail(log_path, offset), "seconds": round(time.monotonic() - t0, 1)}
    if message is None:
        return None, {"status": "crashed",
                      "error": f"the worker ended while starting ({_exit_reason(worker.exit_code())})",
                      "output_tail": _tail(log_path, offset), "seconds": round(time.monotonic() - t0, 1)}
    return worker, None


def _run_one(worker: Worker, c: Check, timeout_s: float, log_file, log_path: Path) -> tuple[dict, Worker | None]:
    """(c's result, the worker if it can take the next check)."""
    t0 = time.monotonic()
    log_file.write(f"=== {c.name}\n")
    log_file.flush()
    offset = log_path.stat().st_size
    worker.send({"fn": f"{c.fn.__module__}:{c.fn.__qualname__}", "args": c.args})
    try:
        message = worker.receive(timeout_s)
    except queue.Empty:
        worker.kill()
        return ({"status": "timeout", "error": f"no result within {timeout_s:.0f} s: the worker was killed",
                 "output_tail": _tail(log_path, offset), "seconds": round(time.monotonic() - t0, 1)}, None)
    if message is None:  # segfault, abort, CUDA fault that killed the process
        return ({"status": "crashed", "error": f"the worker died ({_exit_reason(worker.exit_code())})",
                 "exit_code": worker.proc.returncode, "output_tail": _tail(log_path, offset),
                 "seconds": round(time.monotonic() - t0, 1)}, None)
    if message["exiting"]:
        worker.close()
        return message["result"], None
    return message["result"], worker


def dispatch_table(record: dict) -> dict:
    """What `nanofast.dispatch` reads from a run: its "dispatch" section, with the machine it was
    measured on (a file per GPU class in nanofast/dispatch_tables/, shipped in the package)."""
    return {"machine_class": record.get("machine_class"), "machine": record.get("machine"),
            "dispatch": record.get("dispatch", {})}


def dispatch_table_path(out_dir: Path | None, out: Path | None, default_out: Path | None, machine: str) -> Path | None:
    """Where a run writes its dispatch table: into --out-dir (dispatch_table.json, to commit as
    nanofast/dispatch_tables/<class>.json); for the default record on a GPU, straight into the
    package; beside an explicit --out as <stem>.dispatch.json."""
    if out_dir is not None:
        return out_dir / "dispatch_table.json"
    if out is None:
        return None
    if out == default_out:
        from nanofast.dispatch import TABLES

        return TABLES / f"{machine}.json"
    return out.with_name(f"{out.stem}.dispatch.json")


def build_dispatch(results: list[dict]) -> dict:
    """{op: {backend: {"ms", "ok"}}} for `nanofast.dispatch`: time from the op's speed check (only
    the backends the op can dispatch to: flash-attn or Liger timings are for the page), ok = every
    numerics check of that (op, backend) ran and passed (the vendor's, unchecked, counts as ok)."""
    from nanofast.dispatch import OPS

    table: dict[str, dict] = {}
    for r in results:
        if r["section"] == "speed" and r["op"] and r["status"] == "pass":
            for backend, ms in r["times_ms"].items():
                if backend in OPS[r["op"]].backends:
                    table.setdefault(r["op"], {})[backend] = {"ms": ms, "ok": True}
    for r in results:
        if r["section"] == "numerics" and r["op"] in table and r["backend"] in table[r["op"]]:
            entry = table[r["op"]][r["backend"]]
            entry["ok"] = entry["ok"] and r["status"] == "pass"
    return table


def set_floors(floors_doc: dict, machine: str, results: list[dict], margin: float = FLOOR_MARGIN) -> list[str]:
    """Fill the unmeasured (null) floors of `machine` in gpu_floors.json's document from the speed
    checks' fractions of peak; returns the names set. A floor already set is never moved here."""
    floors = floors_doc.setdefault("floors", {}).setdefault(machine, {})
    done = []
    for r in results:
        floor = r.get("floor")
        if r["status"] != "pass" or not floor:
            continue
        frac = r["fraction_of_peak"].get(floor["backend"])
        if frac is not None and floors.get(floor["name"]) is None:
            floors[floor["name"]] = round(margin * frac, 3)
            done.append(floor["name"])
    return done


def summary_lines(record: dict, wrote: list[Path]) -> list[str]:
    """The run in a few lines, printed last: each check that did not pass, the backend each op gets
    from this run's table, the totals."""
    from nanofast.dispatch import OPS, choose

    lines = [f"gpu_check: {r['status']:8} {r['name']}{check_summary(r)}" for r in record["checks"] if r["status"] != "pass"]
    picks = [f"{op} {choose(op, record['dispatch'].get(op))}{'' if op in record['dispatch'] else ' (unmeasured)'}"
             for op in OPS]
    lines.append("gpu_check: dispatch: " + ", ".join(picks))
    counts = status_counts(record)
    budget = "" if record["budget_s"] is None else f" of {record['budget_s']:.0f}"
    lines.append(f"gpu_check: {counts['pass']} passed, {counts['fail']} failed, {counts['error']} errors, "
                 f"{counts['crashed']} crashed, {counts['timeout']} timed out, {counts['skipped']} skipped; "
                 f"{record['elapsed_s']} s{budget}; cuda backend {record['cuda_backend']['status']}"
                 + (f"; wrote {', '.join(map(str, wrote))}" if wrote else ""))
    return lines


def _machine() -> tuple[str, dict]:
    """(the machine class: bench/conftest.py's rule, "gpu-<short name>" or "cpu-<cores>core"; the
    facts of the record). bench/conftest.py itself imports pytest, which a bare GPU machine lacks."""
    import torch

    from nanofast.common import system_info
    from nanofast.dispatch import device_class

    cls = device_class(torch.device("cuda")) if torch.cuda.is_available() else f"cpu-{os.cpu_count()}core"
    triton = _optional("triton")
    return cls, system_info() | {"triton": getattr(triton, "__version__", None), "machine_class": cls,
                                 "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter, CUDA emulation")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"seconds for the whole run, the CUDA build included (default {BUDGET_S:.0f}; dry run: none)")
    p.add_argument("--sections", default="numerics,model,speed", help="comma-separated sections to run (default all)")
    p.add_argument("--only", default=None,
                   help="comma-separated substrings: run the checks whose name has one (left-out checks too)")
    p.add_argument("--all", action="store_true", help="also run the checks the default plan leaves out")
    p.add_argument("--timeout-s", type=float, default=None,
                   help="each check's timeout (default max(30, 3 x its estimate), capped by the budget left)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=None,
                       help="the JSON written (default on a GPU: bench/baselines/<class>/gpu_check.json; "
                            "dry run: none)")
    where.add_argument("--out-dir", type=Path, default=None,
                       help="write gpu_check.json, gpu_check.log and performance.md into this folder, nothing "
                            "into the repository")
    p.add_argument("--no-page", action="store_true", help="do not regenerate bench/performance.md")
    p.add_argument("--set-floors", action="store_true", help="fill this device's null floors in gpu_floors.json")
    args = p.parse_args(argv)
    sections = args.sections.split(",")
    if not set(sections) <= {"numerics", "model", "speed"}:
        p.error(f"--sections takes numerics, model and speed, got {args.sections!r}")
    if args.budget_s is not None and args.budget_s <= 0 or args.timeout_s is not None and args.timeout_s <= 0:
        p.error("--budget-s and --timeout-s must be > 0")
    import torch

    if not args.dry_run:
        if not torch.cuda.is_available():
            print(NO_CUDA)
            return 2
        if os.environ.get("TRITON_INTERPRET") == "1":
            print("gpu_check: TRITON_INTERPRET=1 would run the interpreter on the GPU: unset it")
            return 2
    kernels_importable()
    checks = [c for c in CHECKS if c.section in sections]
    if args.only:
        keys = args.only.split(",")
        checks = [c for c in checks if any(k in c.name for k in keys)]
    if not checks:
        p.error(f"no check in sections {args.sections!r} matches --only {args.only!r}")
    machine, facts = _machine()
    default_out = None if args.dry_run else BASELINES / machine / "gpu_check.json"
    if args.out_dir:
        out, log_path = args.out_dir / "gpu_check.json", args.out_dir / "gpu_check.log"
        args.out_dir.mkdir(parents=True, exist_ok=True)
    else:
        out = args.out or default_out
        # the log beside an explicit JSON; never into bench/baselines, which is committed
        log_path = (out.with_suffix(".log") if args.out else
                    Path(tempfile.gettempdir()) / f"gpu_check-{machine}-{os.getpid()}.log")
    budget_s = args.budget_s if args.budget_s is not None else (None if args.dry_run else BUDGET_S)
    record = {"machine": facts, "machine_class": machine, "dry_run": args.dry_run, "argv": sys.argv[1:] if argv is None
              else argv}
    run(checks, record, out, log_path, dry_run=args.dry_run, budget_s=budget_s,
        everything=args.all or args.dry_run or bool(args.only), timeout_s=args.timeout_s)
    wrote = [path for path in (out, log_path) if path is not None]
    table_out = dispatch_table_path(args.out_dir, out, default_out, machine)
    if table_out is not None:
        table_out.write_text(json.dumps(dispatch_table(record), indent=1) + "\n")
        wrote.append(table_out)
    if args.out_dir:
        page = args.out_dir / "performance.md"
        page.write_text(f"# gpu_check: {machine}\n\n{gpu_check_markdown(record)}\n")
        wrote.append(page)
    if args.set_floors and not args.dry_run:
        doc = json.loads(GPU_FLOORS.read_text())
        names = set_floors(doc, machine, record["checks"])
        GPU_FLOORS.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"floors set for {machine}: {names or 'none (already set, or no peak known)'}")
    if out is not None and out == default_out and not args.no_page:
        try:  # the page reads the committed records; it needs pytest and matplotlib, which a bare machine may lack
            from bench import performance

            performance.main([])
        except Exception as e:
            print(f"gpu_check: the performance page was not regenerated ({type(e).__name__}: {e}); "
                  f"run `python -m bench.performance` where its requirements are installed")
    for line in summary_lines(record, wrote):
        print(line)
    counts = status_counts(record)
    return 0 if counts["fail"] == counts["error"] == counts["crashed"] == counts["timeout"] == 0 else 1


if __name__ == "__main__":
    # The imported module's main, not this __main__ copy's: a worker imports the checks' functions
    # by their module name, which must then be bench.gpu_check.
    from bench import gpu_check

    sys.exit(gpu_check.main())
