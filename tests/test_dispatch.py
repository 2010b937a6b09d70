"""nanofast.dispatch: the backend of each kernel-backed op on a GPU, from a table of measurements.

Runs on CPU: CUDA devices are named through `torch.device("cuda")` (no tensor is created on them)
with torch.cuda.get_device_name or dispatch.device_class monkeypatched.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nanofast import attention, dispatch, ops

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
REAL_TABLES = dispatch.TABLES  # the fixture below points dispatch at a temporary folder
UNMEASURED = {"rms_norm": "triton", "qk_norm_rope": "triton", "rotary": "triton", "paged_attention": "triton",
              "linear_cross_entropy": "triton", "newton_schulz": "torch", "fp8_linear": "scaled_mm"}


def r(ms: float | None, ok: bool = True) -> dict:
    return {"ms": ms, "ok": ok}


@pytest.fixture(autouse=True)
def clean(monkeypatch, tmp_path):
    """No table from the environment or the repository; no cached loads; no forced backend."""
    monkeypatch.delenv(dispatch.TABLE_ENV, raising=False)
    monkeypatch.setattr(dispatch, "TABLES", tmp_path / "tables")
    dispatch.clear_cache()
    ops.set_kernel_backend(None)
    ops.set_fp8_backend(None)
    yield
    dispatch.clear_cache()
    ops.set_kernel_backend(None)
    ops.set_fp8_backend(None)


def write_table(path: Path, doc) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


@pytest.fixture
def gpu_named(monkeypatch):
    """Make torch.device("cuda") report the given GPU name."""
    def name(device_name: str) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
    return name


# ---- the rule -------------------------------------------------------------------------------

def test_ops_table_lists_each_ops_backends_and_default():
    assert {op: spec.unmeasured for op, spec in dispatch.OPS.items()} == UNMEASURED
    assert {op: spec.vendor for op, spec in dispatch.OPS.items()} == {**{op: "torch" for op in UNMEASURED},
                                                                       "fp8_linear": "scaled_mm"}
    for op, spec in dispatch.OPS.items():
        assert spec.unmeasured in spec.backends
    # "cuda" only for the ops that have CUDA sources: dispatch can never pick a kernel that does not exist
    assert sorted(op for op, spec in dispatch.OPS.items() if "cuda" in spec.kernels) == \
        ["paged_attention", "qk_norm_rope", "rms_norm"]


@pytest.mark.parametrize("measured", [None, {}])
def test_unmeasured_ops_take_their_defaults(measured):
    assert {op: dispatch.choose(op, measured) for op in dispatch.OPS} == UNMEASURED


def test_kernel_faster_than_the_vendor_is_chosen():
    assert dispatch.choose("rms_norm", {"torch": r(2.0), "triton": r(1.0)}) == "triton"
    assert dispatch.choose("newton_schulz", {"torch": r(2.0), "triton": r(1.5)}) == "triton"
    assert dispatch.choose("fp8_linear", {"scaled_mm": r(2.0), "triton": r(1.9)}) == "triton"


def test_fastest_of_two_winning_kernels_is_chosen():
    assert dispatch.choose("rms_norm", {"torch": r(2.0), "triton": r(1.0), "cuda": r(0.5)}) == "cuda"
    assert dispatch.choose("rms_norm", {"torch": r(2.0), "triton": r(0.5), "cuda": r(1.0)}) == "triton"
    assert dispatch.choose("fp8_linear", {"scaled_mm": r(2.0), "triton": r(1.5),
                                          "triton_persistent": r(1.2)}) == "triton_persistent"


def test_vendor_wins_when_no_kernel_is_faster():
    assert dispatch.choose("rms_norm", {"torch": r(1.0), "triton": r(1.5), "cuda": r(2.0)}) == "torch"
    assert dispatch.choose("fp8_linear", {"scaled_mm": r(1.0), "triton": r(1.5)}) == "scaled_mm"
    assert dispatch.choose("paged_attention", {"torch": r(1.0), "triton": r(1.0)}) == "torch"  # a tie is no win
    # a table that measured the op but not the kernel: nothing shows the kernel is right, so the vendor
    assert dispatch.choose("rms_norm", {"torch": r(1.0)}) == "torch"


def test_a_faster_kernel_that_failed_its_checks_is_never_chosen():
    assert dispatch.choose("rms_norm", {"torch": r(2.0), "triton": r(0.1, ok=False)}) == "torch"
    assert dispatch.choose("rms_norm", {"torch": r(2.0), "triton": r(1.0), "cuda": r(0.1, ok=False)}) == "triton"
    assert dispatch.choose("newton_schulz", {"torch": r(None, ok=False), "triton": r(0.1, ok=False)}) == "torch"


def test_a_kernel_without_a_time_is_not_chosen():
    assert dispatch.choose("qk_norm_rope", {"torch": r(2.0), "triton": r(None)}) == "torch"


def test_vendor_failed_or_untimed_means_the_fastest_ok_kernel():
    # the vendor's time does not count when it failed its checks, even though it was faster
    assert dispatch.choose("fp8_linear", {"scaled_mm": r(0.5, ok=False), "triton": r(2.0),
                                          "triton_persistent": r(1.0)}) == "triton_persistent"
    assert dispatch.choose("rms_norm", {"torch": r(None), "triton": r(3.0), "cuda": r(2.0)}) == "cuda"
    assert dispatch.choose("linear_cross_entropy", {"triton": r(3.0)}) == "triton"


def test_unknown_op_is_an_error_naming_it_and_the_known_ones():
    for call in (lambda: dispatch.choose("rmsnorm", None), lambda: dispatch.backend_for("rmsnorm", CUDA),
                 lambda: ops.decide_backend("rmsnorm", CPU)):
        with pytest.raises(ValueError, match="'rmsnorm'.*rms_norm"):
            call()


# ---- device classes and the table file ------------------------------------------------------

@pytest.mark.parametrize("name,cls", [("NVIDIA H100 80GB HBM3", "gpu-H100"), ("NVIDIA H200", "gpu-H200"),
                                      ("NVIDIA L40S", "gpu-L40S"), ("NVIDIA L4", "gpu-L4"),
                                      ("NVIDIA A100-SXM4-80GB", "gpu-A100"),
                                      ("Tesla V100-SXM2 16GB", "gpu-Tesla-V100-SXM2-16GB")])
def test_device_class_of_a_gpu(gpu_named, name, cls):
    gpu_named(name)
    assert dispatch.device_class(CUDA) == cls
    assert dispatch.device_class("cuda:0") == cls


def test_device_class_of_the_cpu_queries_no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: pytest.fail("asked for a GPU name"))
    assert dispatch.device_class(CPU) == "cpu"
    assert dispatch.device_class("cpu") == "cpu"


def test_bench_machine_class_uses_the_same_rule(monkeypatch, gpu_named):
    from bench.conftest import machine_class

    gpu_named("NVIDIA H100 PCIe")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert machine_class() == "gpu-H100"
    monkeypatch.setattr(dispatch, "device_class", lambda device: "gpu-from-dispatch")
    assert machine_class() == "gpu-from-dispatch"


def test_committed_table_location_per_device_class(tmp_path, gpu_named):
    gpu_named("NVIDIA H100 80GB HBM3")
    assert dispatch.backend_for("rms_norm", CUDA) == "triton"  # no table: the default
    write_table(tmp_path / "tables" / "gpu-H100.json",
                {"dispatch": {"rms_norm": {"torch": r(1.0), "triton": r(2.0)}}})
    dispatch.clear_cache()
    assert dispatch.backend_for("rms_norm", CUDA) == "torch"
    gpu_named("NVIDIA H200")  # another class: its (absent) table, so the default
    assert dispatch.backend_for("rms_norm", CUDA) == "triton"


def test_tables_ship_inside_the_package():
    """The measured tables live in the package (package data), so an installed nanofast uses them."""
    assert REAL_TABLES == Path(dispatch.__file__).resolve().parent / "dispatch_tables"
    assert REAL_TABLES.is_dir() and (REAL_TABLES / "README.md").is_file()
    assert dispatch.table_path("gpu-H100") == dispatch.TABLES / "gpu-H100.json"
    setup = (Path(dispatch.__file__).resolve().parents[1] / "setup.py").read_text()
    assert '"dispatch_tables/*.json"' in setup


def test_env_var_names_the_table(monkeypatch, tmp_path, gpu_named):
    gpu_named("NVIDIA H100 80GB HBM3")
    path = write_table(tmp_path / "mine.json", {"dispatch": {"newton_schulz": {"torch": r(2.0), "triton": r(1.0)}}})
    monkeypatch.setenv(dispatch.TABLE_ENV, str(path))
    assert dispatch.table_path("gpu-H100") == path
    assert dispatch.backend_for("newton_schulz", CUDA) == "triton"
    assert dispatch.backend_for("rms_norm", CUDA) == "triton"  # not in the table: unmeasured


def test_env_var_naming_a_missing_file_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv(dispatch.TABLE_ENV, str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="nope.json"):
        dispatch.table("gpu-H100")


def test_a_table_without_dispatch_results_is_unmeasured(monkeypatch, tmp_path, gpu_named):
    gpu_named("NVIDIA H100")
    monkeypatch.setenv(dispatch.TABLE_ENV, str(write_table(tmp_path / "t.json", {"results": []})))
    assert dispatch.table("gpu-H100") == {}
    assert {op: dispatch.backend_for(op, CUDA) for op in dispatch.OPS} == UNMEASURED


def test_loads_are_cached_until_cleared(monkeypatch, tmp_path):
    path = write_table(tmp_path / "t.json", {"dispatch": {"rms_norm": {"torch": r(1.0), "triton": r(2.0)}}})
    monkeypatch.setenv(dispatch.TABLE_ENV, str(path))
    assert dispatch.choose("rms_norm", dispatch.table("x").get("rms_norm")) == "torch"
    write_table(path, {"dispatch": {"rms_norm": {"torch": r(3.0), "triton": r(2.0)}}})
    assert dispatch.choose("rms_norm", dispatch.table("x").get("rms_norm")) == "torch"  # cached
    dispatch.clear_cache()
    assert dispatch.choose("rms_norm", dispatch.table("x").get("rms_norm")) == "triton"


@pytest.mark.parametrize("doc,what", [
    ("{not json", "not valid JSON"),
    ([1, 2], "top level must be a JSON object"),
    ({"dispatch": [1]}, "\"dispatch\" must be an object"),
    ({"dispatch": {"rmsnorm": {}}}, "unknown op 'rmsnorm'"),
    ({"dispatch": {"rms_norm": []}}, r"dispatch\['rms_norm'\] must be an object"),
    ({"dispatch": {"linear_cross_entropy": {"cuda": r(1.0)}}}, "unknown backend 'cuda'"),
    ({"dispatch": {"rms_norm": {"triton": {"ms": 1.0}}}}, "with \"ms\" and \"ok\""),
    ({"dispatch": {"rms_norm": {"triton": {"ms": 1.0, "ok": "yes"}}}}, "must be true or false"),
    ({"dispatch": {"rms_norm": {"triton": {"ms": "1.0", "ok": True}}}}, "finite number"),
    ({"dispatch": {"rms_norm": {"triton": {"ms": -1, "ok": True}}}}, "finite number"),
])
def test_malformed_table_is_an_error_naming_the_file(monkeypatch, tmp_path, gpu_named, doc, what):
    gpu_named("NVIDIA H100")
    path = write_table(tmp_path / "broken_table.json", doc)
    monkeypatch.setenv(dispatch.TABLE_ENV, str(path))
    with pytest.raises(ValueError, match=what) as err:
        dispatch.backend_for("rms_norm", CUDA)
    assert str(path) in str(err.value)


def test_committed_tables_are_well_formed():
    """Every gpu_check.json in the repository loads (a malformed one would fail every GPU run)."""
    for path in sorted(REAL_TABLES.glob("*.json")):
        dispatch._load(str(path))


# ---- ops: who runs each op --------------------------------------------------------------------

@pytest.fixture
def measured_gpu(monkeypatch, tmp_path):
    """A CUDA device of class gpu-Test whose table makes a different backend win for each op."""
    table = {"rms_norm": {"torch": r(1.0), "triton": r(2.0), "cuda": r(3.0)},
             "qk_norm_rope": {"torch": r(3.0), "triton": r(1.0), "cuda": r(2.0)},
             "rotary": {"torch": r(1.0), "triton": r(2.0)},
             "paged_attention": {"torch": r(3.0), "triton": r(2.0), "cuda": r(1.0)},
             "linear_cross_entropy": {"torch": r(1.0), "triton": r(2.0)},
             "newton_schulz": {"torch": r(2.0), "triton": r(1.0)},
             "fp8_linear": {"scaled_mm": r(3.0), "triton": r(2.0), "triton_persistent": r(1.0)}}
    write_table(tmp_path / "tables" / "gpu-Test.json", {"dispatch": table})
    monkeypatch.setattr(dispatch, "device_class", lambda device: "gpu-Test" if torch.device(device).type == "cuda"
                        else "cpu")
    return {"rms_norm": "torch", "qk_norm_rope": "triton", "rotary": "torch", "paged_attention": "cuda",
            "linear_cross_entropy": "torch", "newton_schulz": "triton", "fp8_linear": "triton_persistent"}


def test_ops_on_an_unmeasured_gpu_take_the_defaults(monkeypatch):
    monkeypatch.setattr(dispatch, "device_class", lambda device: "gpu-Unmeasured")
    assert {op: ops.decide_backend(op, CUDA) for op in dispatch.OPS} == UNMEASURED


def test_ops_on_a_measured_gpu_follow_the_table(measured_gpu):
    assert {op: ops.decide_backend(op, CUDA) for op in dispatch.OPS} == measured_gpu


def test_cpu_default_is_the_vendor_path_for_every_op_whatever_the_table(measured_gpu, monkeypatch, tmp_path):
    # CPU: each op's vendor path (torch; torch._scaled_mm for the fp8 linears, as on a GPU)
    vendor = {op: spec.vendor for op, spec in dispatch.OPS.items()}
    assert vendor["fp8_linear"] == "scaled_mm" and vendor["rms_norm"] == "torch"
    assert {op: ops.decide_backend(op, CPU) for op in dispatch.OPS} == vendor
    assert {op: dispatch.backend_for(op, CPU) for op in dispatch.OPS} == vendor
    x = torch.zeros(2, 4)
    assert (ops.op_backend("rms_norm", x), ops.op_backend("linear_cross_entropy", x), ops.op_backend("fp8_linear", x)) \
        == ("torch", "torch", "scaled_mm")


@pytest.mark.parametrize("forced,want", [
    ("torch", {op: "torch" for op in UNMEASURED}),
    ("triton", {op: "triton" for op in UNMEASURED}),
    ("cuda", {"rms_norm": "cuda", "qk_norm_rope": "cuda", "rotary": "triton", "paged_attention": "cuda",
              "linear_cross_entropy": "triton", "newton_schulz": "triton", "fp8_linear": "triton"}),
])
@pytest.mark.parametrize("device", [CUDA, CPU])
def test_a_forced_kernel_backend_wins_over_the_table(measured_gpu, forced, want, device):
    ops.set_kernel_backend(forced)
    assert {op: ops.decide_backend(op, device) for op in dispatch.OPS} == want


def test_a_forced_fp8_backend_wins_over_everything(measured_gpu):
    ops.set_kernel_backend("torch")
    ops.set_fp8_backend("triton")
    assert ops.decide_backend("fp8_linear", CUDA) == "triton"
    assert ops.decide_backend("rms_norm", CUDA) == "torch"
    ops.set_kernel_backend(None)
    ops.set_fp8_backend("scaled_mm")
    assert ops.decide_backend("fp8_linear", CUDA) == "scaled_mm"
    assert ops.decide_backend("fp8_linear", CPU) == "scaled_mm"
    ops.set_fp8_backend(None)
    assert ops.decide_backend("fp8_linear", CUDA) == "triton_persistent"


def test_forced_cuda_runs_triton_where_an_op_has_no_cuda_kernel():
    x = torch.zeros(2, 4)
    ops.set_kernel_backend("cuda")
    assert ops.op_backend("rms_norm", x) == "cuda"
    assert ops.op_backend("linear_cross_entropy", x) == "triton"
    assert ops.op_backend("newton_schulz", x) == "triton"


def test_each_op_asks_for_its_own_backend(monkeypatch):
    """norm, qk_norm_rope, paged attention, the fused head, fp8 linear and Muon's Newton-Schulz each
    decide under their own op name (what the dispatch table is keyed by)."""
    from nanofast.optim import MuonAdamW

    asked = []

    def record(op, device):
        asked.append(op)
        return "torch"

    monkeypatch.setattr(ops, "decide_backend", record)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, generator=g)

    def expect(op, call):
        asked.clear()
        call()
        assert set(asked) == {op}, (op, asked)

    expect("rms_norm", lambda: ops.norm(x))
    cos, sin = ops.rotary_tables(3, 8)
    q, k = torch.randn(1, 3, 2, 8, generator=g), torch.randn(1, 3, 1, 8, generator=g)
    expect("qk_norm_rope", lambda: ops.qk_norm_rope(q, k, cos, sin))
    kc, vc = torch.zeros(4, 2, 1, 8), torch.zeros(4, 2, 1, 8)
    expect("paged_attention", lambda: attention.paged_kv_write(k[0], k[0], kc, vc, torch.tensor([0, 1, 2])))
    expect("paged_attention", lambda: attention.paged_decode_attention(q[:, 0], kc, vc, torch.tensor([[0, 1]]),
                                                                       torch.tensor([3]), 8))
    w = torch.randn(16, 8, generator=g)
    targets = torch.randint(0, 10, (2, 3), generator=g)
    expect("linear_cross_entropy", lambda: ops.linear_softcap_cross_entropy(x, w, targets, 10))
    expect("fp8_linear", lambda: ops.linear(torch.randn(16, 16, generator=g), torch.randn(16, 16, generator=g),
                                            "fp8"))
    p = torch.nn.Parameter(torch.randn(8, 8, generator=g))
    p.grad = torch.randn(8, 8, generator=g)
    opt = MuonAdamW([{"params": [p], "kind": "muon", "lr": 0.02}])
    expect("newton_schulz", opt.step)


def test_qk_norm_rope_torch_path_is_unchanged_plain_torch():
    """Its vendor path runs F.rms_norm itself (not the rms_norm op's choice): same numbers as before."""
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 5, 3, 8, generator=g), torch.randn(1, 5, 1, 8, generator=g)
    cos, sin = ops.rotary_tables(5, 8)
    qo, ko = ops.qk_norm_rope(q, k, cos, sin, scale=1.5)
    torch.testing.assert_close(qo, ops.norm(ops.apply_rotary(q, cos, sin)) * 1.5, rtol=0, atol=0)
    torch.testing.assert_close(ko, ops.norm(ops.apply_rotary(k, cos, sin)) * 1.5, rtol=0, atol=0)


