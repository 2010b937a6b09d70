"""Task datasets for mid-training, SFT, RL and evaluation.

`load_task(name, split)` returns a Task: real data (nanochat's sources, from the Hugging Face
parquet API) when it is cached under `data_dir` or `download=True`, else an offline generator
built from the embedded corpus, so every stage runs without network. `task.source` ("real" or
"offline") says which one an evaluation ran on.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from nanofast.tasks.base import (Task, TaskMixture, extract_answer, gsm8k_parts, mc_conversation,
                                 render_mc)
from nanofast.tasks.hub import cached_files, download_split
from nanofast.tasks.offline import (Arithmetic, HumanEvalOffline, Identity, MultipleChoice, SmolTalkOffline,
                                    SpellingBee)
from nanofast.tasks.real import ARC, GSM8K, MMLU, HumanEval, SmolTalk

__all__ = ["Task", "TaskMixture", "TASK_NAMES", "load_task", "download_task", "real_splits", "render_mc",
           "mc_conversation", "gsm8k_parts", "extract_answer"]

TASK_NAMES = ("smoltalk", "mmlu", "arc_easy", "arc_challenge", "gsm8k", "humaneval", "spellingbee", "identity",
              "multiple_choice", "arithmetic")


@dataclass(frozen=True)
class _Real:
    repo: str
    splits: dict[str, tuple[str, str]]  # our split name -> (parquet API subset, split)
    task: type
    offline: type                       # the generator standing in when the data is absent


_ARC_SPLITS = ("train", "validation", "test")
_REAL = {
    "smoltalk": _Real("HuggingFaceTB/smol-smoltalk", {s: ("default", s) for s in ("train", "test")},
                      SmolTalk, SmolTalkOffline),
    "mmlu": _Real("cais/mmlu", {"train": ("auxiliary_train", "train"), "validation": ("all", "validation"),
                                "dev": ("all", "dev"), "test": ("all", "test")}, MMLU, MultipleChoice),
    "arc_easy": _Real("allenai/ai2_arc", {s: ("ARC-Easy", s) for s in _ARC_SPLITS}, ARC, MultipleChoice),
    "arc_challenge": _Real("allenai/ai2_arc", {s: ("ARC-Challenge", s) for s in _ARC_SPLITS}, ARC, MultipleChoice),
    "gsm8k": _Real("openai/gsm8k", {s: ("main", s) for s in ("train", "test")}, GSM8K, Arithmetic),
    "humaneval": _Real("openai/openai_humaneval", {"test": ("openai_humaneval", "test")}, HumanEval,
                       HumanEvalOffline),
}
_OFFLINE = {"spellingbee": SpellingBee, "identity": Identity, "multiple_choice": MultipleChoice,
            "arithmetic": Arithmetic}


def _check_name_split(name: str, split: str) -> None:
    if name not in TASK_NAMES:
        raise ValueError(f"unknown task name {name!r}: expected one of {', '.join(TASK_NAMES)}")
    valid = tuple(_REAL[name].splits) if name in _REAL else _OFFLINE[name].splits
    if split not in valid:
        raise ValueError(f"bad split {split!r} for task {name!r}: expected one of {valid}")


def real_splits(name: str) -> tuple[str, ...]:
    """The splits of `name` that real data exists for (empty for the offline-only tasks)."""
    if name not in TASK_NAMES:
        raise ValueError(f"unknown task name {name!r}: expected one of {', '.join(TASK_NAMES)}")
    return tuple(_REAL[name].splits) if name in _REAL else ()


def _data_dir(data_dir: str | os.PathLike | None) -> Path:
    if data_dir is None:
        from nanofast.common import base_dir  # lazy: common imports torch

        return base_dir() / "tasks"
    return Path(data_dir)


def download_task(name: str, split: str, *, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Download (once, under a file lock) the real data of `name`/`split`; return its parquet files."""
    _check_name_split(name, split)
    if name not in _REAL:
        raise ValueError(f"task name {name!r} is generated offline: there is no real data to download")
    real = _REAL[name]
    subset, hub_split = real.splits[split]
    return download_split(_data_dir(data_dir), real.repo, subset, hub_split)


def load_task(name: str, split: str, *, data_dir: str | os.PathLike | None = None, download: bool = False,
              seed: int = 0, size: int | None = None) -> Task:
    """The task `name` (one of TASK_NAMES) for `split`.

    Real data is used when its files are already in `data_dir` (default base_dir()/"tasks") or,
    with `download=True`, after fetching them; otherwise the offline generator stands in (the
    task keeps its name; `source` says "offline"). `seed` shuffles real data and seeds the
    generators; `size` caps real data and is the exact count of generated conversations
    (default: 2000 for train, 200 for held-out splits), except for the offline humaneval, a fixed
    set of problems like the real one, which it caps.
    """
    _check_name_split(name, split)
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be a positive int or None, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if name in _OFFLINE:
        return _OFFLINE[name](split, seed=seed, size=size)
    real = _REAL[name]
    subset, hub_split = real.splits[split]
    root = _data_dir(data_dir)
    files = cached_files(root, real.repo, subset, hub_split)
    if files is None and download:
        files = download_split(root, real.repo, subset, hub_split)
    if files is None:
        return real.offline(split, seed=seed, size=size, name=name)
    extra = {"name": name} if real.task is ARC else {}
    return real.task(files, split, seed=seed, size=size, **extra)
