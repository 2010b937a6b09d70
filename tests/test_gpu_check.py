"""`python -m bench.gpu_check`: the one GPU command. Without a GPU it says so in one line; its dry
run executes every check's code path on CPU (Triton interpreter, CUDA emulation, torch.compile);
the time budget, the dispatch table it writes and the floors it sets follow their rules. On a
machine with CUDA the same test runs the real checks, compiled, in a fresh process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check, performance
from nanofast import dispatch

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.gpu_check", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=900)


@pytest.mark.skipif(CUDA, reason="this machine has a CUDA device")
def test_without_a_gpu_it_exits_with_one_clear_line():
    done = _run()
    assert done.returncode == 2
    assert done.stdout.strip().splitlines() == [gpu_check.NO_CUDA] and "no CUDA device" in done.stdout


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    """The whole dry run once (about a minute on 2 cores), in this process: the interpreter is on."""
    out = tmp_path_factory.mktemp("gpu_check") / "dry.json"
    assert gpu_check.main(["--dry-run", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_the_dry_run_executes_and_passes_every_check(dry_run):
    results = {r["name"]: r for r in dry_run["checks"]}
    assert list(results) == [c.name for c in gpu_check.CHECKS] and len(results) >= 40
    assert {r["status"] for r in results.values()} == {"pass"}, \
        {n: gpu_check._summary(r) for n, r in results.items() if r["status"] != "pass"}
    assert dry_run["dry_run"] and {r["section"] for r in results.values()} == {"numerics", "model", "speed"}
    # What the issue asks of the numerics: GQA groups, both page sizes, both backends, every split count.
    decode = [r for n, r in results.items() if n.startswith("paged_decode[triton")]
    assert len(decode) == 6 and all(len(r["cases"]) == 6 for r in decode)  # 2 windows x 3 split counts
    assert {c["case"] for c in results["fp8_gemm[triton]"]["cases"]} >= {
        "long K split accumulation 16x32x1024", "long K fast accumulation 16x32x1024"}
    assert results["train_step[compiled,triton vs torch]"]["cases"][0]["case"] == "fp32 loss"
    assert results["engine_greedy_vs_generate"]["identical"] == results["engine_greedy_vs_generate"]["requests"]
    fp8 = [c["case"] for c in results["fp8_training_paths"]["cases"]]  # both recipes, odd M, the report
    assert fp8 == ["fp8 tensorwise step, 25 tokens", "fp8 rowwise step, 25 tokens", "precision report"]


def test_the_dry_run_dispatch_table_feeds_the_dispatch_rule(dry_run, tmp_path, monkeypatch):
    table = dry_run["dispatch"]
    written = tmp_path / "gpu_check.json"
    written.write_text(json.dumps(dry_run))
    monkeypatch.setenv(dispatch.TABLE_ENV, str(written))
    dispatch.clear_cache()
    try:
        assert dispatch.table("gpu-X") == table  # the file gpu_check writes passes dispatch's validation
    finally:
        dispatch.clear_cache()
    assert set(table) == set(dispatch.OPS)
    for op, measured in table.items():
        spec = dispatch.OPS[op]
        assert set(measured) == set(spec.backends), op  # the vendor's time too: the rule compares with it
        assert all(v["ok"] and v["ms"] > 0 for v in measured.values()), op
        assert dispatch.choose(op, measured) in spec.backends


def test_the_page_renders_a_record_and_says_when_there_is_none(dry_run, tmp_path):
    text = gpu_check.render(dry_run)
    assert "dry run" in text and f"{len(dry_run['checks'])} passed" in text and "| paged_decode |" in text
    assert "No GPU has run `make gpu-check` yet" in performance.gpu_check_section(tmp_path)
    (tmp_path / "gpu-X").mkdir()
    (tmp_path / "gpu-X" / "gpu_check.json").write_text(json.dumps(dry_run))
    assert performance.gpu_check_section(tmp_path).startswith("**gpu-X**: ")


def _check(name: str, est_s: float, fn) -> gpu_check.Check:
    return gpu_check.Check(name, "numerics", fn, est_s)


def test_the_budget_skips_by_estimate_and_a_crash_is_a_result():
    now, ran = [0.0], []

    def takes(name: str, seconds: float, ok: bool = True):
        def fn(ctx):
            ran.append(name)
            now[0] += seconds
            return {"ok": ok}
        return fn

    checks = [_check("a", 10, takes("a", 10)), _check("too long", 10, takes("b", 10)),
              _check("short", 1, takes("c", 1, ok=False)), _check("crash", 1, lambda ctx: 1 / 0),
              _check("fits", 4, takes("d", 4)), _check("over", 1, takes("e", 1))]
    ctx = gpu_check.Ctx(torch.device("cpu"), dry_run=False)
    lines = []
    results = gpu_check.run_checks(ctx, checks, budget_s=15, log=lines.append, clock=lambda: now[0])
    # After a (10 s) a 10-s check cannot end within 15 s; at 11 s a 4-s one can; at 15 s nothing.
    assert ran == ["a", "c", "d"]
    assert [r["status"] for r in results] == ["pass", "skipped", "fail", "error", "pass", "skipped"]
    assert "time budget" in results[1]["reason"] and "ZeroDivisionError" in results[3]["error"]
    assert len(lines) == 6 and lines[1].startswith("skipped")


def _speed(op: str, times: dict, floor: tuple | None = None, fractions: dict | None = None) -> dict:
    rec = {"name": op, "section": "speed", "op": op, "backend": None, "status": "pass", "times_ms": times,
           "fraction_of_peak": fractions or {}}
    if floor:
        rec["floor"] = {"name": floor[0], "backend": floor[1]}
    return rec


def test_the_dispatch_table_takes_time_from_speed_and_ok_from_numerics():
    results = [{"name": "n1", "section": "numerics", "op": "rms_norm", "backend": "triton", "status": "pass"},
               {"name": "n2", "section": "numerics", "op": "rms_norm", "backend": "cuda", "status": "fail"},
               {"name": "n3", "section": "numerics", "op": "rms_norm", "backend": "cuda", "status": "pass"},
               _speed("rms_norm", {"triton": 1.0, "cuda": 0.5, "torch": 2.0}),
               {**_speed("newton_schulz", {"triton": 1.0}), "status": "error"}]
    table = gpu_check.build_dispatch(results)
    assert table == {"rms_norm": {"triton": {"ms": 1.0, "ok": True}, "cuda": {"ms": 0.5, "ok": False},
                                  "torch": {"ms": 2.0, "ok": True}}}
    assert dispatch.choose("rms_norm", table["rms_norm"]) == "triton"  # cuda is faster but failed a check


def test_floors_fill_only_what_is_unmeasured():
    doc = {"floors": {"gpu-H100": {"a": None, "b": 0.5}}}
    results = [_speed("x", {"triton": 1.0}, ("a", "triton"), {"triton": 0.7, "torch": 0.9}),
               _speed("y", {"triton": 1.0}, ("b", "triton"), {"triton": 0.9}),
               _speed("z", {"triton": 1.0}, ("c", "triton"), {}),  # no known peak: nothing to set
               {**_speed("w", {"triton": 1.0}, ("d", "triton"), {"triton": 0.5}), "status": "fail"}]
    assert gpu_check.set_floors(doc, "gpu-H100", results) == ["a"]
    assert doc["floors"]["gpu-H100"] == {"a": 0.56, "b": 0.5}
    assert gpu_check.set_floors(doc, "gpu-H200", results[:1]) == ["a"] and doc["floors"]["gpu-H200"] == {"a": 0.56}


def test_every_guard_floor_has_a_speed_check_that_sets_it():
    floors = json.loads(gpu_check.GPU_FLOORS.read_text())["floors"]
    named = [c.floor[0] for c in gpu_check.CHECKS if c.floor]
    assert all(c.section == "speed" for c in gpu_check.CHECKS if c.floor)
    assert len(named) == len(set(named)) and all(set(f) == set(named) for f in floors.values())


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device: the CPU runs the same checks in the dry run above")
def test_compiled_kernels_on_this_gpu(tmp_path):
    """The numerics and model checks compiled (no interpreter), in a fresh process."""
    out = tmp_path / "gpu.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--sections", "numerics,model", "--no-page",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
