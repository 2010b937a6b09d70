"""`python -m bench.gpu_check`: the one GPU command. Without a GPU it says so in one line; its dry
run executes every check's code path on CPU (Triton interpreter, CUDA emulation, torch.compile)
through the same worker processes a GPU run uses; a check that aborts, exits or hangs costs that
check only, and the JSON on disk holds every result after each one; the plan fits its budget and
names what it leaves out; the nvcc build and the imports need nothing a bare GPU machine lacks. On
a machine with CUDA the same test file runs the real checks, compiled, in a fresh process."""
from __future__ import annotations

import ast
import contextlib
import ctypes
import importlib.metadata
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import gpu_check, render
from nanofast import dispatch
from nanofast.kernels.cuda_abi import ABI, ERROR_FN
from nanofast.kernels.cuda_facts import nvcc_path
from nanofast.presets import PRESETS

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
    """The whole dry run once (one to two minutes on 2 cores), its checks in worker processes; the
    record it wrote and what it printed."""
    out = tmp_path_factory.mktemp("gpu_check") / "dry.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert gpu_check.main(["--dry-run", "--out", str(out)]) == 0
    return json.loads(out.read_text()) | {"printed": printed.getvalue().splitlines(), "_out": str(out)}


def test_the_run_writes_the_dispatch_table_nanofast_reads(dry_run):
    """Beside the record: {"dispatch": ...} in the format nanofast.dispatch loads (what is
    committed as nanofast/dispatch_tables/<class>.json from a GPU run)."""
    from nanofast import dispatch

    path = Path(dry_run["_out"]).with_name(Path(dry_run["_out"]).stem + ".dispatch.json")
    table = json.loads(path.read_text())
    assert table["dispatch"] == dry_run["dispatch"] and table["machine_class"] == dry_run["machine_class"]
    assert dispatch._load(str(path)) == dry_run["dispatch"]
    assert gpu_check.dispatch_table_path(None, None, None, "gpu-H100") is None
    assert gpu_check.dispatch_table_path(Path("d"), Path("d/gpu_check.json"), None, "gpu-H100") == Path(
        "d/dispatch_table.json")
    default = gpu_check.BASELINES / "gpu-H100" / "gpu_check.json"
    assert gpu_check.dispatch_table_path(None, default, default, "gpu-H100") == dispatch.TABLES / "gpu-H100.json"


def test_the_dry_run_executes_and_passes_every_check(dry_run):
    results = {r["name"]: r for r in dry_run["checks"]}
    assert list(results) == [c.name for c in gpu_check.CHECKS] and len(results) >= 40  # the left-out ones too
    assert {r["status"] for r in results.values()} == {"pass"}, \
        {n: render.check_summary(r) for n, r in results.items() if r["status"] != "pass"}
    assert dry_run["dry_run"] and dry_run["finished"] and {r["section"] for r in results.values()} == {
        "numerics", "model", "speed"}
    assert dry_run["cuda_backend"]["status"] == "ready" and dry_run["plan"]["runs"] == list(results)
    # What the issue asks of the numerics: GQA groups, both page sizes, both backends, every split count.
    decode = [r for n, r in results.items() if n.startswith("paged_decode[triton")]
    assert len(decode) == 6 and all(len(r["cases"]) == 6 for r in decode)  # 2 windows x 3 split counts
    assert {c["case"] for c in results["fp8_gemm[triton]"]["cases"]} >= {
        "long K split accumulation 16x32x1024", "long K fast accumulation 16x32x1024"}
    assert results["train_step[compiled,triton vs torch]"]["cases"][0]["case"] == "fp32 loss"
    assert results["engine_greedy_vs_generate"]["identical"] == results["engine_greedy_vs_generate"]["requests"]
    fp8 = [c["case"] for c in results["fp8_training_paths"]["cases"]]  # both recipes, odd M, the report
    assert fp8 == ["fp8 tensorwise step, 25 tokens", "fp8 rowwise step, 25 tokens", "precision report"]
    decode = results["decode_step[graph vs off]"]  # the CPU's stand-in for the graphs: the static step eager
    assert decode["settings"]["static_mode"] == "eager" and len(decode["times_ms"]) == 8
    hf = results["hf_models"]  # transformers is in the dev extra: both families, patched and not
    assert set(hf["times_ms"]) == {f"{f}:{i}" for f in ("llama", "qwen3") for i in ("transformers", "nanofast")}
    assert hf["not_timed"] == {"llama:liger": "GPU only", "qwen3:liger": "GPU only"}


