"""nanochat's own GPT on nanofast's kernels (`kernels/nanochat.py`): a tiny nanochat GPT, built from
its config on CPU in fp32, run unpatched and patched on the torch and Triton backends (in a child,
tests/nanochat_patch_worker.py: importing nanochat sets process-wide state), compared on logits,
KV-cache decoding, the loss (mean, sum, per position) and every parameter's gradient; spies show
which functions and Triton launchers ran; undo restores nanochat exactly.

nanochat comes from NANOCHAT_SRC (default ../shared/peers/nanochat beside the checkout, as
bench/vs_nanochat.py); without it those tests skip. The argument checks need no nanochat.

Budgets (fp32; measured in brackets):
  * torch backend: logits and decoding bitwise nanochat's (the references run nanochat's
    expressions in its order). Loss within 1e-6 relative [1.2e-7] and every gradient within
    1e-5 relative Frobenius [6.4e-7]: the fused head sums the softmax and its gradient in chunks.
  * triton backend: the kernels reduce rows in another order and normalise before rotating, so
    not bitwise: logits within 1e-5 relative Frobenius [4.2e-7] (1e-4 absolute [4.8e-6] on
    logits up to ~8 in magnitude), loss 1e-6 [1.2e-7], gradients 1e-5 [1.2e-6].
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.vs_nanochat import nanochat_src
from nanofast.kernels.nanochat import apply_nanofast_kernels_to_nanochat

WORKER = Path(__file__).with_name("nanochat_patch_worker.py")
needs_nanochat = pytest.mark.skipif(not (nanochat_src() / "nanochat" / "gpt.py").is_file(),
                                    reason="no nanochat checkout at NANOCHAT_SRC (default ../shared/peers/nanochat)")
LAYERS = 3  # nanochat_patch_worker.CONFIG
NORMS_PER_FORWARD = 2 * LAYERS + 2  # after the embedding, two per block, before the head


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("nanochat") / "results.pt"
    env = {**os.environ, "NANOCHAT_SRC": str(nanochat_src()), "NANOCHAT_DTYPE": "float32", "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=True)


def _assert_matches(got: dict, want: dict, logits_exact: bool) -> None:
    if logits_exact:
        assert torch.equal(got["logits"], want["logits"])
        assert torch.equal(got["decode"], want["decode"])
    else:
        for key in ("logits", "decode"):
            assert _rel(got[key], want[key]) <= 1e-5, (key, _rel(got[key], want[key]))
            assert (got[key] - want[key]).abs().max() <= 1e-4
    assert got["logits"].shape == want["logits"].shape == (2, 12, 100)  # cropped to vocab_size, padded head
    assert abs(got["loss"].item() / want["loss"].item() - 1) <= 1e-6, (got["loss"], want["loss"])
    assert got["loss_none"].shape == want["loss_none"].shape == (24,)  # nanochat's flattened positions
    assert (got["loss_none"][:3] == 0).all()  # ignore_index=-1 positions
    assert _rel(got["loss_none"], want["loss_none"]) <= 1e-6 and _rel(got["loss_sum"], want["loss_sum"]) <= 1e-6
    assert set(got["grads"]) == set(want["grads"]) and len(want["grads"]) > 10
    for name, g in want["grads"].items():
        assert g.abs().max() > 0, name  # every parameter in the test gets a gradient: none is vacuous
        assert _rel(got["grads"][name], g) <= 1e-5, (name, _rel(got["grads"][name], g))


@needs_nanochat
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patched_nanochat_matches_unpatched(results, backend):
    _assert_matches(results[backend], results["unpatched"], logits_exact=backend == "torch")


@needs_nanochat
def test_spies_show_nanofasts_kernels_ran_instead_of_nanochats(results):
    unpatched = results["unpatched"]
    # nanochat's rotary runs twice per layer (q and k) unpatched, never patched.
    assert unpatched["calls_logits"] == {"nanochat.apply_rotary_emb": 2 * LAYERS}
    torch_calls = {"rms_norm": NORMS_PER_FORWARD, "qk_norm_rope": LAYERS}
    assert results["torch"]["calls_logits"] == torch_calls
    assert results["torch"]["calls_train"] == {**torch_calls, "linear_softcap_cross_entropy": 1}
    # The Triton launchers, forward and backward, once per call of the function above them.
    assert results["triton"]["calls_train"] == {
        **torch_calls, "linear_softcap_cross_entropy": 1,
        "triton.rms_norm.fwd": NORMS_PER_FORWARD, "triton.rms_norm.bwd": NORMS_PER_FORWARD,
        "triton.qk_norm_rope.fwd": LAYERS, "triton.qk_norm_rope.bwd": LAYERS, "triton.lce.step": 1}


@needs_nanochat
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patch_reports_what_it_replaced_and_undo_restores_nanochat(results, backend):
    r = results[backend]
    attention = [f"transformer.h.{i}.attn.forward" for i in range(LAYERS)]
    assert list(r["replaced"]) == ["nanochat.gpt.norm", *attention, "forward"]
    assert "rms_norm" in r["replaced"]["nanochat.gpt.norm"] and "qk_norm_rope" in r["replaced"][attention[0]]
    assert "linear_softcap_cross_entropy" in r["replaced"]["forward"]
    assert r["restored"]
    # A second model of the process shares the module-wide norm (same backend) and patches its own
    # modules only; another backend for the shared norm is refused; so is patching twice.
    assert list(r["second_replaced"]) == [*attention, "forward"]
    assert r["other_backend"][0] == "ValueError" and "nanochat.gpt.norm already runs" in r["other_backend"][1]
    assert r["double_patch"] == ["ValueError", f"{attention[0]} already runs nanofast's kernels: undo() that patch "
                                               "first"]
    # After undo: nanochat's own functions again, bit for bit, rotary included.
    after, unpatched = results["after_undo"], results["unpatched"]
    for key in ("logits", "decode", "loss", "loss_none"):
        assert torch.equal(after[key], unpatched[key]), key
    assert after["calls_train"] == unpatched["calls_train"]


@needs_nanochat
def test_class_patch_reaches_models_built_later(results):
    r = results["classes"]
    assert list(r["replaced"]) == ["nanochat.gpt.norm", "nanochat.gpt.CausalSelfAttention.forward",
                                   "nanochat.gpt.GPT.forward"]
    _assert_matches(r, results["unpatched"], logits_exact=True)
    assert r["calls_train"] == {"rms_norm": NORMS_PER_FORWARD, "qk_norm_rope": LAYERS, "linear_softcap_cross_entropy": 1}
    assert r["model_on_patched_class"][0] == "ValueError" and r["restored"]


@needs_nanochat
def test_loss_head_alone(results):
    r = results["loss_only"]
    assert list(r["replaced"]) == ["forward"]
    _assert_matches(r, results["unpatched"], logits_exact=True)
    assert r["calls_logits"] == {"nanochat.apply_rotary_emb": 2 * LAYERS}  # logits: nanochat's forward untouched
    assert r["calls_train"] == {"nanochat.apply_rotary_emb": 2 * LAYERS, "linear_softcap_cross_entropy": 1}


@needs_nanochat
def test_importing_the_patch_does_not_import_nanochat(results):
    assert results["patch_import_imported_nanochat"] is False  # checked in the child before it imports nanochat


@pytest.mark.parametrize("args, kwargs, exc, match", [
    ((torch.nn.Linear(4, 4),), {}, TypeError, "model must be a nanochat GPT"),
    (("gpt",), {}, TypeError, "model must be a nanochat GPT"),
    ((), {"backend": "cutlass"}, ValueError, "backend must be one of"),
    ((), {"norms": 1}, TypeError, "norms must be a bool"),
    ((), {"loss": None}, TypeError, "loss must be a bool"),
    ((), {"norms": False, "attention": False, "loss": False}, ValueError, "nothing to patch"),
])
def test_argument_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        apply_nanofast_kernels_to_nanochat(*args, **kwargs)


def test_model_none_needs_nanochat_imported(monkeypatch):
    monkeypatch.delitem(sys.modules, "nanochat.gpt", raising=False)
    with pytest.raises(ValueError, match="import nanochat.gpt first"):
        apply_nanofast_kernels_to_nanochat()
