"""GRPO pieces on a tiny model: rollouts through the engine, the policy batch's alignment, the loss
and its gradient's direction, and the sampler/trainer mismatch per precision."""
from __future__ import annotations

import inspect
import json

import pytest
import torch

from nanofast.model import GPT, config_for_depth
from nanofast.rl import Rollout, grpo_loss, policy_batch, rollouts
from nanofast.tasks import load_task
from nanofast.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([inspect.getsource(m) for m in (json, inspect)], vocab_size=512)


def _model(tok: Tokenizer, dtype=torch.float32, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config_for_depth(2, tok.vocab_size, 128, head_dim=32), compute_dtype=dtype)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_rollouts_rewards_advantages_and_batch_alignment(tok):
    task = load_task("arithmetic", "train", size=6)
    model = _model(tok)
    rolls = rollouts(model, tok, task, [0, 1, 2], samples=4, max_new_tokens=12, seed=5)
    assert len(rolls) == 12
    for q in range(3):
        group = rolls[q * 4:(q + 1) * 4]
        assert sum(r.advantage for r in group) == pytest.approx(0.0, abs=1e-9)
        assert all(r.advantage == pytest.approx(r.reward - sum(g.reward for g in group) / 4) for r in group)
        assert all(r.prompt == group[0].prompt for r in group)
    x, y, adv, elp = policy_batch(rolls, tok.bos_token_id, torch.device("cpu"))
    for i, r in enumerate(rolls):
        row = r.prompt + r.tokens
        assert x[i, :len(row) - 1].tolist() == row[:-1]
        targets = [(j, t) for j, t in enumerate(y[i].tolist()) if t >= 0]
        want = [(len(r.prompt) - 1 + j, t) for j, (t, trained) in enumerate(zip(r.tokens, r.trained)) if trained]
        assert targets == want  # exactly the sampled answer tokens, at their positions
        assert adv[i].item() == pytest.approx(r.advantage)


def test_forced_tool_tokens_are_not_trained():
    r = Rollout(prompt=[1, 2], tokens=[5, 6, 7, 8], trained=[True, False, False, True],
                engine_logprobs=[-1.0, 0.0, 0.0, -2.0], reward=1.0, advantage=0.5)
    x, y, adv, elp = policy_batch([r], 0, torch.device("cpu"))
    assert x[0].tolist() == [1, 2, 5, 6, 7]
    assert y[0].tolist() == [-1, 5, -1, -1, 8]  # position 1 predicts the first answer token
    assert elp[0].tolist() == [0.0, -1.0, 0.0, 0.0, -2.0] and adv.tolist() == [0.5]


def test_one_update_moves_probability_towards_rewarded_answers(tok):
    model = _model(tok)
    task = load_task("arithmetic", "train", size=4)
    rolls = rollouts(model, tok, task, [0, 1], samples=4, max_new_tokens=8, seed=1)
    # hand out rewards so both groups have winners and losers (the policy gradient then has a sign)
    for i, r in enumerate(rolls):
        r.reward = float(i % 2)
    for q in range(2):
        group = rolls[q * 4:(q + 1) * 4]
        mean = sum(r.reward for r in group) / 4
        for r in group:
            r.advantage = r.reward - mean
    x, y, adv, elp = policy_batch(rolls, tok.bos_token_id, torch.device("cpu"))
    loss, stats = grpo_loss(model, x, y, adv, elp)
    assert stats["tokens"] == int((y >= 0).sum()) and stats["kl_engine_trainer"] < 1e-6  # fp32: same numbers
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(1e-2 * p.grad)

    def seq_logp(m):
        with torch.no_grad():
            lp = -m(x, y, loss_reduction="none").view_as(y)
        return (lp * (y >= 0)).sum(1)

    before = seq_logp(_model(tok))
    after = seq_logp(model)
    delta = after - before
    win = adv > 0
    assert delta[win].mean() > delta[~win].mean()


def test_fp16_sampler_trainer_mismatch_is_smaller_than_bf16(tok):
    """The reason for --precision fp16 (arXiv 2510.26788): measured, not assumed. Same weights, same
    rollouts protocol; the engine's per-token log-probs vs the trainer's full forward."""
    task = load_task("arithmetic", "train", size=8)
    gaps = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        model = _model(tok, dtype, seed=3)
        rolls = rollouts(model, tok, task, list(range(8)), samples=2, max_new_tokens=16, seed=9)
        x, y, adv, elp = policy_batch(rolls, tok.bos_token_id, torch.device("cpu"))
        _, stats = grpo_loss(model, x, y, adv, elp)
        gaps[dtype] = stats["logp_abs_diff"]
    assert gaps[torch.float32] < 1e-4
    assert gaps[torch.float16] < gaps[torch.bfloat16], gaps
