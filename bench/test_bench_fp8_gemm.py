"""FP8 GEMM timings: the Triton kernels (tiled and persistent TMA) vs torch._scaled_mm (cuBLASLt) vs a
bf16 torch.mm.

Run with
    python -m pytest bench/test_bench_fp8_gemm.py --benchmark-only
GPU cases (skipped without CUDA) use nanochat's linear-layer shapes and record TFLOP/s and the
fraction of the device's dense fp8 or bf16 peak (nanofast.common.GPU_PEAKS) in extra_info. The CPU
case times only the torch reference and torch._scaled_mm's CPU fallback, so the file collects and
runs quickly without a GPU (the Triton interpreter's speed says nothing about the kernel).
"""
from __future__ import annotations

import pytest
import torch

from bench.workloads import quantize_e4m3
from nanofast.common import gpu_peak
from nanofast.kernels.fp8_gemm import fp8_gemm, fp8_gemm_reference


# --------------------------------------------------------------------------------------------
# CPU: the reference and torch._scaled_mm's CPU path (baselines, and so the file runs anywhere)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["torch", "scaled_mm"])
def test_bench_fp8_gemm_cpu(benchmark, impl):
    m, n, k = 512, 768, 768
    g = torch.Generator().manual_seed(0)
    a, sa = quantize_e4m3(torch.randn(m, k, generator=g))
    b, sb = quantize_e4m3(torch.randn(n, k, generator=g))
    out = benchmark(fp8_gemm, a, b, sa, sb, out_dtype=torch.bfloat16, backend=impl)
    benchmark.extra_info.update(shape=[m, n, k], impl=impl, device="cpu", flops=2 * m * n * k,
                                threads=torch.get_num_threads())
    assert out.shape == (m, n) and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------
# GPU: nanochat's linears, (B*T, K) x (N, K)^T
# --------------------------------------------------------------------------------------------

_ON_GPU = torch.cuda.is_available()


def _gpu_shapes() -> list[tuple[str, int, int, int]]:
    out = []
    for d in (768, 1280, 1664):
        for bt in (1 << 15, 1 << 19):
            out += [(f"qkv_o_d{d}", bt, d, d), (f"mlp_up_d{d}", bt, 4 * d, d), (f"mlp_down_d{d}", bt, d, 4 * d)]
        # lm_head: (B*T, 65536) bf16 logits are 4 GiB at 2^15 tokens already (nanochat chunks it).
        out.append((f"lm_head_d{d}", 1 << 15, 65536, d))
    return out


GPU_SHAPES = _gpu_shapes()
# triton_persistent*: the persistent TMA kernel, timed beside the pointer kernel it may replace.
GPU_IMPLS = ["triton", "triton_fast_accum", "triton_persistent", "triton_persistent_fast_accum",
             "scaled_mm_fast_accum", "bf16_mm"]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("case", GPU_SHAPES, ids=lambda c: f"{c[0]}-M{c[1]}")
def test_bench_fp8_gemm_gpu(benchmark, case, impl):
    if not _ON_GPU:
        pytest.skip("GPU timing: no CUDA device (CPU baselines are timed above)")
    name, m, n, k = case
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g)
    if impl == "bf16_mm":
        wt = w.t()

        def fn():
            return torch.mm(x, wt)
    else:
        a, sa = quantize_e4m3(x)
        b, sb = quantize_e4m3(w)
        backend = impl.removesuffix("_fast_accum")
        fast = impl.endswith("fast_accum")

        def fn():
            return fp8_gemm(a, b, sa, sb, out_dtype=torch.bfloat16, use_fast_accum=fast, backend=backend)
    for _ in range(3):  # warm-up: Triton JIT compilation stays out of the timing
        out = fn()
    torch.cuda.synchronize()

    def run():
        res = fn()
        torch.cuda.synchronize()
        return res

    out = benchmark(run)
    flops = 2 * m * n * k
    kind = "bf16" if impl == "bf16_mm" else "fp8"
    peak = gpu_peak(torch.cuda.get_device_name())
    peak_flops = None if peak is None else (peak.bf16_flops if kind == "bf16" else peak.fp8_flops)
    peak_tflops = None if peak_flops is None else peak_flops / 1e12
    benchmark.extra_info.update(case=name, shape=[m, n, k], impl=impl, device=torch.cuda.get_device_name(),
                                flops=flops, peak_tflops=peak_tflops)
    if benchmark.stats is not None:  # None under --benchmark-disable
        tflops = flops / benchmark.stats.stats.mean / 1e12
        benchmark.extra_info.update(tflops=tflops,
                                    pct_of_peak=None if peak_tflops is None else 100 * tflops / peak_tflops)
    assert out.shape == (m, n) and torch.isfinite(out[:64]).all()
    if impl in ("triton", "triton_persistent"):  # the kernel agrees with the dequantised reference on a slice of rows
        want = fp8_gemm_reference(a[:256], b, sa, sb, out_dtype=torch.float32)
        err = (out[:256].float() - want).abs().max().item()
        assert err <= 2 ** -7 * want.abs().max().item(), err  # within bf16 rounding of the largest entry
