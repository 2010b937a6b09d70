"""RMSNorm throughput: the Triton kernel against torch eager and torch.compile of the reference.

    python -m pytest bench/test_bench_rms_norm.py --benchmark-only

On a GPU: nanochat's shapes (B*T = 16 .. 65536 tokens x D = 768 .. 1664, bf16), forward and
forward+backward, parameter-free (nanochat's F.rms_norm) and with a learned weight (where
Liger-Kernel's LigerRMSNorm joins, if installed). extra_info records GB/s from a byte model (every
tensor read or written exactly once: the floor an ideal kernel pays) and the percentage of the
device's DRAM bandwidth.

On CPU only torch eager vs torch.compile of the reference is measured, at two shapes: the Triton
kernel would run through the interpreter (numpy, ~1 ms per row block), whose speed says nothing
about the kernel, so those cases are skipped with that reason.
"""
from __future__ import annotations

import pytest
import torch

from nanofast.kernels.rms_norm import rms_norm, rms_norm_reference
from nanofast.kernels.registry import OPS

from bench.gpu_peaks import bandwidth_info

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
EPS = 1e-6

if GPU:
    SHAPES = [(t, d) for t in (16, 2048, 16384, 65536) for d in (768, 1280, 1664)]
else:
    SHAPES = [(256, 768), (2048, 1280)]
IMPLS = ["triton", "torch", "compile", "liger"]
MODES = ["fwd", "fwd+bwd"]

def make_impl(impl: str, d: int, weight: torch.Tensor | None):
    if impl == "triton":
        return lambda x: rms_norm(x, weight, EPS, backend="triton")
    if impl == "torch":
        return lambda x: rms_norm_reference(x, weight, EPS)
    if impl == "compile":
        return torch.compile(lambda x: rms_norm_reference(x, weight, EPS), dynamic=False)
    if impl == "liger":
        from liger_kernel.transformers.rms_norm import LigerRMSNorm

        module = LigerRMSNorm(d, eps=EPS).to(DEVICE, DTYPE)
        with torch.no_grad():
            module.weight.copy_(weight)
        return module
    raise ValueError(impl)


@pytest.mark.parametrize("weight", [False, True], ids=["plain", "w"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_bench_rms_norm(benchmark, shape, impl, mode, weight):
    if not GPU and impl in ("triton", "liger"):
        pytest.skip(f"{impl} on CPU would run Triton's interpreter, whose speed says nothing about the kernel")
    if not GPU and weight:
        pytest.skip("CPU measures the parameter-free form only (nanochat's F.rms_norm)")
    if impl == "liger":
        pytest.importorskip("liger_kernel", reason="Liger-Kernel is not installed")
        if not weight:
            pytest.skip("LigerRMSNorm always has a weight: compared in the 'w' cases")
    tokens, d = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(tokens, d, device=DEVICE, dtype=DTYPE, generator=g)
    w = (1 + 0.1 * torch.randn(d, device=DEVICE, dtype=DTYPE, generator=g)) if weight else None
    dy = torch.randn(tokens, d, device=DEVICE, dtype=DTYPE, generator=g)
    fn = make_impl(impl, d, w)
    if mode == "fwd+bwd":
        x.requires_grad_(True)
        if w is not None and impl != "liger":
            w.requires_grad_(True)
    # Enough calls per timed round that launch overhead and timer resolution do not dominate.
    inner = 20 if GPU else 3

    def run():
        for _ in range(inner):
            if mode == "fwd":
                with torch.no_grad():
                    y = fn(x)
            else:
                y = fn(x)
                y.backward(dy)
                x.grad = None
        if GPU:
            torch.cuda.synchronize()
        return y

    y = run()  # warm-up: compilation / autotuning outside the timed rounds
    ref = rms_norm_reference(x.detach(), None if w is None else w.detach(), EPS)
    torch.testing.assert_close(y.detach().float(), ref.float(), rtol=2e-2, atol=2e-2)
    benchmark.group = f"rms_norm {mode} {tokens}x{d} {'w' if weight else 'plain'} {DEVICE}"
    benchmark.pedantic(run, rounds=10 if GPU else 5, iterations=1, warmup_rounds=1)
    nbytes = OPS["rms_norm"].cost(tokens=tokens, d=d, mode=mode, weight=weight, itemsize=x.element_size())["bytes"]
    info = dict(device=torch.cuda.get_device_name(0) if GPU else "cpu", dtype=str(DTYPE).replace("torch.", ""),
                tokens=tokens, d=d, bytes_per_call=nbytes, calls_per_round=inner)
    info.update(bandwidth_info(benchmark, nbytes, inner))
    benchmark.extra_info.update(info)
