"""The op registry (nanofast.kernels.registry): every kernel-backed op declared once, its public
entries validating once per call on every backend, and a new backend reaching every caller through
the declaration alone."""
from __future__ import annotations

import functools
import importlib
from types import SimpleNamespace

import pytest
import torch

import nanofast.kernels as K
from nanofast import dispatch, ops
from nanofast.kernels import registry
from nanofast.kernels.backend import BACKENDS

from cuda_emu_helpers import emu  # noqa: F401 (emu: the fixture building the CUDA sources' CPU emulation)

E4M3 = torch.float8_e4m3fn


def _paged():
    g = torch.Generator().manual_seed(0)
    kc, vc = torch.randn(4, 2, 1, 4, generator=g), torch.randn(4, 2, 1, 4, generator=g)
    return dict(q=torch.randn(2, 2, 4, generator=g), k_cache=kc, v_cache=vc,
                block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
                seq_lens=torch.tensor([3, 4], dtype=torch.int32))


def _fp8_operands():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(16, 16, generator=g).to(E4M3), torch.randn(16, 16, generator=g).to(E4M3)
    return a, b, torch.tensor(0.5), torch.tensor(0.25)


# entry -> a call of the public function on small awkward inputs, given a backend; `grad`: the
# inputs that require grad, so the backward runs too (it must not validate again).
def _calls():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, generator=g, requires_grad=True)
    q, k = torch.randn(1, 3, 2, 4, generator=g, requires_grad=True), torch.randn(1, 3, 1, 4, generator=g)
    cos, sin = torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g)
    qkv = torch.randn(3, 16, generator=g)
    xs, w = torch.randn(3, 8, generator=g, requires_grad=True), torch.randn(5, 8, generator=g)
    targets = torch.tensor([1, -1, 4])
    G = torch.randn(4, 6, generator=g)
    grad, buf = torch.randn(2, 4, 6, generator=g), torch.zeros(2, 4, 6)
    xl, wl = torch.randn(5, 16, generator=g, requires_grad=True), torch.randn(16, 16, generator=g)
    kv = torch.randn(2, 1, 4, generator=g)
    rq, rk = torch.randn(1, 3, 2, 4, generator=g, requires_grad=True), torch.randn(1, 3, 1, 4, generator=g)
    rc, rs = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    return {
        "rms_norm": lambda be: K.rms_norm(x, backend=be).sum().backward(),
        "qk_norm_rope": lambda be: sum(t.sum() for t in K.qk_norm_rope(q, k, cos, sin, backend=be)).backward(),
        "qk_norm_rope_inplace": lambda be: K.qk_norm_rope_inplace(
            qkv.clone(), torch.tensor([0, 2, 1]), torch.randn(4, 4, generator=g), 2, 1, backend=be),
        "paged_decode_attention": lambda be: K.paged_decode_attention(**_paged(), backend=be),
        "paged_kv_write": lambda be: K.paged_kv_write(
            kv, kv, *(lambda p: (p["k_cache"], p["v_cache"]))(_paged()), torch.tensor([5, -1]), backend=be),
        "linear_softcap_cross_entropy": lambda be: K.linear_softcap_cross_entropy(
            xs, w, targets, 15.0, backend=be).backward(),
        "linear_cross_entropy": lambda be: K.linear_cross_entropy(
            xs, w, targets, torch.randn(5, generator=g, requires_grad=True), ignore_index=-1, label_smoothing=0.1,
            z_loss=1e-4, backend=be).backward(),
        "newton_schulz": lambda be: K.newton_schulz(G, backend=be),
        "nesterov_normalize_": lambda be: K.nesterov_normalize_(grad.clone(), buf.clone(), 0.9, backend=be),
        "fp8_linear": lambda be: K.fp8_linear(xl, wl, backend=be).sum().backward(),
        "fp8_gemm": lambda be: K.fp8_gemm(*_fp8_operands(), backend=be),
        "quantize_fp8": lambda be: K.quantize_fp8(torch.randn(4, 16, generator=g), backend=be),
        "apply_rotary_pos_emb": lambda be: sum(t.sum() for t in K.apply_rotary_pos_emb(
            rq.transpose(1, 2), rk.transpose(1, 2), rc, rs, backend=be)).backward(),
        "rotary_embedding": lambda be: K.rotary_embedding(rq, rc, rs, torch.tensor([2, 0, 1]), unsqueeze_dim=2,
                                                          backend=be).sum().backward(),
    }


