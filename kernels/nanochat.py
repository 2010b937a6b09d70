"""nanochat's own GPT (github.com/karpathy/nanochat, `nanochat/gpt.py`) on nanofast's kernels,
patched in place by one reversible call.

    import nanochat.gpt                         # nanochat importable (e.g. NANOCHAT_SRC on sys.path)
    from nanofast.kernels.nanochat import apply_nanofast_kernels_to_nanochat

    patch = apply_nanofast_kernels_to_nanochat(model)   # one nanochat.gpt.GPT; model=None: every one
    loss = model(idx, targets); loss.backward()         # nanochat's code, unchanged, on the kernels
    patch.undo()                                        # or: with apply_nanofast_kernels_to_nanochat(model): ...

What runs instead of what (each part can be turned off: norms=, attention=, loss=):
  * `nanochat.gpt.norm(x)`, nanochat's parameter-free RMSNorm `F.rms_norm(x, (D,))` (after the
    embedding, before attention and MLP in every block, before the head) -> `rms_norm(x)`
    (x (..., D) in nanochat's compute dtype, no weight, F.rms_norm's default eps).
  * In `CausalSelfAttention.forward`: rotary (nanochat's `apply_rotary_emb`, half-split pairs)
    -> QK RMSNorm -> `* 1.2` of q (B, T, Hq, D) and k (B, T, Hkv, D), three passes each -> one
    `qk_norm_rope(q, k, cos, sin, scale=1.2)` launch. The rest of the attention is nanochat's
    own modules and functions called as nanochat calls them: the c_q / c_k / c_v / c_proj
    projections, the value-embedding gate, `nanochat.gpt.flash_attn` (FA3 or SDPA) and the KV
    cache (training, prefill and decode alike).
  * `GPT.forward(idx, targets)`: lm_head -> crop to vocab_size -> fp32 -> 15 tanh(z / 15) ->
    F.cross_entropy(ignore_index=-1) -> `linear_softcap_cross_entropy` on the head's input,
    chunked, never holding the (B*T, vocab) logits. Everything before the head still runs
    as nanochat's own GPT.forward (embedding, smear, value embeddings, backout, ... follow the
    installed nanochat): a forward pre-hook on lm_head, present only during that call, stops
    the forward where the head starts and hands its input over. Without targets (logits,
    generation) GPT.forward is nanochat's, untouched.

Scope: the norm is a module function that nanochat's Block and GPT look up by name at each
call, so it is replaced in the nanochat.gpt module whatever `model` is: every nanochat GPT of the
process runs it until the call that replaced it is undone. The attention and loss head are patched
on `model`'s instances (instance `forward` attributes), or, with model=None, on the classes
(every instance, existing or built later).

Numerics, fp32 (tests/test_nanochat_patch.py): on backend "torch" (nanofast's plain-torch
references, which run the same expressions in the same order as nanochat) the logits are
bitwise nanochat's, and the loss and gradients agree to fp32 rounding (the fused head sums its
softmax and its gradient in another order). On the Triton kernels they cannot be bitwise: the
kernels reduce each row in another order, and qk_norm_rope normalises before it rotates (equal
in exact arithmetic: a rotation keeps each pair's norm), so the logits agree to fp32 rounding.

torch.compile(model) traces the patched forwards (checked by hand on CPU with backend="aot_eager",
torch and Triton backends: same loss and logits as eager; not part of the tests, for their time).

Not patched: nanochat's Linear layers (fp8 GEMMs change the logits: `FP8Linear.from_linear` is
the opt-in), attention itself, the optimizer (nanochat's MuonAdamW runs Polar Express inside its
own fused step, no function to swap; `zeropower_via_newtonschulz5` is the drop-in for Keller
Jordan's Muon). This module imports nothing from nanochat: it takes nanochat's module
from the model's class or from `sys.modules` (importing nanochat reads NANOCHAT_DTYPE and sets
up logging, which is the caller's choice to make).
"""
from __future__ import annotations

import sys
import types

from torch import Tensor, nn

from .backend import BACKENDS
from .linear_cross_entropy import OP as _LCE_OP, linear_softcap_cross_entropy
from .qk_norm_rope import qk_norm_rope
from .rms_norm import rms_norm

