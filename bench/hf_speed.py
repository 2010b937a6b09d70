"""The GPU check's benchmark of Hugging Face models: a training step (forward with labels, backward)
of a randomly initialised Llama and Qwen3 (built from a config: no download) as transformers runs
it, patched with `nanofast.kernels.hf.apply_nanofast_kernels`, and patched with Liger-Kernel
where it is installed, timed in the same run.

transformers and Liger-Kernel are not on a bare GPU machine (no network there): bench/README.md
says how to carry their wheels. Without transformers the check says so in its record instead of
timing anything; without Liger its column says why it is missing.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

# family -> (config class, causal-LM class, Liger's patch function), as each package names them
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "apply_liger_kernel_to_llama"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "apply_liger_kernel_to_qwen3"),
}
# A 1B-class layer shape with few layers (the step's kernels, not its depth, are what is compared)
# and a 128k vocabulary, where the unfused loss head's (tokens x vocab) logits dominate memory.
GPU_SIZES = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=4,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096)
CPU_SIZES = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=64)


def _model(transformers, family: str, sizes: dict, device, dtype):
    import torch

    config_cls, model_cls, _ = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**sizes)
    return getattr(transformers, model_cls)(config).to(device=device, dtype=dtype).train()


def _step(model, ids) -> Callable[[], None]:
    def run():
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
    return run


def _liger_step(liger, family: str, model, ids) -> Callable[[], None]:
    """Liger patches the modeling module itself (every model of the family): done on the first
    call, i.e. after the other columns were timed."""
    patched = []

    def run():
        if not patched:
            getattr(liger, FAMILIES[family][2])(model=model)
            patched.append(True)
        _step(model, ids)()
    return run


def speed_hf_models(ctx, speed: Callable[..., dict], transformers, liger) -> dict:
    """Per family: ms per training step of transformers as it is, nanofast-patched and
    Liger-patched (bf16 weights on a GPU, fp32 in a dry run), batch 4 x 2048 tokens. ctx and
    `speed` are the GPU check's (bench/gpu_check.py); transformers and liger (its
    `liger_kernel.transformers`) the modules, or None where not installed."""
    import torch

    from nanofast.kernels.hf import apply_nanofast_kernels

    if transformers is None:
        return {"times_ms": {}, "not_timed": {"all": "transformers is not installed here (bench/README.md: "
                                                    "carry its wheel to the GPU machine)"}}
    sizes = ctx.pick(GPU_SIZES, CPU_SIZES)
    batch, seq = ctx.pick((4, 2048), (2, 16))
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    tokens = batch * seq
    out = {"times_ms": {}, "tokens_per_s": {}, "not_timed": {}, "tokens_per_step": tokens}
    for family in FAMILIES:
        ids = torch.randint(0, sizes["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1))
        ids = ids.to(ctx.device)
        plain = _model(transformers, family, sizes, ctx.device, dtype)
        ours = copy.deepcopy(plain)
        apply_nanofast_kernels(ours)
        impls = {"transformers": _step(plain, ids), "nanofast": _step(ours, ids)}
        extras, missing = {}, {}
        if liger is None:
            missing["liger"] = "liger_kernel is not installed here" if ctx.device.type == "cuda" else "GPU only"
        else:
            extras["liger"] = _liger_step(liger, family, copy.deepcopy(plain), ids)
        res = speed(ctx, impls, extras=extras, not_timed=missing)
        for impl, ms in res["times_ms"].items():  # one flat table: "family:implementation"
            out["times_ms"][f"{family}:{impl}"] = ms
            out["tokens_per_s"][f"{family}:{impl}"] = tokens / (ms / 1e3)
        out["not_timed"].update({f"{family}:{k}": v for k, v in res.get("not_timed", {}).items()})
        del plain, ours, impls, extras
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return out
