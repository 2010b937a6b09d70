"""Fused QK-norm + rotary embedding (+ scale): one launch normalises and rotates q and k.

Per head vector x of length D (statistics in fp32 whatever the storage dtype):

    n   = x * rsqrt(mean(x^2) + eps)            # RMSNorm over D (eps=None: F.rms_norm's default, fp32's eps for 16-bit x)
    n   = n * weight                            # optional per-channel weight (D,) (Qwen3's q_norm / k_norm)
    out = scale * rotate(n, cos, sin)           # rotary, cos/sin (T, D/2)

rotate pairs (a_i, b_i) and maps them to (a c + b s, b c - a s). Half-split convention (nanochat,
GPT-NeoX): a = n[:D/2], b = n[D/2:]. interleaved=True (GPT-J, Meta's original): a = n[0::2],
b = n[1::2]. A rotation preserves each pair's norm, so without a weight this equals nanochat's
rotary -> RMSNorm -> * scale (nanofast.ops.qk_norm_rope), which the reference reproduces bitwise.
(That equivalence needs genuine rotation tables, cos^2 + sin^2 = 1, as rotary tables are; the
kernels always normalise first, the weight-free reference rotates first like nanochat.)

Why fuse: q/k norm and rotary are each a full read + write of q and k in bf16 with almost no
arithmetic (memory bound); fused, q and k are read once and written once, and cos/sin are
loaded once per token for all of its heads.

Layering (as in Liger-Kernel): Triton kernels -> launchers `qk_norm_rope_{fwd,bwd,inplace}_triton`
(same names and signatures as the `_cuda` launchers in `qk_norm_rope_cuda`) -> autograd (a
`torch.library.custom_op` with `register_fake` + `register_autograd`, so torch.compile can trace it
with fullgraph=True; eager calls the same launchers through a plain autograd.Function, whose
dispatch costs a fraction of the custom op's: that matters next to a ~10 us kernel) -> functional
`qk_norm_rope` / `qk_norm_rope_inplace` -> `QKNormRope`; the op's declaration (`OP`, with the
launchers of each backend) closes the module.
"""
from __future__ import annotations

import numbers
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .backend import resolve_backend
from .compile_gate import gate_signature
from .launch import TL_DTYPE as _TL_DTYPE
from .op import Op
from .rms_norm import default_eps

