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

Answers whose advantage is exactly 0 (every answer of a group got the same reward: all right or
all wrong, the common case once the policy is good) add exactly 0 to the loss and to its gradient,
so the policy step forwards only the others, and packs them (`step_batch`): per question a prefix
tree (`nanofast.prefix_tree`) with the prompt once and each answer a branch from its last token,
each token at its own position attending to its ancestors, no padding. Each answer's tokens get
the log-probabilities its own padded row gives them (causal attention, no batch statistics), and
the training loop still divides by every sampled token of the step, so the step equals the full
padded batch's (`grpo_loss`, the reference) up to the GEMMs' rounding. The mismatch statistics
are measured on the trained tokens, the ones whose gradient the mismatch biases.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch

from nanofast.engine import Engine, SamplingParams
from nanofast.model import GPT
from nanofast.prefix_tree import PrefixTree, pack_prefix_tree
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
    """The inputs of one RL micro-batch: the answers whose advantage is not 0, packed as prefix trees
    (`nanofast.prefix_tree`): per question its prompt once, each answer a branch from the prompt's
    last token. The head takes only the sampled tokens. Its targets travel beside it, as the loop's
    loaders do."""
    idx: torch.Tensor              # (1, N) the packed tokens
    tree: PrefixTree               # their layout; tree.logits_rows (M,): the packed row predicting each token below
    targets: torch.Tensor          # (M,) int64 the sampled tokens of the trained answers
    advantages: torch.Tensor       # (M,) each one's answer's advantage
    engine_logprobs: torch.Tensor  # (M,) the sampler's log p of each
    tokens: int                    # M; 0 when no answer has an advantage (then one 0-weighted token stands in)
    reward: float                  # the mean reward of the batch's answers
    trained: float                 # the share of the batch's answers with advantage != 0
    packed: float                  # N over those answers' own tokens (prompt + answer each, no padding)


def step_batch(rolls: list[Rollout], device: torch.device) -> tuple[PolicyBatch, torch.Tensor]:
    """The policy step's packed batch of `rolls` and the step's targets: every sampled token of every
    answer (K,), which the training loop counts to normalise the loss, trained or not.

    Answers that follow one another with the same prompt (a question's group) share it in one tree.
    Only answers whose advantage is not 0 are packed (decided on the host, from the rewards: no
    device sync); when none has one, the first answer stands in with weight 0, so that the step
    still has a graph (every gradient 0, not missing) and statistics."""
    live = [i for i, r in enumerate(rolls) if r.advantage != 0.0] or [0]
    groups: list[list[int]] = []
    for i in live:
        if groups and rolls[groups[-1][-1]].prompt == rolls[i].prompt:
            groups[-1].append(i)
        else:
            groups.append([i])
    # row i's inputs are prompt + answer minus the last token; input t predicts answer[t - P + 1]
    idx, tree, rows = pack_prefix_tree([[(rolls[i].prompt + rolls[i].tokens)[:-1] for i in g] for g in groups],
                                       device)
    head, targets, advantages, engine_lp = [], [], [], []
    for g, group_rows in zip(groups, rows):
        for i, seq_rows in zip(g, group_rows):
            r = rolls[i]
            start = len(r.prompt) - 1
            for j, (tok, trained, lp) in enumerate(zip(r.tokens, r.trained, r.engine_logprobs)):
                if trained:
                    head.append(seq_rows[start + j])
                    targets.append(tok)
                    advantages.append(r.advantage)
                    engine_lp.append(lp)
    tokens = len(head)
    if not tokens:  # nothing sampled in the packed answers: one token, weight 0
        head, targets, advantages, engine_lp = [0], [rolls[live[0]].prompt[0]], [0.0], [0.0]
    tree.logits_rows = torch.tensor(head, device=device)
    unpacked = sum(len(rolls[i].prompt) + len(rolls[i].tokens) - 1 for i in live)
    sampled = [t for r in rolls for t, trained in zip(r.tokens, r.trained) if trained]
    batch = PolicyBatch(idx, tree, torch.tensor(targets, device=device),
                        torch.tensor(advantages, dtype=torch.float32, device=device),
                        torch.tensor(engine_lp, dtype=torch.float32, device=device), tokens,
                        sum(r.reward for r in rolls) / len(rolls),
                        sum(r.advantage != 0.0 for r in rolls) / len(rolls), tree.num_tokens / unpacked)
    return batch, torch.tensor(sampled, dtype=torch.long, device=device)


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
        batch, y = step_batch(rolls, device)
        step += 1
        yield batch, y, {"step": step}


def policy_loss(model: GPT, batch: PolicyBatch, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loop's loss_fn for RL: GRPO's loss summed over the sampled tokens of the packed
    answers (the others' advantage is 0: they add nothing; `targets`, every sampled token, is what
    the loop normalises by), and the numbers each step reports: mean reward, the share of answers
    trained, the share of their own tokens forwarded, the sampler/trainer mismatch on the
    trained tokens. The same loss and gradients as `grpo_loss` on the padded batch, up to rounding."""
    logp = -model(batch.idx, batch.targets, loss_reduction="none", kv=batch.tree).float()  # (M,) log p(target)
    loss = -(batch.advantages * logp).sum()
    with torch.no_grad():
        diff = (logp - batch.engine_logprobs)[:batch.tokens]  # log(p_trainer / p_engine)
        mismatch = (diff.abs().mean().item(), (diff.exp() - 1 - diff).mean().item()) if batch.tokens else (0.0, 0.0)
    return loss, {"reward": batch.reward, "rows_trained": batch.trained, "tokens_forwarded": batch.packed,
                  "logp_abs_diff": mismatch[0], "kl_engine_trainer": mismatch[1]}
