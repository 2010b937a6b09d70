"""Rotary position embedding in Hugging Face's conventions: q and k rotated in one launch.

A drop-in for transformers' `apply_rotary_pos_emb` (Llama, Mistral, Qwen2/3, Gemma 2/3 ...). Per
head vector x of length D, with the model's full-width tables cos, sin of length D:

    rotate_half(x) = cat(-x[D/2:], x[:D/2])
    out            = x * cos + rotate_half(x) * sin

i.e. out[:D/2] = x1 * cos1 - x2 * sin1 and out[D/2:] = x2 * cos2 + x1 * sin2 (x1, x2 the halves of x;
cos1, cos2, sin1, sin2 the halves of the tables). The halves of a table are equal in every HF rotary
embedding, but nothing here assumes it: all D values of cos and sin are read and used.

Direction, against nanofast's fused `qk_norm_rope`: that kernel maps the pairs (a, b) = (x1, x2)
to (a c + b s, b c - a s) with half-width (T, D/2) tables, the rotation by the opposite angle. So
`qk_norm_rope(q, k, c, -s)` (no weights, scale 1) equals this rotation of the normalised q, k with
the full tables cat(c, c), cat(s, s). Passing HF's sin to qk_norm_rope rotates the wrong way.

Layouts (HF's `unsqueeze_dim`): 1 -> q (B, Hq, T, D), k (B, Hk, T, D), what HF's attention builds
(`q_proj(x).view(B, T, H, D).transpose(1, 2)`: a non-contiguous view, read in place, never
copied); 2 -> q (B, T, Hq, D), k (B, T, Hk, D). Any strides of q and k are read as they are
(packed qkv views, transposed views); only a tensor whose last dim is not unit-stride is copied
first (the kernels' row loads need it; no HF model makes one). Hq and Hk may differ (GQA) and need
not be powers of two.

Tables: cos, sin (B, T, D) (HF's, per position of each sequence; batch 1 broadcasts) or (T, D)
(shared by every sequence). position_ids (optional, (B, T) or (T,), int64 or int32): cos and sin
are then position TABLES (L, D), and token (b, t) uses row position_ids[b, t] (left padding, packed
sequences, decode at an offset) without materialising (B, T, D) tables. transformers <= 4.x had a
`position_ids` argument here that was deprecated and ignored (its tables were already per
position), and transformers 5 removed it: HF models never pass it, and the positional order
(q, k, cos, sin, position_ids, unsqueeze_dim) is transformers 4's. An int in position_ids' place
(transformers 5's positional unsqueeze_dim) is refused with that explanation, not guessed at.

Precision: the kernels compute in fp32 (q/k and tables loaded and converted, one FMA-style
rotation) and round once to q's dtype. The reference is HF's formula evaluated in the promoted
dtype of (q, cos, sin) and cast to q's dtype: bitwise HF's result when the tables are in q's
dtype (what HF models pass); with fp32 tables and 16-bit q, HF's own formula would return fp32
(torch's type promotion), here the result stays in q's dtype, rounded once from fp32 (the
kernels' error: <= 0.5 ulp of q's dtype plus fp32 rounding; the tests hold both backends to twice
the error of HF's formula in q's dtype plus the kernel tests' per-dtype ATOL).

Gradients: w.r.t. q and k, the rotation by the opposite angle, which is the forward kernel with
the sin halves swapped and negated (out1 = g1 cos1 + g2 sin2, out2 = g2 cos2 - g1 sin1): the
backward reads dy and the tables only, never q or k. cos and sin get gradients on backend="torch"
(plain autograd); the kernel backends refuse tables that require grad with a ValueError naming
them (HF's tables come from the inv_freq buffer and carry no gradient, so no model needs it).

Outputs (kernel backends): new tensors, never aliases of the inputs, in the layout of the input
convention, stored token-major: for unsqueeze_dim=2 a contiguous (B, T, H, D) tensor; for
unsqueeze_dim=1 a (B, H, T, D) view with strides (T*H*D, D, H*D, 1) of a contiguous (B, T, H, D)
buffer, exactly the layout of HF's own transposed projections (and of HF's result for them), so
the kernel writes each token's heads as one contiguous run. backend="torch" returns what HF's
formula returns (torch's elementwise layout rules). Gradients of q and k follow the same rule.

Layering (as qk_norm_rope): Triton kernel -> launchers (`fwd` / `bwd`, inputs trusted) -> a
`torch.library.custom_op` with register_fake + register_autograd (torch.compile, fullgraph) and a
plain autograd.Function for eager (cheaper dispatch) -> `apply_rotary_pos_emb` / `rotary_embedding`;
the op's declaration (`OP`) closes the module.
"""
from __future__ import annotations

