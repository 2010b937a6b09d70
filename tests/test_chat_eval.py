"""Chat evaluations: batched multiple choice equals one prompt at a time; generated answers are
scored by the task; ChatCORE's centring."""
from __future__ import annotations

import inspect
import json
import math

import pytest
import torch

from nanofast.chat_eval import (chatcore, evaluate_categorical, evaluate_generative, evaluate_task,
                                generative_outcomes, paired_change)
from nanofast.model import GPT, config_for_depth
from nanofast.tasks import load_task
from nanofast.tokenizer import Tokenizer


def make_tokenizer() -> Tokenizer:
    return Tokenizer.train([inspect.getsource(m) for m in (json, inspect)], vocab_size=512)


def make_model(tok: Tokenizer) -> GPT:
    torch.manual_seed(0)
    m = GPT(config_for_depth(2, tok.vocab_size, 256, head_dim=32))
    m.init_weights()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    return make_model(tok)


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
    # nanochat's definition: five tasks, 0.25 for the letter tasks whatever their letter count
    results = {"arc_easy": {"accuracy": 0.625}, "arc_challenge": {"accuracy": 0.25}, "mmlu": {"accuracy": 0.4},
               "gsm8k": {"accuracy": 0.1}, "humaneval": {"accuracy": 0.05}, "spellingbee": {"accuracy": 1.0}}
    assert chatcore(results) == pytest.approx((0.5 + 0.0 + 0.2 + 0.1 + 0.05) / 5)  # SpellingBee does not count
    assert chatcore({k: v for k, v in results.items() if k != "humaneval"}) is None  # all five or none
    assert chatcore({}) is None


def test_generative_outcomes_pair_up_across_reruns(tok, model):
    """Per-question outcomes behind the accuracy; sampled reruns reuse seed i for question i, so
    the same model gives the same outcomes (what makes before/after RL a paired comparison)."""
    task = load_task("arithmetic", "test", size=6)
    greedy = generative_outcomes(model, tok, task, max_new_tokens=10)
    assert len(greedy) == 6 and evaluate_generative(model, tok, task, max_new_tokens=10)["accuracy"] == sum(greedy) / 6
    sampled = [generative_outcomes(model, tok, task, max_new_tokens=10, temperature=1.0) for _ in range(2)]
    assert sampled[0] == sampled[1]


class ParityTask:
    """Arithmetic questions judged by the parity of the answer's code points: a random model gets
    about half "right", so outcomes that differ in any answer differ in the list."""

    def __init__(self):
        self.task = load_task("arithmetic", "test", size=9)
        self.source = self.task.source

    def __len__(self) -> int:
        return len(self.task)

    def __getitem__(self, i: int):
        return self.task[i]

    def evaluate(self, conversation, text: str) -> bool:
        return sum(map(ord, text)) % 2 == 0


def _sharded_outcomes_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    tok = make_tokenizer()
    model, task = make_model(tok), ParityTask()
    outcomes = [generative_outcomes(model, tok, task, max_new_tokens=10, temperature=t, rank=rank, world_size=world)
                for t in (0.0, 1.0)]
    torch.save(outcomes, f"{out}.{rank}")
    dist.destroy_process_group()


def test_generative_outcomes_sharded_over_ranks_equal_one_rank(tok, model, tmp_path):
    """RL's held-out measurement on 2 ranks: each answers every other question (seeded by question),
    and both get the whole list one rank computes, greedy and sampled."""
    import torch.multiprocessing as mp

    task = ParityTask()
    single = [generative_outcomes(model, tok, task, max_new_tokens=10, temperature=t) for t in (0.0, 1.0)]
    assert all(True in o and False in o for o in single)
    out = str(tmp_path / "outcomes")
    mp.spawn(_sharded_outcomes_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    assert torch.load(f"{out}.0") == torch.load(f"{out}.1") == single and len(single[0]) == 9


def test_paired_change_and_its_interval():
    before = [True] * 50 + [False] * 50
    after = [True] * 50 + [True] * 30 + [False] * 20       # 30 gained, none lost
    c = paired_change(before, after)
    assert c["change"] == pytest.approx(0.3) and (c["improved"], c["worsened"], c["n"]) == (30, 0, 100)
    d = [0] * 70 + [1] * 30
    se = math.sqrt(sum((x - 0.3) ** 2 for x in d) / 99 / 100)
    assert c["ci95"] == pytest.approx([0.3 - 1.96 * se, 0.3 + 1.96 * se])
    assert c["ci95"][0] > 0  # measurable: the interval excludes no change
    same = paired_change(before, before)
    assert same["change"] == 0 and same["ci95"] == [0, 0]
    swapped = paired_change(before, before[::-1])  # as many gained as lost: no change, wide interval
    assert swapped["change"] == 0 and swapped["ci95"][0] < -0.1 < 0.1 < swapped["ci95"][1]
    with pytest.raises(ValueError, match="equally long"):
        paired_change([True], [True, False])
    with pytest.raises(ValueError, match="non-empty"):
        paired_change([], [])
