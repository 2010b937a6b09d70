"""The decode step's lm_head on CPU: `nanofast.ops.linear` (which computes a few rows times a large
weight as (W @ x^T)^T when autograd is off) against F.linear (x @ W^T), in the same run.

    python -m pytest bench/test_bench_decode_linear.py --benchmark-only

Shape: the lm_head of issue 17's comparison (vocab 32768 x 256, fp32) times 1, 8 or 32 rows, one
per decoding sequence. extra_info records the weight's GB/s (32 MiB read per call). CPU only: on a
GPU ops.linear is F.linear.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nanofast import ops

VOCAB, DIM = 32768, 256


@pytest.mark.parametrize("rows", [1, 8, 32])
@pytest.mark.parametrize("impl", ["ops.linear", "F.linear"])
def test_decode_lm_head(benchmark, impl, rows):
    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(VOCAB, DIM, generator=g), torch.randn(rows, DIM, generator=g)
    fn = ops.linear if impl == "ops.linear" else F.linear
    benchmark.group = f"decode lm_head {rows} rows x {VOCAB}x{DIM} fp32 (cpu)"
    with torch.inference_mode():
        torch.testing.assert_close(fn(x, weight), F.linear(x, weight), rtol=1e-4, atol=1e-4)
        benchmark.pedantic(fn, args=(x, weight), rounds=20, iterations=1, warmup_rounds=3)
    benchmark.extra_info.update(weight_gb_per_s=weight.numel() * 4 / benchmark.stats.stats.median / 1e9)