import numbers
from types import SimpleNamespace
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .backend import resolve_backend
from .compile_gate import gate_signature
from .launch import TL_DTYPE as _TL_DTYPE, device_ctx as _device_ctx, next_pow2 as _next_pow2
from .op import Op

__all__ = ["apply_rotary_pos_emb", "rotary_embedding", "apply_rotary_pos_emb_reference", "rotary_embedding_reference",
           "rotate_half", "KERNEL_CONFIGS"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_POSITION_DTYPES = (torch.int64, torch.int32)


# ----------------------------------------------------------------------------------------------
# Validation (once, at the public entry)
# ----------------------------------------------------------------------------------------------

def _layout_doc(unsqueeze_dim: int, heads: str) -> str:
    return f"(B, {heads}, T, D)" if unsqueeze_dim == 1 else f"(B, T, {heads}, D)"


def _btd(x: Tensor, unsqueeze_dim: int) -> tuple[int, int, int, int]:
    """(B, T, H, D) of a head tensor in the `unsqueeze_dim` layout (validated)."""
    if unsqueeze_dim == 1:
        B, H, T, D = x.shape
    else:
        B, T, H, D = x.shape
    return B, T, H, D


def _check_heads(name: str, x, unsqueeze_dim: int, heads: str) -> None:
    doc = _layout_doc(unsqueeze_dim, heads)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {doc} (unsqueeze_dim={unsqueeze_dim}), "
                        f"got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape {doc} (4 dims, unsqueeze_dim={unsqueeze_dim}), "
                         f"got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor of shape {doc}, got dtype {x.dtype}")


