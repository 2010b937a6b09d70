"""Training-step throughput: forward + backward + MuonAdamW step on a fixed small config.

Runs unchanged on CPU and GPU (the device is picked automatically). Eager and torch.compile'd
steps are measured in the same run, so the compiled/eager ratio is meaningful even on a noisy
machine; tokens/s (and MFU on a GPU with a known peak) go into extra_info.
"""
import pytest
import torch

from nanofast.common import autodetect_device, default_dtype, peak_flops
from nanofast.model import GPT, config_for_depth
from nanofast.optim import MuonAdamW

DEVICE = autodetect_device()
# CPU: a depth-2 model at T=256 keeps a round under a second; GPU: nanochat's depth 12 at T=2048.
DEPTH, T, B, VOCAB = (2, 256, 4, 8192) if DEVICE == "cpu" else (12, 2048, 16, 32768)


def make_step(compiled: bool):
    torch.manual_seed(0)
    cfg = config_for_depth(DEPTH, VOCAB, T, head_dim=64 if DEVICE == "cpu" else 128)
    model = GPT(cfg, compute_dtype=default_dtype(DEVICE)).to(DEVICE)
    model.init_weights()
    optimizer = MuonAdamW(model.param_groups())
    run = torch.compile(model, dynamic=False) if compiled else model
    x = torch.randint(0, VOCAB, (B, T), device=DEVICE)

    def step():
        loss = run(x, x)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return loss.item()

    step()  # warm-up (and compilation) outside the timed rounds
    return step, model


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.expensive)],
                         ids=["eager", "compiled"])  # compiling takes ~10-30 s on a 2-core CPU
def test_train_step(benchmark, compiled):
    step, model = make_step(compiled)
    benchmark.group = f"train step d{DEPTH} T{T} B{B} {DEVICE}"
    loss = benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    assert torch.isfinite(torch.tensor(loss))
    seconds = benchmark.stats.stats.median
    tokens_per_second = B * T / seconds
    peak = peak_flops(DEVICE)
    benchmark.extra_info.update(device=DEVICE, tokens_per_second=round(tokens_per_second),
                                mfu_percent=None if peak is None else 100 * model.flops_per_token() * tokens_per_second / peak)
