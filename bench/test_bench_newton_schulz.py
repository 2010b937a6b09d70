"""Baseline timings of the plain-torch Newton-Schulz reference (CPU, fp32 iteration).

Later kernels are compared against these numbers. Run with
    python -m pytest bench/test_bench_newton_schulz.py --benchmark-only
extra_info records the matmul FLOPs per call, so GFLOP/s = flops / mean time.
"""
import pytest
import torch

from bench.workloads import prologue_impl
from nanofast.kernels.newton_schulz import newton_schulz_reference, prologue_cost
from nanofast.kernels.registry import OPS

SHAPES = [(4, 256, 256), (256, 1024), (1024, 256), (8, 128, 512)]
STEPS = 5


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bench_newton_schulz_reference(benchmark, shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    benchmark.extra_info.update(shape=list(shape), steps=STEPS, dtype="float32", device="cpu",
                                flops=OPS["newton_schulz"].cost(shape=shape, steps=STEPS)["flops"], threads=torch.get_num_threads())
    out = benchmark(newton_schulz_reference, G, STEPS)
    assert out.shape == G.shape and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------
# GPU: the full 5-step iteration, Triton kernels vs the torch reference (eager and compiled)
# --------------------------------------------------------------------------------------------

_ON_GPU = torch.cuda.is_available()
# nanochat's matrix shapes (attention d x d, MLP 4d x d and d x 4d) for depth 12 .. 26, and 4096^2.
GPU_SHAPES = [s for d in (768, 1280, 1536, 1664) for s in ((d, d), (4 * d, d), (d, 4 * d))] + [(4096, 4096)]
IMPLS = ["triton", "torch_eager", "torch_compile"]


def _gpu_impl(name: str):
    from nanofast.kernels.newton_schulz import newton_schulz

    if name == "triton":
        return lambda G: newton_schulz(G, STEPS, backend="triton", dtype=torch.bfloat16)
    if name == "torch_eager":
        return lambda G: newton_schulz_reference(G, STEPS, dtype=torch.bfloat16)
    return torch.compile(lambda G: newton_schulz_reference(G, STEPS, dtype=torch.bfloat16), dynamic=False)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bench_newton_schulz_gpu(benchmark, shape, impl):
    if not _ON_GPU:
        pytest.skip("GPU timing: no CUDA device (the Triton kernels would run through the interpreter, "
                    "whose speed says nothing about the GPU; CPU torch baselines are timed above)")
    G = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(0))
    fn = _gpu_impl(impl)
    for _ in range(3):  # warm-up: Triton JIT compilation and torch.compile tracing stay out of the timing
        fn(G)
    torch.cuda.synchronize()

    def run():
        out = fn(G)
        torch.cuda.synchronize()
        return out

    out = benchmark(run)
    # TFLOP/s counted with the dense reference's FLOPs (the symmetric kernels do fewer, so this is
    # the speed-up-relevant "effective" rate, comparable across implementations).
    flops = OPS["newton_schulz"].cost(shape=shape, steps=STEPS)["flops"]
    benchmark.extra_info.update(shape=list(shape), steps=STEPS, dtype="bfloat16", device=torch.cuda.get_device_name(),
                                impl=impl, flops=flops)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["tflops"] = flops / benchmark.stats.stats.mean / 1e12
    assert out.shape == G.shape and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------
# Muon's prologue: Nesterov + row equilibration + normalisation, fused vs the unfused torch steps
# (the implementations: bench/workloads.py)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["fused_torch", "unfused_eager"])
def test_bench_prologue_cpu(benchmark, impl):
    """CPU: the fused formulation in torch (row sums reused for the norm) vs the unfused steps."""
    shape = (4, 512, 2048)
    g, m = torch.randn(shape), torch.randn(shape)
    fn = prologue_impl(impl, torch.float32)
    out = benchmark(fn, g, m)
    benchmark.extra_info.update(shape=list(shape), impl=impl, device="cpu", threads=torch.get_num_threads())
    assert out.shape == shape and torch.isfinite(out).all()


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fused_triton", "unfused_eager", "unfused_compile"])
@pytest.mark.parametrize("shape", [(12, 1280, 1280), (12, 5120, 1280), (8, 4096, 4096)],
                         ids=lambda s: "x".join(map(str, s)))
def test_bench_prologue_gpu(benchmark, shape, impl):
    if not _ON_GPU:
        pytest.skip("GPU timing: no CUDA device")
    g = torch.randn(shape, device="cuda")
    m = torch.randn(shape, device="cuda")
    fn = prologue_impl(impl, torch.bfloat16)
    for _ in range(3):
        fn(g, m)
    torch.cuda.synchronize()

    def run():
        out = fn(g, m)
        torch.cuda.synchronize()
        return out

    out = benchmark(run)
    nbytes = prologue_cost(shape, out_itemsize=2)["bytes"]
    benchmark.extra_info.update(shape=list(shape), impl=impl, device=torch.cuda.get_device_name(), bytes=nbytes)
    if benchmark.stats is not None:
        benchmark.extra_info["gbps"] = nbytes / benchmark.stats.stats.mean / 1e9
    assert out.shape == shape and torch.isfinite(out).all()