__all__ = ["apply_nanofast_kernels_to_nanochat", "NanochatPatch", "NANOCHAT_QK_SCALE", "NANOCHAT_SOFTCAP"]

# Constants nanochat writes inline (CausalSelfAttention: `q * 1.2`, `k * 1.2`; GPT.forward:
# `softcap = 15`). A nanochat that changes them no longer matches: the tests compare patched and
# unpatched models, which catches it.
NANOCHAT_QK_SCALE = 1.2
NANOCHAT_SOFTCAP = 15.0

# Marks every function this module installs, so a second patch of the same target is refused
# (it would wrap a patch: undo order would matter) and the shared norm is recognised.
_MARK = "_nanofast_nanochat_backend"

# What each patched part reads from nanochat: checked before anything is replaced, so a nanochat
# that renamed something fails loudly instead of half-patched.
_MODULE_NAMES = ("norm", "CausalSelfAttention", "GPT", "flash_attn")
_ATTENTION_FIELDS = ("c_q", "c_k", "c_v", "c_proj", "n_head", "n_kv_head", "head_dim", "layer_idx", "ve_gate",
                     "ve_gate_channels")


class NanochatPatch:
    """The record of one `apply_nanofast_kernels_to_nanochat` call.

    replaced: {target: what runs there now}, targets named as in nanochat: "nanochat.gpt.norm",
        the classes' "nanochat.gpt.CausalSelfAttention.forward" / "nanochat.gpt.GPT.forward"
        (model=None), or a model's "transformer.h.0.attn.forward" ... and "forward".
    undo(): puts back exactly what this call replaced (idempotent); also on leaving a `with` block.
    """

    def __init__(self) -> None:
        self.replaced: dict[str, str] = {}
        self._saved: list[tuple[object, str, bool, object]] = []

    @property
    def active(self) -> bool:
        return bool(self._saved)

    def _set(self, owner: object, name: str, value: object, target: str, runs: str) -> None:
        own = vars(owner)  # the owner's own attribute, not one inherited from a class
        self._saved.append((owner, name, name in own, own.get(name)))
        setattr(owner, name, value)
        self.replaced[target] = runs

    def undo(self) -> None:
        while self._saved:  # last replaced, first restored
            owner, name, had, old = self._saved.pop()
            if had:
                setattr(owner, name, old)
            else:
                delattr(owner, name)

    def __enter__(self) -> "NanochatPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"NanochatPatch(active={self.active}, replaced={self.replaced})"


# ---- the replacements ---------------------------------------------------------------------------

def _make_norm(backend: str | None):
    def norm(x: Tensor) -> Tensor:
        # nanochat's F.rms_norm(x, (D,)): no weight, eps None (F.rms_norm's default: the torch
        # backend is then bitwise the same).
        return rms_norm(x, None, None, backend=backend)

    setattr(norm, _MARK, backend)
    return norm


def _make_attention_forward(gpt: types.ModuleType, backend: str | None):
    def forward(self, x: Tensor, ve: Tensor | None, cos_sin, window_size, kv_cache) -> Tensor:
        B, T, _ = x.shape
        heads = (B, T, self.n_head, self.head_dim)
        kv_heads = (B, T, self.n_kv_head, self.head_dim)
        q, k, v = self.c_q(x).view(heads), self.c_k(x).view(kv_heads), self.c_v(x).view(kv_heads)
        if ve is not None:
            # Value residual: each kv head mixes in the token's value embedding, gated by
            # 3 sigmoid(.) in (0, 3) computed from the first channels of x.
            gate = self.ve_gate(x[..., :self.ve_gate_channels]).sigmoid() * 3
            v = v + gate[..., None] * ve.view(kv_heads)
        # cos, sin: (1, T, 1, D/2) views of the model's tables, already offset to the KV cache's
        # position; qk_norm_rope takes the (T, D/2) rows. Rotary, norm and the 1.2 in one pass.
        cos, sin = cos_sin
        q, k = qk_norm_rope(q, k, cos[0, :, 0], sin[0, :, 0], scale=NANOCHAT_QK_SCALE, backend=backend)
        attn = gpt.flash_attn  # nanochat's dispatcher (FA3 where it runs, else SDPA), looked up per call
        if kv_cache is None:
            y = attn.flash_attn_func(q, k, v, causal=True, window_size=window_size)
        else:
            k_cache, v_cache = kv_cache.get_layer_cache(self.layer_idx)
            y = attn.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=kv_cache.cache_seqlens,
                                             causal=True, window_size=window_size)
            if self.layer_idx == kv_cache.n_layers - 1:  # the cache moves on once every layer has written
                kv_cache.advance(T)
        return self.c_proj(y.contiguous().view(B, T, -1))

    setattr(forward, _MARK, backend)
    return forward


