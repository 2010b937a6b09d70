"""FP8 vs bf16 vs fp16 where it matters: the MLP block (forward + backward, quantisation included)
and a whole training step's tokens/s, measured in the same run.

    python -m pytest bench/test_bench_fp8_linear.py --benchmark-only

GPU: nanochat's MLP at depth 12/20/26 (d = 768/1280/1664, 4d hidden) over B*T = 2^15 tokens, and a
depth-12 training step; goal on an H100: fp8 MLP fwd+bwd >= 1.5x bf16 at depth 26 (unmeasured until
a GPU run). CPU: a small MLP and a depth-2 step, FP8 through torch._scaled_mm (which emulates the
format on CPU, so these CPU numbers price the emulation, not FP8 hardware).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nanofast import ops
from nanofast.kernels import fp8_linear
from nanofast.model import GPT, config_for_depth, parse_linear_precision
from nanofast.optim import MuonAdamW
from nanofast.trainer import LossScaler, backward_and_step

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
MLP_SHAPES = [(2 ** 15, d) for d in (768, 1280, 1664)] if ON_GPU else [(512, 256)]
FP8_BACKENDS = ["triton", "triton_persistent", "scaled_mm"] if ON_GPU else ["scaled_mm"]


def _sync():
    if ON_GPU:
        torch.cuda.synchronize()


def mlp_step(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, impl: str):
    """nanochat's MLP, relu(x W1^T)^2 W2^T, forward and backward."""
    if impl == "bf16":
        h = F.linear(x, w1.to(x.dtype))
        y = F.linear(torch.relu(h).square(), w2.to(x.dtype))
    else:
        h = fp8_linear(x, w1, backend=impl)
        y = fp8_linear(torch.relu(h).square(), w2, backend=impl)
    y.float().square().mean().backward()
    _sync()


@pytest.mark.parametrize("impl", ["bf16", *FP8_BACKENDS])
@pytest.mark.parametrize("tokens,d", MLP_SHAPES, ids=lambda v: str(v))
def test_bench_mlp_fwd_bwd(benchmark, tokens, d, impl):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(tokens, d, device=DEVICE, generator=g).to(torch.bfloat16).requires_grad_()
    w1 = (torch.randn(4 * d, d, device=DEVICE, generator=g) / d ** 0.5).requires_grad_()
    w2 = (torch.randn(d, 4 * d, device=DEVICE, generator=g) / (4 * d) ** 0.5).requires_grad_()
    mlp_step(x, w1, w2, impl)  # warm-up: Triton compilation stays out of the timing
    benchmark.group = f"MLP fwd+bwd {tokens}x{d} {DEVICE}"
    benchmark.pedantic(mlp_step, args=(x, w1, w2, impl), rounds=5 if ON_GPU else 3, iterations=1)
    flops = 3 * 2 * tokens * d * 4 * d * 2  # two GEMMs, forward + two backward GEMMs each
    benchmark.extra_info.update(device=DEVICE, impl=impl, flops=flops)
    if benchmark.stats is not None:
        benchmark.extra_info["tflops"] = flops / benchmark.stats.stats.median / 1e12
    assert torch.isfinite(w1.grad).all() and torch.isfinite(x.grad.float()).all()


TRAIN = (12, 2048, 16, 32768) if ON_GPU else (2, 128, 4, 4096)  # depth, T, B, vocab


@pytest.mark.expensive  # fp16 matmuls are emulated slowly on CPU: ~30 s
@pytest.mark.parametrize("precision", ["bf16", "fp8", "fp16"])
def test_bench_train_step_by_precision(benchmark, precision):
    """Tokens/s of a whole training step (fwd, bwd, MuonAdamW) in bf16, fp8 linears (bf16 around
    them) and fp16 (with loss scaling)."""
    depth, T, B, vocab = TRAIN
    torch.manual_seed(0)
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    model = GPT(config_for_depth(depth, vocab, T, head_dim=128 if ON_GPU else 64), compute_dtype=dtype).to(DEVICE)
    model.init_weights()
    model.set_linear_precision(parse_linear_precision("fp8" if precision == "fp8" else None))
    opt = MuonAdamW(model.param_groups())
    scaler = LossScaler() if precision == "fp16" else None
    x = torch.randint(0, vocab, (B, T), device=DEVICE)
    ops.set_fp8_backend(None if ON_GPU else "scaled_mm")

    def step():
        loss = model(x, x)
        backward_and_step(loss, opt, scaler)
        model.zero_grad(set_to_none=True)
        _sync()
        return loss.item()

    try:
        step()
        benchmark.group = f"train step by precision d{depth} T{T} B{B} {DEVICE}"
        loss = benchmark.pedantic(step, rounds=3, iterations=1)
    finally:
        ops.set_fp8_backend(None)
    assert loss == loss  # finite (not NaN)
    if benchmark.stats is not None:
        benchmark.extra_info.update(device=DEVICE, precision=precision,
                                    tokens_per_second=B * T / benchmark.stats.stats.median)
