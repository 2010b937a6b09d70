"""The engine's sampler: every row of a decode step at once (nanofast.sampling, counter-based
streams) against what it replaced and what a user writes by hand, a loop over the rows with a
torch.Generator per request (top-k, top-p by sort, torch.multinomial), in the same run.

    python -m pytest bench/test_bench_sampling.py --benchmark-only

Rows: the engine's decode batch sizes (1, 8, 32, 64) at nanochat's vocabulary (65536 on a GPU,
32768 on CPU), temperature 0.8 with top-k 50 and top-p 0.9 on every row (the sort runs), and
temperature 1.0 alone (no sort).
"""
from __future__ import annotations

import pytest
import torch

from nanofast.sampling import sample, seed_halves

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
VOCAB = 65536 if GPU else 32768
BATCHES = (1, 8, 32, 64)
SETTINGS = {"t0.8-k50-p0.9": (0.8, 50, 0.9), "t1.0": (1.0, 0, 1.0)}


def per_row(logits: torch.Tensor, gens: list[torch.Generator], temperature: float, top_k: int, top_p: float):
    """One row at a time, a Generator each: the loop the batched sampler replaced."""
    out = []
    for row, gen in zip(logits, gens):
        row = row / temperature
        if top_k:
            kth = torch.topk(row, top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if top_p < 1.0:
            probs, order = torch.sort(torch.softmax(row, -1), descending=True)
            drop = (probs.cumsum(0) - probs) >= top_p
            row = row.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        out.append(torch.multinomial(torch.softmax(row, -1), 1, generator=gen))
    return torch.cat(out).tolist()


@pytest.mark.parametrize("impl", ["batched", "per_row"])
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("rows", BATCHES)
def test_bench_sampling(benchmark, rows, setting, impl):
    temperature, top_k, top_p = SETTINGS[setting]
    logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(0)).to(DEVICE) * 3
    benchmark.group = f"sampling {rows}x{VOCAB} {setting}"
    if impl == "per_row":
        gens = [torch.Generator(device=DEVICE).manual_seed(i) for i in range(rows)]
        benchmark(per_row, logits, gens, temperature, top_k, top_p)
        return
    seeds, draws = seed_halves(list(range(rows)), DEVICE), torch.zeros(rows, dtype=torch.int64, device=DEVICE)
    t = torch.full((rows,), temperature, device=DEVICE)
    k = torch.full((rows,), top_k, dtype=torch.int64, device=DEVICE)
    p = torch.full((rows,), top_p, device=DEVICE)
    filtered = bool(top_k) or top_p < 1.0
    benchmark(lambda: sample(logits, t, k, p, seeds, draws, filtered=filtered, candidates=top_k or None).tolist())


@pytest.mark.parametrize("impl", ["ops.softcap_logits", "tanh"])
@pytest.mark.parametrize("rows", BATCHES)
def test_bench_softcap(benchmark, rows, impl):
    """The logit softcap of a decode step's rows (inference): nanofast.ops.softcap_logits (on CPU
    through sigmoid) against softcap * tanh(logits / softcap) as written, in place as the op does."""
    from nanofast.ops import softcap_logits

    logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(0)).to(DEVICE) * 20
    fn = softcap_logits if impl == "ops.softcap_logits" else lambda x, c=15.0: x.div(c).tanh_().mul_(c)
    benchmark.group = f"softcap {rows}x{VOCAB} fp32 (inference)"
    with torch.inference_mode():
        torch.testing.assert_close(fn(logits), 15 * torch.tanh(logits / 15), rtol=0, atol=1e-5)
        benchmark(fn, logits)
