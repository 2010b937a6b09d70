"""The README's Python examples, and those of docs/kernels.md, run as written (on CPU: the Triton
examples through the interpreter, which conftest.py turns on). Two need state outside the example
and are run by the tests of what they show instead: the checkpoint loader (tests/test_pipeline.py
loads `make run`'s checkpoints) and the HTTP client (tests/test_serve.py drives the server)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
KERNEL_DOCS = README.parent / "docs" / "kernels.md"
BLOCKS = [b for doc in (README, KERNEL_DOCS) for b in re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)]
NEEDS_OUTSIDE_STATE = ("load_nanochat(", "http://127.0.0.1")  # a trained checkpoint, a running server


def _runnable() -> list[tuple[int, str]]:
    return [(i, b) for i, b in enumerate(BLOCKS) if not any(s in b for s in NEEDS_OUTSIDE_STATE)]


def test_the_readme_has_examples_and_runs_most():
    assert len(BLOCKS) >= 10 and len(BLOCKS) - len(_runnable()) <= 2


@pytest.mark.parametrize("block", [b for _, b in _runnable()], ids=[f"block{i}" for i, _ in _runnable()])
def test_readme_example_runs(block, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md or docs/kernels.md", "exec"), {"__name__": "__readme__"})
