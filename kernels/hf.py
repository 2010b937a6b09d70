"""Hugging Face transformers models on nanofast's kernels, patched in place in one line.

    from nanofast.kernels.hf import apply_nanofast_kernels
    replaced = apply_nanofast_kernels(model)   # a loaded Llama, Mistral, Qwen2, Qwen3, Gemma 2 / 3 ...

What is patched, per model instance (other models of the same family in the process are untouched):
- norms: every RMSNorm module of the families below (the decoder's norms, the final norm, Qwen3's
  and Gemma 3's per-head q/k norms) runs `nanofast.kernels.rms_norm` with the module's own weight
  and eps, and Gemma's (1 + w) scale as `offset=1.0` (summed in fp32, as Gemma does);
- rotary: each attention module's forward runs `nanofast.kernels.rotary.apply_rotary_pos_emb` on
  the cos/sin the model hands it (HF's `rotate_half` convention, (B, T, D) tables), where the
  family's own function was;
- loss: the causal-LM forward, when called with `labels` in training mode, computes the loss with
  the fused, chunked `linear_cross_entropy` straight from the last hidden states (HF's shift,
  ignore index -100, `num_items_in_batch`, Gemma's final logit softcap) and never materialises
  the (tokens x vocab) logits: its output's `logits` is None then (as Liger-Kernel's patch). In
  eval mode or without labels the forward is the model's own (logits computed, loss from them).
The parameters, state dict and outputs' dtypes are the model's; only forwards change. Modules are
recognised by class name, so this module imports nothing from transformers at import time.
"""
from __future__ import annotations

import inspect
import types
from typing import Any, Callable

import torch.nn.functional as F
from torch import Tensor, nn

from .backend import BACKENDS
from .linear_cross_entropy import linear_cross_entropy
from .rms_norm import rms_norm
from .rotary import apply_rotary_pos_emb

# RMSNorm classes -> the offset their scale adds to the weight (Gemma: 1 + w, weights start at 0).
NORMS: dict[str, float] = {
    "LlamaRMSNorm": 0.0, "MistralRMSNorm": 0.0, "Qwen2RMSNorm": 0.0, "Qwen3RMSNorm": 0.0,
    "Gemma2RMSNorm": 1.0, "Gemma3RMSNorm": 1.0,
}
# Attention classes whose forward calls its modeling module's `apply_rotary_pos_emb`.
ROTARY: tuple[str, ...] = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention",
                           "Gemma2Attention", "Gemma3Attention")
# Causal-LM classes whose forward is decoder (`.model`) -> `.lm_head` -> optional final logit
# softcap (config.final_logit_softcapping) -> transformers' ForCausalLMLoss.
CAUSAL_LMS: tuple[str, ...] = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                               "Gemma2ForCausalLM", "Gemma3ForCausalLM")
ROTARY_GLOBAL = "apply_rotary_pos_emb"
LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


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


def _rebind_global(fn: Callable, name: str, value: Any) -> Callable | None:
    """A copy of `fn` whose innermost function sees `name` as `value` instead of its module global;
    None when the innermost function does not read that global.

    The attention forwards call their modeling module's `apply_rotary_pos_emb` by global name, so
    replacing the module's attribute would patch every model of the family in the process. The copy
    has its own globals (a snapshot of the module's, one name replaced), so only the instance that
    gets it changes; decorators made with functools.wraps (transformers' deprecate_kwarg) are
    recreated around the copy, with their wrapped function swapped in their closure.
    """
    inner = getattr(fn, "__wrapped__", None)
    if inner is None:
        if name not in fn.__code__.co_names or name not in fn.__globals__:
            return None
        scope = dict(fn.__globals__)
        scope[name] = value
        new = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    else:
        new_inner = _rebind_global(inner, name, value)
        if new_inner is None:
            return None
        cells = fn.__closure__ or ()
        at = [i for i, c in enumerate(cells) if _cell_holds(c, inner)]
        if len(at) != 1:  # a wrapper that reaches its function another way: leave the forward alone
            return None
        closure = tuple(types.CellType(new_inner) if i == at[0] else c for i, c in enumerate(cells))
        new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, closure)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    new.__qualname__, new.__doc__, new.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    if inner is not None:
        new.__wrapped__ = new_inner
    return new


def _cell_holds(cell, obj) -> bool:
    try:
        return cell.cell_contents is obj
    except ValueError:  # an empty cell
        return False


def _rotary_for(backend: str | None) -> Callable:
    def nanofast_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, backend=backend)

    return nanofast_apply_rotary_pos_emb


def _is_causal_lm_loss(model: nn.Module) -> bool:
    """The model's loss is transformers' ForCausalLMLoss (a custom loss_type is left alone)."""
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:
        return False
    return getattr(model, "loss_function", None) is ForCausalLMLoss


