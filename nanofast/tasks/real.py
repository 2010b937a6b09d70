"""The real task datasets (nanochat's sources), read from downloaded parquet files.

Rows stay in a pyarrow table (compact: SmolTalk's 460k conversations would take gigabytes as
Python dicts) and become conversations when indexed. The order is a seeded shuffle, so the first
`size` conversations are a random sample of the split.
"""
from __future__ import annotations

import abc

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nanofast.tasks.base import FinalNumberMixin, LetterMixin, Task, gsm8k_parts, mc_conversation

MMLU_LETTERS = ("A", "B", "C", "D")


class ParquetTask(Task):
    """Rows of parquet `files`, shuffled with `seed` and cut to `size`; subclasses convert rows."""

    source = "real"
    repo: str = ""

    def __init__(self, files: Sequence[str | os.PathLike], split: str, seed: int = 0, size: int | None = None):
        paths = [Path(f) for f in files]
        if not paths:
            raise ValueError(f"{self.name}: files is empty, need at least one parquet file")
        self.split = split
        self.files = paths
        table = pa.concat_tables([pq.read_table(p) for p in paths], promote_options="default")
        order = np.random.default_rng(seed).permutation(table.num_rows)
        self._order = order if size is None else order[:size]
        self._columns = {name: table.column(name) for name in table.column_names}

    def __len__(self) -> int:
        return len(self._order)

    def row(self, i: int) -> dict:
        """Row `i` (in this task's order) as a dict of Python values."""
        j = int(self._order[i])
        return {name: col[j].as_py() for name, col in self._columns.items()}

    def _get(self, i: int) -> dict:
        j = int(self._order[i])
        try:
            return self.convert(self.row(i))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"{self.name}: row {j} of {[p.name for p in self.files]} is malformed "
                             f"({type(e).__name__}: {e})") from None

    @abc.abstractmethod
    def convert(self, row: dict) -> dict:
        """One row as a conversation."""


class SmolTalk(ParquetTask):
    """HuggingFaceTB/smol-smoltalk: general chat, a "messages" column (optional system turn first)."""

    name, eval_type, repo = "smoltalk", "generative", "HuggingFaceTB/smol-smoltalk"

    def convert(self, row: dict) -> dict:
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        rest = messages[1:] if messages and messages[0]["role"] == "system" else messages
        if len(rest) < 2 or rest[-1]["role"] != "assistant":
            raise ValueError("a conversation needs a user turn and must end with an assistant turn")
        for k, m in enumerate(rest):
            if m["role"] != ("user" if k % 2 == 0 else "assistant") or not isinstance(m["content"], str):
                raise ValueError(f"message {k} breaks the user/assistant alternation or is not text")
        return {"messages": messages}


class MMLU(LetterMixin, ParquetTask):
    """cais/mmlu: question, 4 choices, answer index, subject. The auxiliary_train rows come
    wrapped in a "train" struct in the parquet export, which is unwrapped here."""

    name, repo = "mmlu", "cais/mmlu"

    def convert(self, row: dict) -> dict:
        if "question" not in row and isinstance(row.get("train"), dict):
            row = row["train"]
        choices = row["choices"]
        if len(choices) != len(MMLU_LETTERS):
            raise ValueError(f"expected 4 choices, got {len(choices)}")
        return mc_conversation(row["question"], MMLU_LETTERS, choices, MMLU_LETTERS[row["answer"]],
                               subject=row.get("subject") or "")


class ARC(LetterMixin, ParquetTask):
    """allenai/ai2_arc: question, choices {text, label}, answerKey (labels are the letters)."""

    repo = "allenai/ai2_arc"

    def __init__(self, files: Sequence[str | os.PathLike], split: str, seed: int = 0, size: int | None = None,
                 name: str = "arc_easy"):
        self.name = name
        super().__init__(files, split, seed, size)

    def convert(self, row: dict) -> dict:
        choices = row["choices"]
        return mc_conversation(row["question"], choices["label"], choices["text"], row["answerKey"])


class GSM8K(FinalNumberMixin, ParquetTask):
    """openai/gsm8k (main): question, answer with <<expr=result>> calculator calls and "#### N"."""

    name, repo = "gsm8k", "openai/gsm8k"

    def convert(self, row: dict) -> dict:
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": gsm8k_parts(row["answer"])}]}


_CODE_BLOCK_RE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.S)


def extract_program(completion: str) -> str:
    """The code of a completion: its first ``` fenced block if it has one, else all of it."""
    m = _CODE_BLOCK_RE.search(completion)
    return m.group(1) if m else completion


def humaneval_conversation(prompt: str, solution: str, test: str, entry_point: str) -> dict:
    """user = the prompt (signature and docstring); assistant = the prompt continued by the solution."""
    joined = prompt + solution if prompt.endswith("\n") else prompt + "\n" + solution
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": joined}],
            "prompt": prompt, "test": test, "entry_point": entry_point}


class HumanEvalMixin:
    """evaluate by running the program against the problem's tests in nanofast.sandbox."""

    eval_type = "generative"
    timeout: float = 5.0

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """Does the completed program pass the problem's `check(entry_point)` tests?"""
        if not isinstance(completion, str):
            raise TypeError(f"completion must be a str, got {type(completion).__name__}")
        from nanofast.sandbox import run_humaneval  # lazy: only code evaluation needs the sandbox

        return bool(run_humaneval(conversation["prompt"], extract_program(completion), conversation["test"],
                                  conversation["entry_point"], timeout=self.timeout))


class HumanEval(HumanEvalMixin, ParquetTask):
    """openai/openai_humaneval: prompt, canonical_solution, test, entry_point (test split only)."""

    name, repo = "humaneval", "openai/openai_humaneval"

    def convert(self, row: dict) -> dict:
        return humaneval_conversation(row["prompt"], row["canonical_solution"], row["test"], row["entry_point"])
