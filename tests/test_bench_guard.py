"""The throughput guard's own checks (bench/guard.py) and the performance page generator."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `bench` is a package at the repository root, not an installed one
    sys.path.insert(0, str(ROOT))

from bench import guard  # noqa: E402
from bench import performance, render  # noqa: E402

# The byte models live in bench/ files whose gpu / expensive markers bench/conftest.py registers;
# imported from here (outside that conftest) pytest would warn about them.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnknownMarkWarning")


# --------------------------------------------------------------------------------------------
# Ratios
# --------------------------------------------------------------------------------------------

def test_interleaved_ratio_measures_the_faster_one():
    fast_calls, slow_calls = [], []
    result = guard.measure_ratio("sleepers", lambda: (fast_calls.append(1), time.sleep(0.001)),
                                 lambda: (slow_calls.append(1), time.sleep(0.005)), reps=6)
    assert len(fast_calls) == len(slow_calls) == 7  # warm-up + 6 repetitions each
    assert len(result.fast_s) == len(result.slow_s) == 6
    assert result.ratio > 2, result.describe()


def test_slowed_implementation_fails_the_ratio_check():
    """The real paged-decode case, with its batched implementation deliberately slowed: the check
    fails and names the benchmark, both implementations, the numbers and the floor."""
    case = guard.RATIO_CASES["paged_decode"]
    fast, slow = case.make()

    def slowed():
        for _ in range(4):  # four times the batched work: slower than the per-sequence loop
            fast()

    with pytest.raises(guard.GuardFailure) as err:
        guard.check_ratio(case, fast=slowed, slow=slow)
    msg = str(err.value)
    assert "paged_decode" in msg and case.fast_label in msg and case.slow_label in msg
    assert f"{case.floor:.2f}x" in msg and " ms vs " in msg and "then" in msg  # measured twice before failing
    assert guard.check_ratio(case, fast=fast, slow=slow).ratio >= case.floor  # the unslowed pair passes


def test_ratio_floors_have_their_measurements():
    for case in guard.RATIO_CASES.values():
        assert 0 < case.floor and case.reps >= 3 and case.measured, case.name


# --------------------------------------------------------------------------------------------
# Machine-code facts
# --------------------------------------------------------------------------------------------

def _row(registers=64, local=0, **ins) -> dict:
    return {"source": "triton", "kernel": "k", "config": "c", "arch": 90, "registers": registers, "shared_bytes": 0,
            "local_bytes": local, "spill_bytes": 0, "instructions": ins}


TABLE_ROW = _row(registers=100, HGMMA=4, **{"LDG.E.128": 2, "LDGSTS.E.BYPASS.128": 32})


def test_unchanged_facts_pass():
    assert guard.check_kernel_facts({"cfg": dict(TABLE_ROW)}, {"cfg": TABLE_ROW}) == []


def test_spill_fails_naming_the_config():
    now = _row(registers=255, local=96, HGMMA=4, STL=12, **{"LDG.E.128": 2, "LDGSTS.E.BYPASS.128": 32})
    problems = guard.check_kernel_facts({"gemm BLOCK=256x256": now}, {"gemm BLOCK=256x256": TABLE_ROW})
    assert any("gemm BLOCK=256x256" in p and "spills" in p and "local 96 B" in p and "STL x12" in p for p in problems)
    assert any("registers 100 -> 255" in p for p in problems)


def test_register_increase_beyond_the_margin_fails():
    limit = guard.register_limit(100)
    assert limit == 110  # max(8, 10% of 100)
    at_limit = dict(TABLE_ROW, registers=limit)
    assert guard.check_kernel_facts({"cfg": at_limit}, {"cfg": TABLE_ROW}) == []
    over = dict(TABLE_ROW, registers=limit + 1)
    assert guard.check_kernel_facts({"cfg": over}, {"cfg": TABLE_ROW}) == \
        ["cfg: registers 100 -> 111 (allowed up to 110)"]
    assert guard.register_limit(32) == 40  # small kernels: +8


def test_lost_tensor_cores_and_vector_loads_fail():
    now = _row(registers=100, HMMA=8, **{"LDG.E": 40})
    problems = guard.check_kernel_facts({"ns poly": now}, {"ns poly": TABLE_ROW})
    assert "ns poly: lost its tensor-core MMAs: HGMMA x4 -> x0" in problems
    assert "ns poly: lost its vectorised memory access: LDG.E.128 x2 -> x0" in problems
    assert "ns poly: lost its vectorised memory access: LDGSTS.E.BYPASS.128 x32 -> x0" in problems
    qg = _row(QGMMA=4)
    assert guard.check_kernel_facts({"fp8": _row()}, {"fp8": qg}) == ["fp8: lost its tensor-core MMAs: QGMMA x4 -> x0"]


def test_new_and_missing_configs_fail():
    problems = guard.check_kernel_facts({"new": _row()}, {"old": _row()})
    assert any(p.startswith("new: not in the committed table") for p in problems)
    assert any(p.startswith("old: in the committed table but no longer compiled") for p in problems)


def test_cuda_stack_frame_is_not_a_spill_but_ptxas_spills_are():
    frame = dict(_row(local=16), source="cuda")
    assert guard.facts_problems("cu", frame, frame) == []
    spilled = dict(frame, spill_bytes=8)
    assert "spills" in guard.facts_problems("cu", spilled, frame)[0]


SPILL_KERNEL = '''
import triton
import triton.language as tl


@triton.jit
def live_row(X, Y, BLOCK: tl.constexpr):
    # One warp keeps a 16384-float row live across its reduction: 512 values per thread, more than
    # the 255 registers a thread can have, so ptxas spills to the stack frame.
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs)
    tl.store(Y + offs, x / tl.sum(x * x))


CONFIG = dict(fn=live_row, signature={"X": "*fp32", "Y": "*fp32", "BLOCK": "constexpr"},
              constexprs={"BLOCK": 16384}, num_warps=1, num_stages=1, aligned=("X", "Y"), config="BLOCK=16384 warps=1")
'''


def test_a_real_spilling_config_fails_the_facts_check(tmp_path):
    """A Triton kernel compiled for sm_90 with a tile too big for the register file spills; the
    guard's checker reports it with the config and the numbers (compiled in a child process
    without the Triton interpreter, as the guard does)."""
    pytest.importorskip("triton")
    (tmp_path / "spill_kernel.py").write_text(SPILL_KERNEL)
    child = ("import json, sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import spill_kernel; "
             "from bench.kernel_facts import triton_config_facts; print(json.dumps(triton_config_facts(spill_kernel.CONFIG)))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", child, str(tmp_path), str(ROOT)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=ROOT)
    if proc.returncode != 0 and "not found in the triton wheel" in proc.stderr:
        pytest.skip("the triton wheel has no cuobjdump / nvdisasm")
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["stack_bytes"] > 0 and row["instructions"].get("STL", 0) > 0, row
    problems = guard.facts_problems("live_row [BLOCK=16384 warps=1] sm_90", row, None)
    assert len(problems) == 1 and "live_row [BLOCK=16384 warps=1] sm_90: spills registers" in problems[0], problems
    assert f"stack {row['stack_bytes']} B" in problems[0] and f"STL x{row['instructions']['STL']}" in problems[0]


# --------------------------------------------------------------------------------------------
# GPU peak fractions (the check itself; the measurement needs a GPU)
# --------------------------------------------------------------------------------------------

def test_peak_fraction_floor():
    r = guard.PeakResult("rms_norm fwd", seconds=1e-3, bytes=1_000_000_000, flops=0, peak_bytes_per_s=2e12,
                         peak_flops=None, bound="memory")
    assert r.fraction == pytest.approx(0.5)
    guard.check_peak_fraction(r, 0.4)
    guard.check_peak_fraction(r, None)  # unmeasured floor: nothing to check
    with pytest.raises(guard.GuardFailure, match=r"rms_norm fwd: 50\.0% of peak memory .*floor 60\.0%"):
        guard.check_peak_fraction(r, 0.6)


# --------------------------------------------------------------------------------------------
# The performance page
# --------------------------------------------------------------------------------------------

def _bench(name: str, group: str, median: float, **extra) -> dict:
    return {"name": name, "fullname": f"bench/x.py::{name}", "group": group, "extra_info": extra,
            "stats": {"median": median, "mean": median, "min": median, "max": median, "rounds": 5}}


def test_performance_page_renders_and_says_not_measured(tmp_path):
    cpu = {"machine_info": {"node": "cpu-2core", "nanofast": {"machine_class": "cpu-2core", "cpu": "Test CPU",
                                                              "cpu_count": 2, "gpu": None, "torch": "2.x"}},
           "commit_info": {"id": "abcdef0123"}, "datetime": "2030-01-01T00:00:00",
           "benchmarks": [_bench("test_a[eager]", "train", 0.002), _bench("test_a[compiled]", "train", 0.001)]}
    results = tmp_path / "cpu.json"
    results.write_text(json.dumps(cpu))
    guard_json = tmp_path / "guard.json"
    guard_json.write_text(json.dumps({"machine_info": {"machine_class": "cpu-2core"}, "results": [
        {"kind": "ratio", "name": "paged_engine", "fast": "batched", "slow": "loop", "ratio": 4.5, "floor": 2.0,
         "fast_median_s": 0.05, "slow_median_s": 0.225, "repetitions": 5}]}))
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps({"versions": {"triton": "3.9.0", "nvcc": "13.0"}, "kernels": {
        "k [c] sm_90": dict(TABLE_ROW, kernel="k", config="c")}}))
    readme = ROOT / "README.md"
    readme_before = readme.read_bytes()
    out, png = tmp_path / "page.md", tmp_path / "roofline.png"
    assert performance.main(["--results", str(results), "--facts", str(facts), "--guard", str(guard_json),
                             "--out", str(out), "--png", str(png)]) == 0
    page = out.read_text()
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert render.NOT_MEASURED in page and "Test CPU" in page and "| paged_engine |" in page and "4.50x" in page
    assert "1 Triton configs" in page and "0 spill" in page
    assert "`test_a[eager]`" in page and "2.00x" in page  # full page: every benchmark, vs the group's best
    assert "](roofline.png)" in page  # the PNG beside the page, linked relative to it
    # The tool writes the page and its PNG only: the README links to the page, no tool rewrites it.
    assert readme.read_bytes() == readme_before and "bench/performance.md" in readme_before.decode()
    with pytest.raises(SystemExit):
        performance.main(["--readme", str(tmp_path / "README.md")])
    # Byte models come from the benchmark files: a GPU cell is filled only from a GPU result.
    gpu = dict(cpu, machine_info={"nanofast": {"gpu": "NVIDIA H100 80GB HBM3", "machine_class": "gpu-H100"}},
               benchmarks=[_bench("test_bench_rms_norm[16384x1280-triton-fwd+bwd-plain]", "g", 2e-3, calls_per_round=20)])
    table, points = render.gpu_kernel_table(performance.kernel_models(), [cpu, gpu])
    row = next(line for line in table.splitlines() if line.startswith("| rms_norm fwd+bwd"))
    assert "NVIDIA H100" in row and "100.0 us" in row and len(points) == 1
    assert table.count(render.NOT_MEASURED) == 4 * (len(performance.kernel_models()) - 1)
