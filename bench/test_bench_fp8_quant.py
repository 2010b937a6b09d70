"""FP8 quantisation throughput: the Triton kernels against the torch code a user would write.

    python -m pytest bench/test_bench_fp8_quant.py --benchmark-only

On a GPU (bf16 activations, nanochat widths, 2K .. 32K tokens):
  * "tensorwise+T" (what an FP8 linear needs per operand: q and its transpose, one scale)
      - triton:         quantize_fp8(x, transpose=True): amax pass + one cast pass writing q and q_t
      - triton-delayed: the same with a given (delayed) scale: a single pass over x
      - torch:          amax = x.abs().max(); scale = amax / 448; q = (x / scale).to(fp8);
                        q_t = q.t().contiguous()       (eager, as a user writes it)
      - compile:        torch.compile of that baseline
  * "rowwise": triton vs torch (x.abs().amax(1) ...), no transpose.
extra_info records GB/s from a byte model (x read once, q and q_t written once: the floor an
ideal kernel pays, so the JIT-scaled Triton path, which reads x twice, cannot reach 100%) and the
percentage of the device's DRAM bandwidth.

On CPU only the torch reference is timed (the Triton kernels would run in the interpreter, whose
speed says nothing about them): the file still collects and runs in seconds.
"""
from __future__ import annotations

import pytest
import torch

from nanofast.kernels.fp8_quant import FP8_MAX, quantize_fp8, quantize_fp8_reference
from nanofast.kernels.registry import OPS

from bench.gpu_peaks import bandwidth_info

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
FP8 = torch.float8_e4m3fn

if GPU:
    SHAPES = [(t, d) for t in (2048, 16384, 32768) for d in (1536, 6144)]
else:
    SHAPES = [(256, 768)]
IMPLS = ["triton", "triton-delayed", "torch", "compile"]
RECIPES = ["tensorwise+T", "rowwise"]

def torch_baseline(x: torch.Tensor, recipe: str):
    """What a user writes without a kernel library (no saturation clamp: torch's e4m3fn cast
    saturates on its own)."""
    if recipe == "tensorwise+T":
        amax = x.abs().max().float()
        scale = amax / FP8_MAX[FP8]
        q = (x / scale).to(FP8)
        return q, scale, q.t().contiguous(), amax
    amax = x.abs().amax(dim=1, keepdim=True).float()
    scale = amax / FP8_MAX[FP8]
    return (x / scale).to(FP8), scale, None, amax


def make_impl(impl: str, recipe: str, delayed_scale: torch.Tensor):
    if impl == "triton":
        if recipe == "rowwise":
            return lambda x: quantize_fp8(x, FP8, recipe="rowwise", backend="triton")
        return lambda x: quantize_fp8(x, FP8, transpose=True, backend="triton")
    if impl == "triton-delayed":
        return lambda x: quantize_fp8(x, FP8, scale=delayed_scale, transpose=True, backend="triton")
    if impl == "torch":
        if not GPU:  # CPU: the library's own reference (the only implementation timed there)
            if recipe == "rowwise":
                return lambda x: quantize_fp8_reference(x, FP8, recipe="rowwise")
            return lambda x: quantize_fp8_reference(x, FP8, transpose=True)
        return lambda x: torch_baseline(x, recipe)
    if impl == "compile":
        return torch.compile(lambda x: torch_baseline(x, recipe), dynamic=False)
    raise ValueError(impl)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_bench_fp8_quant(benchmark, shape, impl, recipe):
    if not GPU and impl != "torch":
        pytest.skip(f"{impl} on CPU would run Triton's interpreter (or compile for CPU): timings say nothing about "
                    "the GPU kernel")
    if impl == "triton-delayed" and recipe == "rowwise":
        pytest.skip("delayed scaling is per-tensor only")
    tokens, d = shape
    dtype = torch.bfloat16 if GPU else torch.float32
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(tokens, d, device=DEVICE, dtype=dtype, generator=g)
    delayed = (x.float().abs().amax() / FP8_MAX[FP8]).reshape(())
    fn = make_impl(impl, recipe, delayed)
    inner = 20 if GPU else 3  # calls per timed round: launch overhead and timer resolution do not dominate

    def run():
        for _ in range(inner):
            out = fn(x)
        if GPU:
            torch.cuda.synchronize()
        return out

    q, scale, q_t, amax = run()  # warm-up: compilation / autotuning outside the timed rounds
    # The outputs are right before they are timed: Triton bitwise the reference (same scale); the
    # eager baseline divides in bf16, so it is only within fp8 rounding of the reference.
    rq, rscale, _, ramax = quantize_fp8_reference(x, FP8, recipe="rowwise" if recipe == "rowwise" else "tensorwise",
                                                  scale=delayed if impl == "triton-delayed" else None)
    assert torch.equal(amax.float(), ramax)
    if impl.startswith("triton"):
        assert torch.equal(scale, rscale) and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    else:
        torch.testing.assert_close(q.float() * scale, rq.float() * rscale, rtol=0.13, atol=1e-3)  # 1 fp8 ulp (2^-3 relative)
    if q_t is not None:
        assert torch.equal(q_t.view(torch.uint8), q.t().contiguous().view(torch.uint8))
    benchmark.group = f"fp8_quant {recipe} {tokens}x{d} {DEVICE}"
    benchmark.pedantic(run, rounds=10 if GPU else 5, iterations=1, warmup_rounds=1)
    nbytes = OPS["fp8_quant"].cost(tokens=tokens, d=d, recipe=recipe, itemsize=x.element_size())["bytes"]
    info = dict(device=torch.cuda.get_device_name(0) if GPU else "cpu", dtype=str(dtype).replace("torch.", ""),
                tokens=tokens, d=d, bytes_per_call=nbytes, calls_per_round=inner)
    info.update(bandwidth_info(benchmark, nbytes, inner))
    benchmark.extra_info.update(info)
