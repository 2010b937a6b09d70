"""RL's policy step, forward and backward: the answers packed as prefix trees (`nanofast.rl.step_batch`
+ `policy_loss`, what the RL stage runs) against the same answers as right-padded rows
(`policy_batch` + `grpo_loss`, what a GRPO loop otherwise runs), in the same run, equal loss first.

    python -m pytest bench/test_bench_policy_step.py --benchmark-only

Shape: the cpu preset's model (depth 4, head 64, vocab 8192, fp32) and an RL step of its size:
8 questions x 8 answers, 38-token prompts, answers of 20 to 60 tokens, every answer with an
advantage (the packing's share of the saving; skipping zero-advantage answers is the other).
extra_info records the tokens each forwards.
"""
from __future__ import annotations

import random

import pytest
import torch

from nanofast.model import GPT, config_for_depth
from nanofast.rl import Rollout, grpo_loss, policy_batch, policy_loss, step_batch

QUESTIONS, SAMPLES, PROMPT, VOCAB = 8, 8, 38, 8192


def _rollouts() -> list[Rollout]:
    rng = random.Random(0)
    rolls = []
    for _ in range(QUESTIONS):
        prompt = [rng.randrange(VOCAB) for _ in range(PROMPT)]
        for s in range(SAMPLES):
            n = rng.randrange(20, 61)
            rolls.append(Rollout(prompt, [rng.randrange(VOCAB) for _ in range(n)], [True] * n, [0.0] * n,
                                 reward=float(s % 2), advantage=0.5 if s % 2 else -0.5))
    return rolls


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_policy_step(benchmark, layout):
    torch.manual_seed(0)
    model = GPT(config_for_depth(4, VOCAB, 512, head_dim=64))
    model.init_weights()
    rolls = _rollouts()
    packed, y = step_batch(rolls, torch.device("cpu"))
    x, y_full, adv, elp = policy_batch(rolls, 0, torch.device("cpu"))

    def step(which: str) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = (policy_loss(model, packed, y) if which == "packed"
                else grpo_loss(model, x, y_full, adv, elp, loss_reduction="sum"))[0]
        loss.backward()
        return loss.detach()

    torch.testing.assert_close(step("packed"), step("padded"), rtol=1e-4, atol=1e-4)
    benchmark.group = f"RL policy step fwd+bwd, {QUESTIONS}x{SAMPLES} answers, d4 v{VOCAB} fp32 (cpu)"
    benchmark.pedantic(step, args=(layout,), rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(tokens=packed.idx.size(1) if layout == "packed" else x.numel())