CALLS = _calls()
CASES = [(op.name, entry, be) for op in registry.OPS.values() for entry in op.checks for be in op.choices]


def test_every_public_entry_is_declared_and_exercised_here():
    entries = {e for op in registry.OPS.values() for e in op.checks}
    assert entries == set(CALLS)
    for op in registry.OPS.values():
        assert set(op.references) == set(op.checks), op.name
        for entry in op.checks:
            assert callable(getattr(K, entry)), f"nanofast.kernels.{entry} is the public entry of {op.name}"


@pytest.mark.parametrize("name,entry,backend", CASES, ids=["-".join(c) for c in CASES])
def test_validation_runs_once_per_public_call(name, entry, backend, monkeypatch, request):
    """The public entry validates; the references it falls back to and the launchers behind it
    trust their inputs, forward and backward."""
    if backend == "cuda":
        request.getfixturevalue("emu")  # the CPU emulation build of csrc/
    op = registry.op(name)
    count = []
    check = op.checks[entry]
    monkeypatch.setitem(op.checks, entry, lambda *a, **kw: (count.append(1), check(*a, **kw))[1])
    CALLS[entry](backend)
    assert len(count) == 1, f"{entry}(backend={backend!r}) validated {len(count)} times"


def test_bad_input_is_refused_by_the_entry_before_any_backend_runs(monkeypatch):
    """The validation is the entry's: a launcher never sees an argument the check refuses."""
    op = registry.op("rms_norm")
    monkeypatch.setitem(op.launchers, "triton", SimpleNamespace(fwd=None, bwd=None))
    monkeypatch.setattr(op, "_loaded", {})
    with pytest.raises(ValueError, match="weight must have shape"):
        K.rms_norm(torch.randn(3, 5), torch.ones(4), backend="triton")


def test_declarations_are_complete():
    for op in registry.OPS.values():
        assert op.vendor in op.backends and op.unmeasured in op.backends and op.why, op.name
        assert op.choices[0] == "torch" and set(op.backends) <= set(op.choices), op.name
        assert op.cost is not None, f"{op.name} declares no byte/FLOP model"
        for backend in op.kernels:
            assert op.launcher(backend) is not None, (op.name, backend)
        if op.configs is not None:
            configs = op.configs()
            assert configs and all("fn" in c and "signature" in c for c in configs), op.name
    assert {op.part_of for op in registry.OPS.values()} - {None} <= set(registry.OPS)
    assert set(dispatch.OPS) == {n for n, op in registry.OPS.items() if op.part_of is None}
    assert set(K.BACKENDS) == set(BACKENDS)


def test_cost_models_count_what_they_say():
    rn = registry.op("rms_norm").cost(tokens=16, d=8, mode="fwd", weight=False, itemsize=2)
    assert rn == {"bytes": 2 * 16 * 8 * 2 + 4 * 16, "flops": 4 * 16 * 8}
    pa = registry.op("paged_attention").cost(seq_lens=[3, 5], hq=4, hkv=2, d=8, itemsize=2)
    assert pa["bytes"] == (2 * 8 * 2 * 8 + 2 * 2 * 4 * 8) * 2 and pa["flops"] == 4 * 4 * 8 * 8
    ns = registry.op("newton_schulz").cost(shape=(2, 6, 4), steps=5)
    assert ns["flops"] == 2 * 5 * (4 * 4 * 4 * 6 + 2 * 4 ** 3)
    assert registry.op("fp8_gemm").cost(m=4, n=8, k=16)["flops"] == 2 * 4 * 8 * 16
    with pytest.raises(ValueError, match="mode must be"):
        registry.op("rms_norm").cost(tokens=1, d=1, mode="bwd")


