"""The language-model head's loss, fused and chunked (linear_softcap_cross_entropy) against the
unfused reference a user would otherwise write (F.linear -> fp32 softcap -> F.cross_entropy),
forward + backward, measured in the same run.

    python -m pytest bench/test_bench_linear_cross_entropy.py --benchmark-only

CPU: N=4096 tokens, C=256, V=32768, fp32, the torch step (marked expensive: measured 2.6 s per
fused call, 3.2 s unfused, on 2 cores with another process competing; ~30 s for the pair). GPU
(marked gpu): N=16384, C=1280, V=65536, bf16, the Triton kernel; not run yet (no GPU run has been
made). extra_info: the logits bytes each path holds (computed: the
unfused (N, V) logits in the compute dtype plus their fp32 capped copy, against one (R, V) chunk)
and, on a GPU, the measured peak of torch.cuda.max_memory_allocated above the inputs. On CPU the
peak is not measured (tracemalloc does not see torch's allocator).
"""
from __future__ import annotations

import pytest
import torch

from nanofast.kernels import linear_softcap_cross_entropy, linear_softcap_cross_entropy_reference
from nanofast.kernels.linear_cross_entropy import default_chunk_rows

GPU = torch.cuda.is_available()
CASES = [
    pytest.param(("cpu", 4096, 256, 32768, torch.float32), marks=pytest.mark.expensive, id="cpu-4096x256-V32768-fp32"),
    pytest.param(("cuda", 16384, 1280, 65536, torch.bfloat16), marks=pytest.mark.gpu,
                 id="gpu-16384x1280-V65536-bf16"),
]
IMPLS = ["fused", "unfused"]


def _logits_bytes(impl: str, N: int, V: int, dtype: torch.dtype, device: torch.device) -> int:
    """Bytes of logits-shaped buffers alive at the peak, by construction (not measured)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if impl == "unfused":
        return N * V * (itemsize + 4)  # logits in the compute dtype + the fp32 softcapped copy
    rows = default_chunk_rows(N, V, device)
    temps = 0 if device.type == "cuda" else 2 * 4  # the torch step's fp32 capped logits and tanh
    return rows * V * (itemsize + temps)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_bench_linear_cross_entropy(benchmark, case, impl):
    device, N, C, V, dtype = case
    dev = torch.device(device)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(N, C, device=device, dtype=dtype, generator=g).requires_grad_()
    w = (torch.randn(V, C, device=device, generator=g) / C ** 0.5 * 4).requires_grad_()  # fp32 master
    t = torch.randint(0, V, (N,), device=device, generator=g)
    fn = linear_softcap_cross_entropy if impl == "fused" else linear_softcap_cross_entropy_reference

    def run():
        loss = fn(x, w, t, 15.0)  # nanochat's softcap, explicit (the entry has no default)
        loss.backward()
        x.grad = w.grad = None
        if GPU:
            torch.cuda.synchronize()
        return loss

    loss = run()  # warm-up
    with torch.no_grad():
        want = linear_softcap_cross_entropy_reference(x, w, t, 15.0)
    torch.testing.assert_close(loss.detach(), want, rtol=2e-2, atol=2e-2)
    peak = None
    if GPU:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        peak = torch.cuda.max_memory_allocated() - base
    benchmark.group = f"linear_cross_entropy fwd+bwd {N}x{C} V={V} {str(dtype).replace('torch.', '')} {device}"
    benchmark.pedantic(run, rounds=10 if GPU else 3, iterations=1, warmup_rounds=0)
    unfused = _logits_bytes("unfused", N, V, dtype, dev)
    mine = _logits_bytes(impl, N, V, dtype, dev)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(0) if GPU else "cpu", tokens=N, C=C, V=V,
        dtype=str(dtype).replace("torch.", ""), chunk_rows=default_chunk_rows(N, V, dev) if impl == "fused" else None,
        logits_bytes=mine, logits_bytes_avoided=unfused - mine, peak_bytes_above_inputs=peak)
