"""Evaluations of a chat model on tasks: multiple choice by argmax over the answer letters, and
generated answers (through the paged engine) scored by each task's own rule. ChatCORE is the mean
centred accuracy, so chance level counts as 0 whatever the number of choices.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from nanofast.common import all_sum
from nanofast.engine import Engine, SamplingParams
from nanofast.model import GPT
from nanofast.tokenizer import Tokenizer

# nanochat's ChatCORE: its five tasks, each centred on a fixed random baseline (a letter task as 1
# of 4), so the number compares with nanochat's leaderboard. SpellingBee is reported beside it.
CHATCORE_BASELINES = {"arc_easy": 0.25, "arc_challenge": 0.25, "mmlu": 0.25, "gsm8k": 0.0, "humaneval": 0.0}


def _letter_ids(tokenizer: Tokenizer, letters: list[str]) -> list[int]:
    ids = []
    for letter in letters:
        enc = tokenizer.encode(letter)
        if len(enc) != 1:
            raise ValueError(f"answer letter {letter!r} is {len(enc)} tokens with this tokenizer; "
                             "categorical evaluation needs one token per letter")
        ids.append(enc[0])
    return ids


@torch.no_grad()
def evaluate_categorical(model: GPT, tokenizer: Tokenizer, task: Any, *, max_examples: int | None = None,
                         batch_size: int = 8, rank: int = 0, world_size: int = 1) -> dict:
    """Accuracy of argmax over each question's answer letters at the position after
    <|assistant_start|>. Prompts are batched right-padded; each row reads its own last position.
    Returns {"accuracy", "centered", "n", "source"}; centred uses 1 / number of choices as chance.
    With world_size > 1 rank r takes batches r, r + world_size, ... (the batches one rank would
    form, so the same numbers) and the counts are summed over the ranks."""
    n = len(task) if max_examples is None else min(len(task), max_examples)
    device = model.cos.device
    correct, chance = 0, 0.0
    for start in range(rank * batch_size, n, world_size * batch_size):
        convs = [task[i] for i in range(start, min(n, start + batch_size))]
        prompts = [tokenizer.render_for_completion(c) for c in convs]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), tokenizer.bos_token_id, dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, :len(p)] = torch.tensor(p)
        logits = model(ids.to(device))
        last = logits[torch.arange(len(prompts)), torch.tensor([len(p) - 1 for p in prompts])]
        for conv, row in zip(convs, last):
            letters = conv["letters"]
            choice = letters[int(row[_letter_ids(tokenizer, letters)].argmax())]
            correct += bool(task.evaluate(conv, choice))
            chance += 1.0 / len(letters)
    correct, chance = all_sum([correct, chance], device, world_size)
    acc, base = correct / max(n, 1), chance / max(n, 1)
    return {"accuracy": acc, "centered": (acc - base) / (1 - base), "n": n, "source": task.source}


def generative_outcomes(model: GPT, tokenizer: Tokenizer, task: Any, *, max_examples: int | None = None,
                        max_new_tokens: int = 256, temperature: float = 0.0, engine: Engine | None = None,
                        rank: int = 0, world_size: int = 1) -> list[bool]:
    """Whether each of the first `max_examples` answers of `task`, generated (greedy by default;
    at temperature > 0 request i samples with seed i, so reruns pair up) for every prompt at once
    through the paged engine and stopped at <|assistant_end|>, is correct by the task's rule. The
    calculator tool is live, as in chat.

    With world_size > 1 (a process group formed) rank r answers examples r, r + world_size, ...
    and every rank returns the whole list, in order: the seeds follow the example, not the rank,
    so any number of ranks gives the outcomes one rank gives.
    """
    n = len(task) if max_examples is None else min(len(task), max_examples)
    engine = engine or Engine(model, tokenizer, max_num_seqs=64)
    stop = (tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_token_id)
    mine = range(rank, n, world_size)
    convs = [task[i] for i in mine]
    prompts = [tokenizer.render_for_completion(c) for c in convs]
    budget = [min(max_new_tokens, engine.max_context - len(p)) for p in prompts]
    ids = [engine.add_request(p, SamplingParams(max_tokens=b, temperature=temperature, seed=i, stop_token_ids=stop))
           for i, p, b in zip(mine, prompts, budget)]
    out: dict[int, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for ev in engine.step():
            if ev.token not in stop:
                out[ev.request_id].append(ev.token)
    outcomes = [bool(task.evaluate(c, tokenizer.decode(out[i]))) for c, i in zip(convs, ids)]
    if world_size == 1:
        return outcomes
    shares: list[list[bool] | None] = [None] * world_size
    dist.all_gather_object(shares, outcomes)
    merged = [False] * n
    for r, share in enumerate(shares):
        merged[r::world_size] = share
    return merged


def evaluate_generative(model: GPT, tokenizer: Tokenizer, task: Any, *, max_examples: int | None = None,
                        max_new_tokens: int = 256, temperature: float = 0.0, engine: Engine | None = None,
                        rank: int = 0, world_size: int = 1) -> dict:
    """Accuracy of generated answers (see `generative_outcomes`, also for the ranks).
    Returns {"accuracy", "centered" (chance 0), "n", "source"}."""
    correct = generative_outcomes(model, tokenizer, task, max_examples=max_examples, max_new_tokens=max_new_tokens,
                                  temperature=temperature, engine=engine, rank=rank, world_size=world_size)
    acc = sum(correct) / max(len(correct), 1)
    return {"accuracy": acc, "centered": acc, "n": len(correct), "source": task.source}


def paired_change(before: list[bool], after: list[bool]) -> dict:
    """Accuracy change on the same questions (paired): mean of after_i - before_i with a normal
    95% confidence interval from the per-question differences, which cancels the questions' own
    difficulty and so is far tighter than comparing two independent accuracies."""
    if len(before) != len(after) or not before:
        raise ValueError(f"before and after must be equally long and non-empty, got {len(before)} and {len(after)}")
    d = [int(a) - int(b) for b, a in zip(before, after)]
    n = len(d)
    mean = sum(d) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / max(n - 1, 1) / n)
    return {"change": mean, "ci95": [mean - 1.96 * se, mean + 1.96 * se], "n": n,
            "improved": sum(x > 0 for x in d), "worsened": sum(x < 0 for x in d)}


def evaluate_task(model: GPT, tokenizer: Tokenizer, task: Any, *, max_examples: int | None = None,
                  max_new_tokens: int = 256, rank: int = 0, world_size: int = 1) -> dict:
    """Dispatch on task.eval_type: "categorical" (letters; max_new_tokens unused) or "generative"."""
    if task.eval_type == "categorical":
        return evaluate_categorical(model, tokenizer, task, max_examples=max_examples, rank=rank, world_size=world_size)
    return evaluate_generative(model, tokenizer, task, max_examples=max_examples, max_new_tokens=max_new_tokens,
                               rank=rank, world_size=world_size)


def chatcore(results: dict[str, dict]) -> float | None:
    """nanochat's ChatCORE from `results` ({task: {"accuracy", ...}}): the mean over its five tasks
    of (accuracy - baseline) / (1 - baseline) with nanochat's baselines (0.25 for ARC and MMLU,
    whatever a question's letter count; 0 for GSM8K and HumanEval). None unless all five are there,
    as nanochat reports it: a mean over fewer tasks is another number."""
    if not all(t in results and math.isfinite(results[t]["accuracy"]) for t in CHATCORE_BASELINES):
        return None
    return sum((results[t]["accuracy"] - b) / (1 - b) for t, b in CHATCORE_BASELINES.items()) / len(CHATCORE_BASELINES)
