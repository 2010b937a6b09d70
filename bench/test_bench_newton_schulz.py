"""Baseline timings of the plain-torch Newton-Schulz reference (CPU, fp32 iteration).

Later kernels are compared against these numbers. Run with
    python -m pytest bench/test_bench_newton_schulz.py --benchmark-only
extra_info records the matmul FLOPs per call, so GFLOP/s = flops / mean time.
"""
import pytest
import torch

from nanofast.kernels.newton_schulz import newton_schulz_reference

SHAPES = [(4, 256, 256), (256, 1024), (1024, 256), (8, 128, 512)]
STEPS = 5


def newton_schulz_flops(shape: tuple[int, ...], steps: int = STEPS) -> int:
    """Matmul FLOPs: per matrix and step, with s = min(m, n) and l = max(m, n), the Gram matrix
    A (2 s^2 l), A @ A (2 s^3) and B @ X (2 s^2 l); the elementwise terms are negligible."""
    *batch, m, n = shape
    count = 1
    for b in batch:
        count *= b
    s, l = min(m, n), max(m, n)
    return count * steps * (4 * s * s * l + 2 * s ** 3)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bench_newton_schulz_reference(benchmark, shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    benchmark.extra_info.update(shape=list(shape), steps=STEPS, dtype="float32", device="cpu",
                                flops=newton_schulz_flops(shape), threads=torch.get_num_threads())
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
    flops = newton_schulz_flops(shape)
    benchmark.extra_info.update(shape=list(shape), steps=STEPS, dtype="bfloat16", device=torch.cuda.get_device_name(),
                                impl=impl, flops=flops)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["tflops"] = flops / benchmark.stats.stats.mean / 1e12
    assert out.shape == G.shape and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------
# Muon's prologue: Nesterov + row equilibration + normalisation, fused vs the unfused torch steps
# --------------------------------------------------------------------------------------------

def unfused_prologue(g: torch.Tensor, m: torch.Tensor, mu: float, dtype: torch.dtype) -> torch.Tensor:
    """What a user writes without the fusion (nanofast's optimizer before it): two in-place lerps,
    row equilibration in fp32, then newton_schulz's own cast and normalisation."""
    m.lerp_(g, 1 - mu)
    u = g.lerp_(m, mu).float()
    u = u * (torch.linalg.matrix_norm(u, keepdim=True) / u.size(-2) ** 0.5 / u.norm(dim=-1, keepdim=True).clamp_min(1e-6))
    x = u.to(dtype)
    return x / (torch.linalg.matrix_norm(x.float(), keepdim=True) * 1.01 + 1e-6).to(dtype)


def prologue_bytes(shape: tuple[int, ...], out_dtype: torch.dtype) -> int:
    """The fused path's minimum traffic for fp32 g and m: read g, m; write m', u; read u; write X_0."""
    n = 1
    for s in shape:
        n *= s
    return n * (6 * 4 + torch.finfo(out_dtype).bits // 8)


def _prologue_impl(name: str, dtype: torch.dtype):
    from nanofast.kernels.newton_schulz import nesterov_normalize_

    if name == "fused_triton":
        return lambda g, m: nesterov_normalize_(g, m, 0.95, dtype=dtype, backend="triton")
    if name == "fused_torch":
        return lambda g, m: nesterov_normalize_(g, m, 0.95, dtype=dtype, backend="torch")
    if name == "unfused_compile":
        return torch.compile(lambda g, m: unfused_prologue(g, m, 0.95, dtype), dynamic=False)
    return lambda g, m: unfused_prologue(g, m, 0.95, dtype)


@pytest.mark.parametrize("impl", ["fused_torch", "unfused_eager"])
def test_bench_prologue_cpu(benchmark, impl):
    """CPU: the fused formulation in torch (row sums reused for the norm) vs the unfused steps."""
    shape = (4, 512, 2048)
    g, m = torch.randn(shape), torch.randn(shape)
    fn = _prologue_impl(impl, torch.float32)
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
    fn = _prologue_impl(impl, torch.bfloat16)
    for _ in range(3):
        fn(g, m)
    torch.cuda.synchronize()

    def run():
        out = fn(g, m)
        torch.cuda.synchronize()
        return out

    out = benchmark(run)
    nbytes = prologue_bytes(shape, torch.bfloat16)
    benchmark.extra_info.update(shape=list(shape), impl=impl, device=torch.cuda.get_device_name(), bytes=nbytes)
    if benchmark.stats is not None:
        benchmark.extra_info["gbps"] = nbytes / benchmark.stats.stats.mean / 1e9
    assert out.shape == shape and torch.isfinite(out).all()
