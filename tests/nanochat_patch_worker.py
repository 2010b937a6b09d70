"""Child process of tests/test_nanochat_patch.py: a tiny nanochat GPT (nanochat's own gpt.py, from
NANOCHAT_SRC) run unpatched, patched by `apply_nanofast_kernels_to_nanochat` on each backend, and
after undo; the results go to a file the test reads.

    python tests/nanochat_patch_worker.py OUT.pt      (NANOCHAT_SRC, NANOCHAT_DTYPE=float32 set)

A child of its own because importing nanochat sets process-wide state: its compute dtype (read from
NANOCHAT_DTYPE once, at import), the root logger's configuration, `nanochat.*` in sys.modules and
its checkout on sys.path.
"""
from __future__ import annotations

import math
import os
import sys

import torch

CONFIG = dict(sequence_len=32, vocab_size=100, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")
BATCH, T, PREFILL = 2, 12, 7  # decode check: a PREFILL-token prefill, then one token at a time


def build(gpt, seed: int = 0):
    """nanochat's GPT as its scripts build it (meta device, to_empty, init_weights), then every
    matrix redrawn: nanochat zero-initialises the output projections and gives the head std 1e-3,
    which would leave the attention out of the logits and the loss at log(vocab)."""
    with torch.device("meta"):
        model = gpt.GPT(gpt.GPTConfig(**CONFIG))
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, (3.0 if name == "lm_head.weight" else 1.0) / math.sqrt(p.shape[1]))
        model.smear_lambda.fill_(0.5)
    return model


def counting(calls: dict, key: str, fn):
    def wrapper(*args, **kwargs):
        calls[key] = calls.get(key, 0) + 1
        return fn(*args, **kwargs)
    return wrapper


def run(model, engine, idx, targets, calls: dict) -> dict:
    """Logits, loss (mean and per position), every parameter's gradient, KV-cache decoding, and the
    calls each part made."""
    out = {}
    calls.clear()
    with torch.no_grad():
        out["logits"] = model(idx)
    out["calls_logits"] = dict(calls)
    calls.clear()
    model.zero_grad(set_to_none=True)
    loss = model(idx, targets)
    loss.backward()
    out["calls_train"] = dict(calls)
    out["loss"] = loss.detach()
    out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        out["loss_none"] = model(idx, targets, loss_reduction="none")
        out["loss_sum"] = model(idx, targets, loss_reduction="sum")
        cfg = model.config
        cache = engine.KVCache(batch_size=BATCH, num_heads=cfg.n_kv_head, seq_len=T, head_dim=cfg.n_embd // cfg.n_head,
                               num_layers=cfg.n_layer, device="cpu", dtype=torch.float32)
        steps = [model(idx[:, :PREFILL], kv_cache=cache)[:, -1]]
        for t in range(PREFILL, T):
            steps.append(model(idx[:, t:t + 1], kv_cache=cache)[:, -1])
        out["decode"] = torch.stack(steps, 1)  # (B, T - PREFILL + 1, vocab): the last position of each call
    return out


def attribute_state(gpt, model) -> dict:
    """What the patch touches, as identities: restored means equal to the state before the patch."""
    return {"norm": id(gpt.norm), "attention_class_forward": id(gpt.CausalSelfAttention.forward),
            "gpt_class_forward": id(gpt.GPT.forward), "model_forward_attr": "forward" in vars(model),
            "attention_forward_attrs": sum("forward" in vars(m) for m in model.modules()
                                           if isinstance(m, gpt.CausalSelfAttention))}


def error(fn) -> list:
    try:
        fn()
    except Exception as e:  # the test checks type and message
        return [type(e).__name__, str(e)]
    return ["no error", ""]


def main(out_path: str) -> None:
    from nanofast.kernels import nanochat as patching

    # The patch module must not import nanochat itself (kernels/nanochat.py's docstring says why).
    imported_nanochat = any(m.split(".")[0] == "nanochat" for m in sys.modules)
    sys.path.insert(0, os.environ["NANOCHAT_SRC"])
    import nanochat.engine as engine
    import nanochat.gpt as gpt

    from nanofast.kernels.linear_cross_entropy import TRITON_LAUNCHERS as LCE
    from nanofast.kernels.qk_norm_rope import TRITON_LAUNCHERS as QK
    from nanofast.kernels.rms_norm import TRITON_LAUNCHERS as NORM

    assert gpt.COMPUTE_DTYPE == torch.float32, gpt.COMPUTE_DTYPE
    # Spies: nanochat's own rotary (called by name from its attention), nanofast's functions as the
    # patch calls them (module globals of kernels/nanochat.py), and the Triton launchers.
    calls: dict = {}
    gpt.apply_rotary_emb = counting(calls, "nanochat.apply_rotary_emb", gpt.apply_rotary_emb)
    for name in ("rms_norm", "qk_norm_rope", "linear_softcap_cross_entropy"):
        setattr(patching, name, counting(calls, name, getattr(patching, name)))
    for prefix, launchers, names in (("rms_norm", NORM, ("fwd", "bwd")), ("qk_norm_rope", QK, ("fwd", "bwd")),
                                     ("lce", LCE, ("step",))):
        for n in names:
            setattr(launchers, n, counting(calls, f"triton.{prefix}.{n}", getattr(launchers, n)))

    model = build(gpt)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, CONFIG["vocab_size"], (BATCH, T), generator=g)
    targets = torch.randint(0, CONFIG["vocab_size"], (BATCH, T), generator=g)
    targets[0, :3] = -1  # nanochat's ignore_index
    results = {"unpatched": run(model, engine, idx, targets, calls), "patch_import_imported_nanochat": imported_nanochat}
    before = attribute_state(gpt, model)

    for backend in ("torch", "triton"):
        patch = patching.apply_nanofast_kernels_to_nanochat(model, backend=backend)
        results[backend] = run(model, engine, idx, targets, calls)
        results[backend]["replaced"] = dict(patch.replaced)
        results[backend]["double_patch"] = error(lambda: patching.apply_nanofast_kernels_to_nanochat(model))
        other = build(gpt, seed=2)  # a second model shares the module-wide norm, with its backend only
        results[backend]["other_backend"] = error(
            lambda: patching.apply_nanofast_kernels_to_nanochat(other, backend="torch" if backend == "triton" else "triton"))
        second = patching.apply_nanofast_kernels_to_nanochat(other, backend=backend)
        results[backend]["second_replaced"] = dict(second.replaced)
        second.undo()
        patch.undo()
        patch.undo()  # idempotent
        results[backend]["restored"] = attribute_state(gpt, model) == before

    results["after_undo"] = run(model, engine, idx, targets, calls)

    # model=None: nanochat's classes, so a model built afterwards runs the kernels too.
    with patching.apply_nanofast_kernels_to_nanochat(backend="torch", norms=True, attention=True, loss=True) as patch:
        fresh = build(gpt)
        results["classes"] = run(fresh, engine, idx, targets, calls)
        results["classes"]["replaced"] = dict(patch.replaced)
        results["classes"]["model_on_patched_class"] = error(lambda: patching.apply_nanofast_kernels_to_nanochat(fresh))
    results["classes"]["restored"] = attribute_state(gpt, model) == before

    # One part at a time: the loss head alone leaves logits and the norm as nanochat's.
    with patching.apply_nanofast_kernels_to_nanochat(model, backend="torch", norms=False, attention=False) as patch:
        results["loss_only"] = run(model, engine, idx, targets, calls)
        results["loss_only"]["replaced"] = dict(patch.replaced)
    torch.save(results, out_path)


if __name__ == "__main__":
    main(sys.argv[1])