def _check_rotary(heads: list[tuple[str, Tensor]], cos, sin, position_ids, unsqueeze_dim) -> None:
    """Shapes, dtypes and devices of a rotary call on the head tensors `heads` ((name, tensor),
    the first one q or x); raises TypeError / ValueError naming the argument."""
    if isinstance(unsqueeze_dim, bool) or not isinstance(unsqueeze_dim, numbers.Integral):
        raise TypeError(f"unsqueeze_dim must be the int 1 ((B, H, T, D) heads, HF's layout) or 2 ((B, T, H, D)), "
                        f"got {type(unsqueeze_dim).__name__} {unsqueeze_dim!r}")
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"unsqueeze_dim must be 1 ((B, H, T, D) heads, HF's layout) or 2 ((B, T, H, D)), "
                         f"got {unsqueeze_dim}")
    (name0, x0), *rest = heads
    _check_heads(name0, x0, unsqueeze_dim, "Hq" if rest else "H")
    B, T, _, D = _btd(x0, unsqueeze_dim)
    for name, x in rest:
        _check_heads(name, x, unsqueeze_dim, "Hk")
        b, t, _, d = _btd(x, unsqueeze_dim)
        if (b, t, d) != (B, T, D):
            raise ValueError(f"{name} must have shape {_layout_doc(unsqueeze_dim, 'Hk')} with B={B}, T={T}, D={D} "
                             f"to match {name0} {tuple(x0.shape)}, got {tuple(x.shape)}")
        if x.dtype != x0.dtype:
            raise TypeError(f"{name0} and {name} must have the same dtype, got {x0.dtype} and {x.dtype}")
        if x.device != x0.device:
            raise ValueError(f"{name0} and {name} must be on the same device, got {x0.device} and {x.device}")
    if D < 2 or D % 2:
        raise ValueError(f"the head dim D of {name0} must be even and >= 2 (rotate_half splits it in halves), "
                         f"got D={D}")
    if position_ids is not None and not isinstance(position_ids, torch.Tensor):
        hint = (" (transformers 5 passes unsqueeze_dim as its 5th positional argument; here the 5th is "
                "position_ids, as in transformers 4: pass unsqueeze_dim=... by keyword)"
                if isinstance(position_ids, numbers.Integral) else "")
        raise TypeError(f"position_ids must be None or an int64 tensor of shape (B, T) or (T,), "
                        f"got {type(position_ids).__name__} {position_ids!r}{hint}")
    tables = "(L, D)" if position_ids is not None else "(B, T, D) or (T, D)"
    for name, c in (("cos", cos), ("sin", sin)):
        if not isinstance(c, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {tables}, got {type(c).__name__}")
        if not c.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got dtype {c.dtype}")
        if c.device != x0.device:
            raise ValueError(f"{name} is on {c.device} but {name0} is on {x0.device}")
    if sin.shape != cos.shape:
        raise ValueError(f"sin must have cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}")
    if position_ids is None:
        ok = (cos.ndim == 3 and cos.shape[0] in (1, B) and cos.shape[1:] == (T, D)) or \
             (cos.ndim == 2 and cos.shape == (T, D))
        if not ok:
            raise ValueError(f"cos and sin must have shape (B, T, D) = ({B}, {T}, {D}) (batch 1 broadcasts) or "
                             f"(T, D) = ({T}, {D}): one row per position of {name0}; got {tuple(cos.shape)}. "
                             f"For tables indexed by position pass position_ids")
        return
    if cos.ndim != 2 or cos.shape[1] != D or cos.shape[0] < 1:
        raise ValueError(f"with position_ids, cos and sin are tables of shape (L, D) with D = {D}, "
                         f"got {tuple(cos.shape)}")
    if position_ids.dtype not in _POSITION_DTYPES:
        raise TypeError(f"position_ids must be int64 (or int32), got {position_ids.dtype}")
    if not ((position_ids.ndim == 2 and position_ids.shape[0] in (1, B) and position_ids.shape[1] == T)
            or (position_ids.ndim == 1 and position_ids.shape[0] == T)):
        raise ValueError(f"position_ids must have shape (B, T) = ({B}, {T}) (batch 1 broadcasts) or (T,) = ({T},), "
                         f"got {tuple(position_ids.shape)}")
    if position_ids.device != x0.device:
        raise ValueError(f"position_ids is on {position_ids.device} but {name0} is on {x0.device}")
    # The range check reads the ids back: free on CPU, a device sync on CUDA (skipped there: the
    # kernels mask the table loads, so an id outside [0, L) never reads outside the tables; its
    # token's heads come out zero). Under torch.compile the values are unknown at trace time (a
    # guard on them breaks fullgraph): the kernel backends' custom op checks them when it runs.
    if not torch.compiler.is_compiling():
        _check_positions(position_ids, cos)


def _check_positions(position_ids: Tensor, cos: Tensor) -> None:
    """CPU ids: every one a row of the (L, D) tables (ValueError naming position_ids)."""
    if (not position_ids.is_cuda and position_ids.numel()
            and (int(position_ids.min()) < 0 or int(position_ids.max()) >= cos.shape[0])):
        raise ValueError(f"position_ids must lie in [0, L = {cos.shape[0]}) (rows of the cos/sin tables), got "
                         f"values in [{int(position_ids.min())}, {int(position_ids.max())}]")


def _check_pair(q, k, cos, sin, position_ids=None, unsqueeze_dim=1) -> None:
    """Validation of `apply_rotary_pos_emb` (its one check per call)."""
    _check_rotary([("q", q), ("k", k)], cos, sin, position_ids, unsqueeze_dim)


def _check_one(x, cos, sin, position_ids=None, unsqueeze_dim=1) -> None:
    """Validation of `rotary_embedding` (its one check per call)."""
    _check_rotary([("x", x)], cos, sin, position_ids, unsqueeze_dim)


def _check_kernel_call(name: str, x: Tensor, cos: Tensor, sin: Tensor) -> None:
    """What the kernel backends add: fp16/bf16/fp32 loads, and no gradient for the tables."""
    for n, t in ((name, x), ("cos", cos), ("sin", sin)):
        if t.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"{n} must be float16, bfloat16 or float32 for the kernel backends, got {t.dtype} "
                            f"(backend='torch' takes any float dtype)")
    if torch.is_grad_enabled():
        for n, t in (("cos", cos), ("sin", sin)):
            if t.requires_grad:
                raise ValueError(f"{n} requires grad, but the kernel backends compute no gradient for the rotary "
                                 f"tables: pass {n}.detach() (HF's tables carry none) or use backend='torch'")


# ----------------------------------------------------------------------------------------------
# Plain-torch reference (HF's formula; the definition the kernels are tested against)
# ----------------------------------------------------------------------------------------------

def rotate_half(x: Tensor) -> Tensor:
    """cat(-x[..., D/2:], x[..., :D/2]) (HF's rotate_half, D even)."""
    d = x.shape[-1] // 2
    return torch.cat((-x[..., d:], x[..., :d]), dim=-1)


def _broadcast_tables(cos: Tensor, sin: Tensor, position_ids: Optional[Tensor],
                      unsqueeze_dim: int) -> tuple[Tensor, Tensor]:
    """cos/sin as (B' or 1, T, D) tables, unsqueezed on the heads dim of the layout."""
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]  # (B, T, D) or (T, D)
    if cos.ndim == 2:  # (T, D): shared by the batch (HF's unsqueeze would broadcast it over the wrong dim)
        cos, sin = cos[None], sin[None]
    return cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)