class _HeadInput(Exception):
    """Carries lm_head's input out of nanochat's forward (raised by `_stop_at_head`)."""

    def __init__(self, hidden: Tensor) -> None:
        super().__init__("nanofast's nanochat patch: lm_head's input, caught by the patched GPT.forward")
        self.hidden = hidden


def _stop_at_head(module: nn.Module, args: tuple) -> None:
    raise _HeadInput(args[0])


def _make_gpt_forward(original, backend: str | None):
    loss_backend = backend if backend in _LCE_OP.choices else None  # no CUDA-source loss: the device's default

    def forward(self, idx: Tensor, targets: Tensor | None = None, kv_cache=None, loss_reduction: str = "mean"):
        if targets is None:
            return original(self, idx, targets, kv_cache, loss_reduction)
        # Run nanochat's trunk as nanochat wrote it, stopping where the head starts; the hook lives
        # only for this call, so logits calls and other models are untouched.
        hook = self.lm_head.register_forward_pre_hook(_stop_at_head)
        try:
            original(self, idx, None, kv_cache, loss_reduction)
        except _HeadInput as stop:
            hidden = stop.hidden  # (B, T, C) final normed hidden state, nanochat's compute dtype
        else:
            raise RuntimeError("nanochat's GPT.forward returned without calling lm_head: this nanochat is not the "
                               "one the loss patch knows (pass loss=False)")
        finally:
            hook.remove()
        # The padded head's first vocab_size rows are the cropped logits' weights.
        weight = self.lm_head.weight[:self.config.vocab_size]
        loss = linear_softcap_cross_entropy(hidden, weight, targets, softcap=NANOCHAT_SOFTCAP,
                                            reduction=loss_reduction, backend=loss_backend)
        # nanochat's "none" is over the flattened (B*T,) positions
        return loss.reshape(-1) if loss_reduction == "none" else loss

    setattr(forward, _MARK, backend)
    return forward


# ---- the entry point ----------------------------------------------------------------------------

def _nanochat_module(model: nn.Module | None) -> types.ModuleType:
    """nanochat's gpt module: the one defining model's GPT class, else the imported nanochat.gpt."""
    if model is None:
        gpt = sys.modules.get("nanochat.gpt")
        if gpt is None:
            raise ValueError("model=None patches the imported nanochat.gpt module, which is not imported: import "
                             "nanochat.gpt first (this patch never imports nanochat itself)")
        return gpt
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a nanochat GPT (nanochat.gpt.GPT) or None, got {type(model).__name__}")
    for cls in type(model).__mro__:  # a subclass of nanochat's GPT defined elsewhere counts too
        gpt = sys.modules.get(cls.__module__)
        if gpt is not None and getattr(gpt, "GPT", None) is cls and hasattr(gpt, "CausalSelfAttention"):
            return gpt
    raise TypeError(f"model must be a nanochat GPT (nanochat.gpt.GPT) or None, got {type(model).__name__}")


def _check_nanochat(gpt: types.ModuleType, attentions: list, model: nn.Module | None) -> None:
    missing = [n for n in _MODULE_NAMES if not hasattr(gpt, n)]
    missing += [f"CausalSelfAttention.{f}" for f in _ATTENTION_FIELDS if attentions and not hasattr(attentions[0], f)]
    if model is not None:
        missing += [f"GPT.{f}" for f in ("lm_head", "config") if not hasattr(model, f)]
    if missing:
        raise ValueError(f"{gpt.__name__} lacks {missing}: not the nanochat this patch knows (its gpt.py defines "
                         "norm, apply_rotary_emb, CausalSelfAttention, GPT and imports flash_attn)")


