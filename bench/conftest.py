"""pytest configuration of the benchmark suite: markers, run modes and the machine info in results.

    pytest bench --benchmark-only --quick        # quick run: skips benchmarks marked `expensive`
    pytest bench --benchmark-only                # full run (GPU cases run when CUDA is present)
    pytest bench --benchmark-only --gpu          # full run that must have a GPU (error otherwise)
    pytest bench -m guard                        # the throughput guard (what CI runs)

Markers: `guard` (the regression guard), `gpu` (needs CUDA: skipped without one, auto-detected),
`expensive` (long on CPU, e.g. torch.compile of a model; skipped by --quick).
"""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest
import torch

_GUARD_RESULTS: list[dict] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nanofast bench")
    group.addoption("--quick", action="store_true", help="skip benchmarks marked expensive (a run of a few minutes)")
    group.addoption("--gpu", action="store_true",
                    help="require a CUDA device (usage error without one); by default GPU cases run when one is found")
    group.addoption("--guard-json", default=None, metavar="PATH",
                    help="write the guard's measured ratios (and GPU peak fractions) to this JSON file")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "guard: the throughput regression guard (pytest bench -m guard)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped when none is found")
    config.addinivalue_line("markers", "expensive: long on a CPU machine; skipped by --quick")
    if config.getoption("--gpu") and not torch.cuda.is_available():
        raise pytest.UsageError("--gpu given but torch finds no CUDA device")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    have_gpu = torch.cuda.is_available()
    quick = config.getoption("--quick")
    for item in items:
        if "gpu" in item.keywords and not have_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device (none found)"))
        if quick and "expensive" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="expensive: skipped by --quick"))


@pytest.fixture(scope="session")
def guard_record():
    """Append one guard measurement (a dict) to the --guard-json output."""
    return _GUARD_RESULTS.append


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = session.config.getoption("--guard-json", default=None)
    if path and _GUARD_RESULTS:
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        doc = {"machine_info": machine_summary(), "datetime": stamp, "results": _GUARD_RESULTS}
        Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def machine_class() -> str:
    """The baseline class of this machine: "gpu-<name>" with a GPU, else "cpu-<cores>core"."""
    if torch.cuda.is_available():
        # one rule with the dispatch table's folders (nanofast.dispatch reads gpu_check.json there)
        from nanofast.dispatch import device_class

        return device_class(torch.device("cuda"))
    return f"cpu-{os.cpu_count()}core"


def machine_summary() -> dict:
    """CPU model and cores, GPU, torch/triton/CUDA versions, torch threads, git commit."""
    from nanofast.common import system_info

    info = system_info()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["torch_threads"] = torch.get_num_threads()
    info["machine_class"] = machine_class()
    return info


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """pytest-benchmark's hook: our facts go into every result JSON; the host name is replaced by
    the machine class (results identify the kind of machine, not the host)."""
    machine_info["node"] = machine_class()
    machine_info["nanofast"] = machine_summary()
