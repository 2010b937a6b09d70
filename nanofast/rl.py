"""Reinforcement learning on tasks with checkable answers (GSM8K-style): nanochat's simplified GRPO.

RL trains through the one training loop (`nanofast.trainer.train`): `rollout_batches` is its
loader, `policy_loss` its loss. Per step, on-policy: every question is answered `samples` times by
the current model through the paged engine; each answer gets the task's reward; advantage =
reward minus the mean reward of its question (no std normalisation, no KL term, no clipping: one
update per batch of fresh samples); the loss is -sum(advantage * log p(token)) over the sampled
tokens, divided by their number over every rank (token-level normalisation). Calculator output
forced in by the engine is not the policy's choice: masked out.

Sampler/trainer mismatch: the engine (paged attention, one token at a time) and the trainer (full
sequence forward) compute the same distribution with different kernels and rounding. On a GPU
both attention kernels round the softmax probabilities to the compute dtype, over different
tiles: in bf16 that gap is large enough to bias the policy gradient (arXiv 2510.26788); fp16's
10-bit mantissa shrinks it (~7x measured through the paged decode kernel, tests/test_rl.py).
Each step reports mean |logp_engine - logp_trainer| and the KL(engine || trainer) estimated on
the sampled tokens (k3: E[r - 1 - log r], r = p_trainer / p_engine).

Rows whose advantage is exactly 0 (every answer of a group got the same reward: all right or all
wrong, the common case once the policy is good) add exactly 0 to the loss and to its gradient, so
the policy step forwards only the others: the same update for a fraction of the work. Each row's
forward depends on that row alone (causal attention, no batch statistics), and the training loop
still divides by every sampled token of the step, so the step equals the full batch's up to the
GEMMs' rounding. The mismatch statistics are then measured on the rows that are trained, the ones
whose gradient the mismatch biases.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch

from nanofast.engine import Engine, SamplingParams
from nanofast.model import GPT
from nanofast.tokenizer import Tokenizer


@dataclass
class Rollout:
    prompt: list[int]
    tokens: list[int]          # the answer, as generated (stop token included)
    trained: list[bool]        # sampled by the policy (False: forced calculator output)
    engine_logprobs: list[float]
    reward: float
    advantage: float = 0.0


def rollouts(model: GPT, tokenizer: Tokenizer, task: Any, indices: list[int], samples: int, *, max_new_tokens: int,
             temperature: float = 1.0, seed: int = 0) -> list[Rollout]:
    """`samples` answers to each task[i], i in `indices`, with rewards and GRPO advantages."""
    engine = Engine(model, tokenizer, max_num_seqs=max(1, len(indices) * samples))
    stop = (tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_token_id)
    requests = []
    for qi, i in enumerate(indices):
        conv = task[i]
        prompt = tokenizer.render_for_completion(conv)
        for s in range(samples):
            params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=seed + qi * samples + s,
                                    stop_token_ids=stop)
            requests.append((engine.add_request(prompt, params), conv, prompt))
    events: dict[int, list] = {rid: [] for rid, _, _ in requests}
    was_training = model.training
    model.eval()
    while engine.has_unfinished():
        for ev in engine.step():
            events[ev.request_id].append(ev)
    model.train(was_training)
    out = []
    for rid, conv, prompt in requests:
        evs = events[rid]
        text = tokenizer.decode([e.token for e in evs if e.token not in stop])
        out.append(Rollout(prompt, [e.token for e in evs], [not e.forced for e in evs],
                           [e.logprob if e.logprob is not None else 0.0 for e in evs], task.reward(conv, text)))
    for q in range(len(indices)):
        group = out[q * samples:(q + 1) * samples]
        mean = sum(r.reward for r in group) / len(group)
        for r in group:
            r.advantage = r.reward - mean
    return out


def policy_batch(rolls: list[Rollout], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor,
                                                                                    torch.Tensor, torch.Tensor]:
    """Right-padded (N, T) inputs and targets (-1 except on sampled answer tokens), per-row
    advantages (N,) and the engine's log-probs aligned with the targets (N, T)."""
    rows = [r.prompt + r.tokens for r in rolls]
    width = max(map(len, rows)) - 1
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), -1, dtype=torch.long)
    engine_lp = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (r, row) in enumerate(zip(rolls, rows)):
        x[i, :len(row) - 1] = torch.tensor(row[:-1])
        start = len(r.prompt) - 1  # the target at position start is the first answer token
        for j, (tok, trained, lp) in enumerate(zip(r.tokens, r.trained, r.engine_logprobs)):
            if trained:
                y[i, start + j] = tok
                engine_lp[i, start + j] = lp
    adv = torch.tensor([r.advantage for r in rolls], dtype=torch.float32)
    return x.to(device), y.to(device), adv.to(device), engine_lp.to(device)


