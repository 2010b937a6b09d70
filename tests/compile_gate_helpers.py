"""The compile gate's test scaffolding, shared by the kernel families' tests: compile a kernel
module's configs once per test module (in a child process without the Triton interpreter), the
facts every compiled kernel must show, and the sm_90 / sm_80 test cases over the configs."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from typing import Callable, Sequence

import pytest

from nanofast.kernels.compile_gate import configs_facts

MAX_SHARED = {90: 227 * 1024, 80: 163 * 1024}  # per-CTA opt-in maximum: H100, A100


def config_ids(configs: Sequence[dict]) -> list[str]:
    """Test ids of configs: their labels up to the tile sizes, spaces as dashes."""
    return [c["config"].split(" BLOCK")[0].replace(" ", "-") for c in configs]


def gate_facts_fixture(module: str, attr: str = "KERNEL_CONFIGS", arch: int = 90, sm80: Sequence[int] = ()):
    """A module-scoped fixture: {(index, arch): facts} of every config of `module.<attr>` compiled
    for sm_`arch`, and of the `sm80` indices for sm_80 too (see compile_gate.configs_facts)."""

    @pytest.fixture(scope="module")
    def gate_facts() -> dict:
        configs = getattr(importlib.import_module(module), attr)
        jobs = [[i, arch] for i in range(len(configs))] + [[i, 80] for i in sm80]
        return configs_facts(module, jobs, attr)

    return gate_facts


def gate_tests(configs: Sequence[dict], sm80: Sequence[int], check: Callable[[dict, dict, int], None]):
    """test_compile_gate_sm90 over every config and test_compile_gate_sm80 over the `sm80` indices,
    each calling check(config, facts, arch) on the facts of the module's `gate_facts` fixture."""

    @pytest.mark.parametrize("index", range(len(configs)), ids=config_ids(configs))
    def test_compile_gate_sm90(gate_facts, index):
        check(configs[index], gate_facts[(index, 90)], 90)

    @pytest.mark.parametrize("index", sm80)
    def test_compile_gate_sm80(gate_facts, index):
        check(configs[index], gate_facts[(index, 80)], 80)

    return test_compile_gate_sm90, test_compile_gate_sm80


def check_common_facts(cfg: dict, f: dict, arch: int, max_registers: int, where: str | None = None) -> str:
    """What every compiled kernel must show: the config's kernel and target, no register spills,
    registers within `max_registers`, shared memory within the target's per-CTA maximum. Returns
    the failure context (`where`, by default the config, target and facts) for further asserts."""
    where = where or f"{cfg['config']} sm_{arch}: {f}"
    assert f["arch"] == arch and f["kernel"] == cfg["fn"].__name__, where
    # Triton's spill slots show up as STACK (LOCAL stays 0): both must be 0
    assert f["local_bytes"] == 0 and f.get("stack_bytes", 0) == 0 and f["instructions"].get("STL", 0) == 0, \
        "register spills: " + where
    assert f["registers"] <= max_registers, where
    assert f["shared_bytes"] <= MAX_SHARED[arch], where
    return where


def run_uninterpreted(code: str, timeout: int = 600):
    """Run Python `code` in a child process without TRITON_INTERPRET (the compiler cannot inline
    the interpreter's helpers) and return the JSON its last line of output prints."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