def _rotate_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # HF's expression, in the promoted dtype of (x, cos, sin), then x's dtype (a no-op when the
    # tables are in x's dtype: then this is HF's result bit for bit).
    return ((x * cos) + (rotate_half(x) * sin)).to(x.dtype)


def _reference_pair(q, k, cos, sin, position_ids, unsqueeze_dim) -> tuple[Tensor, Tensor]:
    c, s = _broadcast_tables(cos, sin, position_ids, unsqueeze_dim)
    return _rotate_reference(q, c, s), _rotate_reference(k, c, s)


def _reference_one(x, cos, sin, position_ids, unsqueeze_dim) -> Tensor:
    c, s = _broadcast_tables(cos, sin, position_ids, unsqueeze_dim)
    return _rotate_reference(x, c, s)


def apply_rotary_pos_emb_reference(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                                   position_ids: Optional[Tensor] = None,
                                   unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    """Plain torch, differentiable w.r.t. q, k, cos and sin: HF's `q * cos + rotate_half(q) * sin`.

    q: (B, Hq, T, D) with unsqueeze_dim=1 or (B, T, Hq, D) with unsqueeze_dim=2, k likewise with
    Hk heads, any float dtype (fp64 gives the accuracy yardstick), any strides; cos, sin: (B, T, D)
    (batch 1 broadcasts) or (T, D), or with position_ids ((B, T) or (T,) int64) tables (L, D)
    indexed by position. Computed in the promoted dtype of (q, cos, sin), returned in q's dtype.
    """
    _check_pair(q, k, cos, sin, position_ids, unsqueeze_dim)
    return _reference_pair(q, k, cos, sin, position_ids, unsqueeze_dim)


def rotary_embedding_reference(x: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor] = None,
                               unsqueeze_dim: int = 1) -> Tensor:
    """`apply_rotary_pos_emb_reference` for one head tensor x (B, H, T, D) or (B, T, H, D)."""
    _check_one(x, cos, sin, position_ids, unsqueeze_dim)
    return _reference_one(x, cos, sin, position_ids, unsqueeze_dim)


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------