def test_each_race_is_against_what_the_model_runs_without_the_kernel(dry_run):
    results = {r["name"]: r for r in dry_run["checks"]}
    for op in ("rms_norm", "qk_norm_rope"):
        assert set(results[op]["times_ms"]) == set(dispatch.OPS[op].backends)
    assert set(results["paged_decode"]["times_ms"]) == {"torch", "triton", "cuda"}  # torch: ops' gather + SDPA
    assert "flash_attn" in results["paged_decode"]["not_timed"]  # said, not silently missing
    assert set(results["linear_cross_entropy"]["times_ms"]) == {"triton", "torch", "unfused", "unfused_compiled"}
    # fp8: the three GEMMs of every fp8 layer of the speedrun's model, summed per backend
    fp8 = results["fp8_linear"]
    assert set(fp8["times_ms"]) == {*dispatch.OPS["fp8_linear"].backends, "bf16_matmul"}
    shapes = gpu_check._fp8_linear_shapes(gpu_check._speedrun(gpu_check.Ctx(torch.device("cpu"), dry_run=True)))
    assert set(fp8["gemm_ms"]) == {f"{n}x{k} x{count}" for (n, k), count in shapes.items()}
    for backend, total in fp8["times_ms"].items():
        per_layer = [(int(name.rpartition("x")[2]), ms[backend]) for name, ms in fp8["gemm_ms"].items()]
        assert all(len(three) == 3 for _, three in per_layer)
        assert total == pytest.approx(sum(count * sum(three) for count, three in per_layer))
    # the d24 step is the speedrun's: fp8 linears, compiled (toy sizes in the dry run)
    step = results["train_step[d24]"]["settings"]
    speedrun = PRESETS["speedrun"]
    assert step["linear_precision"] == speedrun.linear_precision and step["fp8_recipe"] == speedrun.fp8_recipe
    assert step["compile"] is True and step["dtype"] == "torch.bfloat16"


def test_the_dry_run_prints_its_plan_first_and_its_summary_last(dry_run):
    printed = dry_run["printed"]
    assert printed[0].startswith(f"gpu_check plan: {len(gpu_check.CHECKS)} checks") and "no budget" in printed[0]
    assert printed[-2].startswith("gpu_check: dispatch: rms_norm ")
    assert printed[-1].startswith(f"gpu_check: {len(gpu_check.CHECKS)} passed, 0 failed, 0 errors, 0 crashed, "
                                  "0 timed out, 0 skipped")


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
    text = render.gpu_check_markdown(dry_run)
    assert "dry run" in text and f"{len(dry_run['checks'])} passed" in text and "| paged_decode |" in text
    assert "No GPU has run `make gpu-check` yet" in render.gpu_check_section(tmp_path)
    (tmp_path / "gpu-X").mkdir()
    (tmp_path / "gpu-X" / "gpu_check.json").write_text(json.dumps(dry_run))
    assert render.gpu_check_section(tmp_path).startswith("**gpu-X**: ")


def _cpu_ctx() -> gpu_check.Ctx:
    return gpu_check.Ctx(torch.device("cpu"), dry_run=True)


def test_the_decode_check_times_both_modes_and_compares_their_tokens_on_cpu():
    """The decode check at its toy sizes, in this process (~10 s on 2 cores): the static step
    ("eager", the CPU's stand-in for the graphs) and the general path at both depths and batches,
    the static engine on every decode step, the tokens equal; no launch count on CPU, said so, not
    0. `--only decode_step` picks it alone."""
    assert [c.name for c in gpu_check.CHECKS if "decode_step" in c.name] == ["decode_step[graph vs off]"]
    out = gpu_check.speed_decode_step(_cpu_ctx())
    assert out["ok"], [c for c in out["cases"] if not c["ok"]]
    keys = {f"{m} d{d} b{b}" for m in ("eager", "off") for d in (1, 2) for b in (1, 3)}
    assert set(out["times_ms"]) == set(out["configs"]) == set(out["tokens_per_s"]) == keys
    assert [c["case"] for c in out["cases"]] == [
        f"d{d}{case}" for d in (1, 2) for case in (" batch 1: greedy tokens, eager == off",
                                                   " batch 3: greedy tokens, eager == off",
                                                   ": eager ran every decode step static, off none")]
    for key, config in out["configs"].items():
        static = key.startswith("eager")
        assert config["decode_steps"] == 3 and config["static_steps"] == [3 if static else 0] * 2, key
        assert config["profiled_static_steps"] == (2 if static else 0), key
        assert config["launches_per_step"] is None and "CPU" in out["launches_not_counted"][key], key
        assert config["decode_tokens_per_s"] > 0 and config["ms_per_decode_step"] > 0, key
    assert out["settings"]["max_num_seqs"] == 4  # batch 3 runs in the bucket of 4: one padding row
    assert out["graphs_captured"] == {f"{m} d{d}": 0 for m in ("eager", "off") for d in (1, 2)}