__all__ = ["qk_norm_rope", "qk_norm_rope_inplace", "qk_norm_rope_reference", "qk_norm_rope_inplace_reference",
           "qk_norm_rope_fwd_triton", "qk_norm_rope_bwd_triton", "qk_norm_rope_inplace_triton", "QKNormRope",
           "KERNEL_CONFIGS"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# Validation (shared by the reference, the launchers and the public functions)
# ----------------------------------------------------------------------------------------------

def _check_tensor(name: str, x, ndim: int, shape_doc: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {shape_doc} ({ndim} dims), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor of shape {shape_doc}, got dtype {x.dtype}")


def _check_weight(name: str, w, D: int, ref: torch.Tensor) -> None:
    if w is None:
        return
    _check_tensor(name, w, 1, f"({D},)")
    if w.shape[0] != D:
        raise ValueError(f"{name} must have shape ({D},) (the head dim), got shape {tuple(w.shape)}")
    if w.device != ref.device:
        raise ValueError(f"{name} is on {w.device} but the activations are on {ref.device}")


def _check_scalars(scale, eps, interleaved) -> None:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0):
        raise ValueError(f"eps must be None or a real number >= 0, got {eps!r}")
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {type(interleaved).__name__}")


def _check_qk(q, k, cos, sin, q_weight, k_weight, scale=1.0, eps=None, interleaved=False) -> None:
    """Shapes, dtypes, devices and layout of a qk_norm_rope call; raises TypeError / ValueError."""
    _check_tensor("q", q, 4, "(B, T, Hq, D)")
    _check_tensor("k", k, 4, "(B, T, Hk, D)")
    B, T, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != T:
        raise ValueError(f"k must have shape (B, T, Hk, D) = ({B}, {T}, Hk, {D}) to match q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if k.shape[3] != D:
        raise ValueError(f"q and k must have the same head dim D: q has D={D}, k has D={k.shape[3]}")
    if D < 2 or D % 2:
        raise ValueError(f"the head dim D of q and k must be even and >= 2 (rotary rotates pairs), got D={D}")
    if k.dtype != q.dtype:
        raise TypeError(f"q and k must have the same dtype, got q {q.dtype} and k {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"q and k must be on the same device, got q on {q.device} and k on {k.device}")
    # Only the last dim must be contiguous: q and k may be views into a packed qkv buffer.
    for name, x in (("q", q), ("k", k)):
        if x.stride(-1) != 1 and x.shape[-1] > 1:
            raise ValueError(f"{name} must be contiguous in its last dim (stride 1), got strides {x.stride()}: "
                             f"call .contiguous() first")
    for name, c in (("cos", cos), ("sin", sin)):
        _check_tensor(name, c, 2, f"(T >= {T}, D/2 = {D // 2})")
        if c.shape[0] < T or c.shape[1] != D // 2:
            raise ValueError(f"{name} must have shape (T', D/2) with T' >= T = {T} and D/2 = {D // 2}, "
                             f"got {tuple(c.shape)}")
        if c.device != q.device:
            raise ValueError(f"{name} is on {c.device} but q is on {q.device}")
        if c.stride(-1) != 1 and c.shape[-1] > 1:
            raise ValueError(f"{name} must be contiguous in its last dim (stride 1), got strides {c.stride()}")
    _check_weight("q_weight", q_weight, D, q)
    _check_weight("k_weight", k_weight, D, q)
    _check_scalars(scale, eps, interleaved)


def _check_kernel_dtype(x: torch.Tensor, name: str, *others: tuple[str, torch.Tensor | None]) -> None:
    """The kernel backends load fp16/bf16/fp32 only: x, and any of `others` (name, tensor or None)."""
    for n, t in ((name, x), *others):
        if t is not None and t.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"{n} must be float16, bfloat16 or float32 for the kernel backends, got {t.dtype}")


def _check_inplace(qkv, positions, cos_sin_cache, num_q_heads, num_kv_heads, q_weight, k_weight,
                   scale=1.0, eps=None, interleaved=False) -> int:
    """Validate an in-place call; returns the head dim D."""
    for name, h in (("num_q_heads", num_q_heads), ("num_kv_heads", num_kv_heads)):
        if isinstance(h, bool) or not isinstance(h, numbers.Integral) or h < 1:
            raise ValueError(f"{name} must be an int >= 1, got {h!r}")
    _check_tensor("cos_sin_cache", cos_sin_cache, 2, "(max_position, D)")
    D = cos_sin_cache.shape[1]
    if D < 2 or D % 2:
        raise ValueError(f"cos_sin_cache must have shape (max_position, D) with D even ([cos | sin] halves), "
                         f"got {tuple(cos_sin_cache.shape)}")
    width = (num_q_heads + 2 * num_kv_heads) * D
    _check_tensor("qkv", qkv, 2, f"(N, (Hq + 2*Hkv) * D) = (N, {width})")
    if qkv.shape[1] != width:
        raise ValueError(f"qkv must have shape (N, (Hq + 2*Hkv) * D) = (N, {width}) for Hq={num_q_heads}, "
                         f"Hkv={num_kv_heads}, D={D} (from cos_sin_cache), got {tuple(qkv.shape)}")
    if qkv.stride(1) != 1:
        raise ValueError(f"qkv must be contiguous in its last dim (stride 1), got strides {qkv.stride()}")
    if qkv.shape[0] > 1 and qkv.stride(0) < width:
        raise ValueError(f"qkv rows must not overlap: row stride {qkv.stride(0)} < row width {width}")
    if not isinstance(positions, torch.Tensor) or positions.ndim != 1 or positions.shape[0] != qkv.shape[0]:
        got = tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise ValueError(f"positions must be a tensor of shape (N,) = ({qkv.shape[0]},), got {got}")
    if positions.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"positions must be int64 (or int32), got {positions.dtype}")
    for name, t in (("positions", positions), ("cos_sin_cache", cos_sin_cache)):
        if t.device != qkv.device:
            raise ValueError(f"{name} is on {t.device} but qkv is on {qkv.device}")
    if cos_sin_cache.stride(1) != 1:
        raise ValueError(f"cos_sin_cache must be contiguous in its last dim, got strides {cos_sin_cache.stride()}")
    # A range check reads positions back: free on CPU, a device sync on CUDA (skipped there; the
    # kernels mask the cache load, so a bad position never reads outside the cache). Under
    # torch.compile the values are unknown at trace time (a guard on them is a data-dependent error
    # that breaks fullgraph): the kernel backends' custom op checks them when it runs instead.
    if not torch.compiler.is_compiling():
        _check_positions(positions, cos_sin_cache)
    _check_weight("q_weight", q_weight, D, qkv)
    _check_weight("k_weight", k_weight, D, qkv)
    _check_scalars(scale, eps, interleaved)
    return D


def _check_positions(positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """CPU tensors: every position within the cache's rows (ValueError naming positions)."""
    if not positions.is_cuda and positions.numel() and (
            int(positions.min()) < 0 or int(positions.max()) >= cos_sin_cache.shape[0]):
        raise ValueError(f"positions must lie in [0, max_position = {cos_sin_cache.shape[0]}), got values in "
                         f"[{int(positions.min())}, {int(positions.max())}]")


def _resolve_eps(eps: float | None, dtype: torch.dtype) -> float:
    """F.rms_norm's default (`rms_norm.default_eps`): the epsilon of the dtype the statistics are
    computed in, fp32 for fp16/bf16 inputs. (finfo(bf16).eps = 7.8e-3 would shrink a head vector
    with mean square 1e-3 by ~0.35, so a bf16 run would disagree with the fp32 and torch paths.)"""
    return default_eps(dtype) if eps is None else float(eps)


# ----------------------------------------------------------------------------------------------
# Plain-torch reference (the definition the kernels are tested against)
# ----------------------------------------------------------------------------------------------

def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x (..., T, H, D) rotated with cos/sin (T, D/2) broadcast over heads."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    if interleaved:
        pairs = x.unflatten(-1, (-1, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.stack([a * cos + b * sin, b * cos - a * sin], dim=-1).flatten(-2)
    d = x.size(-1) // 2
    a, b = x[..., :d], x[..., d:]  # same expression as nanofast.ops.apply_rotary (bitwise parity)
    return torch.cat([a * cos + b * sin, b * cos - a * sin], dim=-1)


def rotary_tables(seq_len: int, head_dim: int, base: float = 100_000.0,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for `qk_norm_rope`: cos, sin of shape (seq_len, head_dim // 2), fp32, angle
    t * base^(-2i / head_dim) for position t and pair i. base: nanochat's 100,000 by default
    (Llama uses 10,000, Llama 3 500,000: pass the model's `rope_theta`)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return freqs.cos(), freqs.sin()


def qk_norm_rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                           scale: float = 1.0, eps: float | None = None,
                           interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch QK-norm + rotary + scale, computed in the input dtype (differentiable).

    q: (B, T, Hq, D), k: (B, T, Hk, D) any float dtype (fp64 gives the accuracy yardstick), only the
    last dim needs to be contiguous; cos, sin: (T' >= T, D/2), the first T rows are used, cast to
    q's dtype; q_weight, k_weight: optional (D,). Returns (q_out, k_out) in q's dtype and shapes.
    Without weights: rotary -> F.rms_norm -> * scale, exactly nanofast.ops.qk_norm_rope; with
    weights: F.rms_norm(x, weight) -> rotary -> * scale (Qwen3). eps=None: F.rms_norm's default
    (`default_eps`: fp32's 1.19e-7 for fp16/bf16 inputs).
    The two orders (and the kernels' norm-first order) agree when cos^2 + sin^2 = 1.
    """
    _check_qk(q, k, cos, sin, q_weight, k_weight, scale, eps, interleaved)
    return _reference(q, k, cos, sin, q_weight, k_weight, scale, eps, interleaved)


def _reference(q, k, cos, sin, q_weight, k_weight, scale, eps, interleaved) -> tuple[torch.Tensor, torch.Tensor]:
    """qk_norm_rope_reference for validated arguments."""
    T, D = q.shape[1], q.shape[3]
    cos, sin = cos[:T].to(q.dtype), sin[:T].to(q.dtype)

    def one(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        if w is None:
            y = F.rms_norm(_rotate(x, cos, sin, interleaved), (D,), eps=eps)
        else:
            y = _rotate(F.rms_norm(x, (D,), weight=w.to(x.dtype), eps=eps), cos, sin, interleaved)
        return y * scale

    return one(q, q_weight), one(k, k_weight)


def qk_norm_rope_inplace_reference(qkv: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                                   num_q_heads: int, num_kv_heads: int, q_weight: torch.Tensor | None = None,
                                   k_weight: torch.Tensor | None = None, scale: float = 1.0,
                                   eps: float | None = None, interleaved: bool = False) -> None:
    """Reference of the in-place inference variant (vLLM / FlashInfer layout).

    qkv: (N, (Hq + 2*Hkv) * D), rows [q heads | k heads | v heads], last dim contiguous (the row
    stride may exceed the width); positions: (N,) int64 in [0, max_position); cos_sin_cache:
    (max_position, D) holding [cos | sin] per position. The q and k heads of token i are
    normalised, rotated at positions[i] and scaled in place; v and any row padding are untouched.
    """
    _check_inplace(qkv, positions, cos_sin_cache, num_q_heads, num_kv_heads, q_weight, k_weight, scale, eps,
                   interleaved)
    _inplace_reference(qkv, positions, cos_sin_cache, num_q_heads, num_kv_heads, q_weight, k_weight, scale, eps,
                       interleaved)


def _inplace_reference(qkv, positions, cos_sin_cache, num_q_heads, num_kv_heads, q_weight, k_weight, scale, eps,
                       interleaved) -> None:
    """qk_norm_rope_inplace_reference for validated arguments."""
    D = qkv.shape[1] // (num_q_heads + 2 * num_kv_heads)
    nq, nk = num_q_heads * D, num_kv_heads * D
    rows = cos_sin_cache[positions.long()]  # (N, D): each token's own position, in any order
    q = qkv[:, :nq].unflatten(-1, (num_q_heads, D))[None]  # (1, N, Hq, D): tokens play the role of T
    k = qkv[:, nq:nq + nk].unflatten(-1, (num_kv_heads, D))[None]
    q_out, k_out = _reference(q, k, rows[:, :D // 2], rows[:, D // 2:], q_weight, k_weight, scale, eps, interleaved)
    with torch.no_grad():
        qkv[:, :nq].copy_(q_out[0].flatten(-2))
        qkv[:, nq:nq + nk].copy_(k_out[0].flatten(-2))


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _load_pairs(ptr, rows, row_mask, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                INTERLEAVED: tl.constexpr):
    """(a, b) pair tiles (BLOCK_H, BLOCK_HALF) in fp32 of the head rows starting at ptr + rows."""
    if INTERLEAVED:
        # One contiguous row load (vectorisable), then a register-level deinterleave, instead of
        # two stride-2 loads that would each be scalar.
        cols = tl.arange(0, 2 * BLOCK_HALF)
        x = tl.load(ptr + rows + cols[None, :], mask=row_mask & (cols[None, :] < 2 * HALF), other=0.0)
        a, b = tl.split(tl.reshape(x.to(tl.float32), (BLOCK_H, BLOCK_HALF, 2)))
    else:
        cols = tl.arange(0, BLOCK_HALF)
        mask = row_mask & (cols[None, :] < HALF)  # masked tail: D/2 need not be a power of two
        a = tl.load(ptr + rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(ptr + rows + HALF + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return a, b


@triton.jit
def _store_pairs(ptr, rows, row_mask, a, b, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Store fp32 pair tiles (BLOCK_H, BLOCK_HALF) to the head rows at ptr + rows in ptr's dtype."""
    if INTERLEAVED:
        cols = tl.arange(0, 2 * BLOCK_HALF)
        x = tl.reshape(tl.join(a, b), (BLOCK_H, 2 * BLOCK_HALF))
        tl.store(ptr + rows + cols[None, :], x.to(ptr.dtype.element_ty),
                 mask=row_mask & (cols[None, :] < 2 * HALF))
    else:
        cols = tl.arange(0, BLOCK_HALF)
        mask = row_mask & (cols[None, :] < HALF)
        tl.store(ptr + rows + cols[None, :], a.to(ptr.dtype.element_ty), mask=mask)
        tl.store(ptr + rows + HALF + cols[None, :], b.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pair_cols(HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Column indices of the a and b halves of a (D,) vector (weights: tiny, cached, so strided is fine)."""
    i = tl.arange(0, BLOCK_HALF)
    if INTERLEAVED:
        return 2 * i, 2 * i + 1, i < HALF
    else:
        return i, HALF + i, i < HALF


@triton.jit
def _norm_rope_heads(X, x_row, stride_xh, O, o_row, stride_oh, RSTD, r_row, W, n_heads, cos, sin, eps, scale,
                     HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, HAS_W: tl.constexpr,
                     STORE_RSTD: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Normalise + weight + rotate + scale the n_heads head vectors of one token (all in registers)."""
    h = tl.arange(0, BLOCK_H)
    h_mask = h < n_heads
    a, b = _load_pairs(X, x_row + h[:, None].to(tl.int64) * stride_xh, h_mask[:, None], HALF, BLOCK_H,
                       BLOCK_HALF, INTERLEAVED)
    # fp32 statistics (masked lanes are 0 and do not count: divide by the true D = 2 * HALF).
    mean_sq = (tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)) / (2 * HALF)
    rstd = tl.rsqrt(mean_sq + eps)
    # Fold the output scale into the per-row factor: rotation and weight are linear, so
    # scale * R(x * rstd * w) = R(x * (rstd * scale) * w), one multiply per element fewer.
    f = (rstd * scale)[:, None]
    a = a * f
    b = b * f
    if HAS_W:
        ca, cb, cm = _pair_cols(HALF, BLOCK_HALF, INTERLEAVED)
        a = a * tl.load(W + ca, mask=cm, other=0.0).to(tl.float32)[None, :]
        b = b * tl.load(W + cb, mask=cm, other=0.0).to(tl.float32)[None, :]
    out_a = a * cos[None, :] + b * sin[None, :]
    out_b = b * cos[None, :] - a * sin[None, :]
    _store_pairs(O, o_row + h[:, None].to(tl.int64) * stride_oh, h_mask[:, None], out_a, out_b, HALF, BLOCK_H,
                 BLOCK_HALF, INTERLEAVED)
    if STORE_RSTD:
        tl.store(RSTD + r_row + h, rstd, mask=h_mask)


@triton.jit
def _qk_norm_rope_fwd_kernel(Q, K, COS, SIN, QW, KW, QO, KO, QR, KR, T, HQ, HK,
                             stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                             stride_cos, stride_sin, eps, scale,
                             HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                             BLOCK_HALF: tl.constexpr, HAS_QW: tl.constexpr, HAS_KW: tl.constexpr,
                             INTERLEAVED: tl.constexpr):
    """One program per token (b, t): all Hq q heads and all Hk k heads, cos/sin loaded once."""
    # int64 offsets: B*T*H*D elements exceed 2^31 at long contexts / large batches.
    tok = tl.program_id(0).to(tl.int64)
    b = tok // T
    t = tok - b * T
    i = tl.arange(0, BLOCK_HALF)
    cos = tl.load(COS + t * stride_cos + i, mask=i < HALF, other=0.0).to(tl.float32)
    sin = tl.load(SIN + t * stride_sin + i, mask=i < HALF, other=0.0).to(tl.float32)
    eps = tl.cast(eps, tl.float32)
    scale = tl.cast(scale, tl.float32)
    _norm_rope_heads(Q, b * stride_qb + t * stride_qt, stride_qh, QO, tok * HQ * (2 * HALF), 2 * HALF, QR, tok * HQ,
                     QW, HQ, cos, sin, eps, scale, HALF, BLOCK_HQ, BLOCK_HALF, HAS_QW, True, INTERLEAVED)
    _norm_rope_heads(K, b * stride_kb + t * stride_kt, stride_kh, KO, tok * HK * (2 * HALF), 2 * HALF, KR, tok * HK,
                     KW, HK, cos, sin, eps, scale, HALF, BLOCK_HK, BLOCK_HALF, HAS_KW, True, INTERLEAVED)


@triton.jit
def _qk_norm_rope_inplace_kernel(QKV, POS, CACHE, QW, KW, stride_row, stride_cache, max_pos, HQ, HK, eps, scale,
                                 HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                                 BLOCK_HALF: tl.constexpr, HAS_QW: tl.constexpr, HAS_KW: tl.constexpr,
                                 INTERLEAVED: tl.constexpr):
    """One program per token: its q and k heads rewritten in place at the token's own position."""
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + tok).to(tl.int64)
    # A position outside the cache is a caller bug (checked on CPU); masking the load guarantees
    # the kernel still never reads outside the cache (cos = sin = 0 then: those heads come out zero).
    # (Expressed as a column count: the interpreter mis-types `vector_mask & scalar_mask`.)
    n_cols = tl.where((pos >= 0) & (pos < max_pos), HALF, 0)
    i = tl.arange(0, BLOCK_HALF)
    cos = tl.load(CACHE + pos * stride_cache + i, mask=i < n_cols, other=0.0).to(tl.float32)
    sin = tl.load(CACHE + pos * stride_cache + HALF + i, mask=i < n_cols, other=0.0).to(tl.float32)
    eps = tl.cast(eps, tl.float32)
    scale = tl.cast(scale, tl.float32)
    row = tok * stride_row
    k_row = row + HQ * (2 * HALF)
    # Each program loads a head tile completely before storing it, and tokens never share
    # memory, so reading and writing the same addresses is race free.
    _norm_rope_heads(QKV, row, 2 * HALF, QKV, row, 2 * HALF, QKV, 0, QW, HQ, cos, sin, eps, scale,
                     HALF, BLOCK_HQ, BLOCK_HALF, HAS_QW, False, INTERLEAVED)
    _norm_rope_heads(QKV, k_row, 2 * HALF, QKV, k_row, 2 * HALF, QKV, 0, KW, HK, cos, sin, eps, scale,
                     HALF, BLOCK_HK, BLOCK_HALF, HAS_KW, False, INTERLEAVED)


@triton.jit
def _load_weight_pair(W, ca, cb, cm, BLOCK_HALF: tl.constexpr, HAS_W: tl.constexpr):
    """A weight's (BLOCK_HALF,) a and b halves in fp32, for the backward of q's or k's heads; zeros
    without a weight (then never read)."""
    if HAS_W:
        wa = tl.load(W + ca, mask=cm, other=0.0).to(tl.float32)
        wb = tl.load(W + cb, mask=cm, other=0.0).to(tl.float32)
    else:
        wa = tl.zeros((BLOCK_HALF,), dtype=tl.float32)
        wb = wa
    return wa, wb


@triton.jit
def _norm_rope_heads_bwd(DO, do_row, stride_doh, X, x_row, stride_xh, DX, dx_row, RSTD, r_row, wa, wb, n_heads,
                         cos, sin, scale, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                         HAS_W: tl.constexpr, INTERLEAVED: tl.constexpr):
    """dx for the heads of one token; returns its weight-gradient row as (BLOCK_HALF,) a and b halves."""
    h = tl.arange(0, BLOCK_H)
    h_mask = h < n_heads
    hm = h_mask[:, None]
    ga, gb = _load_pairs(DO, do_row + h[:, None].to(tl.int64) * stride_doh, hm, HALF, BLOCK_H, BLOCK_HALF,
                         INTERLEAVED)
    # Undo the rotation (its transpose) and the scale: gradient w.r.t. the weighted normalised n.
    gna = (ga * cos[None, :] - gb * sin[None, :]) * scale
    gnb = (ga * sin[None, :] + gb * cos[None, :]) * scale
    xa, xb = _load_pairs(X, x_row + h[:, None].to(tl.int64) * stride_xh, hm, HALF, BLOCK_H, BLOCK_HALF,
                         INTERLEAVED)
    rstd = tl.load(RSTD + r_row + h, mask=h_mask, other=0.0)[:, None]
    xha = xa * rstd
    xhb = xb * rstd
    if HAS_W:
        # This token's weight-gradient row: d(loss)/dw = sum over heads of g * xhat (padded head
        # rows hold x = 0 and add nothing).
        dwa = tl.sum(gna * xha, axis=0)
        dwb = tl.sum(gnb * xhb, axis=0)
        gna = gna * wa[None, :]
        gnb = gnb * wb[None, :]
    else:
        dwa = tl.zeros((BLOCK_HALF,), dtype=tl.float32)
        dwb = dwa
    # RMSNorm backward: dx = rstd * (g - xhat * mean(g * xhat)).
    c = ((tl.sum(gna * xha, axis=1) + tl.sum(gnb * xhb, axis=1)) / (2 * HALF))[:, None]
    dxa = rstd * (gna - xha * c)
    dxb = rstd * (gnb - xhb * c)
    _store_pairs(DX, dx_row + h[:, None].to(tl.int64) * (2 * HALF), hm, dxa, dxb, HALF, BLOCK_H, BLOCK_HALF,
                 INTERLEAVED)
    return dwa, dwb


@triton.jit
def _qk_norm_rope_bwd_kernel(DQO, DKO, Q, K, COS, SIN, QW, KW, QR, KR, DQ, DK, DQW, DKW, T, HQ, HK,
                             stride_dqb, stride_dqt, stride_dqh, stride_dkb, stride_dkt, stride_dkh,
                             stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                             stride_cos, stride_sin, scale,
                             HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                             BLOCK_HALF: tl.constexpr, HAS_QW: tl.constexpr, HAS_KW: tl.constexpr,
                             INTERLEAVED: tl.constexpr):
    """One program per token (like the forward); with weights it also writes the token's fp32
    weight-gradient row (summed over its heads) to a (B*T, D) buffer.

    The rows are summed afterwards in a fixed order, so weight gradients are deterministic (float
    atomics would depend on scheduling). Per-token rows rather than per-program accumulators
    spanning many tokens: those loop-carried (heads, D/2) tiles cost ~200 registers on sm_90,
    while the rows add only 4*D bytes of traffic per token next to the ~3 * (Hq + Hk) * D * 2 of
    dy, x and dx.
    """
    tok = tl.program_id(0).to(tl.int64)
    b = tok // T
    t = tok - b * T
    scale = tl.cast(scale, tl.float32)
    i = tl.arange(0, BLOCK_HALF)
    cos = tl.load(COS + t * stride_cos + i, mask=i < HALF, other=0.0).to(tl.float32)
    sin = tl.load(SIN + t * stride_sin + i, mask=i < HALF, other=0.0).to(tl.float32)
    ca, cb, cm = _pair_cols(HALF, BLOCK_HALF, INTERLEAVED)
    qwa, qwb = _load_weight_pair(QW, ca, cb, cm, BLOCK_HALF, HAS_QW)
    kwa, kwb = _load_weight_pair(KW, ca, cb, cm, BLOCK_HALF, HAS_KW)
    qa, qb = _norm_rope_heads_bwd(DQO, b * stride_dqb + t * stride_dqt, stride_dqh,
                                  Q, b * stride_qb + t * stride_qt, stride_qh, DQ, tok * HQ * (2 * HALF),
                                  QR, tok * HQ, qwa, qwb, HQ, cos, sin, scale, HALF, BLOCK_HQ, BLOCK_HALF, HAS_QW,
                                  INTERLEAVED)
    ka, kb = _norm_rope_heads_bwd(DKO, b * stride_dkb + t * stride_dkt, stride_dkh,
                                  K, b * stride_kb + t * stride_kt, stride_kh, DK, tok * HK * (2 * HALF),
                                  KR, tok * HK, kwa, kwb, HK, cos, sin, scale, HALF, BLOCK_HK, BLOCK_HALF, HAS_KW,
                                  INTERLEAVED)
    row = tok * (2 * HALF)
    if HAS_QW:
        tl.store(DQW + row + ca, qa, mask=cm)
        tl.store(DQW + row + cb, qb, mask=cm)
    if HAS_KW:
        tl.store(DKW + row + ca, ka, mask=cm)
        tl.store(DKW + row + cb, kb, mask=cm)


# ----------------------------------------------------------------------------------------------
# Launch configuration (one function, used by the launchers and by KERNEL_CONFIGS)
# ----------------------------------------------------------------------------------------------

def _launch_meta(hq: int, hk: int, d: int) -> dict:
    """Block sizes and warps for a token program holding hq + hk heads of dim d.

    Warps scale with the bigger tile so each thread holds about 8 elements of it per pair half:
    in 16-bit dtypes that is one 128-bit load per thread per tile (full-width coalesced
    transactions) without enough registers per thread to limit occupancy.
    """
    block_half = triton.next_power_of_2(max(d // 2, 1))
    block_hq = triton.next_power_of_2(max(hq, 1))
    block_hk = triton.next_power_of_2(max(hk, 1))
    elems = max(block_hq, block_hk) * 2 * block_half
    return dict(BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half,
                num_warps=min(8, max(1, elems // 512)))


def _token_meta(hq: int, hk: int, d: int, has_qw: bool, has_kw: bool, interleaved: bool) -> tuple[dict, int]:
    """(constexprs, num_warps) of a token program: the fwd, bwd and in-place kernels take the same
    set, and the launchers and the compile gate's configs both build it here, so the gate compiles
    exactly what a launch runs."""
    meta = _launch_meta(hq, hk, d)
    nw = meta.pop("num_warps")
    return dict(HALF=d // 2, HAS_QW=has_qw, HAS_KW=has_kw, INTERLEAVED=interleaved, **meta), nw


# ----------------------------------------------------------------------------------------------
# Launchers (Triton backend). Same names/signatures as the `_cuda` launchers in qk_norm_rope_cuda.
# ----------------------------------------------------------------------------------------------

def _launch_fwd(q, k, cos, sin, q_weight, k_weight, scale, eps, interleaved, q_out, k_out, q_rstd, k_rstd) -> None:
    """Run the forward kernel into given outputs (contiguous q_out/k_out, q_rstd/k_rstd)."""
    B, T, HQ, D = q.shape
    HK = k.shape[2]
    if B * T == 0:
        return
    const, nw = _token_meta(HQ, HK, D, q_weight is not None, k_weight is not None, interleaved)
    _qk_norm_rope_fwd_kernel[(B * T,)](
        q, k, cos, sin, q if q_weight is None else q_weight, q if k_weight is None else k_weight,
        q_out, k_out, q_rstd, k_rstd, T, HQ, HK, *q.stride()[:3], *k.stride()[:3], cos.stride(0), sin.stride(0),
        eps, scale, num_warps=nw, **const)


def _fwd_triton(q, k, cos, sin, q_weight, k_weight, scale: float, eps: float | None, interleaved: bool):
    """qk_norm_rope_fwd_triton without input validation (for callers that validated already)."""
    eps = _resolve_eps(eps, q.dtype)
    B, T, HQ, D = q.shape
    q_out = torch.empty((B, T, HQ, D), dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    q_rstd = torch.empty((B, T, HQ), dtype=torch.float32, device=q.device)
    k_rstd = torch.empty(k.shape[:3], dtype=torch.float32, device=k.device)
    _launch_fwd(q, k, cos, sin, q_weight, k_weight, float(scale), eps, interleaved, q_out, k_out, q_rstd, k_rstd)
    return q_out, k_out, q_rstd, k_rstd


def qk_norm_rope_fwd_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, scale: float,
                            eps: float | None, interleaved: bool
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward launch over (B*T,) token programs covering both q and k.

    q: (B, T, Hq, D), k: (B, T, Hk, D) fp16/bf16/fp32, last dim contiguous (other strides free);
    cos, sin: (T' >= T, D/2) any float dtype; weights (D,) or None. Returns new contiguous
    q_out (B, T, Hq, D), k_out (B, T, Hk, D) in q's dtype and q_rstd (B, T, Hq), k_rstd (B, T, Hk)
    fp32 (1/rms of each input head, kept for the backward). Inputs are not modified.
    """
    _check_qk(q, k, cos, sin, q_weight, k_weight, scale, eps, interleaved)
    _check_kernel_dtype(q, "q")
    return _fwd_triton(q, k, cos, sin, q_weight, k_weight, scale, eps, interleaved)


def _launch_bwd(dq_out, dk_out, q, k, cos, sin, q_weight, k_weight, q_rstd, k_rstd, scale, interleaved,
                dq, dk, dqw_rows, dkw_rows) -> None:
    """Run the backward kernel into given outputs; weight-gradient row buffers are (B*T, D) fp32."""
    B, T, HQ, D = q.shape
    HK = k.shape[2]
    if B * T == 0:
        return
    const, nw = _token_meta(HQ, HK, D, q_weight is not None, k_weight is not None, interleaved)
    _qk_norm_rope_bwd_kernel[(B * T,)](
        dq_out, dk_out, q, k, cos, sin, q if q_weight is None else q_weight, q if k_weight is None else k_weight,
        q_rstd, k_rstd, dq, dk, q_rstd if dqw_rows is None else dqw_rows, q_rstd if dkw_rows is None else dkw_rows,
        T, HQ, HK, *dq_out.stride()[:3], *dk_out.stride()[:3], *q.stride()[:3], *k.stride()[:3],
        cos.stride(0), sin.stride(0), scale, num_warps=nw, **const)


def qk_norm_rope_bwd_triton(dq_out: torch.Tensor, dk_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                            cos: torch.Tensor, sin: torch.Tensor, q_weight: torch.Tensor | None,
                            k_weight: torch.Tensor | None, q_rstd: torch.Tensor, k_rstd: torch.Tensor,
                            scale: float, interleaved: bool
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Backward launch: gradients of q, k (new contiguous tensors in q's dtype) and of the weights.

    dq_out (B, T, Hq, D) / dk_out (B, T, Hk, D): upstream gradients (any strides); q, k,
    cos, sin, weights: the forward inputs; q_rstd (B, T, Hq), k_rstd (B, T, Hk) fp32 from the
    forward. dq_weight / dk_weight: (D,) in the weight's dtype, reduced deterministically (an fp32
    row per token, then one fixed-order sum over tokens; no atomics), or None without weights.
    """
    _check_qk(q, k, cos, sin, q_weight, k_weight, scale, None, interleaved)
    _check_kernel_dtype(q, "q")
    for name, g, x in (("dq_out", dq_out, q), ("dk_out", dk_out, k)):
        if not isinstance(g, torch.Tensor) or g.shape != x.shape or g.device != x.device:
            raise ValueError(f"{name} must be a tensor of shape {tuple(x.shape)} on {x.device}")
    for name, r, x in (("q_rstd", q_rstd, q), ("k_rstd", k_rstd, k)):
        if not isinstance(r, torch.Tensor) or r.shape != x.shape[:3] or r.dtype != torch.float32:
            raise ValueError(f"{name} must be a float32 tensor of shape {tuple(x.shape[:3])} (from the forward)")
    return _bwd_triton(dq_out, dk_out, q, k, cos, sin, q_weight, k_weight, q_rstd, k_rstd, scale, interleaved)


def _bwd_triton(dq_out, dk_out, q, k, cos, sin, q_weight, k_weight, q_rstd, k_rstd, scale: float,
                interleaved: bool):
    """qk_norm_rope_bwd_triton without input validation (autograd hands it the forward's tensors)."""
    # Upstream gradients may be expanded (stride 0, e.g. from .sum()): the kernel takes any
    # batch/token/head strides but needs unit stride on D for vector loads, so only then copy.
    dq_out = dq_out.to(q.dtype)
    dk_out = dk_out.to(k.dtype)
    dq_out = dq_out if dq_out.stride(-1) == 1 else dq_out.contiguous()
    dk_out = dk_out if dk_out.stride(-1) == 1 else dk_out.contiguous()
    q_rstd, k_rstd = q_rstd.contiguous(), k_rstd.contiguous()
    B, T, HQ, D = q.shape
    dq = torch.empty((B, T, HQ, D), dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    # Per-token fp32 weight-gradient rows, then one fixed-order sum over tokens: deterministic.
    dqw_rows = None if q_weight is None else torch.empty((B * T, D), dtype=torch.float32, device=q.device)
    dkw_rows = None if k_weight is None else torch.empty((B * T, D), dtype=torch.float32, device=q.device)
    _launch_bwd(dq_out, dk_out, q, k, cos, sin, q_weight, k_weight, q_rstd, k_rstd, float(scale), interleaved,
                dq, dk, dqw_rows, dkw_rows)
    dqw = None if q_weight is None else dqw_rows.sum(dim=0).to(q_weight.dtype)
    dkw = None if k_weight is None else dkw_rows.sum(dim=0).to(k_weight.dtype)
    return dq, dk, dqw, dkw


def qk_norm_rope_inplace_triton(qkv: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                                num_q_heads: int, num_kv_heads: int, q_weight: torch.Tensor | None,
                                k_weight: torch.Tensor | None, scale: float, eps: float | None,
                                interleaved: bool) -> None:
    """In-place launch over (N,) token programs; see `qk_norm_rope_inplace_reference` for the layout."""
    _check_inplace(qkv, positions, cos_sin_cache, num_q_heads, num_kv_heads, q_weight, k_weight, scale, eps,
                   interleaved)
    _check_kernel_dtype(qkv, "qkv")
    _inplace_triton(qkv, positions, cos_sin_cache, num_q_heads, num_kv_heads, q_weight, k_weight, scale, eps,
                    interleaved)


def _inplace_triton(qkv, positions, cos_sin_cache, num_q_heads: int, num_kv_heads: int, q_weight, k_weight,
                    scale: float, eps: float | None, interleaved: bool) -> None:
    """qk_norm_rope_inplace_triton without input validation."""
    D = cos_sin_cache.shape[1]
    eps = _resolve_eps(eps, qkv.dtype)
    N = qkv.shape[0]
    if N == 0:
        return
    const, nw = _token_meta(num_q_heads, num_kv_heads, D, q_weight is not None, k_weight is not None, interleaved)
    positions = positions.contiguous()  # the kernel reads positions[i] at offset i (a strided column would misread)
    _qk_norm_rope_inplace_kernel[(N,)](
        qkv, positions, cos_sin_cache, qkv if q_weight is None else q_weight, qkv if k_weight is None else k_weight,
        qkv.stride(0), cos_sin_cache.stride(0), cos_sin_cache.shape[0], num_q_heads, num_kv_heads,
        eps, float(scale), num_warps=nw, **const)


# ----------------------------------------------------------------------------------------------
# Backend dispatch, custom ops (torch.compile) and autograd
# ----------------------------------------------------------------------------------------------

# The Triton backend's launchers, in the op's launcher protocol (fwd, bwd, inplace; inputs trusted:
# the public functions validated once). The CUDA backend's are qk_norm_rope_cuda.fwd / bwd / inplace.
TRITON_LAUNCHERS = SimpleNamespace(fwd=_fwd_triton, bwd=_bwd_triton, inplace=_inplace_triton)


@torch.library.custom_op("nanofast::qk_norm_rope_fwd", mutates_args=())
def _qk_norm_rope_fwd_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, scale: float, eps: float,
                         interleaved: bool, backend: str
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return OP.launcher(backend).fwd(q, k, cos, sin, q_weight, k_weight, scale, eps, interleaved)


@_qk_norm_rope_fwd_op.register_fake
def _(q, k, cos, sin, q_weight, k_weight, scale, eps, interleaved, backend):
    return (q.new_empty(q.shape), k.new_empty(k.shape), q.new_empty(q.shape[:3], dtype=torch.float32),
            k.new_empty(k.shape[:3], dtype=torch.float32))


@torch.library.custom_op("nanofast::qk_norm_rope_bwd", mutates_args=())
def _qk_norm_rope_bwd_op(dq_out: torch.Tensor, dk_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                         cos: torch.Tensor, sin: torch.Tensor, q_weight: torch.Tensor | None,
                         k_weight: torch.Tensor | None, q_rstd: torch.Tensor, k_rstd: torch.Tensor, scale: float,
                         interleaved: bool, backend: str
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # Custom-op schemas cannot return an optional tensor: an absent weight's gradient is (0,).
    dq, dk, dqw, dkw = OP.launcher(backend).bwd(dq_out, dk_out, q, k, cos, sin, q_weight, k_weight, q_rstd, k_rstd,
                                              scale, interleaved)
    # (two distinct empties: custom-op outputs must not alias each other)
    return (dq, dk, q.new_empty((0,), dtype=torch.float32) if dqw is None else dqw,
            q.new_empty((0,), dtype=torch.float32) if dkw is None else dkw)


@_qk_norm_rope_bwd_op.register_fake
def _(dq_out, dk_out, q, k, cos, sin, q_weight, k_weight, q_rstd, k_rstd, scale, interleaved, backend):
    def wgrad(w):
        return q.new_empty((0,), dtype=torch.float32) if w is None else w.new_empty(w.shape)

    return q.new_empty(q.shape), k.new_empty(k.shape), wgrad(q_weight), wgrad(k_weight)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, q_weight, k_weight, scale, eps, interleaved, backend = inputs
    ctx.save_for_backward(q, k, cos, sin, q_weight, k_weight, output[2], output[3])
    ctx.scale, ctx.interleaved, ctx.backend = scale, interleaved, backend
    ctx.mark_non_differentiable(output[2], output[3])


def _unit_last_stride(g: torch.Tensor) -> torch.Tensor:
    """Autograd may hand expanded (stride-0) gradients, e.g. from .sum(); every backend's launcher
    needs a unit stride on D (vector loads), so copy only then."""
    return g if g.stride(-1) == 1 else g.contiguous()


def _backward(ctx, dq_out, dk_out, _dq_rstd, _dk_rstd):
    q, k, cos, sin, q_weight, k_weight, q_rstd, k_rstd = ctx.saved_tensors
    dq_out, dk_out = _unit_last_stride(dq_out), _unit_last_stride(dk_out)
    dq, dk, dqw, dkw = torch.ops.nanofast.qk_norm_rope_bwd(dq_out, dk_out, q, k, cos, sin, q_weight, k_weight,
                                                           q_rstd, k_rstd, ctx.scale, ctx.interleaved, ctx.backend)
    return (dq, dk, None, None, dqw if q_weight is not None else None, dkw if k_weight is not None else None,
            None, None, None, None)


_qk_norm_rope_fwd_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("nanofast::qk_norm_rope_inplace", mutates_args=("qkv",))
def _qk_norm_rope_inplace_op(qkv: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                             num_q_heads: int, num_kv_heads: int, q_weight: torch.Tensor | None,
                             k_weight: torch.Tensor | None, scale: float, eps: float, interleaved: bool,
                             backend: str) -> None:
    # Eager calls run the launcher without this op (their entry checked positions); compiled calls
    # reach it with that check skipped at trace time (see _check_inplace), so it runs here.
    _check_positions(positions, cos_sin_cache)
    OP.launcher(backend).inplace(qkv, positions, cos_sin_cache, num_q_heads, num_kv_heads, q_weight, k_weight, scale,
                           eps, interleaved)


@_qk_norm_rope_inplace_op.register_fake
def _(qkv, positions, cos_sin_cache, num_q_heads, num_kv_heads, q_weight, k_weight, scale, eps, interleaved,
      backend):
    return None


class _QKNormRopeFunction(torch.autograd.Function):
    """Eager autograd around the same launchers as the custom op (skips the op dispatcher)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, q_weight, k_weight, scale, eps, interleaved, backend):
        q_out, k_out, q_rstd, k_rstd = OP.launcher(backend).fwd(q, k, cos, sin, q_weight, k_weight, scale, eps,
                                                              interleaved)
        ctx.save_for_backward(q, k, cos, sin, q_weight, k_weight, q_rstd, k_rstd)
        ctx.scale, ctx.interleaved, ctx.backend = scale, interleaved, backend
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        q, k, cos, sin, q_weight, k_weight, q_rstd, k_rstd = ctx.saved_tensors
        dq_out, dk_out = _unit_last_stride(dq_out), _unit_last_stride(dk_out)
        dq, dk, dqw, dkw = OP.launcher(ctx.backend).bwd(dq_out, dk_out, q, k, cos, sin, q_weight, k_weight, q_rstd,
                                                      k_rstd, ctx.scale, ctx.interleaved)
        return dq, dk, None, None, dqw, dkw, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Functional API and module
# ----------------------------------------------------------------------------------------------

def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None, scale: float = 1.0,
                 eps: float | None = None, interleaved: bool = False,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm (optionally weighted) + rotary + scale of q and k in one fused launch.

    q: (B, T, Hq, D), k: (B, T, Hk, D) (GQA: Hk may differ), fp16/bf16/fp32 (fp64 on the torch
    backend), same dtype and device, last dim contiguous (views into a packed qkv buffer are fine);
    cos, sin: (T' >= T, D/2), rows 0..T-1 used; q_weight, k_weight: optional (D,) per-channel
    weights; eps None: F.rms_norm's default (fp32's epsilon for fp16/bf16 q); interleaved: pair (2i, 2i+1) instead of (i, i + D/2).
    backend: None (Triton on CUDA, torch on CPU), "torch", "triton" or "cuda".
    Returns (q_out (B, T, Hq, D), k_out (B, T, Hk, D)), contiguous, in q's dtype; differentiable
    w.r.t. q, k and the weights (not cos/sin on the kernel backends).
    """
    OP.checks["qk_norm_rope"](q, k, cos, sin, q_weight, k_weight, scale, eps, interleaved)
    backend = resolve_backend(backend, q, OP.choices)
    if backend == "torch":
        q_out, k_out = _reference(q, k, cos, sin, q_weight, k_weight, scale, eps, interleaved)
        return q_out.contiguous(), k_out.contiguous()
    _check_kernel_dtype(q, "q", ("cos", cos), ("sin", sin), ("q_weight", q_weight), ("k_weight", k_weight))
    if sin.dtype != cos.dtype or sin.shape != cos.shape:  # one table layout: the CUDA launch takes one dtype code
        raise TypeError(f"sin must have cos's shape and dtype {tuple(cos.shape)} {cos.dtype} for the kernel backends, "
                        f"got {tuple(sin.shape)} {sin.dtype}")
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("cos and sin get no gradient from the kernel backends: pass detached tables "
                         "(or use backend='torch')")
    eps = _resolve_eps(eps, q.dtype)
    if torch.compiler.is_compiling():
        q_out, k_out, _, _ = torch.ops.nanofast.qk_norm_rope_fwd(q, k, cos, sin, q_weight, k_weight, float(scale),
                                                                 eps, interleaved, backend)
        return q_out, k_out
    return _QKNormRopeFunction.apply(q, k, cos, sin, q_weight, k_weight, float(scale), eps, interleaved, backend)


def qk_norm_rope_inplace(qkv: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                         num_q_heads: int, num_kv_heads: int, q_weight: torch.Tensor | None = None,
                         k_weight: torch.Tensor | None = None, scale: float = 1.0, eps: float | None = None,
                         interleaved: bool = False, backend: str | None = None) -> None:
    """In-place QK-norm + rotary + scale of a packed qkv buffer at per-token positions (inference).

    qkv: (N, (Hq + 2*Hkv) * D) fp16/bf16/fp32, rows [q heads | k heads | v heads], last dim
    contiguous (row stride >= width); positions: (N,) int64, any order, repeats allowed;
    cos_sin_cache: (max_position, D) fp32 with [cos | sin] halves. v is not touched. No autograd.
    Positions outside [0, max_position) raise ValueError for CPU tensors (on CUDA the kernels mask
    the cache load instead of a host sync); under torch.compile the kernel backends still check them
    (inside their custom op); the traced torch backend has no value check.
    """
    OP.checks["qk_norm_rope_inplace"](qkv, positions, cos_sin_cache, num_q_heads, num_kv_heads, q_weight,
                                      k_weight, scale, eps, interleaved)
    backend = resolve_backend(backend, qkv, OP.choices)
    if backend == "torch":
        _inplace_reference(qkv, positions, cos_sin_cache, num_q_heads, num_kv_heads, q_weight,
                                       k_weight, scale, eps, interleaved)
        return
    _check_kernel_dtype(qkv, "qkv", ("cos_sin_cache", cos_sin_cache), ("q_weight", q_weight), ("k_weight", k_weight))
    eps = _resolve_eps(eps, qkv.dtype)
    if torch.compiler.is_compiling():
        torch.ops.nanofast.qk_norm_rope_inplace(qkv, positions, cos_sin_cache, num_q_heads, num_kv_heads, q_weight,
                                                k_weight, float(scale), eps, interleaved, backend)
    else:  # eager: the same launcher without the op dispatcher's overhead (a decode step calls it per layer)
        OP.launcher(backend).inplace(qkv, positions, cos_sin_cache, num_q_heads, num_kv_heads, q_weight, k_weight,
                               float(scale), eps, interleaved)


class QKNormRope(torch.nn.Module):
    """QK-norm + rotary + scale as a module; `weight=True` adds learnable (D,) q and k norm weights.

    forward(q (B, T, Hq, D), k (B, T, Hk, D), cos (T', D/2), sin (T', D/2)) -> (q_out, k_out).
    Without weights (nanochat) it has no parameters; with weights it is Qwen3's q_norm/k_norm.
    """

    def __init__(self, head_dim: int, weight: bool = False, scale: float = 1.0, eps: float | None = None,
                 interleaved: bool = False, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, numbers.Integral) or head_dim < 2 or head_dim % 2:
            raise ValueError(f"head_dim must be an even int >= 2, got {head_dim!r}")
        _check_scalars(scale, eps, interleaved)
        self.head_dim, self.scale, self.eps, self.interleaved, self.backend = head_dim, scale, eps, interleaved, backend
        if weight:
            self.q_weight = torch.nn.Parameter(torch.ones(head_dim, device=device, dtype=dtype))
            self.k_weight = torch.nn.Parameter(torch.ones(head_dim, device=device, dtype=dtype))
        else:
            self.register_parameter("q_weight", None)
            self.register_parameter("k_weight", None)

    def forward(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return qk_norm_rope(q, k, cos, sin, self.q_weight, self.k_weight, self.scale, self.eps, self.interleaved,
                            self.backend)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, weight={self.q_weight is not None}, scale={self.scale}, "
                f"eps={self.eps}, interleaved={self.interleaved}")


# ----------------------------------------------------------------------------------------------
# What an H100 compiles for nanochat shapes (checked by the compile gate in the tests)
# ----------------------------------------------------------------------------------------------

def _config(kind: str, dtype: torch.dtype, hq: int, hk: int, d: int, weights: bool = False,
            interleaved: bool = False) -> dict:
    """The compile_triton keyword arguments of one launch. Strides, T, pointers are multiples of 16 for these
    shapes (D, Hq*D, T*Hq*D, D/2 rows of the tables), which Triton's launcher specialises on: the
    `aligned` names are exactly those, so the compiled code is the one a real launch gets."""
    t = _TL_DTYPE[dtype]
    const, nw = _token_meta(hq, hk, d, weights, weights, interleaved)
    tables = ("stride_cos", "stride_sin") if d // 2 % 16 == 0 else ()
    if kind == "fwd":
        fn = _qk_norm_rope_fwd_kernel
        types = {"K": f"*{t}", "QR": "*fp32", "KR": "*fp32"}
        aligned = ("Q", "K", "COS", "SIN", "QW", "KW", "QO", "KO", "QR", "KR", "T", "stride_qb", "stride_qt",
                   "stride_qh", "stride_kb", "stride_kt", "stride_kh") + tables
    elif kind == "bwd":
        fn = _qk_norm_rope_bwd_kernel
        types = {"K": f"*{t}", "QR": "*fp32", "KR": "*fp32", "DQW": "*fp32", "DKW": "*fp32"}
        strides = [f"stride_{p}{a}" for p in ("dq", "dk", "q", "k") for a in ("b", "t", "h")]
        aligned = ("DQO", "DKO", "Q", "K", "COS", "SIN", "QW", "KW", "QR", "KR", "DQ", "DK", "DQW", "DKW",
                   "T", *strides) + tables
    elif kind == "inplace":
        fn = _qk_norm_rope_inplace_kernel
        types = {"POS": "*i64", "CACHE": "*fp32"}
        aligned = ("QKV", "POS", "CACHE", "QW", "KW", "stride_row", "max_pos") + (
            ("stride_cache",) if d % 16 == 0 else ())
    else:
        raise ValueError(f"kind must be 'fwd', 'bwd' or 'inplace', got {kind!r}")
    label = (f"{kind} {t} Hq={hq} Hk={hk} D={d}" + (" weights" if weights else "")
             + (" interleaved" if interleaved else "") + f" warps={nw}")
    return dict(fn=fn, signature=gate_signature(fn, const, t, types), constexprs=const, num_warps=nw, num_stages=3,
                aligned=aligned, config=label)


# nanochat: head_dim 128, n_head = depth / 2 -> 6 (d12) .. 13 (d26); D=64 for small models; a GQA
# case (Hq=12, Hk=4); weights (Qwen3) and the interleaved convention in bf16; the in-place
# inference kernel on the packed qkv layout.
KERNEL_CONFIGS: list[dict] = [
    *[_config(kind, dt, h, h, 128) for kind in ("fwd", "bwd") for dt in (torch.bfloat16, torch.float16,
                                                                           torch.float32) for h in (6, 13)],
    *[_config(kind, torch.bfloat16, 12, 12, 64) for kind in ("fwd", "bwd")],
    *[_config(kind, torch.bfloat16, 12, 4, 128) for kind in ("fwd", "bwd")],
    *[_config(kind, torch.bfloat16, 8, 8, 128, weights=True) for kind in ("fwd", "bwd")],
    *[_config(kind, torch.bfloat16, 8, 8, 128, interleaved=True) for kind in ("fwd", "bwd")],
    _config("inplace", torch.bfloat16, 12, 4, 128),
    _config("inplace", torch.float16, 13, 13, 128, weights=True),
]
"""Each entry: keyword arguments of `compile_gate.compile_triton` (fn, signature, constexprs, num_warps,
num_stages, aligned, config), built from the launchers' own `_launch_meta`, so
`compile_triton(**cfg, arch=90)` compiles exactly what an H100 launches for that shape."""


def cost(B: int, T: int, HQ: int, HK: int, D: int, itemsize: int = 2, backward: bool = False,
         norm: bool = True) -> dict:
    """Bytes a fused implementation must move (the minimum; extra passes only add to it) and FLOPs.

    Forward: read q and k, write q_out and k_out, write fp32 rstd per head, read cos and sin once
    (T x D/2 each; re-reads by other batch rows hit L2). Backward: read dy and x, write dx, read
    rstd, read cos/sin. norm=False (rope only): no rstd. ~8 FLOPs per element each way.
    """
    n = B * T * (HQ + HK)
    tables = T * D * itemsize
    fwd = 2 * n * D * itemsize + (4 * n if norm else 0) + tables
    bwd = 3 * n * D * itemsize + (4 * n if norm else 0) + tables
    return {"bytes": fwd + (bwd if backward else 0), "flops": 8 * n * D * (2 if backward else 1)}


OP = Op(name="qk_norm_rope", vendor="torch", kernels=("triton", "cuda"), unmeasured="triton",
        why="memory-bound: rotary, norm and scale in one pass instead of several",
        checks={"qk_norm_rope": _check_qk, "qk_norm_rope_inplace": _check_inplace},
        references={"qk_norm_rope": qk_norm_rope_reference, "qk_norm_rope_inplace": qk_norm_rope_inplace_reference},
        vendor_path=qk_norm_rope_reference,
        launchers={"triton": TRITON_LAUNCHERS, "cuda": "qk_norm_rope_cuda"}, cost=cost, configs=lambda arch=90: KERNEL_CONFIGS)
