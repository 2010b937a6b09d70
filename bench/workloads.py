"""Workloads shared by the benchmarks (bench/test_bench_*.py) and the throughput guard (bench/guard.py,
bench/test_guard.py): the code a benchmark times, in one non-test module that both import.

* `unfused_prologue`, `prologue_impl`: Muon's prologue without the fusion, and each implementation
  the prologue benchmarks race (bench/test_bench_newton_schulz.py).
* `offline_throughput`: a list of requests through the paged engine, all at once or one at a time
  (bench/test_bench_engine.py).
* `TOKENIZER_MODULES`, `DOC_CHARS`, `tokenizer_sources`, `split_documents`: the tokenizer
  benchmark's text (bench/test_bench_tokenizer.py).
* `quantize_e4m3`: tensorwise e4m3 quantisation of a GEMM operand (bench/test_bench_fp8_gemm.py).
* `qk_pair_step`, `record_bandwidth`: the timed step of an op on a (q, k) pair, and the GB/s a
  timed op reached (bench/test_bench_qk_norm_rope.py, bench/test_bench_rotary.py).
"""
from __future__ import annotations

import importlib
import inspect
import time

import torch

# --------------------------------------------------------------------------------------------
# Muon's prologue: Nesterov + row equilibration + normalisation
# --------------------------------------------------------------------------------------------


def unfused_prologue(g: torch.Tensor, m: torch.Tensor, mu: float, dtype: torch.dtype) -> torch.Tensor:
    """What a user writes without the fusion (nanofast's optimizer before it): two in-place lerps,
    row equilibration in fp32, then newton_schulz's own cast and normalisation."""
    m.lerp_(g, 1 - mu)
    u = g.lerp_(m, mu).float()
    u = u * (torch.linalg.matrix_norm(u, keepdim=True) / u.size(-2) ** 0.5 / u.norm(dim=-1, keepdim=True).clamp_min(1e-6))
    x = u.to(dtype)
    return x / (torch.linalg.matrix_norm(x.float(), keepdim=True) * 1.01 + 1e-6).to(dtype)


def prologue_impl(name: str, dtype: torch.dtype):
    """One prologue implementation as `fn(g, m)`: "fused_triton", "fused_torch" (nesterov_normalize_
    on that backend), "unfused_compile" (torch.compile of the unfused steps), else the unfused steps."""
    from nanofast.kernels.newton_schulz import nesterov_normalize_

    if name == "fused_triton":
        return lambda g, m: nesterov_normalize_(g, m, 0.95, dtype=dtype, backend="triton")
    if name == "fused_torch":
        return lambda g, m: nesterov_normalize_(g, m, 0.95, dtype=dtype, backend="torch")
    if name == "unfused_compile":
        return torch.compile(lambda g, m: unfused_prologue(g, m, 0.95, dtype), dynamic=False)
    return lambda g, m: unfused_prologue(g, m, 0.95, dtype)


# --------------------------------------------------------------------------------------------
# The paged engine: offline throughput
# --------------------------------------------------------------------------------------------


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def offline_throughput(model, requests, one_at_a_time: bool) -> dict:
    """`requests` ([(prompt ids, SamplingParams)]) through the paged engine, all submitted at once, or
    each alone in a fresh engine (a dense per-request cache, like nanochat's engine): seconds,
    tokens generated, tokens/s and the outputs."""
    from nanofast.engine import Engine

    sync()
    t0 = time.perf_counter()
    if one_at_a_time:
        outs = [Engine(model, max_num_seqs=1).generate([p], sp)[0] for p, sp in requests]
    else:
        engine = Engine(model, max_num_seqs=len(requests), max_batch_tokens=4096)
        ids = [engine.add_request(p, sp) for p, sp in requests]
        got: dict[int, list[int]] = {i: [] for i in ids}
        while engine.has_unfinished():
            for ev in engine.step():
                got[ev.request_id].append(ev.token)
        outs = [got[i] for i in ids]
    sync()
    dt = time.perf_counter() - t0
    return {"seconds": dt, "tokens": sum(map(len, outs)), "tokens_per_s": sum(map(len, outs)) / dt, "outputs": outs}


# --------------------------------------------------------------------------------------------
# The tokenizer's text: standard-library sources cut into document-sized pieces
# --------------------------------------------------------------------------------------------

TOKENIZER_MODULES = ["textwrap", "argparse", "inspect", "dataclasses", "json.decoder", "difflib", "string",
                     "functools", "pathlib", "typing", "collections", "email.message"]
DOC_CHARS = 2000  # roughly a web-text document


def tokenizer_sources() -> list[str]:
    """The source text of each of TOKENIZER_MODULES (~1 MB together)."""
    return [open(inspect.getsourcefile(importlib.import_module(m)), encoding="utf-8").read()
            for m in TOKENIZER_MODULES]


def split_documents(text: str, chars: int = DOC_CHARS) -> list[str]:
    return [text[i:i + chars] for i in range(0, len(text), chars)]


# --------------------------------------------------------------------------------------------
# FP8 GEMM operands
# --------------------------------------------------------------------------------------------

E4M3 = torch.float8_e4m3fn


def quantize_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensorwise e4m3 quantisation: (x / s).to(e4m3), s = amax / 448 (fp32 scalar)."""
    scale = (x.abs().amax().float() / torch.finfo(E4M3).max).clamp_min(1e-12)
    return (x.float() / scale).to(E4M3), scale


# --------------------------------------------------------------------------------------------
# Memory-bound ops on a (q, k) pair: the timed step and its bandwidth
# --------------------------------------------------------------------------------------------

def qk_pair_step(fwd, leaves: tuple, backward: bool):
    """A callable running `fwd()` -> (q_out, k_out), then (if `backward`) the gradient into
    `leaves` for fixed random upstream gradients, then a device sync; returns q_out."""
    grads = None

    def step():
        nonlocal grads
        qo, ko = fwd()
        if backward:
            if grads is None:
                grads = (torch.randn_like(qo), torch.randn_like(ko))
            # autograd.grad, not .backward(): no .grad accumulation kernels inside the timed region
            torch.autograd.grad((qo, ko), leaves, grads)
        sync()
        return qo

    return step


def record_bandwidth(benchmark, moved: int, **info) -> None:
    """Put the median's GB/s for `moved` bytes (and its share of the device's DRAM peak) with
    `info` into the benchmark's extra_info; nothing under --benchmark-disable (nothing timed)."""
    if benchmark.stats is None:
        return
    from bench.gpu_peaks import peak_bandwidth_gbps

    gbps = moved / benchmark.stats.stats.median / 1e9
    peak = peak_bandwidth_gbps()
    benchmark.extra_info.update(**info, bytes=moved, gb_per_s=round(gbps, 2),
                                pct_of_peak_bandwidth=None if peak is None else round(100 * gbps / peak, 1))
