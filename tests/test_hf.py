"""nanofast's kernels in Hugging Face transformers models: tiny randomly initialised models of each
family (built from a config, no download), patched in one line, against the unpatched model."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanofast.kernels import registry
from nanofast.kernels.hf import NORMS, apply_nanofast_kernels

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
FAMILIES = {  # family -> (config class, causal-LM class), as transformers names them
    "llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"), "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
}
# fp32 models: the kernels compute the norms in fp32 like the model, in another order (one fused
# pass), so the outputs agree to a few fp32 ulps of their scale; the patched and unpatched models
# must pick the same greedy tokens.
LOGITS_ATOL, GRAD_ATOL = 2e-6, 2e-6


def tiny_model(family: str) -> torch.nn.Module:
    config_cls, model_cls = (getattr(transformers, n) for n in FAMILIES[family])
    torch.manual_seed(0)
    model = model_cls(config_cls(**SIZES)).eval()
    with torch.no_grad():  # norm weights away from their init (ones / zeros), so the scale matters
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.5)
    return model


def batch():
    ids = torch.randint(0, SIZES["vocab_size"], (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding, as batched generation pads
    mask[1, :1] = 0
    return ids, mask


def run(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_model_matches_the_unpatched_one(family, backend, monkeypatch):
    model = tiny_model(family)
    patched = copy.deepcopy(model)
    replaced = apply_nanofast_kernels(patched, backend=backend)
    assert replaced and set(replaced.values()) <= set(NORMS)
    assert set(replaced) == {n for n, m in model.named_modules() if type(m).__name__ in NORMS}
    # The spy: every patched norm runs nanofast's rms_norm (its validation counts the calls).
    op, calls = registry.op("rms_norm"), []
    check = op.checks["rms_norm"]
    monkeypatch.setitem(op.checks, "rms_norm", lambda *a, **k: (calls.append(1), check(*a, **k))[1])

    ids, mask = batch()
    logits, loss, grads = run(model, ids, mask)
    assert not calls
    logits_p, loss_p, grads_p = run(patched, ids, mask)
    assert len(calls) == len(replaced)  # each patched norm ran once, on nanofast's kernel
    scale = max(1.0, logits.abs().max().item())
    assert (logits_p - logits).abs().max().item() <= LOGITS_ATOL * scale
    assert abs(loss_p.item() - loss.item()) <= LOGITS_ATOL * max(1.0, loss.item())
    assert grads.keys() == grads_p.keys()
    for name, g in grads.items():
        assert (grads_p[name] - g).abs().max().item() <= GRAD_ATOL * max(1.0, g.abs().max().item()), name

    calls.clear()
    with torch.no_grad():  # generation with the KV cache, from left-padded prompts
        want = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        got = patched.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want) and calls


def test_patch_keeps_parameters_and_state_dict():
    model = tiny_model("gemma3")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_nanofast_kernels(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_bad_calls_are_refused():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        apply_nanofast_kernels("llama")
    with pytest.raises(ValueError, match="backend must be one of"):
        apply_nanofast_kernels(tiny_model("llama"), backend="cudnn")
    with pytest.raises(ValueError, match="Linear has no module this patch knows"):
        apply_nanofast_kernels(torch.nn.Linear(4, 4))


def test_import_kernels_from_the_checkout_root_gets_the_installed_package():
    """transformers imports Hugging Face's `kernels`; from a nanofast checkout's root the folder
    kernels/ (nanofast.kernels) comes first on sys.path and hands the import over
    (kernels/_shadowed.py, executed in these subprocesses)."""
    hub = subprocess.run([sys.executable, "-c", "import kernels, transformers.integrations.hub_kernels; "
                          "print(kernels.__file__)"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert hub.returncode == 0, hub.stderr[-2000:]
    assert Path(hub.stdout.strip()).resolve().parent != ROOT / "kernels"
    none = subprocess.run([sys.executable, "-c", "import sys; sys.path = [p for p in sys.path if 'site-packages' "
                           "not in p]; import kernels"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert none.returncode != 0 and "import it as nanofast.kernels" in none.stderr
