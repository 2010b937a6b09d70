"""Rotary embedding (HF's rotate_half conventions) benchmarks (pytest-benchmark).

    python -m pytest bench/test_bench_rotary.py --benchmark-only

GPU: the Triton kernel vs HF's formula in plain torch (eager: what an HF model runs; the reference
is that formula, bit for bit transformers' `apply_rotary_pos_emb`) vs torch.compile of it, and
Liger-Kernel's `liger_rotary_pos_emb` when it is installed (the same conventions: a like-for-like
kernel comparison), on Llama 3 8B's attention: head_dim 128, 32 q heads and 8 kv heads, bf16,
HF's layout ((B, H, T, D) views transposed from the projections) and (B, T, D) tables, B*T from 16
to 65536 tokens. extra_info records the bytes each call must move (the op's byte model,
kernels/rotary.py `cost`), the achieved GB/s and the % of the device's DRAM bandwidth.

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

rot = importlib.import_module("nanofast.kernels.rotary")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

try:  # optional comparison, GPU only
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
except ImportError:
    liger_rotary_pos_emb = None


def make_inputs(B, T, HQ, HK, D, dtype, device, requires_grad):
    """q (B, HQ, T, D), k (B, HK, T, D) as HF makes them (transposed views of (B, T, H, D)
    projections, the views being the leaves' layout) and Llama-style (B, T, D) tables."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(B, T, HQ, D, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(B, T, HK, D, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
    inv_freq = 1.0 / 500_000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    ang = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)
    ang = torch.cat([ang, ang], dim=-1)[None].expand(B, T, D)
    cos, sin = (t.to(device=device, dtype=dtype) for t in (ang.cos(), ang.sin()))
    return q.requires_grad_(requires_grad), k.requires_grad_(requires_grad), cos, sin


def make_step(impl: str, q, k, cos, sin, backward: bool):
    """A callable running one forward (and backward) of `impl`, synchronised."""
    if impl == "triton":
        def fwd():
            return rot.apply_rotary_pos_emb(q, k, cos, sin, backend="triton")
    elif impl == "torch_eager":
        def fwd():
            return rot.apply_rotary_pos_emb_reference(q, k, cos, sin)
    elif impl == "torch_compile":
        compiled = torch.compile(rot.apply_rotary_pos_emb_reference, dynamic=False)

        def fwd():
            return compiled(q, k, cos, sin)
    elif impl == "liger":
        def fwd():
            return liger_rotary_pos_emb(q, k, cos, sin)
    else:
        raise ValueError(impl)
    return qk_pair_step(fwd, (q, k), backward)


# (B, T): 16 .. 65536 tokens at Llama 3 8B's heads (32 q / 8 kv of 128).
GPU_SHAPES = [(1, 16), (1, 2048), (8, 2048), (32, 2048)]
GPU_HEADS = (32, 8, 128)
CPU_SHAPES = [(2, 256, 8, 2, 64), (1, 1024, 8, 2, 128)]
IMPLS = ["triton", "torch_eager", "torch_compile", "liger"]


def _run(benchmark, impl, B, T, HQ, HK, D, dtype, backward):
    q, k, cos, sin = make_inputs(B, T, HQ, HK, D, dtype, DEVICE, requires_grad=backward)
    step = make_step(impl, q, k, cos, sin, backward)
    step()  # warm-up: compilation and autotuning outside the timed rounds
    benchmark.group = f"rotary {'fwd+bwd' if backward else 'fwd'} B{B} T{T} Hq{HQ} Hk{HK} D{D} {DEVICE}"
    out = benchmark.pedantic(step, rounds=20 if DEVICE == "cuda" else 10, iterations=1, warmup_rounds=2)
    assert torch.isfinite(out).all()
    moved = OPS["rotary"].cost(B=B, T=T, HQ=HQ, HK=HK, D=D, itemsize=q.element_size(), backward=backward)["bytes"]
    record_bandwidth(benchmark, moved, impl=impl, device=DEVICE, dtype=str(dtype), tokens=B * T, q_heads=HQ,
                     kv_heads=HK, head_dim=D)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="GPU shapes need a CUDA device")
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "B{}xT{}".format(*s))
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_rotary_gpu(benchmark, impl, shape, backward):
    if impl == "liger" and liger_rotary_pos_emb is None:
        pytest.skip("liger-kernel is not installed")
    B, T = shape
    _run(benchmark, impl, B, T, *GPU_HEADS, torch.bfloat16, backward)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU comparison; on a GPU the GPU benchmarks run instead")
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "B{}xT{}xHq{}xHk{}xD{}".format(*s))
@pytest.mark.parametrize("impl", ["torch_eager", "torch_compile", "triton"])
def test_bench_rotary_cpu(benchmark, impl, shape, backward):
    if impl == "triton":
        pytest.skip("the Triton kernel would run through the Triton interpreter on CPU (numpy, ~1 ms per "
                    "program): that times the interpreter, not the kernel; GPU timings only")
    _run(benchmark, impl, *shape, torch.float32, backward)


def test_byte_model():
    """The byte model by hand for one shape (bf16, B=2, T=3, Hq=4, Hk=2, D=8)."""
    n = 2 * 3 * (4 + 2) * 8  # elements of q and k
    tables = 2 * (2 * 3) * 8 * 2  # cos and sin: one (D,) row per token, bf16
    fwd = 2 * n * 2 + tables
    cost = OPS["rotary"].cost
    assert cost(B=2, T=3, HQ=4, HK=2, D=8) == {"bytes": fwd, "flops": 3 * n}
    # the backward reads dy and the tables, writes dx: the forward's traffic again, never q or k
    assert cost(B=2, T=3, HQ=4, HK=2, D=8, backward=True) == {"bytes": 2 * fwd, "flops": 6 * n}
    # (T, D) tables shared by the batch: T rows; fp32 tables: 4 bytes each; position ids: 8 bytes per token
    assert cost(B=2, T=3, HQ=4, HK=2, D=8, batched_tables=False)["bytes"] == 2 * n * 2 + 2 * 3 * 8 * 2
    assert cost(B=2, T=3, HQ=4, HK=2, D=8, table_itemsize=4)["bytes"] == 2 * n * 2 + 2 * tables
    assert cost(B=2, T=3, HQ=4, HK=2, D=8, position_ids=True)["bytes"] == fwd + 8 * 2 * 3