def test_the_decode_check_reports_different_tokens_as_a_failure(monkeypatch):
    """A static step whose tokens differ from the general path's fails the check, naming the case
    (the summary shows the failing cases, not times), instead of raising."""
    real = gpu_check._engine_run

    def static_differs(engine, prompts, n_new):
        run = real(engine, prompts, n_new)
        if engine.graphs is not None and len(prompts) == 3 and engine.model.config.n_layer == 2:
            run["tokens"][1] = [(run["tokens"][1][0] + 1) % engine.model.config.vocab_size, *run["tokens"][1][1:]]
        return run

    monkeypatch.setattr(gpu_check, "_engine_run", static_differs)
    out = gpu_check.speed_decode_step(_cpu_ctx())
    assert not out["ok"] and "times_ms" not in out
    assert [c["case"] for c in out["cases"] if not c["ok"]] == ["d2 batch 3: greedy tokens, eager == off"]
    assert next(c for c in out["cases"] if not c["ok"])["identical"] == 2
    summary = render.check_summary({"status": "fail", **out})
    assert summary == ": failing ['d2 batch 3: greedy tokens, eager == off']"


# Checks for the runner's own tests: module-level, so that a worker imports them by name.

def _passes(ctx, tag: int) -> dict:
    return {"ok": True, "tag": tag, "pid": os.getpid()}


def _aborts(ctx) -> dict:
    os.abort()


def _exits_139(ctx) -> dict:
    os._exit(139)  # what a segfaulting process reports through a shell


def _hangs(ctx) -> dict:
    time.sleep(3600)


def _raises(ctx) -> dict:
    raise RuntimeError("an ordinary exception")


def _reads_the_record(ctx, path: str) -> dict:
    """What the JSON on disk holds while this check runs."""
    record = json.loads(Path(path).read_text())
    return {"ok": True, "on_disk": [r["name"] for r in record["checks"]], "finished": record["finished"]}


def _check(name: str, fn, est_s: float = 1.0, backend: str | None = None, **args) -> gpu_check.Check:
    return gpu_check.Check(name, "numerics", fn, est_s, backend=backend, args=args)


def test_a_fault_or_a_hang_costs_one_check_and_the_json_holds_every_result(tmp_path):
    out = tmp_path / "run.json"
    checks = [_check("first", _passes, tag=1), _check("raises", _raises), _check("after raise", _passes, tag=2),
              _check("aborts", _aborts), _check("read after abort", _reads_the_record, path=str(out)),
              _check("exits 139", _exits_139), _check("hangs", _hangs), _check("after hang", _passes, tag=3),
              _check("read last", _reads_the_record, path=str(out))]
    record, lines = {}, []
    results = gpu_check.run(checks, record, out, tmp_path / "run.log", dry_run=True, budget_s=None, timeout_s=8,
                            log=lines.append)
    by = {r["name"]: r for r in results}
    assert {n: r["status"] for n, r in by.items()} == {
        "first": "pass", "raises": "error", "after raise": "pass", "aborts": "crashed", "read after abort": "pass",
        "exits 139": "crashed", "hangs": "timeout", "after hang": "pass", "read last": "pass"}
    # an exception on CPU is a result and the worker goes on (on a GPU it ends the worker: CUDA faults)
    assert "RuntimeError: an ordinary exception" in by["raises"]["error"]
    assert by["first"]["pid"] == by["after raise"]["pid"]
    assert "SIGABRT" in by["aborts"]["error"] and by["aborts"]["exit_code"] == -6
    assert by["exits 139"]["exit_code"] == 139 and "exit code 139" in by["exits 139"]["error"]
    assert "Fatal Python error: Aborted" in by["aborts"]["output_tail"]  # the worker's last lines
    assert 8 <= by["hangs"]["seconds"] < 60 and "killed" in by["hangs"]["error"]
    assert by["after hang"]["pid"] != by["after raise"]["pid"]  # a fresh worker after each crash
    # the JSON was complete after every check, a crash or a timeout included, and valid while running
    names = [c.name for c in checks]
    assert by["read after abort"]["on_disk"] == names[:4] and by["read last"]["on_disk"] == names[:8]
    assert not by["read last"]["finished"]
    on_disk = json.loads(out.read_text())
    assert on_disk["finished"] and [r["name"] for r in on_disk["checks"]] == names
    assert [r["status"] for r in on_disk["checks"]] == [r["status"] for r in results]
    summary = gpu_check.summary_lines(on_disk, [out])
    assert [line.split()[1:3] for line in summary[:-2]] == [
        ["error", "raises:"], ["crashed", "aborts:"], ["crashed", "exits"], ["timeout", "hangs:"]]
    assert summary[-1].startswith("gpu_check: 5 passed, 0 failed, 1 errors, 2 crashed, 1 timed out, 0 skipped")


