"""Chat evaluations: batched multiple choice equals one prompt at a time; generated answers are
scored by the task; ChatCORE's centring."""
from __future__ import annotations

import inspect
import json

import pytest
import torch

from nanofast.chat_eval import chatcore, evaluate_categorical, evaluate_generative, evaluate_task
from nanofast.model import GPT, config_for_depth
from nanofast.tasks import load_task
from nanofast.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([inspect.getsource(m) for m in (json, inspect)], vocab_size=512)


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    torch.manual_seed(0)
    m = GPT(config_for_depth(2, tok.vocab_size, 256, head_dim=32))
    m.init_weights()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def test_categorical_batched_equals_one_at_a_time(tok, model):
    task = load_task("mmlu", "test", size=10)
    batched = evaluate_categorical(model, tok, task, batch_size=4)
    correct = 0
    for conv in task:
        ids = torch.tensor([tok.render_for_completion(conv)])
        logits = model(ids)[0, -1]
        letter_ids = [tok.encode(letter)[0] for letter in conv["letters"]]
        choice = conv["letters"][int(logits[letter_ids].argmax())]
        correct += task.evaluate(conv, choice)
    assert batched["accuracy"] == correct / len(task) and batched["n"] == len(task)
    chance = sum(1 / len(c["letters"]) for c in task) / len(task)
    assert batched["centered"] == pytest.approx((batched["accuracy"] - chance) / (1 - chance))
    assert batched["source"] == task.source == "offline"


def test_generative_scores_the_engines_greedy_answers(tok, model):
    task = load_task("arithmetic", "test", size=5)
    result = evaluate_generative(model, tok, task, max_new_tokens=10)
    stop = tok.encode_special("<|assistant_end|>")
    correct = 0
    for conv in task:
        prompt = tok.render_for_completion(conv)
        out = []
        for t in model.generate(prompt, 10):
            if t in (stop, tok.bos_token_id):
                break
            out.append(t)
        correct += task.evaluate(conv, tok.decode(out))
    assert result == {"accuracy": correct / 5, "centered": correct / 5, "n": 5, "source": "offline"}
    # the scoring itself: the reference answers are correct
    assert all(task.evaluate(c, c["messages"][-1]["content"] if isinstance(c["messages"][-1]["content"], str)
                             else "".join(p["text"] for p in c["messages"][-1]["content"])) for c in task)


def test_dispatch_and_chatcore(tok, model):
    assert evaluate_task(model, tok, load_task("arc_easy", "test", size=3))["n"] == 3
    results = {"arc_easy": {"centered": 0.5}, "gsm8k": {"centered": 0.1}, "smoltalk": {"centered": 9.0}}
    assert chatcore(results) == pytest.approx(0.3)  # only ChatCORE's tasks count
    assert chatcore({}) is None
