"""MuonAdamW's step over a whole model's parameters, and its share of a training step.

The optimizer step (Nesterov, Polar Express on every block matrix, NorMuon, AdamW on embeddings)
is timed with the Newton-Schulz iteration on the torch reference and, on a GPU, on the Triton
kernels, in the same run; the training step (forward + backward + step) is timed alongside so
the optimizer's share is reported. CPU: depth 2 at T=256; GPU: nanochat's depth 12 and 20.
"""
import time

import pytest
import torch

from nanofast.common import autodetect_device, default_dtype
from nanofast.model import GPT, config_for_depth
from nanofast.optim import MuonAdamW

DEVICE = autodetect_device()
CASES = [(2, 256, 4, 8192, 64)] if DEVICE == "cpu" else [(12, 2048, 16, 32768, 128), (20, 2048, 16, 32768, 128)]
NS_BACKENDS = ["torch"] if DEVICE == "cpu" else ["torch", "triton"]


def setup(depth, T, B, vocab, head_dim, ns_backend):
    torch.manual_seed(0)
    model = GPT(config_for_depth(depth, vocab, T, head_dim=head_dim), compute_dtype=default_dtype(DEVICE)).to(DEVICE)
    model.init_weights()
    groups = model.param_groups()
    for g in groups:
        if g["kind"] == "muon":
            g["ns_backend"] = ns_backend
    optimizer = MuonAdamW(groups)
    x = torch.randint(0, vocab, (B, T), device=DEVICE)
    model(x, x).backward()  # real gradients; they stay in place for the optimizer-only timing
    return model, optimizer, x


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.expensive  # ~30 s on a 2-core CPU
@pytest.mark.parametrize("ns_backend", NS_BACKENDS)
@pytest.mark.parametrize("depth,T,B,vocab,head_dim", CASES, ids=[f"d{c[0]}" for c in CASES])
def test_optimizer_step(benchmark, depth, T, B, vocab, head_dim, ns_backend):
    model, optimizer, x = setup(depth, T, B, vocab, head_dim, ns_backend)

    def opt_step():
        optimizer.step()
        sync()

    def train_step():
        model.zero_grad(set_to_none=True)
        model(x, x).backward()
        optimizer.step()
        sync()

    benchmark.group = f"optimizer step d{depth} {DEVICE}"
    benchmark.pedantic(opt_step, rounds=5, iterations=1, warmup_rounds=1)
    opt_seconds = benchmark.stats.stats.median
    # The training step, timed the same way, for the optimizer's share of it.
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        train_step()
        times.append(time.perf_counter() - t0)
    train_seconds = sorted(times)[1]
    matrices = sum(p.numel() for g in optimizer.param_groups if g["kind"] == "muon" for p in g["params"])
    benchmark.extra_info.update(device=DEVICE, ns_backend=ns_backend, muon_params=matrices,
                                optimizer_ms=round(1000 * opt_seconds, 2), train_step_ms=round(1000 * train_seconds, 2),
                                optimizer_share_of_train_step=round(opt_seconds / train_seconds, 3))
    assert all(torch.isfinite(p).all() for p in model.parameters())