def test_the_plan_names_what_does_not_fit_before_anything_runs(tmp_path):
    # 30 s: one worker start (10 s by estimate) and "a" (10) fit, "b" (30) does not, "c" (5) still
    # fits, "d" (28) does not: by estimate, and at run time as well.
    checks = [_check("a", _passes, 10, tag=1), _check("b", _passes, 30, tag=2), _check("c", _passes, 5, tag=3),
              _check("d", _passes, 28, tag=4)]
    record, lines = {}, []
    results = gpu_check.run(checks, record, tmp_path / "run.json", tmp_path / "run.log", dry_run=True, budget_s=30,
                            log=lines.append)
    assert lines[0].startswith("gpu_check plan: 2 checks, 25 s by their H100 estimates") and "budget 30 s" in lines[0]
    assert lines[1] == "  runs, in order: a, c"
    assert lines[2] == "  will not run (over the budget by estimate): b (30 s), d (28 s)"
    assert record["plan"]["runs"] == ["a", "c"] and record["plan"]["over_budget"] == ["b", "d"]
    assert [r["status"] for r in results] == ["pass", "skipped", "pass", "skipped"]
    assert "time budget" in results[1]["reason"] and "needs 30 s by estimate" in results[1]["reason"]
    assert record["cuda_backend"]["status"] == "not needed"  # no check here runs the CUDA sources


def test_the_default_plan_fits_the_default_budget_in_the_issues_order():
    checks = gpu_check.CHECKS
    left_out = [c for c in checks if c.left_out]
    assert [c.name for c in left_out] == ["train_step[d12]", "paged_prefill", "hf_models", "decode_step[graph vs off]"]
    default = [c for c in checks if not c.left_out]
    fits, over, estimate = gpu_check.plan(default, gpu_check.BUDGET_S, build=True)
    # every default check, the CUDA build and a worker start within 9 minutes: a 10-minute command
    assert not over and estimate <= gpu_check.BUDGET_S <= 540, [c.name for c in over]
    assert "train_step[d24]" in [c.name for c in fits]
    # the dispatch table's checks, then the model's, then the training steps
    index = {c.name: i for i, c in enumerate(checks)}
    deciding = [c for c in checks if c.op is not None]
    model = [c for c in checks if c.section == "model"]
    assert max(index[c.name] for c in deciding) < min(index[c.name] for c in model)
    assert max(index[c.name] for c in model) < index["train_step[d12]"] < index["train_step[d24]"]
    for op in dispatch.OPS:  # each op's numerics before its speed check, every backend checked
        of_op = [c for c in checks if c.op == op]
        assert [c.section for c in of_op][-1] == "speed" and {c.section for c in of_op[:-1]} == {"numerics"}, op
        assert {c.backend for c in of_op[:-1]} == set(dispatch.OPS[op].backends) - {"torch"}, op


def test_cuda_checks_are_skipped_with_the_reason_when_the_sources_do_not_build(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "build_cuda_backend",
                        lambda dry_run, timeout_s: {"status": "failed", "reason": "RuntimeError: nvcc failed (1)",
                                                    "seconds": 0.1})
    checks = [_check("kernel[cuda]", _passes, backend="cuda", tag=1), _check("kernel[triton]", _passes, tag=2)]
    record, lines = {}, []
    results = gpu_check.run(checks, record, None, tmp_path / "run.log", dry_run=True, budget_s=None, log=lines.append)
    assert [r["status"] for r in results] == ["skipped", "pass"]
    assert results[0]["reason"] == "the CUDA sources did not build: RuntimeError: nvcc failed (1)"
    assert any(line.startswith("cuda backend: failed: RuntimeError: nvcc failed") for line in lines)


