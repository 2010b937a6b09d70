"""GRPO pieces on a tiny model: rollouts through the engine, the policy batch's alignment, the loss
and its gradient's direction, and the sampler/trainer mismatch per precision."""
from __future__ import annotations

import inspect
import json
import math

import pytest
import torch

from nanofast import ops
from nanofast.model import GPT, config_for_depth
from nanofast.rl import Rollout, grpo_loss, policy_batch, policy_loss, rollouts, step_batch
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
    summed, _ = grpo_loss(model, x, y, adv, elp, loss_reduction="sum")
    torch.testing.assert_close(summed, loss * int((y >= 0).sum()))
    with pytest.raises(ValueError, match="loss_reduction must be 'mean' or 'sum'"):
        grpo_loss(model, x, y, adv, elp, loss_reduction="none")
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


def _regroup(rolls: list[Rollout], rewards: list[float], samples: int) -> None:
    for r, reward in zip(rolls, rewards):
        r.reward = reward
    for q in range(0, len(rolls), samples):
        group = rolls[q:q + samples]
        for r in group:
            r.advantage = r.reward - sum(g.reward for g in group) / samples


@pytest.mark.parametrize("mixed", [(0,), (2,), (0, 2)])
def test_the_policy_step_packs_the_answers_with_advantage_and_its_update_is_the_padded_batchs(tok, mixed):
    """A group whose answers all got the same reward adds exactly 0: the policy step packs only the
    other groups' answers, each group's prompt once (nanofast.prefix_tree), and its loss and every
    gradient equal the full padded batch's up to the GEMMs' rounding. The step's targets are every
    sampled token, which the training loop counts to normalise."""
    task = load_task("arithmetic", "train", size=6)
    model = _model(tok)
    rolls = rollouts(model, tok, task, [0, 1, 2], samples=4, max_new_tokens=10, seed=2)
    rewards = [float(q in mixed and s % 2) if q in mixed else float(q == 1) for q in range(3) for s in range(4)]
    _regroup(rolls, rewards, 4)
    batch, y = step_batch(rolls, torch.device("cpu"))
    live = [i for i in range(12) if i // 4 in mixed]
    x, y_full, adv, elp = policy_batch(rolls, tok.bos_token_id, torch.device("cpu"))
    assert sorted(y.tolist()) == sorted(y_full[y_full >= 0].tolist())
    assert batch.tokens == int((y_full[live] >= 0).sum()) and batch.trained == len(live) / 12
    own = sum(len(rolls[i].prompt) + len(rolls[i].tokens) - 1 for i in live)  # their rows' tokens, no padding
    shared = sum(len(rolls[i].prompt) for i in live) - sum(len(rolls[4 * q].prompt) for q in mixed)  # repeated prompts
    assert batch.idx.size(1) <= own - shared and batch.packed == batch.idx.size(1) / own

    seen = []

    def spy(inputs, targets, **kw):
        seen.append(tuple(inputs.shape))
        return model(inputs, targets, **kw)

    loss, stats = policy_loss(spy, batch, y)
    assert seen == [tuple(batch.idx.shape)] and stats["rows_trained"] == batch.trained
    assert stats["tokens_forwarded"] == batch.packed
    loss.backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    full, full_stats = grpo_loss(model, x, y_full, adv, elp, loss_reduction="sum")
    full.backward()
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():  # atol: a gradient that cancels to ~0 (backout_lambda's ~3e-7)
        torch.testing.assert_close(packed[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert any(g.abs().max() > 0 for g in packed.values())
    # the mismatch statistics are over the trained tokens: a sampler 0.25 nats off reads as such
    batch.engine_logprobs += 0.25
    _, stats = policy_loss(model, batch, y)
    assert stats["logp_abs_diff"] == pytest.approx(0.25, abs=1e-5)
    assert stats["kl_engine_trainer"] == pytest.approx(math.exp(-0.25) - 1 + 0.25, abs=1e-5)


def test_a_batch_without_advantage_forwards_one_answer_with_zero_gradients(tok):
    task = load_task("arithmetic", "train", size=4)
    model = _model(tok)
    rolls = rollouts(model, tok, task, [0, 1], samples=3, max_new_tokens=6, seed=4)
    _regroup(rolls, [1.0, 1.0, 1.0, 0.0, 0.0, 0.0], 3)
    batch, y = step_batch(rolls, torch.device("cpu"))
    assert batch.idx.size(1) == len(rolls[0].prompt) + len(rolls[0].tokens) - 1 and batch.trained == 0.0
    assert y.numel() == sum(sum(r.trained) for r in rolls)
    loss, stats = policy_loss(model, batch, y)
    loss.backward()
    assert loss.item() == 0.0 and stats["rows_trained"] == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_answers_whose_tokens_were_all_forced_train_nothing(tok):
    model = _model(tok)
    rolls = [Rollout(prompt=[1, 2, 3], tokens=[5, 6], trained=[False, False], engine_logprobs=[0.0, 0.0],
                     reward=r, advantage=a) for r, a in ((1.0, 0.5), (0.0, -0.5))]
    batch, y = step_batch(rolls, torch.device("cpu"))
    assert batch.tokens == 0 and y.numel() == 0 and batch.idx.tolist() == [[1, 2, 3, 5]]  # both inputs, once
    loss, stats = policy_loss(model, batch, y)
    loss.backward()
    assert loss.item() == 0.0 and stats["logp_abs_diff"] == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def _token_mismatch(model: GPT, tok: Tokenizer, task, questions: int, max_new_tokens: int, seed: int = 9
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """|logp_trainer - logp_engine| of the sampled tokens: (per rollout, its first token's: the
    logits of the prompt's prefill), (per rollout with more, the mean over its other tokens: decode steps)."""
    rolls = rollouts(model, tok, task, list(range(questions)), samples=4, max_new_tokens=max_new_tokens, seed=seed)
    x, y, _, engine_lp = policy_batch(rolls, tok.bos_token_id, torch.device("cpu"))
    with torch.no_grad():
        logp = -model(x, y, loss_reduction="none").view_as(y).float()
    gap = (logp - engine_lp).abs()
    first, rest = [], []
    for row, mask in zip(gap, y >= 0):
        cols = mask.nonzero()[:, 0]
        first.append(row[cols[0]])
        if len(cols) > 1:  # a rollout that stopped at its first token has no decode step
            rest.append(row[cols[1:]].mean())
    return torch.stack(first), torch.stack(rest)


def test_fp16_sampler_trainer_mismatch_is_smaller_than_bf16(tok, monkeypatch):
    """The reason for --rl-dtype fp16 (arXiv 2510.26788), on the path a GPU takes. There the engine
    decodes with nanofast's paged kernel and the trainer attends with flash-attn (SDPA here): both
    round the softmax probabilities to the compute dtype before the P @ V product, but over
    different tiles and running maxima, so their logits differ by rounding in the compute dtype,
    ~8x finer in fp16 (11-bit significand) than in bf16 (8-bit). The engine's paged attention runs
    that kernel here (the Triton interpreter), the rest of both on torch. Each rollout's mean gap
    over its decoded tokens is one observation (tokens of one rollout are correlated, rollouts are
    not); a Welch 95% interval for the difference of the means must exclude 0. Measured on a 2-core
    CPU: means 2.1e-3 (bf16) vs 2.9e-4 (fp16) per token, the difference 15 standard errors from 0
    (7 with another model seed)."""
    task = load_task("arithmetic", "train", size=2)
    orig = ops.op_backend
    monkeypatch.setattr(ops, "op_backend", lambda op, x: "triton" if op == "paged_attention" else orig(op, x))
    gaps = {dtype: _token_mismatch(_model(tok, dtype, seed=3), tok, task, questions=2, max_new_tokens=12)[1]
            for dtype in (torch.bfloat16, torch.float16)}
    bf16, fp16 = gaps[torch.bfloat16], gaps[torch.float16]
    diff = bf16.mean() - fp16.mean()
    se = (bf16.var() / bf16.numel() + fp16.var() / fp16.numel()).sqrt()
    assert diff - 1.96 * se > 0, (bf16.mean().item(), fp16.mean().item(), se.item())


def test_engine_on_torch_computes_what_the_trainer_computes(tok):
    """With every op on torch (CPU) the engine's prefill (all of a step's chunks in one SDPA) agrees
    with the trainer's full forward up to fp32 accumulation order: the first sampled token's gap
    measured ~2e-7 in bf16 and fp16 (one SDPA call per chunk, which took another CPU kernel, gave
    5e-4 in bf16). The decode steps' gap is then no longer a matter of the compute dtype's
    rounding (~7e-5 bf16, ~9e-5 fp16 measured), so fp16 has nothing to remove on this path. The
    bounds leave room for a CPU whose GEMMs block differently by row count (rounding flips at the
    decode steps' level, ~1e-4) and stay below the per-chunk path's 5e-4."""
    task = load_task("arithmetic", "train", size=8)
    first, rest = _token_mismatch(_model(tok, torch.float32, seed=3), tok, task, questions=8, max_new_tokens=32)
    assert first.mean() < 1e-5 and rest.mean() < 1e-5  # same maths in fp32: only summation order differs
    for dtype in (torch.bfloat16, torch.float16):
        first, rest = _token_mismatch(_model(tok, dtype, seed=3), tok, task, questions=8, max_new_tokens=32)
        assert first.mean() < 2e-4 and rest.mean() < 5e-3, (dtype, first.mean().item(), rest.mean().item())
