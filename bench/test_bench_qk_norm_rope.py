"""Fused QK-norm + rotary benchmarks (pytest-benchmark).

    python -m pytest bench/test_bench_qk_norm_rope.py --benchmark-only

GPU: the Triton kernel vs the plain-torch reference (eager) vs torch.compile(reference), and
Liger-Kernel's rope when it is installed (rope only, no norm: a lower bound on what a separate
rope kernel costs), on nanochat shapes: head_dim 128, bf16, B*T from 16 to 65536 tokens, head
counts of depth 12 / 20 / 26 (6 / 10 / 13 heads, Hq = Hk). extra_info records the bytes each call
must move (byte model below), the achieved GB/s and the % of the device's DRAM bandwidth.

CPU: only what means something there: eager vs torch.compile of the reference, measured in the
same run (their ratio is meaningful; absolute CPU times say nothing about a GPU). The Triton
kernel is skipped on CPU: it would run through the Triton interpreter (numpy, ~1 ms per program),
which measures the interpreter, not the kernel.
"""
from __future__ import annotations

import importlib

import pytest
import torch
from nanofast.kernels.registry import OPS

from bench.workloads import qk_pair_step, record_bandwidth

qnr = importlib.import_module("nanofast.kernels.qk_norm_rope")  # the module (the package re-exports the function)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

try:  # optional comparison, GPU only
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
except ImportError:
    liger_rotary_pos_emb = None

def make_inputs(B, T, H, D, dtype, device, requires_grad):
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(B, T, H, D, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)
    k = torch.randn(B, T, H, D, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)
    ang = torch.outer(torch.arange(T, dtype=torch.float32), torch.rand(D // 2, generator=g))
    return q, k, ang.cos().to(device=device, dtype=dtype), ang.sin().to(device=device, dtype=dtype)


def make_step(impl: str, q, k, cos, sin, backward: bool):
    """A callable running one forward (and backward) of `impl`, synchronised."""
    leaves = (q, k)
    if impl == "triton":
        def fwd():
            return qnr.qk_norm_rope(q, k, cos, sin, scale=1.2, backend="triton")
    elif impl == "torch_eager":
        def fwd():
            return qnr.qk_norm_rope_reference(q, k, cos, sin, scale=1.2)
    elif impl == "torch_compile":
        compiled = torch.compile(qnr.qk_norm_rope_reference, dynamic=False)

        def fwd():
            return compiled(q, k, cos, sin, scale=1.2)
    elif impl == "liger_rope_only":
        # Liger's layout: (B, H, T, D) and full-width (1, T, D) tables (HF's rotate_half style).
        ql, kl = (x.detach().transpose(1, 2).contiguous().requires_grad_(backward) for x in (q, k))
        cl, sl = (torch.cat([c, c], dim=-1)[None] for c in (cos, sin))
        leaves = (ql, kl)

        def fwd():
            return liger_rotary_pos_emb(ql, kl, cl, sl)
    else:
        raise ValueError(impl)
    return qk_pair_step(fwd, leaves, backward)


# (B, T, heads): 16 .. 65536 tokens; 6 / 10 / 13 heads = nanochat depth 12 / 20 / 26 at D = 128.
GPU_SHAPES = [(1, 16, 6), (1, 16, 13), (2, 2048, 6), (2, 2048, 13), (32, 2048, 6), (32, 2048, 10), (32, 2048, 13)]
CPU_SHAPES = [(2, 256, 6, 64), (1, 1024, 6, 128)]
IMPLS = ["triton", "torch_eager", "torch_compile", "liger_rope_only"]


def _run(benchmark, impl, B, T, H, D, dtype, backward):
    q, k, cos, sin = make_inputs(B, T, H, D, dtype, DEVICE, requires_grad=backward)
    step = make_step(impl, q, k, cos, sin, backward)
    step()  # warm-up: compilation and autotuning outside the timed rounds
    benchmark.group = f"qk_norm_rope {'fwd+bwd' if backward else 'fwd'} B{B} T{T} H{H} D{D} {DEVICE}"
    out = benchmark.pedantic(step, rounds=20 if DEVICE == "cuda" else 10, iterations=1, warmup_rounds=2)
    assert torch.isfinite(out).all()
    moved = OPS["qk_norm_rope"].cost(B=B, T=T, HQ=H, HK=H, D=D, itemsize=q.element_size(), backward=backward,
                                      norm=impl != "liger_rope_only")["bytes"]
    record_bandwidth(benchmark, moved, impl=impl, device=DEVICE, dtype=str(dtype), tokens=B * T, heads=H, head_dim=D)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="GPU shapes need a CUDA device")
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "B{}xT{}xH{}".format(*s))
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_qk_norm_rope_gpu(benchmark, impl, shape, backward):
    if impl == "liger_rope_only" and liger_rotary_pos_emb is None:
        pytest.skip("liger-kernel is not installed")
    B, T, H = shape
    _run(benchmark, impl, B, T, H, 128, torch.bfloat16, backward)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU comparison; on a GPU the GPU benchmarks run instead")
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "B{}xT{}xH{}xD{}".format(*s))
@pytest.mark.parametrize("impl", ["torch_eager", "torch_compile", "triton"])
def test_bench_qk_norm_rope_cpu(benchmark, impl, shape, backward):
    if impl == "triton":
        pytest.skip("the Triton kernel would run through the Triton interpreter on CPU (numpy, ~1 ms per "
                    "program): that times the interpreter, not the kernel; GPU timings only")
    B, T, H, D = shape
    _run(benchmark, impl, B, T, H, D, torch.float32, backward)


def test_byte_model():
    """The byte model by hand for one shape (bf16, B=2, T=3, Hq=Hk=4, D=8)."""
    n = 2 * 3 * 8  # token-heads of q and k
    fwd = 2 * n * 8 * 2 + 4 * n + 3 * 8 * 2
    bwd = 3 * n * 8 * 2 + 4 * n + 3 * 8 * 2
    cost = OPS["qk_norm_rope"].cost
    assert cost(B=2, T=3, HQ=4, HK=4, D=8, itemsize=2, backward=False)["bytes"] == fwd
    assert cost(B=2, T=3, HQ=4, HK=4, D=8, itemsize=2, backward=True)["bytes"] == fwd + bwd
    assert cost(B=2, T=3, HQ=4, HK=4, D=8, itemsize=2, backward=False, norm=False)["bytes"] == fwd - 4 * n