def _has_nvcc() -> bool:
    try:
        return bool(nvcc_path())
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not _has_nvcc(), reason="no nvcc (NVCC, PATH or CUDA_HOME)")
def test_the_nvcc_build_serves_every_launch_function(tmp_path, monkeypatch):
    """What a bare GPU machine builds (nvcc alone, the sources in parallel), here for sm_90: every
    launch function is in the library, callable, and served as nanofast._C's symbols()."""
    monkeypatch.setenv("NANOFAST_CACHE", str(tmp_path))
    built = gpu_check.build_cuda_library("sm_90", timeout_s=900)
    assert not built["cached"] and Path(built["path"]).is_file() and "-arch=sm_90" in built["how"]
    assert gpu_check.build_cuda_library("sm_90", timeout_s=900) == {**built, "cached": True}
    try:
        gpu_check.use_cuda_library(built["path"])
        symbols = sys.modules["nanofast._C"].symbols()
    finally:
        sys.modules.pop("nanofast._C", None)
    assert set(symbols) == set(ABI) | set(ERROR_FN.values()) and all(symbols.values())
    error_string = ctypes.CFUNCTYPE(ctypes.c_char_p, ctypes.c_int)(symbols["nf_rms_norm_error_string"])
    assert error_string(1)  # host code of the library: runs without a GPU


def _torch_and_triton_modules() -> set[str]:
    """Top-level modules of what `pip install torch triton` brings: their distributions and their
    requirements' (without extras), transitively."""
    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    wanted, todo = set(), ["torch", "triton"]
    while todo:
        dist = norm(todo.pop())
        if dist in wanted:
            continue
        wanted.add(dist)
        try:
            requires = importlib.metadata.requires(dist) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [re.match(r"[A-Za-z0-9_.-]+", r).group(0) for r in requires if "extra ==" not in r]
    return {module for module, dists in importlib.metadata.packages_distributions().items()
            if any(norm(d) in wanted for d in dists)}


_BARE = """
import importlib, json, sys
sys.path[:0] = json.loads(sys.argv[1])
from bench import gpu_check
gpu_check.kernels_importable()
for module in json.loads(sys.argv[2]):
    importlib.import_module(module)
print(gpu_check._machine()[0])
"""


def test_a_bare_machine_imports_everything_the_checks_use(tmp_path):
    """python3 -m bench.gpu_check from the repository root with torch and triton alone: no install
    (no editable finder: -S), no pytest, numpy, tokenizer libraries or matplotlib (a site folder of
    links to torch, triton and their requirements only). Every module the checks import loads; only
    the page (bench.performance, run when writing into the repository) needs more, and the run goes
    on without it."""
    tree = ast.parse(Path(gpu_check.__file__).read_text())
    modules = sorted({a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
                     | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0
                        and n.module not in ("__future__", "bench")}
                     | {f"bench.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                        and n.module == "bench" for a in n.names} - {"bench.performance", "bench.gpu_check"})
    assert {"nanofast.engine", "nanofast.model", "bench.gpu_peaks", "torch"} <= set(modules)
    site = Path(torch.__file__).resolve().parents[1]
    bare = tmp_path / "site"
    bare.mkdir()
    for name in _torch_and_triton_modules():
        for entry in [site / name, site / f"{name}.py", *site.glob(f"{name}.*.so")]:
            if entry.exists():
                (bare / entry.name).symlink_to(entry)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a GPU run's environment
    done = subprocess.run([sys.executable, "-S", "-c", _BARE, json.dumps([str(ROOT), str(bare)]), json.dumps(modules)],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1].startswith("gpu-" if CUDA else "cpu-")  # the machine class


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


def _speed(op: str, times: dict, floor: tuple | None = None, fractions: dict | None = None) -> dict:
    rec = {"name": op, "section": "speed", "op": op, "backend": None, "status": "pass", "times_ms": times,
           "fraction_of_peak": fractions or {}}
    if floor:
        rec["floor"] = {"name": floor[0], "backend": floor[1]}
    return rec


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
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--sections", "numerics,model",
                           "--out-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_every_declared_backend_has_its_numerics_and_every_op_its_race():
    """The checks cover the registry: each kernel backend of each dispatched op (nanofast.kernels.
    registry) has a numerics check, and each op a speed check, so a backend added to a declaration
    is measured before a table can pick it. (The checks are listed by hand: the module must import
    on a bare machine before nanofast can.)"""
    from nanofast import dispatch

    numerics = {(c.op, c.backend) for c in gpu_check.CHECKS if c.section == "numerics"}
    speed = {c.op for c in gpu_check.CHECKS if c.section == "speed"}
    for name, op in dispatch.OPS.items():
        assert {(name, b) for b in op.kernels} <= numerics, name
        assert name in speed, name