def test_unknown_op_is_named():
    with pytest.raises(ValueError, match="unknown op 'rmsnorm'"):
        registry.op("rmsnorm")
    with pytest.raises(ValueError, match="unknown op 'fp8_gemm'"):
        dispatch.backend_for("fp8_gemm", torch.device("cpu"))  # run by fp8_linear's choice, not dispatched


def test_a_new_backend_is_one_launcher_and_one_declaration_entry(monkeypatch, tmp_path):
    """A backend "mine" for rms_norm: a launcher (here an object; in the package, a module named by
    string) added to the op's declaration. Nothing else changes, yet the public entry, the
    dispatch table's rule, the forced-backend knob and the table validation all reach it."""
    op = registry.op("rms_norm")
    triton = op.launcher("triton")
    calls = []

    def traced(fn, name):
        @functools.wraps(fn)
        def run(*args):
            calls.append(name)
            return fn(*args)
        return run

    mine = SimpleNamespace(fwd=traced(triton.fwd, "fwd"), bwd=traced(triton.bwd, "bwd"))
    monkeypatch.setattr(op, "kernels", (*op.kernels, "mine"))
    monkeypatch.setitem(op.launchers, "mine", mine)
    monkeypatch.setattr(op, "_loaded", {})

    x = torch.randn(3, 40, requires_grad=True)
    y = K.rms_norm(x, backend="mine")
    y.sum().backward()
    assert calls == ["fwd", "bwd"]
    torch.testing.assert_close(y, K.rms_norm_reference(x.detach()))

    measured = {"torch": {"ms": 3.0, "ok": True}, "triton": {"ms": 2.0, "ok": True}, "mine": {"ms": 1.0, "ok": True}}
    assert dispatch.choose("rms_norm", measured) == "mine"
    table = tmp_path / "gpu-Test.json"
    table.write_text('{"dispatch": {"rms_norm": {"mine": {"ms": 1.0, "ok": true}}}}')
    monkeypatch.setenv(dispatch.TABLE_ENV, str(table))
    dispatch.clear_cache()
    try:
        assert dispatch.backend_for("rms_norm", torch.device("cpu"), rehearse="gpu-Test") == "mine"
    finally:
        dispatch.clear_cache()

    calls.clear()
    ops.set_kernel_backend(None, dispatch_as=None)
    monkeypatch.setattr(ops, "decide_backend", lambda name, device: "mine" if name == "rms_norm" else "torch")
    ops.norm(torch.randn(2, 40))
    assert calls == ["fwd"], "the model's op boundary runs whatever the dispatch names"


def test_launchers_are_imported_on_first_use(monkeypatch):
    """A backend named by module is not imported until an entry runs it (an optional backend's
    build never runs at import time)."""
    op = registry.op("paged_attention")
    monkeypatch.setattr(op, "_loaded", {})
    assert isinstance(op.launchers["cuda"], str)
    assert op.launcher("cuda") is importlib.import_module("nanofast.kernels.paged_attention_cuda")
    with pytest.raises(ValueError, match="no 'cute' launcher"):
        op.launcher("cute")


def test_the_dispatch_docs_table_is_the_registry():
    """docs/dispatch.md's table of ops says what their declarations say."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "dispatch.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`") and not cells[0].startswith("op ("):
            name = re.match(r"`(\w+)`", cells[0]).group(1)
            rows[name] = (re.match(r"`(\w+)`", cells[1]).group(1), tuple(re.findall(r"`(\w+)`", cells[2])),
                          cells[3].strip("`"))
    assert rows == {n: (op.vendor, op.kernels, op.unmeasured) for n, op in dispatch.OPS.items()}


def test_vendor_paths_compute_the_references_maths():
    """Each op's declared vendor path (what runs without nanofast's kernel) agrees with its reference."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(3, 8, generator=g), torch.randn(8, generator=g)
    torch.testing.assert_close(registry.op("rms_norm").vendor_path(x, w, 1e-6), K.rms_norm_reference(x, w, 1e-6))
    p = _paged()
    for window in (None, 1):
        torch.testing.assert_close(registry.op("paged_attention").vendor_path(**p, window=window),
                                   K.paged_decode_attention_reference(**p, window=window))
