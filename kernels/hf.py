"""Hugging Face transformers models on nanofast's kernels, patched in place in one line.

    from nanofast.kernels.hf import apply_nanofast_kernels
    replaced = apply_nanofast_kernels(model)   # a loaded Llama, Mistral, Qwen2, Qwen3, Gemma 2 / 3 ...

What is patched: every RMSNorm module of the families below (the decoder's norms, the final norm,
Qwen3's and Gemma 3's per-head q/k norms) runs `nanofast.kernels.rms_norm` with the module's own
weight and eps, and Gemma's (1 + w) scale as `offset=1.0` (summed in fp32, as Gemma does). The
parameters, state dict and outputs' dtypes are the model's; only the forward changes. Modules are
recognised by class name, so this module imports nothing from transformers.
"""
from __future__ import annotations

import types

from torch import Tensor, nn

from .backend import BACKENDS
from .rms_norm import rms_norm

# RMSNorm classes -> the offset their scale adds to the weight (Gemma: 1 + w, weights start at 0).
NORMS: dict[str, float] = {
    "LlamaRMSNorm": 0.0, "MistralRMSNorm": 0.0, "Qwen2RMSNorm": 0.0, "Qwen3RMSNorm": 0.0,
    "Gemma2RMSNorm": 1.0, "Gemma3RMSNorm": 1.0,
}


def _eps(module: nn.Module) -> float:
    # Llama-style norms call it variance_epsilon, Gemma's eps.
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if eps is None:
        raise ValueError(f"{type(module).__name__} has neither variance_epsilon nor eps: not an RMSNorm this "
                         "patch knows")
    return float(eps)


def _norm_forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
    offset, backend = self._nanofast_norm
    return rms_norm(hidden_states, self.weight, _eps(self), backend=backend, offset=offset)


def apply_nanofast_kernels(model: nn.Module, *, norms: bool = True, backend: str | None = None) -> dict[str, str]:
    """Patch a transformers model in place to run nanofast's kernels; returns {module name: its
    class name} for every module whose forward now runs one.

    model: a loaded model (e.g. `AutoModelForCausalLM.from_pretrained(...)`, or built from a
        config), any device and dtype. Its parameters are used as they are (fp32 weights with
        16-bit activations included).
    norms: patch the RMSNorm modules (classes in `NORMS`).
    backend: the kernels' backend, as for every nanofast kernel: None (Triton on CUDA tensors,
        torch on CPU), "torch", "triton" or "cuda".
    Raises ValueError for an unknown backend, or when nothing in the model is a module this patch
    knows (a model of another family: nothing would change, silently).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if backend not in (None, *BACKENDS):
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    replaced = {}
    if norms:
        for name, module in model.named_modules():
            offset = NORMS.get(type(module).__name__)
            if offset is None:
                continue
            _eps(module)
            module._nanofast_norm = (offset, backend)
            module.forward = types.MethodType(_norm_forward, module)
            replaced[name] = type(module).__name__
    if not replaced:
        known = ", ".join(sorted(NORMS))
        raise ValueError(f"{type(model).__name__} has no module this patch knows ({known}): nothing was patched")
    return replaced
