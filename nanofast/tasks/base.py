"""The Task interface shared by every dataset, the task mixture, and the answer formats.

A Task is an indexable list of conversations ({"messages": [...]} in the format of
`nanofast.tokenizer`) whose LAST message is the reference assistant answer, plus how to score a
model's answer. Every conversation also carries "task" (the task's name), which lets a
TaskMixture route `evaluate` to the task a conversation came from.
"""
from __future__ import annotations

import abc
import copy
import re
from collections.abc import Iterator, Sequence

import numpy as np

SOURCES = ("real", "offline")
EVAL_TYPES = ("categorical", "generative")

# GSM8K's final-answer marker; official grading strips thousands separators.
_ANSWER_RE = re.compile(r"####\s*(-?[0-9][0-9.,]*)")
_ANNOTATION_RE = re.compile(r"(<<[^<>]*>>)")


class Task(abc.ABC):
    """A dataset of conversations and the rule that scores a model's answer to each.

    Subclasses set `name`, `source` ("real": downloaded data; "offline": generated here),
    `eval_type` ("categorical": the answer is one of conversation["letters"], chosen by argmax;
    "generative": the answer is sampled text) and `split`, and implement `__len__` and `_get`.
    """

    name: str = "task"
    source: str = "offline"
    eval_type: str = "generative"
    split: str = "train"

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of conversations."""

    @abc.abstractmethod
    def _get(self, i: int) -> dict:
        """Conversation `i` for 0 <= i < len(self); may return shared state (it is copied)."""

    def __getitem__(self, i: int) -> dict:
        """Conversation `i` (negative counts from the end), a fresh dict the caller may modify."""
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"{self.name} index must be an int, got {type(i).__name__}")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.name} index {i} out of range for {n} conversations")
        conversation = copy.deepcopy(self._get(int(i) % n))
        conversation.setdefault("task", self.name)
        return conversation

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}[{self.split}], {self.source}, {len(self)} conversations)"

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """Is `completion` (the model's assistant text; for categorical tasks the chosen letter)
        a correct answer to `conversation`? Tasks without a scoring rule (training data only) raise TypeError."""
        raise TypeError(f"task {self.name!r} has no automatic evaluation: it is training data only")

    def reward(self, conversation: dict, completion: str) -> float:
        """RL reward of `completion`: 1.0 if `evaluate` accepts it, else 0.0."""
        return float(self.evaluate(conversation, completion))


class TaskMixture(Task):
    """The concatenation of `tasks` in a deterministic shuffled order (seeded).

    Pass a task several times to oversample it. `source` is the tasks' common source, or
    "mixed"; `eval_type` likewise (a mixed-type mixture is for training, not evaluation).
    """

    def __init__(self, tasks: Sequence[Task], seed: int = 0):
        tasks = list(tasks) if not isinstance(tasks, Task) else None
        if not tasks or not all(isinstance(t, Task) for t in tasks):
            raise ValueError("tasks must be a non-empty sequence of Task objects")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.tasks = tasks
        self.seed = seed
        self.name = "+".join(dict.fromkeys(t.name for t in tasks))
        self.source = _common(t.source for t in tasks)
        self.eval_type = _common(t.eval_type for t in tasks)
        self.split = _common(t.split for t in tasks)
        self.lengths = [len(t) for t in tasks]
        if sum(self.lengths) == 0:
            raise ValueError("tasks are all empty: a mixture needs at least one conversation")
        # Two flat int arrays rather than a list of tuples: a 500k-conversation mixture stays small.
        task_ids = np.repeat(np.arange(len(tasks), dtype=np.int32), self.lengths)
        local_ids = np.concatenate([np.arange(n, dtype=np.int64) for n in self.lengths])
        order = np.random.default_rng(seed).permutation(len(task_ids))
        self._task_ids, self._local_ids = task_ids[order], local_ids[order]
        self._by_name = {}
        for t in tasks:
            self._by_name.setdefault(t.name, t)

    def __len__(self) -> int:
        return len(self._task_ids)

    def _get(self, i: int) -> dict:
        return self.tasks[self._task_ids[i]][int(self._local_ids[i])]

    def task_of(self, conversation: dict) -> Task:
        """The member task a conversation of this mixture came from (by its "task" key)."""
        name = conversation.get("task") if isinstance(conversation, dict) else None
        if name not in self._by_name:
            raise ValueError(f"conversation's 'task' {name!r} is not in this mixture ({sorted(self._by_name)})")
        return self._by_name[name]

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """Score with the rule of the member task the conversation came from."""
        return self.task_of(conversation).evaluate(conversation, completion)

    def reward(self, conversation: dict, completion: str) -> float:
        """Reward with the rule of the member task the conversation came from."""
        return self.task_of(conversation).reward(conversation, completion)


def _common(values) -> str:
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else "mixed"


# ------------------------------------------------------------------------------------------------
# answer formats shared by the real datasets and the offline generators


def render_mc(question: str, letters: Sequence[str], choices: Sequence[str]) -> str:
    """The user message of a multiple-choice question, in nanochat's format.

    Each choice is followed by "=LETTER" with no space, so the letter in the prompt is the same
    token as the bare letter the assistant answers with (" A" and "A" are different tokens).
    """
    if len(letters) != len(choices) or not letters:
        raise ValueError(f"need one letter per choice, got {len(letters)} letters for {len(choices)} choices")
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


def mc_conversation(question: str, letters: Sequence[str], choices: Sequence[str], answer: str,
                    **extra) -> dict:
    """A multiple-choice conversation: the rendered question, the answer letter, and "letters"."""
    letters = [str(x) for x in letters]
    if answer not in letters:
        raise ValueError(f"answer {answer!r} is not one of the letters {letters}")
    return {"messages": [{"role": "user", "content": render_mc(question, letters, choices)},
                         {"role": "assistant", "content": answer}],
            "letters": letters, **extra}


def evaluate_letter(conversation: dict, completion: str) -> bool:
    """Categorical scoring: is the chosen letter the reference letter?"""
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str (the chosen letter), got {type(completion).__name__}")
    return completion.strip() == conversation["messages"][-1]["content"]


def gsm8k_parts(answer: str) -> list[dict]:
    """A GSM8K answer as assistant parts: each <<expr=result>> becomes a python part (expr)
    followed by a python_output part (result); the text around them, including the final
    "#### N" line, becomes text parts."""
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    parts = []
    for piece in _ANNOTATION_RE.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            expr, _, result = piece[2:-2].rpartition("=")
            if not _:  # an annotation without "=": a call whose output is unknown
                expr, result = piece[2:-2], ""
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def extract_answer(text: str) -> str | None:
    """The number after the first "####" in `text`, without thousands separators or a trailing
    period, or None if there is none."""
    if not isinstance(text, str):
        raise TypeError(f"completion must be a str, got {type(text).__name__}")
    m = _ANSWER_RE.search(text)
    if m is None:
        return None
    number = m.group(1).replace(",", "").rstrip(".")
    return number or None


def _same_number(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return float(a) == float(b)  # "18.0" answers "18"
    except ValueError:
        return False


def assistant_text(message: dict) -> str:
    """All the text of an assistant message (str content, or its parts joined)."""
    content = message["content"]
    return content if isinstance(content, str) else "".join(p["text"] for p in content)


def evaluate_final_number(conversation: dict, completion: str) -> bool:
    """GSM8K-style scoring: does the number after "####" match the reference's?"""
    reference = extract_answer(assistant_text(conversation["messages"][-1]))
    predicted = extract_answer(completion)
    if reference is None:
        raise ValueError("the reference answer has no '#### N' line: not a GSM8K-style conversation")
    return predicted is not None and _same_number(predicted, reference)


class FinalNumberMixin:
    """evaluate/reward by the number after "####" (GSM8K, SpellingBee, arithmetic)."""

    eval_type = "generative"

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """Does the number after "####" in `completion` equal the reference answer's?"""
        return evaluate_final_number(conversation, completion)


class LetterMixin:
    """evaluate by the chosen letter (MMLU, ARC, offline multiple choice)."""

    eval_type = "categorical"

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """Is `completion` (the chosen letter) the reference letter?"""
        return evaluate_letter(conversation, completion)
