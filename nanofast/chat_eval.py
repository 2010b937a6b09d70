"""Evaluations of a chat model on tasks: multiple choice by argmax over the answer letters, and
generated answers (through the paged engine) scored by each task's own rule. ChatCORE is the mean
centred accuracy, so chance level counts as 0 whatever the number of choices.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from nanofast.engine import Engine, SamplingParams
from nanofast.model import GPT
from nanofast.tokenizer import Tokenizer

# nanochat's ChatCORE tasks.
CHATCORE_TASKS = ("arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval", "spellingbee")


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
                         batch_size: int = 8) -> dict:
    """Accuracy of argmax over each question's answer letters at the position after
    <|assistant_start|>. Prompts are batched right-padded; each row reads its own last position.
    Returns {"accuracy", "centered", "n", "source"}; centred uses 1 / number of choices as chance."""
    n = len(task) if max_examples is None else min(len(task), max_examples)
    device = model.cos.device
    correct, chance = 0, 0.0
    for start in range(0, n, batch_size):
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
    acc, base = correct / max(n, 1), chance / max(n, 1)
    return {"accuracy": acc, "centered": (acc - base) / (1 - base), "n": n, "source": task.source}


def evaluate_generative(model: GPT, tokenizer: Tokenizer, task: Any, *, max_examples: int | None = None,
                        max_new_tokens: int = 256, temperature: float = 0.0, engine: Engine | None = None) -> dict:
    """Accuracy of answers generated (greedy by default) for every prompt at once through the paged
    engine, stopping at <|assistant_end|>; the calculator tool is live, as in chat.
    Returns {"accuracy", "centered" (chance 0), "n", "source"}."""
    n = len(task) if max_examples is None else min(len(task), max_examples)
    engine = engine or Engine(model, tokenizer, max_num_seqs=64)
    stop = (tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_token_id)
    convs = [task[i] for i in range(n)]
    prompts = [tokenizer.render_for_completion(c) for c in convs]
    budget = [min(max_new_tokens, engine.max_context - len(p)) for p in prompts]
    ids = [engine.add_request(p, SamplingParams(max_tokens=b, temperature=temperature, seed=i, stop_token_ids=stop))
           for i, (p, b) in enumerate(zip(prompts, budget))]
    out: dict[int, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for ev in engine.step():
            if ev.token not in stop:
                out[ev.request_id].append(ev.token)
    correct = sum(bool(task.evaluate(c, tokenizer.decode(out[i]))) for c, i in zip(convs, ids))
    acc = correct / max(n, 1)
    return {"accuracy": acc, "centered": acc, "n": n, "source": task.source}


def evaluate_task(model: GPT, tokenizer: Tokenizer, task: Any, **kwargs) -> dict:
    """Dispatch on task.eval_type ("categorical" or "generative")."""
    if task.eval_type == "categorical":
        return evaluate_categorical(model, tokenizer, task, max_examples=kwargs.get("max_examples"))
    return evaluate_generative(model, tokenizer, task, **kwargs)


def chatcore(results: dict[str, dict]) -> float | None:
    """Mean centred accuracy over the ChatCORE tasks present in `results` (None if none are)."""
    vals = [results[t]["centered"] for t in CHATCORE_TASKS if t in results and math.isfinite(results[t]["centered"])]
    return sum(vals) / len(vals) if vals else None