def test_the_choice_is_a_constant_under_torch_compile(measured_gpu):
    """Dynamo cannot trace the table's file read or the GPU-name query: the choice must be taken
    at trace time (assume_constant_result), so a fullgraph compile succeeds and bakes it in."""
    def f(x):
        a = ops.decide_backend("rms_norm", CUDA)           # "torch" in measured_gpu's table
        b = dispatch.backend_for("newton_schulz", CUDA)    # "triton"
        return x + (1 if a == "torch" else 100) + (10 if b == "triton" else 1000)

    torch._dynamo.reset()
    try:
        out = torch.compile(f, backend="eager", fullgraph=True)(torch.zeros(3))
    finally:
        torch._dynamo.reset()
    assert out.tolist() == [11.0, 11.0, 11.0]


# ---- rehearsing a GPU's choices on CPU (the rehearsal preset's dispatch_as) ------------------

def test_dispatch_as_gives_cpu_tensors_an_unmeasured_gpus_choices():
    ops.set_kernel_backend(None, "cpu", dispatch_as="gpu-Unmeasured")
    assert {op: ops.decide_backend(op, CPU) for op in dispatch.OPS} == UNMEASURED
    x = torch.zeros(2, 4)
    assert (ops.op_backend("rms_norm", x), ops.op_backend("newton_schulz", x), ops.op_backend("fp8_linear", x)) \
        == ("triton", "torch", "scaled_mm")