def grpo_loss(model: GPT, x: torch.Tensor, y: torch.Tensor, advantages: torch.Tensor,
              engine_logprobs: torch.Tensor, loss_reduction: str = "mean") -> tuple[torch.Tensor, dict]:
    """The policy-gradient loss and the sampler/trainer mismatch stats. "mean": token-level
    normalised over this batch's sampled tokens; "sum": summed, for the training loop to
    normalise over the step's tokens on every rank."""
    logp = -model(x, y, loss_reduction="none").view_as(y).float()  # log p(target), 0 where y == -1
    mask = y >= 0
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
    loss = -(advantages[:, None] * logp * mask).sum()
    if loss_reduction == "mean":
        loss = loss / mask.sum().clamp_min(1)
    with torch.no_grad():
        diff = (logp - engine_logprobs)[mask]  # log(p_trainer / p_engine)
        stats = {"logp_abs_diff": diff.abs().mean().item() if diff.numel() else 0.0,
                 "kl_engine_trainer": (diff.exp() - 1 - diff).mean().item() if diff.numel() else 0.0,
                 "tokens": int(mask.sum())}
    return loss, stats


@dataclass
class PolicyBatch:
    """The inputs of one RL micro-batch (its targets travel beside it, as the loop's loaders do)."""
    x: torch.Tensor                # (N, T) prompts + sampled answers, right-padded
    advantages: torch.Tensor       # (N,)
    engine_logprobs: torch.Tensor  # (N, T) the sampler's log p of each target, 0 elsewhere
    reward: float                  # the mean reward of the batch's answers
    rows: torch.Tensor             # (M,) int64, the rows the policy step forwards: advantage != 0 (row 0 if none)
    width: int                     # the longest of those rows: positions past it are padding for all of them
    trained: float                 # the share of the batch's rows with advantage != 0


def step_batch(rolls: list[Rollout], pad_id: int, device: torch.device) -> tuple[PolicyBatch, torch.Tensor]:
    """The policy step's batch of `rolls` and its targets (N, T): every row, so that the training
    loop counts every sampled token, with the rows to forward, those whose advantage is not 0."""
    x, y, advantages, engine_lp = policy_batch(rolls, pad_id, device)
    # Decided on the host, from the rewards: no device sync. One row stays when no row counts,
    # so that the step still has a graph (every gradient 0, not missing) and statistics.
    live = [i for i, r in enumerate(rolls) if r.advantage != 0.0]
    rows = live or [0]
    width = max(len(rolls[i].prompt) + len(rolls[i].tokens) for i in rows) - 1
    return (PolicyBatch(x, advantages, engine_lp, sum(r.reward for r in rolls) / len(rolls),
                        torch.tensor(rows, device=device), width, len(live) / len(rolls)), y)


def rollout_batches(model: GPT, tokenizer: Tokenizer, task: Any, *, start_step: int, questions: int, samples: int,
                    max_new_tokens: int, seed: int, rank: int, world_size: int,
                    device: torch.device) -> Iterator[tuple[PolicyBatch, torch.Tensor, dict]]:
    """RL's loader for the training loop: per step, this rank's share of `questions` questions of
    `task` (consecutive, wrapping around), answered `samples` times each by the current `model`, as
    (PolicyBatch, targets, {"step": steps done}). Sampled lazily, so each batch comes from the policy
    the previous step left (on-policy). Step k's questions and sampling seeds depend only on k and
    the rank: a resumed run (`start_step`) draws what the uninterrupted one would have."""
    per_rank = max(1, questions // world_size)
    step = start_step
    while True:
        first = (step * questions + rank * per_rank) % len(task)
        indices = [(first + i) % len(task) for i in range(per_rank)]
        rolls = rollouts(model, tokenizer, task, indices, samples, max_new_tokens=max_new_tokens,
                         seed=seed + step * 7919 + rank)
        batch, y = step_batch(rolls, tokenizer.bos_token_id, device)
        step += 1
        yield batch, y, {"step": step}


def policy_loss(model: GPT, batch: PolicyBatch, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loop's loss_fn for RL: GRPO's loss summed over the sampled tokens, forwarding
    only `batch.rows` (the others' advantage is 0: they add nothing), and the numbers each step
    reports (mean reward, the share of rows trained, the sampler/trainer mismatch on those rows)."""
    rows, width = batch.rows, batch.width
    loss, stats = grpo_loss(model, batch.x[rows, :width], targets[rows, :width], batch.advantages[rows],
                            batch.engine_logprobs[rows, :width], loss_reduction="sum")
    return loss, {"reward": batch.reward, "rows_trained": batch.trained,
                  "logp_abs_diff": stats["logp_abs_diff"], "kl_engine_trainer": stats["kl_engine_trainer"]}