@triton.jit
def _rotate_heads(X, x_row, stride_xh, O, o_row, n_heads, c1, c2, sa, sb, HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate the n_heads head vectors of one token, BLOCK_H heads at a time: out1 = x1 c1 - x2 sa,
    out2 = x2 c2 + x1 sb, in fp32, one rounding to O's dtype. O's heads are contiguous rows of D."""
    i = tl.arange(0, BLOCK_HALF)
    col_mask = (i < HALF)[None, :]  # masked tail: D/2 need not be a power of two (D = 96, D = 2)
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h < n_heads)[:, None] & col_mask
        # Each half of a head is one contiguous run (unit stride on D): vector loads and stores.
        src = X + x_row + h[:, None].to(tl.int64) * stride_xh + i[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        dst = O + o_row + h[:, None].to(tl.int64) * (2 * HALF) + i[None, :]
        tl.store(dst, (x1 * c1[None, :] - x2 * sa[None, :]).to(O.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, (x2 * c2[None, :] + x1 * sb[None, :]).to(O.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(Q, K, COS, SIN, POS, QO, KO, T, HQ, HK,
                   stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                   stride_cb, stride_ct, stride_sb, stride_st, stride_pb, stride_pt, max_pos,
                   HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
                   HAS_POS: tl.constexpr, INVERSE: tl.constexpr):
    """One program per token (b, t): its cos/sin row is loaded once and rotates all Hq heads of q
    and all Hk heads of k (Hk = 0: q alone). Outputs are token-major: token tok's heads at
    QO + tok * Hq * D (contiguous), KO likewise. INVERSE rotates by the opposite angle (backward)."""
    # int64 offsets: B*T*H*D elements pass 2^31 at long contexts and large batches.
    tok = tl.program_id(0).to(tl.int64)
    b = tok // T
    t = tok - b * T
    i = tl.arange(0, BLOCK_HALF)
    if HAS_POS:
        pos = tl.load(POS + b * stride_pb + t * stride_pt).to(tl.int64)
        # An id outside the tables is a caller bug (checked on CPU); masking keeps the loads inside
        # the tables whatever the ids (cos = sin = 0: the token comes out zero). As a column count:
        # the interpreter mis-types `vector_mask & scalar_mask`.
        n_cols = tl.where((pos >= 0) & (pos < max_pos), HALF, 0)
        cm = i < n_cols
        c_row = pos * stride_ct
        s_row = pos * stride_st
    else:
        cm = i < HALF
        c_row = b * stride_cb + t * stride_ct
        s_row = b * stride_sb + t * stride_st
    c1 = tl.load(COS + c_row + i, mask=cm, other=0.0).to(tl.float32)
    c2 = tl.load(COS + c_row + HALF + i, mask=cm, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + s_row + i, mask=cm, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + s_row + HALF + i, mask=cm, other=0.0).to(tl.float32)
    if INVERSE:
        # The transpose of [[c1, -s1], [s2, c2]] (per pair) is [[c1, s2], [-s1, c2]]:
        # out1 = g1 c1 + g2 s2, out2 = g2 c2 - g1 s1, the forward with (sa, sb) = (-s2, -s1).
        sa = -s2
        sb = -s1
    else:
        sa = s1
        sb = s2
    _rotate_heads(Q, b * stride_qb + t * stride_qt, stride_qh, QO, tok * HQ * (2 * HALF), HQ, c1, c2, sa, sb,
                  HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(K, b * stride_kb + t * stride_kt, stride_kh, KO, tok * HK * (2 * HALF), HK, c1, c2, sa, sb,
                  HALF, BLOCK_HK, BLOCK_HALF)


# ----------------------------------------------------------------------------------------------
# Launch configuration (used by the launcher and by KERNEL_CONFIGS)
# ----------------------------------------------------------------------------------------------

# Elements of one half-tile (BLOCK_H heads x D/2) per loop step. The kernel is memory-bound (3
# flops per element loaded): what matters is 128-bit accesses and enough bytes in flight, not
# arithmetic. 1024 values over 4 warps (128 threads) is 8 per thread per half: one 128-bit load
# of 16-bit data (two of fp32). Each step keeps x1, x2 and the two results (32 fp32 values per
# thread) plus the four table vectors live: far from the register limit, so many programs stay
# resident per SM to hide DRAM latency. A bigger tile only adds registers; heads beyond it loop.
_HALF_TILE = 1024


def _launch_meta(hq: int, hk: int, d: int) -> dict:
    """Block sizes and warps of a token program holding hq + hk heads of dim d (hk = 0: q only).

    One program per token, not per (token, head block): the token's cos/sin row (2 x D values) is
    loaded once for all of its heads, and B*T programs (thousands in training or prefill) fill
    every SM; a decode step's few tokens are a few microseconds however they are split."""
    block_half = _next_pow2(max(d // 2, 1))
    cap = max(1, _HALF_TILE // block_half)
    block_hq = min(_next_pow2(max(hq, 1)), cap)
    block_hk = min(_next_pow2(max(hk, 1)), cap)
    elems = max(block_hq, block_hk) * block_half
    return dict(BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half,
                num_warps=min(4, max(1, elems // 256)))


# ----------------------------------------------------------------------------------------------
# Launchers (Triton backend; inputs trusted: the public entry validated them once)
# ----------------------------------------------------------------------------------------------

def _unit_last(x: Tensor) -> Tensor:
    """The kernel's row loads need a unit stride on the last dim: copy only a tensor without it
    (an expanded upstream gradient from .sum(), a view transposed on D)."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _head_strides(x: Tensor, unsqueeze_dim: int) -> tuple[int, int, int]:
    """(batch, token, head) strides of a head tensor in the `unsqueeze_dim` layout."""
    if unsqueeze_dim == 1:
        return x.stride(0), x.stride(2), x.stride(1)
    return x.stride(0), x.stride(1), x.stride(2)


def _alloc_out(x: Tensor, unsqueeze_dim: int) -> Tensor:
    """A new token-major output for head tensor x: contiguous (B, T, H, D) memory, seen in x's
    layout (a (B, H, T, D) transposed view for unsqueeze_dim=1). Also the fake implementation's."""
    B, T, H, D = _btd(x, unsqueeze_dim)
    out = x.new_empty((B, T, H, D))
    return out.transpose(1, 2) if unsqueeze_dim == 1 else out


def _table_strides(c: Tensor, position_ids: Optional[Tensor]) -> tuple[int, int]:
    """(batch, row) strides of a table: a broadcast batch (T, D) / (1, T, D) has batch stride 0."""
    if position_ids is not None or c.ndim == 2:
        return 0, c.stride(0)
    return (c.stride(0) if c.shape[0] > 1 else 0), c.stride(1)


def _rotary_triton(q: Tensor, k: Optional[Tensor], cos: Tensor, sin: Tensor, position_ids: Optional[Tensor],
                   unsqueeze_dim: int, inverse: bool) -> tuple[Tensor, Optional[Tensor]]:
    """Rotate q (and k, unless None) by the tables (inverse: by the opposite angle) into new
    token-major outputs (`_alloc_out`); one launch over the B*T tokens."""
    q, cos, sin = _unit_last(q), _unit_last(cos), _unit_last(sin)
    k = None if k is None else _unit_last(k)
    B, T, HQ, D = _btd(q, unsqueeze_dim)
    q_out = _alloc_out(q, unsqueeze_dim)
    k_out = None if k is None else _alloc_out(k, unsqueeze_dim)
    if B * T == 0:
        return q_out, k_out
    HK = 0 if k is None else _btd(k, unsqueeze_dim)[2]
    meta = _launch_meta(HQ, HK, D)
    nw = meta.pop("num_warps")
    if position_ids is None:
        pos, stride_pb, stride_pt, max_pos = q, 0, 0, 0  # POS unused (HAS_POS=False)
    else:
        pos = position_ids
        if pos.ndim == 1:
            stride_pb, stride_pt = 0, pos.stride(0)
        else:
            stride_pb, stride_pt = (pos.stride(0) if pos.shape[0] > 1 else 0), pos.stride(1)
        max_pos = cos.shape[0]
    kq = q if k is None else k
    with _device_ctx(q):
        _rotary_kernel[(B * T,)](
            q, kq, cos, sin, pos, q_out, q_out if k_out is None else k_out, T, HQ, HK,
            *_head_strides(q, unsqueeze_dim), *(_head_strides(kq, unsqueeze_dim) if k is not None else (0, 0, 0)),
            *_table_strides(cos, position_ids), *_table_strides(sin, position_ids), stride_pb, stride_pt, max_pos,
            HALF=D // 2, HAS_POS=position_ids is not None, INVERSE=inverse, num_warps=nw, **meta)
    return q_out, k_out


def _fwd_triton(q, k, cos, sin, position_ids, unsqueeze_dim):
    """Launcher protocol `fwd`: (q_out, k_out or None)."""
    return _rotary_triton(q, k, cos, sin, position_ids, unsqueeze_dim, False)


def _bwd_triton(dq_out, dk_out, cos, sin, position_ids, unsqueeze_dim):
    """Launcher protocol `bwd`: (dq, dk or None), the upstream gradients rotated back."""
    return _rotary_triton(dq_out, dk_out, cos, sin, position_ids, unsqueeze_dim, True)


TRITON_LAUNCHERS = SimpleNamespace(fwd=_fwd_triton, bwd=_bwd_triton)


# ----------------------------------------------------------------------------------------------
# Custom op (torch.compile) and autograd
# ----------------------------------------------------------------------------------------------

def _launch(backend: str, inverse: bool, q, k, cos, sin, position_ids, unsqueeze_dim):
    launcher = OP.launcher(backend)
    return (launcher.bwd if inverse else launcher.fwd)(q, k, cos, sin, position_ids, unsqueeze_dim)


@torch.library.custom_op("nanofast::rotary", mutates_args=())
def _rotary_op(q: Tensor, k: Optional[Tensor], cos: Tensor, sin: Tensor, position_ids: Optional[Tensor],
               unsqueeze_dim: int, inverse: bool, backend: str) -> tuple[Tensor, Tensor]:
    if position_ids is not None:  # compiled calls only reach here: their entry skipped the value check
        _check_positions(position_ids, cos)
    q_out, k_out = _launch(backend, inverse, q, k, cos, sin, position_ids, unsqueeze_dim)
    # A custom op's schema cannot return an optional tensor: without k, an empty (0,) stands in.
    return q_out, (q.new_empty((0,)) if k_out is None else k_out)


@_rotary_op.register_fake
def _(q, k, cos, sin, position_ids, unsqueeze_dim, inverse, backend):
    return _alloc_out(q, unsqueeze_dim), (q.new_empty((0,)) if k is None else _alloc_out(k, unsqueeze_dim))


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, position_ids, unsqueeze_dim, inverse, backend = inputs
    ctx.save_for_backward(cos, sin, position_ids)
    ctx.has_k, ctx.unsqueeze_dim, ctx.inverse, ctx.backend = k is not None, unsqueeze_dim, inverse, backend


def _backward(ctx, dq_out, dk_out):
    cos, sin, position_ids = ctx.saved_tensors
    dq, dk = torch.ops.nanofast.rotary(dq_out, dk_out if ctx.has_k else None, cos, sin, position_ids,
                                       ctx.unsqueeze_dim, not ctx.inverse, ctx.backend)
    return dq, (dk if ctx.has_k else None), None, None, None, None, None, None


_rotary_op.register_autograd(_backward, setup_context=_setup_context)


class _RotaryFunction(torch.autograd.Function):
    """Eager autograd around the same launchers as the custom op (skips the op dispatcher)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids, unsqueeze_dim, backend):
        ctx.save_for_backward(cos, sin, position_ids)
        ctx.unsqueeze_dim, ctx.backend = unsqueeze_dim, backend
        return _launch(backend, False, q, k, cos, sin, position_ids, unsqueeze_dim)

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin, position_ids = ctx.saved_tensors
        dq, dk = _launch(ctx.backend, True, dq_out, dk_out, cos, sin, position_ids, ctx.unsqueeze_dim)
        return dq, dk, None, None, None, None, None


def _rotary_kernels(q, k, cos, sin, position_ids, unsqueeze_dim, backend):
    if torch.compiler.is_compiling():
        q_out, k_out = torch.ops.nanofast.rotary(q, k, cos, sin, position_ids, unsqueeze_dim, False, backend)
        return q_out, (None if k is None else k_out)
    return _RotaryFunction.apply(q, k, cos, sin, position_ids, unsqueeze_dim, backend)


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------

def apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor] = None,
                         unsqueeze_dim: int = 1, *, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Rotary embedding of q and k in HF's conventions (`q * cos + rotate_half(q) * sin`), one launch.

    A drop-in for transformers' `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)` (see the
    module docstring for position_ids' place). q: (B, Hq, T, D) with unsqueeze_dim=1 (HF's layout,
    any strides: transposed views are read in place) or (B, T, Hq, D) with unsqueeze_dim=2; k the
    same with Hk heads; D even; fp16/bf16/fp32 (any float dtype on backend="torch"), q and k alike.
    cos, sin: (B, T, D) (batch 1 broadcasts) or (T, D), any float dtype; with position_ids ((B, T)
    or (T,) int64) they are tables (L, D) and token (b, t) uses row position_ids[b, t].
    backend: None (Triton on CUDA, torch on CPU), "torch" or "triton".

    Returns (q_out, k_out) in q's dtype and q's/k's shapes (kernel backends: new token-major
    tensors, see the module docstring; computed in fp32, rounded once). Differentiable w.r.t. q
    and k; w.r.t. cos and sin on backend="torch" only (the kernel backends raise ValueError when a
    table requires grad).
    """
    OP.checks["apply_rotary_pos_emb"](q, k, cos, sin, position_ids, unsqueeze_dim)
    backend = resolve_backend(backend, q, OP.choices)
    if backend == "torch":
        return _reference_pair(q, k, cos, sin, position_ids, unsqueeze_dim)
    _check_kernel_call("q", q, cos, sin)
    return _rotary_kernels(q, k, cos, sin, position_ids, unsqueeze_dim, backend)


def rotary_embedding(x: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor] = None,
                     unsqueeze_dim: int = 1, *, backend: str | None = None) -> Tensor:
    """`apply_rotary_pos_emb` for one head tensor: x (B, H, T, D) with unsqueeze_dim=1 or
    (B, T, H, D) with unsqueeze_dim=2; same tables, position_ids, dtypes, layout and autograd rules.
    Returns the rotated x in x's dtype and shape."""
    OP.checks["rotary_embedding"](x, cos, sin, position_ids, unsqueeze_dim)
    backend = resolve_backend(backend, x, OP.choices)
    if backend == "torch":
        return _reference_one(x, cos, sin, position_ids, unsqueeze_dim)
    _check_kernel_call("x", x, cos, sin)
    return _rotary_kernels(x, None, cos, sin, position_ids, unsqueeze_dim, backend)[0]


# ----------------------------------------------------------------------------------------------
# What an H100 compiles (checked by the compile gate in tests/test_rotary.py)
# ----------------------------------------------------------------------------------------------

def _config(kind: str, dtype: torch.dtype, hq: int, hk: int, d: int, table_dtype: torch.dtype | None = None,
            positions: bool = False, B: int = 4, T: int = 2048) -> dict:
    """The compile_triton keyword arguments of one launch of `_rotary_kernel` on HF's layout (a
    transposed view of a (B, T, H, D) projection, (B, T, D) tables, or (L, D) tables with (B, T)
    int64 position ids). The integer arguments a real launch passes are computed here and those
    divisible by 16 marked `aligned` (and those equal to 1 made constexprs), as Triton's launcher
    specialises them, so the gate compiles exactly what that launch runs."""
    t, tt = _TL_DTYPE[dtype], _TL_DTYPE[table_dtype or dtype]
    meta = _launch_meta(hq, hk, d)
    nw = meta.pop("num_warps")
    const = dict(HALF=d // 2, HAS_POS=positions, INVERSE=kind == "bwd", **meta)
    L = 4096
    ints = dict(T=T, HQ=hq, HK=hk, stride_qb=T * hq * d, stride_qt=hq * d, stride_qh=d, stride_kb=T * hk * d,
                stride_kt=hk * d, stride_kh=d,
                stride_cb=0 if positions else T * d, stride_ct=d, stride_sb=0 if positions else T * d, stride_st=d,
                stride_pb=T if positions else 0, stride_pt=1 if positions else 0, max_pos=L if positions else 0)
    const.update({n: 1 for n, v in ints.items() if v == 1})
    aligned = ("Q", "K", "COS", "SIN", "POS", "QO", "KO") + tuple(n for n, v in ints.items() if v != 1 and v % 16 == 0)
    # (K is a pointer here, not the GEMM size gate_signature's naming rule takes it for.)
    types = {"K": f"*{t}", "COS": f"*{tt}", "SIN": f"*{tt}", "POS": "*i64" if positions else f"*{t}"}
    label = (f"{kind} {t} Hq={hq} Hk={hk} D={d}" + (f" tables={tt}" if tt != t else "")
             + (" position_ids" if positions else "") + f" warps={nw}")
    return dict(fn=_rotary_kernel, signature=gate_signature(_rotary_kernel, const, t, types), constexprs=const,
                num_warps=nw, num_stages=3, aligned=aligned, config=label)


# Llama 3 8B / Mistral 7B: D=128, 32 q heads, 8 kv heads (GQA), bf16 and fp16, forward and
# backward; D=64 (small Llamas, Qwen2-0.5B's 14/2 heads: not powers of two); fp32 tables with bf16
# activations (a model run under autocast); position ids into (L, D) tables (left-padded decode).
KERNEL_CONFIGS: list[dict] = [
    *[_config(kind, dt, 32, 8, 128) for kind in ("fwd", "bwd") for dt in (torch.bfloat16, torch.float16)],
    *[_config(kind, torch.bfloat16, 14, 2, 64) for kind in ("fwd", "bwd")],
    _config("fwd", torch.bfloat16, 32, 8, 128, table_dtype=torch.float32),
    _config("fwd", torch.bfloat16, 32, 8, 128, positions=True),
]
"""Each entry: keyword arguments of `compile_gate.compile_triton` (fn, signature, constexprs, num_warps,
num_stages, aligned, config) built from the launcher's own `_launch_meta`."""


def cost(B: int, T: int, HQ: int, HK: int, D: int, itemsize: int = 2, table_itemsize: int | None = None,
         batched_tables: bool = True, position_ids: bool = False, backward: bool = False) -> dict:
    """Bytes a single-pass implementation must move and its FLOPs, one call (fwd, or fwd + bwd).

    Forward: read q and k, write q_out and k_out (B*T*(Hq+Hk)*D elements each way); read cos and
    sin once per token row: B*T rows of D each for (B, T, D) tables (batched_tables), T rows for
    shared (T, D) tables (re-reads by other batch rows hit L2); position ids: 8 bytes per token
    (and the tables' rows it names, counted as B*T rows). Backward: the same traffic (it reads dy
    and the tables, writes dx; it never reads q or k). 3 FLOPs per element (two products, a sum).
    """
    n = B * T * (HQ + HK) * D
    rows = B * T if (batched_tables or position_ids) else T
    one = 2 * n * itemsize + 2 * rows * D * (table_itemsize or itemsize) + (8 * B * T if position_ids else 0)
    return {"bytes": one * (2 if backward else 1), "flops": 3 * n * (2 if backward else 1)}


OP = Op(name="rotary", vendor="torch", kernels=("triton",), unmeasured="triton",
        why="memory-bound: one read and one write of q and k in one launch, instead of HF's rotate_half "
            "temporaries (cat, negation, two products, a sum)",
        checks={"apply_rotary_pos_emb": _check_pair, "rotary_embedding": _check_one},
        references={"apply_rotary_pos_emb": apply_rotary_pos_emb_reference,
                    "rotary_embedding": rotary_embedding_reference},
        vendor_path=apply_rotary_pos_emb_reference,
        launchers={"triton": TRITON_LAUNCHERS}, cost=cost, configs=lambda arch=90: KERNEL_CONFIGS)