def test_dispatch_as_follows_that_gpus_table(measured_gpu):
    ops.set_kernel_backend(None, "cpu", dispatch_as="gpu-Test")
    assert {op: ops.decide_backend(op, CPU) for op in dispatch.OPS} == measured_gpu


def test_a_forced_backend_wins_over_dispatch_as(measured_gpu):
    ops.set_kernel_backend("torch", "cpu", dispatch_as="gpu-Test")
    assert {op: ops.decide_backend(op, CPU) for op in dispatch.OPS} == {op: "torch" for op in dispatch.OPS}


@pytest.mark.parametrize("bad", ["H100", "cpu", ""])
def test_dispatch_as_names_a_gpu_class(bad):
    with pytest.raises(ValueError, match="dispatch_as must be a GPU device class"):
        ops.set_kernel_backend(None, "cpu", dispatch_as=bad)


def test_dispatch_as_is_a_constant_under_torch_compile(measured_gpu):
    ops.set_kernel_backend(None, "cpu", dispatch_as="gpu-Test")

    def f(x):
        return x + (1 if ops.decide_backend("paged_attention", CPU) == "cuda" else 100)

    torch._dynamo.reset()
    try:
        out = torch.compile(f, backend="eager", fullgraph=True)(torch.zeros(2))
    finally:
        torch._dynamo.reset()
    assert out.tolist() == [1.0, 1.0]