def _output(template_cls: type, outputs: Any, loss: Tensor) -> Any:
    """The causal-LM output of transformers' class with the loss and no logits; the cache field is
    `cache` in transformers 5.x and `past_key_values` before."""
    fields = getattr(template_cls, "__dataclass_fields__", {})
    cache_name = "cache" if "cache" in fields else "past_key_values"
    cache = getattr(outputs, "cache", None)
    if cache is None:
        cache = getattr(outputs, "past_key_values", None)
    return template_cls(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                        attentions=outputs.attentions, **{cache_name: cache})


def _loss_forward(self: nn.Module, *args, **kwargs):
    """The causal-LM forward with the fused loss head (see the module docstring for when)."""
    original, signature, backend = self._nanofast_loss
    bound = signature.bind(*args, **kwargs)
    named = dict(bound.arguments)
    extra = named.pop(next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), ""), {})
    labels = named.get("labels")
    keep = named.get("logits_to_keep", 0)
    if labels is None or not self.training or not (isinstance(keep, int) and keep == 0):
        return original(*args, **kwargs)
    return_dict = extra.pop("return_dict", True)
    named.pop("labels")
    named.pop("logits_to_keep", None)
    loss_kw = {k: extra[k] for k in LOSS_KWARGS if k in extra}
    outputs = self.model(**named, **extra)
    hidden = outputs.last_hidden_state
    ignore_index = loss_kw.get("ignore_index", -100)
    shift_labels = loss_kw.get("shift_labels")
    if shift_labels is None:  # tokens < n predict n, as ForCausalLMLoss shifts
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    n_items = loss_kw.get("num_items_in_batch")
    loss = linear_cross_entropy(hidden, self.lm_head.weight, shift_labels.to(hidden.device), self.lm_head.bias,
                                ignore_index=ignore_index,
                                softcap=getattr(self.config, "final_logit_softcapping", None),
                                reduction="mean" if n_items is None else "sum", backend=backend)
    if n_items is not None:  # the Trainer's token count over all gradient-accumulation steps
        loss = loss / (n_items.to(loss.device) if isinstance(n_items, Tensor) else n_items)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    out = _output(CausalLMOutputWithPast, outputs, loss)
    return out if return_dict else out.to_tuple()


def apply_nanofast_kernels(model: nn.Module, *, norms: bool = True, rotary: bool = True, loss: bool = True,
                           backend: str | None = None) -> dict[str, str]:
    """Patch a transformers model in place to run nanofast's kernels; returns {module name: its
    class name} for every module whose forward now runs one ("" is the model itself: its loss head).
    What a class name stands for: an RMSNorm class (`NORMS`) -> rms_norm; an attention class
    (`ROTARY`) -> the rotary kernel; a causal-LM class (`CAUSAL_LMS`) -> the fused loss head.

    model: a loaded model (e.g. `AutoModelForCausalLM.from_pretrained(...)`, or built from a
        config), any device and dtype. Its parameters are used as they are (fp32 weights with
        16-bit activations included).
    norms: patch the RMSNorm modules.
    rotary: patch the attention modules' rotary embedding.
    loss: patch the causal-LM forward's loss head (training mode with labels; logits then None).
    backend: the kernels' backend, as for every nanofast kernel: None (Triton on CUDA tensors,
        torch on CPU), "torch", "triton"; "cuda" exists for the norms only.
    Raises ValueError for an unknown backend, a backend the patched kernels lack, or when nothing in
    the model is a module this patch knows (a model of another family: nothing would change, silently).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if backend not in (None, *BACKENDS):
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "cuda" and (rotary or loss):
        raise ValueError("backend='cuda' exists for the norms only (no CUDA-source rotary or loss head kernel): "
                         "pass rotary=False, loss=False, or backend='triton'")
    replaced = {}
    rope = _rotary_for(backend)
    for name, module in model.named_modules():
        cls = type(module).__name__
        if norms and cls in NORMS:
            _eps(module)
            module._nanofast_norm = (NORMS[cls], backend)
            module.forward = types.MethodType(_norm_forward, module)
            replaced[name] = cls
        elif rotary and cls in ROTARY:
            forward = _rebind_global(type(module).forward, ROTARY_GLOBAL, rope)
            if forward is None:  # this transformers version rotates another way: leave it as it is
                continue
            module.forward = types.MethodType(forward, module)
            replaced[name] = cls
    if loss and type(model).__name__ in CAUSAL_LMS and isinstance(getattr(model, "lm_head", None), nn.Linear) \
            and isinstance(getattr(model, "model", None), nn.Module) and _is_causal_lm_loss(model):
        # Patching twice keeps the model's own forward underneath (and takes the new backend).
        original = model._nanofast_loss[0] if "_nanofast_loss" in model.__dict__ else model.forward
        model._nanofast_loss = (original, inspect.signature(original), backend)
        model.forward = types.MethodType(_loss_forward, model)
        replaced[""] = type(model).__name__
    if not replaced:
        known = ", ".join(sorted((*NORMS, *ROTARY, *CAUSAL_LMS)))
        raise ValueError(f"{type(model).__name__} has no module this patch knows ({known}): nothing was patched")
    return replaced
