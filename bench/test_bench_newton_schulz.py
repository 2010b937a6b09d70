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
