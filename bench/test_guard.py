"""The throughput regression guard: `pytest bench -m guard` (CI runs it on the CPU).

* Same-run ratios (bench/guard.py's RATIO_CASES): fused vs unfused, batched vs one at a time,
  compiled vs eager, interleaved repetitions, medians, each against a floor.
* The machine-code facts of every kernel config (bench/kernel_facts.py) against the committed
  bench/baselines/kernel_facts.json: no spills, registers within max(8, 10%) of the table, no lost
  HGMMA/QGMMA/HMMA, no lost 128-bit / cp.async / TMA memory access.
* With a GPU only: each kernel's fraction of the device's peak (bandwidth or FLOP/s) against the
  floors in bench/baselines/gpu_floors.json (null until the first GPU run: reported, not checked).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from nanofast.common import peak_flops
from nanofast.kernels.registry import OPS

from bench import guard
from bench.kernel_facts import TABLE, collect, load_table

pytestmark = pytest.mark.guard
GPU_FLOORS = Path(__file__).resolve().parent / "baselines" / "gpu_floors.json"


@pytest.mark.parametrize("name", list(guard.RATIO_CASES))
def test_ratio(name, guard_record):
    case = guard.RATIO_CASES[name]
    try:
        result = guard.check_ratio(case)
    except guard.GuardFailure as e:
        guard_record({"kind": "ratio", "name": name, "floor": case.floor, "failed": str(e)})
        raise
    guard_record({"kind": "ratio", "floor": case.floor, **result.as_dict()})
    print(result.describe(), f"(floor {case.floor:.2f}x)")


def test_kernel_facts():
    table = load_table(TABLE)
    current = collect(cuda=not table.get("notes"))  # the table was made without nvcc: compare like with like
    problems = guard.check_kernel_facts(current["kernels"], table["kernels"])
    header = (f"{len(problems)} kernel-facts problem(s) (table: triton {table['versions'].get('triton')}, "
              f"nvcc {table['versions'].get('nvcc')}; now: triton {current['versions'].get('triton')}, "
              f"nvcc {current['versions'].get('nvcc')}):\n")
    assert not problems, header + "\n".join(problems)


# --------------------------------------------------------------------------------------------
# GPU: fraction of peak
# --------------------------------------------------------------------------------------------

def _cuda_median_seconds(fn, reps: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _peaks() -> tuple[float | None, float | None]:
    """(DRAM bytes/s, dense bf16 FLOP/s) of this GPU (None when unknown)."""
    from bench.gpu_peaks import peak_bandwidth_gbps

    gbps = peak_bandwidth_gbps()
    return (gbps * 1e9 if gbps else None), peak_flops("cuda")


def _peak_case(name: str) -> guard.PeakResult:
    """One kernel at a representative nanochat shape: (call, bytes, FLOPs) -> its PeakResult."""
    bw, flop_peak = _peaks()
    if name == "rms_norm_fwd_16384x1536":
        from nanofast.kernels.rms_norm import rms_norm

        x = torch.randn(16384, 1536, device="cuda", dtype=torch.bfloat16)
        fn, nbytes, flops, bound = lambda: rms_norm(x, None, 1e-6, backend="triton"), \
            OPS["rms_norm"].cost(tokens=16384, d=1536, mode="fwd")["bytes"], 0, "memory"
    elif name == "qk_norm_rope_fwd_B32_T2048_H10":
        from bench.test_bench_qk_norm_rope import make_inputs, qnr

        q, k, cos, sin = make_inputs(32, 2048, 10, 128, torch.bfloat16, "cuda", requires_grad=False)
        fn, nbytes, flops, bound = lambda: qnr.qk_norm_rope(q, k, cos, sin, scale=1.2, backend="triton"), \
            OPS["qk_norm_rope"].cost(B=32, T=2048, HQ=10, HK=10, D=128)["bytes"], 0, "memory"
    elif name == "paged_decode_B64_ctx2048_q32kv8":
        from bench.test_bench_paged_attention import make_inputs, pa

        args = make_inputs(64, 2048, 32, 8, 128)
        fn, nbytes, flops, bound = lambda: pa.paged_decode_attention(*args, backend="triton"), \
            OPS["paged_attention"].cost(seq_lens=[2048] * 64, hq=32, hkv=8, d=128)["bytes"], 0, "memory"
    elif name == "fp8_quant_tensorwise_T_16384x6144":
        from bench.test_bench_fp8_quant import FP8
        from nanofast.kernels.fp8_quant import quantize_fp8

        x = torch.randn(16384, 6144, device="cuda", dtype=torch.bfloat16)
        fn, nbytes, flops, bound = lambda: quantize_fp8(x, FP8, transpose=True, backend="triton"), \
            OPS["fp8_quant"].cost(tokens=16384, d=6144, recipe="tensorwise+T")["bytes"], 0, "memory"
    elif name == "muon_prologue_12x5120x1280":
        from bench.workloads import prologue_impl
        from nanofast.kernels.newton_schulz import prologue_cost

        g, m = torch.randn(12, 5120, 1280, device="cuda"), torch.randn(12, 5120, 1280, device="cuda")
        impl = prologue_impl("fused_triton", torch.bfloat16)
        fn, nbytes, flops, bound = lambda: impl(g, m), prologue_cost((12, 5120, 1280))["bytes"], 0, "memory"
    elif name == "newton_schulz_5120x1280":
        from bench.test_bench_newton_schulz import STEPS
        from nanofast.kernels.newton_schulz import newton_schulz

        G = torch.randn(5120, 1280, device="cuda", dtype=torch.bfloat16)
        fn, nbytes, flops, bound = lambda: newton_schulz(G, STEPS, backend="triton", dtype=torch.bfloat16), \
            0, OPS["newton_schulz"].cost(shape=(5120, 1280), steps=STEPS)["flops"], "compute"
    elif name == "fp8_gemm_32768x5120x1280":
        from bench.workloads import quantize_e4m3
        from nanofast.kernels.fp8_gemm import fp8_gemm

        a, sa = quantize_e4m3(torch.randn(32768, 1280, device="cuda", dtype=torch.bfloat16))
        b, sb = quantize_e4m3(torch.randn(5120, 1280, device="cuda", dtype=torch.bfloat16))
        fn = lambda: fp8_gemm(a, b, sa, sb, out_dtype=torch.bfloat16, backend="triton")  # noqa: E731
        cost = OPS["fp8_gemm"].cost(m=32768, n=5120, k=1280)
        nbytes, flops, bound = cost["bytes"], cost["flops"], "compute"
        flop_peak = peak_flops("cuda", "fp8")  # an fp8 GEMM is held to the fp8 peak
    else:
        raise ValueError(name)
    seconds = _cuda_median_seconds(fn)
    return guard.PeakResult(name, seconds, nbytes, flops, bw, flop_peak, bound)


PEAK_CASES = ["rms_norm_fwd_16384x1536", "qk_norm_rope_fwd_B32_T2048_H10", "paged_decode_B64_ctx2048_q32kv8",
              "fp8_quant_tensorwise_T_16384x6144", "muon_prologue_12x5120x1280", "newton_schulz_5120x1280",
              "fp8_gemm_32768x5120x1280"]


@pytest.mark.gpu
@pytest.mark.parametrize("name", PEAK_CASES)
def test_peak_fraction(name, guard_record):
    from bench.conftest import machine_class

    result = _peak_case(name)
    floors = json.loads(GPU_FLOORS.read_text())["floors"].get(machine_class(), {})
    floor = floors.get(name)
    frac = result.fraction
    guard_record({"kind": "peak", "name": name, "bound": result.bound, "seconds": result.seconds,
                  "bytes": result.bytes, "flops": result.flops, "fraction_of_peak": frac, "floor": floor})
    if frac is None:
        pytest.skip(f"{name}: the peak of {torch.cuda.get_device_name()} is unknown; {1e6 * result.seconds:.1f} us")
    if floor is None:
        pytest.skip(f"{name}: no floor for {machine_class()} yet (unmeasured until the first GPU run); "
                    f"measured {100 * frac:.1f}% of peak {result.bound} throughput")
    guard.check_peak_fraction(result, floor)