def _patched(fn) -> bool:
    return hasattr(getattr(fn, "__func__", fn), _MARK)


def apply_nanofast_kernels_to_nanochat(model: nn.Module | None = None, *, backend: str | None = None,
                                       norms: bool = True, attention: bool = True,
                                       loss: bool = True) -> NanochatPatch:
    """Run nanochat's GPT on nanofast's kernels, in place; returns the `NanochatPatch` (what was
    replaced, and `undo()`). See the module docstring for what replaces what.

    Args:
        model: a nanochat `nanochat.gpt.GPT` (any device, any compute dtype: nanochat's
            COMPUTE_DTYPE), whose attention modules and forward are patched; or None: patch
            nanochat's classes (`nanochat.gpt` must be imported), so every GPT runs the kernels.
            nanochat.gpt.norm is replaced in its module either way (module docstring).
        backend: the kernels' backend, as for every nanofast kernel: None (Triton on CUDA
            tensors, the torch references on CPU), "torch", "triton" (on CPU through Triton's
            interpreter) or "cuda". The loss head has no CUDA-source kernel: with "cuda" it takes
            the device's default (Triton on GPU).
        norms, attention, loss: patch that part (module docstring); at least one.
    Returns:
        NanochatPatch; `.replaced` maps each target to the nanofast function now running there.
    Raises:
        TypeError (model is not a nanochat GPT, a flag is not a bool) or ValueError (backend, no
        part chosen, nanochat.gpt not imported for model=None, a nanochat without the names the
        patch uses, a target nanofast already patched) naming the argument; nothing is patched then.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    for name, flag in (("norms", norms), ("attention", attention), ("loss", loss)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if not (norms or attention or loss):
        raise ValueError("norms, attention and loss are all False: nothing to patch")
    gpt = _nanochat_module(model)
    attentions = [] if model is None else [(n, m) for n, m in model.named_modules()
                                           if isinstance(m, gpt.CausalSelfAttention)]
    _check_nanochat(gpt, [m for _, m in attentions], model)

    # Refuse before changing anything: a patch over a patch would make undo order-dependent.
    targets = []
    if attention:
        targets += [(gpt.CausalSelfAttention, "nanochat.gpt.CausalSelfAttention.forward")] if model is None else \
                   [(m, f"{n}.forward") for n, m in attentions]
    if loss:
        targets.append((gpt.GPT, "nanochat.gpt.GPT.forward") if model is None else (model, "forward"))
    for owner, target in targets:
        if _patched(owner.forward) or (model is not None and _patched(type(owner).forward)):
            raise ValueError(f"{target} already runs nanofast's kernels: undo() that patch first")
    share_norm = norms and _patched(gpt.norm)
    if share_norm and getattr(gpt.norm, _MARK) != backend:
        raise ValueError(f"backend={backend!r}: nanochat.gpt.norm already runs nanofast's rms_norm with backend="
                         f"{getattr(gpt.norm, _MARK)!r} (it is module-wide): undo that patch, or pass the same backend")

    patch = NanochatPatch()
    if norms and not share_norm:  # a norm patched by an earlier call stays that call's to undo
        patch._set(gpt, "norm", _make_norm(backend), "nanochat.gpt.norm", "nanofast.kernels.rms_norm")
    if attention:
        fwd = _make_attention_forward(gpt, backend)
        runs = "nanofast.kernels.qk_norm_rope (rotary -> QK norm -> * 1.2)"
        if model is None:
            patch._set(gpt.CausalSelfAttention, "forward", fwd, "nanochat.gpt.CausalSelfAttention.forward", runs)
        for name, module in attentions:
            patch._set(module, "forward", types.MethodType(fwd, module), f"{name}.forward", runs)
    if loss:
        runs = "nanofast.kernels.linear_softcap_cross_entropy (with targets)"
        if model is None:
            patch._set(gpt.GPT, "forward", _make_gpt_forward(gpt.GPT.forward, backend), "nanochat.gpt.GPT.forward",
                       runs)
        else:
            fwd = _make_gpt_forward(type(model).forward, backend)
            patch._set(model, "forward", types.MethodType(fwd, model), "forward", runs)
    return patch
