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
from nanofast.kernels.hf import NORMS, ROTARY, apply_nanofast_kernels

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


def run(model, ids, mask, labels):
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.logits, out.loss.detach(), grads


def spy(monkeypatch) -> dict[str, list]:
    """Count the calls of each patched kernel through its validation (run once per public call)."""
    calls = {}
    for op_name, entry in (("rms_norm", "rms_norm"), ("rotary", "apply_rotary_pos_emb"),
                           ("linear_cross_entropy", "linear_cross_entropy")):
        op, seen = registry.op(op_name), []
        check = op.checks[entry]
        monkeypatch.setitem(op.checks, entry, lambda *a, _c=check, _s=seen, **k: (_s.append(1), _c(*a, **k))[1])
        calls[entry] = seen
    return calls


def close(got, want, atol, name=""):
    assert (got - want).abs().max().item() <= atol * max(1.0, want.abs().max().item()), name


def names_of(model, classes) -> set[str]:
    return {n for n, m in model.named_modules() if type(m).__name__ in classes}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_model_matches_the_unpatched_one(family, backend, monkeypatch):
    model = tiny_model(family)
    patched = copy.deepcopy(model)
    replaced = apply_nanofast_kernels(patched, backend=backend)
    assert replaced == {**{n: type(m).__name__ for n, m in model.named_modules()
                           if n in names_of(model, NORMS) | names_of(model, ROTARY)}, "": FAMILIES[family][1]}
    n_norms, n_attn = len(names_of(model, NORMS)), len(names_of(model, ROTARY))
    assert n_norms and n_attn
    calls = spy(monkeypatch)
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)  # no loss on the left padding, as a collator masks it

    # Eval mode: the model's own head (logits, loss from them); norms and rotary on the kernels.
    logits, loss, grads = run(model, ids, mask, labels)
    assert not any(calls.values())  # the unpatched copy runs none of them
    logits_p, loss_p, grads_p = run(patched, ids, mask, labels)
    assert len(calls["rms_norm"]) == n_norms and len(calls["apply_rotary_pos_emb"]) == n_attn
    assert not calls["linear_cross_entropy"]
    close(logits_p, logits, LOGITS_ATOL)
    close(loss_p, loss, LOGITS_ATOL)
    assert grads.keys() == grads_p.keys()
    for name, g in grads.items():
        close(grads_p[name], g, GRAD_ATOL, name)

    # Training mode with labels: the fused loss head, no logits.
    model.train(), patched.train()
    _, loss, grads = run(model, ids, mask, labels)
    for c in calls.values():
        c.clear()
    logits_p, loss_p, grads_p = run(patched, ids, mask, labels)
    assert logits_p is None and len(calls["linear_cross_entropy"]) == 1
    close(loss_p, loss, LOGITS_ATOL)
    assert grads.keys() == grads_p.keys()
    for name, g in grads.items():
        close(grads_p[name], g, GRAD_ATOL, name)
    model.eval(), patched.eval()

    calls["rms_norm"].clear()
    with torch.no_grad():  # generation with the KV cache, from left-padded prompts
        want = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        got = patched.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want) and calls["rms_norm"]


def test_the_loss_head_takes_the_trainers_conventions(monkeypatch):
    """num_items_in_batch (a sum over the accumulation steps' tokens), shift_labels, another
    ignore_index, return_dict=False, positional input ids: as transformers' own loss."""
    model = tiny_model("qwen3").train()
    patched = copy.deepcopy(model)
    apply_nanofast_kernels(patched, backend="torch")
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    n = torch.tensor(40)
    close(patched(ids, labels=labels, num_items_in_batch=n).loss, model(ids, labels=labels, num_items_in_batch=n).loss,
          LOGITS_ATOL)
    shifted = torch.roll(labels, -1, dims=1)
    shifted[:, -1] = 7  # a label transformers would never make by shifting: taken as given
    close(patched(input_ids=ids, labels=labels, shift_labels=shifted).loss,
          model(input_ids=ids, labels=labels, shift_labels=shifted).loss, LOGITS_ATOL)
    other = labels.masked_fill(mask == 0, 5)  # ignore index 5: token 5's positions carry no loss either
    close(patched(input_ids=ids, labels=other, ignore_index=5).loss,
          model(input_ids=ids, labels=other, ignore_index=5).loss, LOGITS_ATOL)
    out = patched(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(out, tuple) and out[0].ndim == 0
    apply_nanofast_kernels(patched, backend="torch")  # patching twice keeps one fused head, no recursion
    close(patched(input_ids=ids, labels=labels).loss, model(input_ids=ids, labels=labels).loss, LOGITS_ATOL)


def test_the_patch_changes_only_the_patched_instance(monkeypatch):
    """Rotary is called by global name in transformers' attention forwards: the patch gives the
    instance its own copy of the forward, so the family's module and other models are untouched."""
    modeling = sys.modules[type(tiny_model("llama")).__module__]
    before = (modeling.apply_rotary_pos_emb, modeling.LlamaAttention.forward, modeling.LlamaForCausalLM.forward)
    patched, other = tiny_model("llama"), tiny_model("llama")
    apply_nanofast_kernels(patched)
    assert (modeling.apply_rotary_pos_emb, modeling.LlamaAttention.forward, modeling.LlamaForCausalLM.forward) == before
    calls = spy(monkeypatch)
    ids, mask = batch()
    other.train()(input_ids=ids, labels=ids)
    assert not any(calls.values())
    patched.train()(input_ids=ids, labels=ids)
    assert all(calls.values())


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
    with pytest.raises(ValueError, match="backend='cuda' exists for the norms only"):
        apply_nanofast_kernels(tiny_model("llama"), backend="cuda")
    assert set(apply_nanofast_kernels(tiny_model("llama"), backend="cuda", rotary=False, loss=False).values()) \
        == {"LlamaRMSNorm"}
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
