"""FP8 quantisation (per-tensor and per-row scales) for FP8 GEMMs: plain-torch reference and Triton
kernels, layered kernel -> launcher -> functional API (`quantize_fp8`, `backend=`), plus the
amax history of delayed scaling (`DelayedScaling`).

Definition (the reference, `quantize_fp8_reference`, is the spec the kernels are tested against):

    amax  = max |x|                               (fp32; NaN if x holds a NaN, like torch.amax)
    scale = max(amax, floor) / FP8_MAX            (fp32 dequantisation scale: x ~= q.float() * scale)
    q     = fp8(clamp(x.float() / scale, -FP8_MAX, FP8_MAX))   (IEEE fp32 division, then one
                                                   round-to-nearest-even to the fp8 grid)

    floor = FP8_MAX * 2^-126  (`amax_floor`), so scale >= 2^-126, the smallest *normal* fp32: an
    all-zero tensor gets a finite, non-zero scale and q == 0, and no scale is ever a denormal (GPU
    paths that flush denormals to zero would turn 0 / scale into 0 / 0 = NaN).

Non-finite inputs (a deliberate, tested choice):
  * A given (delayed) scale: +-inf saturate to +-FP8_MAX (as torch's `_scaled_mm` recipes and
    Hopper's `cvt.satfinite` do); NaN stays NaN; the returned amax is inf / NaN, so the next
    history entry shows the overflow.
  * A computed scale: amax is inf (or NaN), so scale is inf (or NaN); q is then 0 for finite
    elements and NaN for the +-inf (inf / inf) and NaN ones. Dequantising gives NaN everywhere
    (0 * inf): an overflow is loud, never silently clipped into a plausible tensor.

Recipes:
  * "tensorwise": one scale () for the whole tensor. Optionally also writes q_t = quantised x^T,
    (K, M) contiguous, with the same scale: the operand layout the backward GEMMs need, written in
    the same pass over x as q.
  * "rowwise": one scale per row, (M, 1). A rowwise transpose would need per-*column* scales: quantise
    x.t() separately instead.

FP8 quantisation is pure bandwidth (bf16 in: 2 bytes read, 1 written, +1 for the transpose, a
dozen flops per element), so the Triton design is about bytes:
  * tensorwise, computed scale: (1) `_amax_partial_kernel`, a persistent grid (about 4 CTAs per
    SM) that walks tiles of x keeping an elementwise running max in registers and writes ONE
    partial per CTA; (2) `_amax_finalize_kernel`, one CTA reducing the partials (< 1024 values) and
    writing amax and scale; (3) `_cast_kernel`, one (BLOCK_M, BLOCK_K) tile per CTA: loads x once,
    stores q and (optionally) the tile's transpose into q_t. Triton routes the transposed store
    through shared memory (a layout conversion), so both the q rows and the q_t rows are written
    with contiguous 128-bit stores. Two reads of x in all; the amax read comes from DRAM, the cast
    read too for tensors larger than L2. Partial maxima instead of `atomic_max`: max is
    order-independent, so either would be deterministic, but atomics need a zeroed target (a
    memset launch, the same count as the finalize launch) and make every CTA contend on one
    address; the partials need no initialisation and no read-modify-write.
  * tensorwise, given scale (delayed scaling): the cast kernel alone, ONE read of x; each CTA also
    writes its tile's max |x| as a partial, and the finalize kernel reduces those to the returned
    amax.
  * rowwise: `_rowwise_kernel`, one CTA per block of rows: the row max and the cast in the same
    program. Rows up to 4096 wide are held in registers (one read); wider rows are walked twice
    in chunks, the second walk hitting L2 (a 16K-wide bf16 row block is 32 KB per row).

Every max |x| propagates NaN like torch.amax: it is an integer max over the bit patterns of |x|
(`_abs_bits`), since Triton's float `tl.max` skips NaN (fmax semantics). Divisions use `tl.math.div_rn`
(IEEE round-to-nearest): plain `/` on fp32 compiles to the approximate `div.full.f32`, which would
make q differ from torch's `x / scale` by one fp32 ulp before the fp8 rounding.

Triton backend inputs: fp32 / fp16 / bf16, any row stride, unit last-dim stride (other layouts
are copied once).

The final fp32 -> fp8 rounding is done by the kernels themselves, in fp32 / int32
(`_round_to_fp8_grid`), before the `.to(fp8)`, which then only re-encodes a value already on the
fp8 grid. On the GPU the conversion alone would do (cvt.rn.satfinite is IEEE round-to-nearest-even),
but Triton's interpreter converts with its own routine that is not (no exponent carry at some
values, ties away from zero, truncated fp8 subnormals, NaN turned into a finite code; triton issue
8322): with the rounding in the kernel, q is torch's cast bit for bit under both, which is what
tests/test_fp8_quant.py checks on CPU.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from .backend import resolve_backend
from .op import Op
from .compile_gate import gate_signature
from .launch import TL_DTYPE as _TL_DTYPE, alloc as _alloc, device_ctx as _device_ctx, next_pow2 as _next_pow2, \
    row_stride as _row_stride, sm_count as _sm_count

try:  # triton is optional: backend="torch" works without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on installs without triton
    triton = None
    tl = None

__all__ = ["FP8_MAX", "RECIPES", "amax_floor", "quantize_fp8", "quantize_fp8_reference", "quantize_fp8_triton",
           "DelayedScaling", "KERNEL_CONFIGS"]

FP8_MAX: dict[torch.dtype, float] = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
RECIPES = ("tensorwise", "rowwise")
_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def amax_floor(dtype: torch.dtype) -> float:
    """Smallest amax a scale is computed from: FP8_MAX * 2^-126, so scale = floor / FP8_MAX is exactly
    2^-126 (the smallest normal fp32) -- finite, non-zero, never denormal. Exact in fp32 (448 = 7 * 2^6,
    57344 = 7 * 2^13)."""
    return FP8_MAX[dtype] * torch.finfo(torch.float32).tiny


# --------------------------------------------------------------------------------------------
# Validation (shared by the reference and the Triton path, so both raise the same errors)
# --------------------------------------------------------------------------------------------

def _validate(x, dtype, recipe, scale, transpose) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (M, K), got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (M, K) (flatten leading dims first), got shape {tuple(x.shape)}")
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if dtype not in FP8_MAX:
        raise TypeError(f"dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {dtype!r}")
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    if not isinstance(transpose, bool):
        raise TypeError(f"transpose must be a bool, got {type(transpose).__name__}")
    if recipe == "rowwise" and transpose:
        raise ValueError("transpose=True needs recipe='tensorwise': the transpose of a rowwise-quantised x would "
                         "need per-column scales; quantise x.t() separately with recipe='rowwise' instead")
    if scale is not None:
        if recipe != "tensorwise":
            raise ValueError("scale may only be given with recipe='tensorwise' (delayed scaling); rowwise scales "
                             "are always computed from the current rows")
        if not isinstance(scale, Tensor):
            raise TypeError(f"scale must be a 0-d float32 torch.Tensor or None, got {type(scale).__name__}")
        if scale.dtype != torch.float32:
            raise TypeError(f"scale must have dtype torch.float32, got {scale.dtype}")
        if scale.shape not in (torch.Size([]), torch.Size([1])):
            raise ValueError(f"scale must have shape () (or (1,)), got {tuple(scale.shape)}")
        if scale.device != x.device:
            raise ValueError(f"scale must be on x's device {x.device}, got {scale.device}")


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------

def quantize_fp8_reference(x: Tensor, dtype: torch.dtype = torch.float8_e4m3fn, *, recipe: str = "tensorwise",
                           scale: Optional[Tensor] = None, transpose: bool = False
                           ) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
    """Plain-torch FP8 quantisation: the definition the kernels are tested against.

    Args and returns exactly as `quantize_fp8` (without `backend`).
    """
    _validate(x, dtype, recipe, scale, transpose)
    return _reference(x, dtype, recipe, scale, transpose)


def _reference(x: Tensor, dtype: torch.dtype, recipe: str, scale: Optional[Tensor], transpose: bool
               ) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
    """quantize_fp8_reference for validated arguments."""
    fp8_max = FP8_MAX[dtype]
    xf = x.float()
    M, K = x.shape
    if recipe == "tensorwise":
        # amax of an empty tensor is 0 by this definition (torch.amax refuses empty inputs).
        amax = xf.abs().amax() if x.numel() else xf.new_zeros(())
    else:
        amax = xf.abs().amax(dim=1, keepdim=True) if K else xf.new_zeros((M, 1))
    if scale is None:
        # clamp(min=) keeps NaN (a NaN amax gives a NaN scale); division by a Python float is the
        # IEEE fp32 division the kernels' div_rn performs.
        scale = amax.clamp(min=amax_floor(dtype)) / fp8_max
    else:
        scale = scale.reshape(())
    q = (xf / scale).clamp(-fp8_max, fp8_max).to(dtype)
    q_t = q.t().contiguous() if transpose else None
    return q, scale, q_t, amax


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _nanmax(a, b):
        """Elementwise max that propagates NaN (torch semantics); tl.maximum's default does not."""
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _abs_bits(x):
        """|x| (fp32) as its int32 bit pattern. Non-negative IEEE floats order exactly like their bit
        patterns, and a NaN (sign cleared) sorts above +inf: an *integer* max over these is a
        NaN-propagating max |x|. tl.max on floats skips NaN (fmax semantics) on the GPU and in the
        interpreter, and a float reduction with a NaN-aware combine function runs element by
        element in Python under the interpreter; the integer max is as cheap as a float max on
        the GPU (IMNMX) and vectorised in numpy."""
        return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF

    @triton.jit
    def _bits_float(b):
        """Inverse of _abs_bits' reinterpretation: int32 bits -> fp32."""
        return b.to(tl.float32, bitcast=True)

    @triton.constexpr_function
    def _fp8_mbits(fp8_max):
        """Mantissa bits of the fp8 format whose largest finite value is fp8_max."""
        return {448.0: 3, 57344.0: 2}[float(fp8_max)]

    @triton.constexpr_function
    def _fp8_emin(fp8_max):
        """Exponent of the fp8 format's smallest normal value, 2^emin (e4m3fn: -6, e5m2: -14)."""
        return {448.0: -6, 57344.0: -14}[float(fp8_max)]

    @triton.jit
    def _round_to_fp8_grid(y, FP8_MAX: tl.constexpr):
        """fp32 y with |y| <= FP8_MAX (or NaN) rounded to the nearest value of the fp8 format's grid
        (ties to even), computed in fp32 / int32 so that the fp8 conversion that follows has
        nothing left to round.

        Why: the conversion itself is IEEE round-to-nearest-even on the GPU (cvt.rn.satfinite), but
        Triton's interpreter converts with its own numpy routine, which is not (triton issue 8322:
        no exponent carry, ties away from zero, truncated fp8 subnormals, NaN turned into a finite
        code). Both convert a value that is already on the fp8 grid exactly, so rounding here gives
        the same bits on the GPU and under the interpreter: torch's cast, bit for bit. It costs a
        dozen integer / fp32 ALU ops per element in a kernel bound by memory bandwidth (measured on
        sm_90: the cast kernels' registers unchanged, the rowwise kernel's 1-2 fewer; no spills).

          * |y| >= 2^emin (fp8 normals): RNE on the fp32 bit pattern. Keeping the top MBITS of the
            23 mantissa bits: add half an fp8 ulp minus one plus the lowest kept bit, then clear
            the dropped bits. A mantissa that rounds up past all ones carries into the exponent
            (127.9 -> 128 in e4m3); integer ops only, so FP fusion cannot touch it. Rounding is
            monotone and FP8_MAX lies on the grid, so |y| <= FP8_MAX stays <= FP8_MAX (+-inf, which
            the clamp already removed, would pass unchanged).
          * |y| < 2^emin (fp8 subnormals): the quantum is fixed, 2^(emin - MBITS). Adding
            C = 2^(emin - MBITS + 23) puts |y| + C in C's binade, whose fp32 ulp is that quantum: the
            fp32 addition rounds to it (RNE), and subtracting C again is exact. An add and a
            subtract, no product for an FMA to fuse with (the compile gate checks that both FADDs
            are in the SASS).
          * NaN: the fp32 NaN whose top MBITS mantissa bits are set (and the sign of y), i.e. the
            fp8 NaN code 0x7F / 0xFF extended to fp32, which torch's cast also returns for any NaN
            (the integer sum above may wrap for a NaN's bits; it is replaced).
        """
        MBITS: tl.constexpr = _fp8_mbits(FP8_MAX)
        EMIN: tl.constexpr = _fp8_emin(FP8_MAX)
        DROP: tl.constexpr = 23 - MBITS  # fp32 mantissa bits below the fp8 ulp
        b = y.to(tl.int32, bitcast=True)
        a = b & 0x7FFFFFFF  # |y|'s bits
        sign = b ^ a
        normal = (a + ((1 << (DROP - 1)) - 1) + ((a >> DROP) & 1)) & -(1 << DROP)
        c = tl.cast(2.0 ** (EMIN - MBITS + 23), tl.float32)
        sub = ((a.to(tl.float32, bitcast=True) + c) - c).to(tl.int32, bitcast=True)
        r = tl.where(a < ((EMIN + 127) << 23), sub, normal)
        r = tl.where(a > 0x7F800000, 0x7F800000 | (((1 << MBITS) - 1) << DROP), r)
        return (r | sign).to(tl.float32, bitcast=True)

    @triton.jit
    def _quantize(x, scale, FP8_MAX: tl.constexpr, OUT_TY: tl.constexpr):
        """fp32 x / scale (IEEE division), saturated to +-FP8_MAX (NaN kept), rounded to OUT_TY.
        The clamp makes saturation explicit rather than relying on the conversion's overflow mode:
        Hopper's cvt.satfinite saturates, but torch's CPU cast (the reference's) saturates only
        e4m3fn and overflows e5m2 to +-inf. The rounding to the fp8 grid is done before the
        conversion (`_round_to_fp8_grid`: the interpreter's own conversion is not IEEE RNE)."""
        y = tl.math.div_rn(x, scale)
        y = tl.clamp(y, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
        return _round_to_fp8_grid(y, FP8_MAX).to(OUT_TY)

    @triton.jit
    def _amax_partial_kernel(X, PARTIAL, stride_x, M, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """Persistent grid over the (BLOCK_M, BLOCK_K) tiles of X (M, K) (row stride stride_x, unit
        column stride): CTA p visits tiles p, p + P, ... keeping an elementwise running max |x| in
        registers, and writes one fp32 partial PARTIAL[p]. No atomics: one store per CTA."""
        pid = tl.program_id(0)
        num_progs = tl.num_programs(0)
        tiles_k = tl.cdiv(K, BLOCK_K)
        num_tiles = tl.cdiv(M, BLOCK_M) * tiles_k
        rm = tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int32)  # bits of the running max |x|
        for t in range(pid, num_tiles, num_progs):
            rows = (t // tiles_k) * BLOCK_M + rm
            cols = (t % tiles_k) * BLOCK_K + rk
            mask = (rows < M)[:, None] & (cols < K)[None, :]
            # int64 row offsets: M * K exceeds 2^31 elements for large activations.
            x = tl.load(X + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
            acc = tl.maximum(acc, _abs_bits(x.to(tl.float32)))
        tl.store(PARTIAL + pid, _bits_float(tl.max(acc)))

    @triton.jit
    def _amax_finalize_kernel(PARTIAL, AMAX, SCALE, P, FP8_MAX: tl.constexpr, FLOOR: tl.constexpr,
                              BLOCK: tl.constexpr, WRITE_SCALE: tl.constexpr):
        """One CTA: AMAX = max(PARTIAL[0:P]) (fp32, NaN-propagating) and, if WRITE_SCALE,
        SCALE = max(AMAX, FLOOR) / FP8_MAX. Kept on the device: no host sync between the kernels."""
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(0, P, BLOCK):
            acc = tl.maximum(acc, _abs_bits(tl.load(PARTIAL + start + offs, mask=start + offs < P, other=0.0)))
        amax = _bits_float(tl.max(acc))
        tl.store(AMAX, amax)
        if WRITE_SCALE:
            floor = tl.cast(FLOOR, tl.float32)
            tl.store(SCALE, tl.math.div_rn(_nanmax(amax, floor), tl.cast(FP8_MAX, tl.float32)))

    @triton.jit
    def _cast_kernel(X, Q, QT, SCALE, PARTIAL, stride_x, stride_q, stride_qt, M, K,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, FP8_MAX: tl.constexpr,
                     WRITE_T: tl.constexpr, WRITE_AMAX: tl.constexpr):
        """One (BLOCK_M, BLOCK_K) tile per CTA (tiles in row-major order). X: (M, K), row stride
        stride_x, unit column stride; Q: (M, K) fp8, row stride stride_q; QT: (K, M) fp8, row
        stride stride_qt (WRITE_T); SCALE: () fp32 dequantisation scale; PARTIAL: (num_tiles,)
        fp32 per-tile max |x| (WRITE_AMAX: the single-pass delayed-scaling path)."""
        pid = tl.program_id(0)
        tiles_k = tl.cdiv(K, BLOCK_K)
        rows = (pid // tiles_k) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (pid % tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rows < M)[:, None] & (cols < K)[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if WRITE_AMAX:
            # Reduced (and stored) before the cast rather than after it: the tile max then is not
            # kept live across the division's slow-path calls (measured on sm_90: 101 -> 59 registers).
            tl.store(PARTIAL + pid, _bits_float(tl.max(_abs_bits(x))))
        q = _quantize(x, tl.load(SCALE), FP8_MAX, Q.dtype.element_ty)
        tl.store(Q + rows64[:, None] * stride_q + cols[None, :], q, mask=mask)
        if WRITE_T:
            # q_t[k, m] = q[m, k]: the transposed tile is stored along M; the compiler converts
            # the register layout through shared memory so these stores are contiguous too.
            tl.store(QT + cols.to(tl.int64)[:, None] * stride_qt + rows[None, :], tl.trans(q), mask=tl.trans(mask))

    @triton.jit
    def _rowwise_kernel(X, Q, SCALE, AMAX, stride_x, stride_q, M, K, BLOCK_M: tl.constexpr,
                        BLOCK_K: tl.constexpr, NUM_CHUNKS: tl.constexpr, FP8_MAX: tl.constexpr,
                        FLOOR: tl.constexpr):
        """BLOCK_M rows per CTA: AMAX[m] = max_k |X[m, k]|, SCALE[m] = max(AMAX[m], FLOOR) / FP8_MAX,
        Q[m, :] = quantised X[m, :] / SCALE[m]. X: (M, K), row stride stride_x, unit column
        stride; Q: (M, K) fp8, row stride stride_q; SCALE, AMAX: (M,) fp32 (the (M, 1) outputs)."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        rows64 = rows.to(tl.int64)
        x_rows = X + rows64[:, None] * stride_x
        q_rows = Q + rows64[:, None] * stride_q
        cols = tl.arange(0, BLOCK_K)
        floor = tl.cast(FLOOR, tl.float32)
        fp8_max = tl.cast(FP8_MAX, tl.float32)
        if NUM_CHUNKS == 1:
            # The whole row block lives in registers between the max and the cast: one read.
            mask = row_mask[:, None] & (cols < K)[None, :]
            x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            amax = _bits_float(tl.max(_abs_bits(x), axis=1))
            scale = tl.math.div_rn(_nanmax(amax, floor), fp8_max)
            tl.store(q_rows + cols[None, :], _quantize(x, scale[:, None], FP8_MAX, Q.dtype.element_ty), mask=mask)
        else:
            # Rows wider than the register tile: an elementwise running max over the chunks (reduced
            # once), then a second walk that re-reads the chunks (L2-resident: this CTA just read
            # them) and casts.
            acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int32)  # bits of the running max |x|
            for c in range(NUM_CHUNKS):
                cc = c * BLOCK_K + cols
                mask = row_mask[:, None] & (cc < K)[None, :]
                x = tl.load(x_rows + cc[None, :], mask=mask, other=0.0)
                acc = tl.maximum(acc, _abs_bits(x.to(tl.float32)))
            amax = _bits_float(tl.max(acc, axis=1))
            scale = tl.math.div_rn(_nanmax(amax, floor), fp8_max)
            for c in range(NUM_CHUNKS):
                cc = c * BLOCK_K + cols
                mask = row_mask[:, None] & (cc < K)[None, :]
                x = tl.load(x_rows + cc[None, :], mask=mask, other=0.0).to(tl.float32)
                tl.store(q_rows + cc[None, :], _quantize(x, scale[:, None], FP8_MAX, Q.dtype.element_ty), mask=mask)
        tl.store(AMAX + rows, amax, mask=row_mask)
        tl.store(SCALE + rows, scale, mask=row_mask)


# --------------------------------------------------------------------------------------------
# Launch meta-parameters (shared by the launchers and KERNEL_CONFIGS, so the compile gate checks
# exactly what runs)
# --------------------------------------------------------------------------------------------

# Cast tile edge: 128 fp8 bytes = one full 128-byte cache line per q row AND per q_t row, so both
# the direct and the transposed stores write whole lines. A 128 x 128 tile over 16 warps is 32
# elements per thread: 54-59 registers measured on sm_90 (over 8 warps, 64 per thread: 102, which
# would halve the resident warps of a kernel that needs them to hide DRAM latency).
_CAST_BLOCK = 128
# The amax tile: 8192 elements per CTA per loop iteration, 16 per thread (two 128-bit bf16 loads)
# at 16 warps.
_AMAX_TILE = 8192
_AMAX_BLOCK_K = 256
# Rowwise: rows up to this width are held in registers (16 elements/thread at 8 warps for 4096).
_ROW_TILE = 4096
_FINALIZE_BLOCK = 1024
# Persistent amax grid: CTAs per SM (4 x 16 warps = 2048 threads, all of an SM's thread slots; at
# the 32 registers measured the register file holds them all), and the program count used on CPU
# (interpreter) so small tests already make every CTA loop over several tiles.
_AMAX_CTAS_PER_SM = 4
_CPU_AMAX_PROGRAMS = 4


def _cast_meta(M: int, K: int) -> dict:
    """BLOCK_M, BLOCK_K, num_warps of `_cast_kernel` for x (M, K). Small dims get small tiles
    (>= 16: the smallest tile a 128-bit fp8 store spans)."""
    bm = min(max(_next_pow2(M), 16), _CAST_BLOCK)
    bk = min(max(_next_pow2(K), 16), _CAST_BLOCK)
    return dict(BLOCK_M=bm, BLOCK_K=bk, num_warps=max(1, min(16, bm * bk // (32 * 32))))


def _amax_meta(M: int, K: int) -> dict:
    """BLOCK_M, BLOCK_K, num_warps of `_amax_partial_kernel`: wide tiles (a row segment of up to
    256 elements = 512 bytes of bf16), 16 elements (two 128-bit bf16 loads) per thread."""
    bk = min(max(_next_pow2(K), 16), _AMAX_BLOCK_K)
    bm = min(_next_pow2(M), max(1, _AMAX_TILE // bk))
    return dict(BLOCK_M=bm, BLOCK_K=bk, num_warps=max(1, min(16, bm * bk // (32 * 16))))


def _rowwise_meta(M: int, K: int) -> dict:
    """BLOCK_M, BLOCK_K, NUM_CHUNKS, num_warps of `_rowwise_kernel`: rows up to _ROW_TILE wide in
    one register tile; narrower rows are grouped so a CTA still moves ~4096 elements."""
    bk = min(max(_next_pow2(K), 16), _ROW_TILE)
    bm = min(_next_pow2(M), max(1, _ROW_TILE // bk))
    return dict(BLOCK_M=bm, BLOCK_K=bk, NUM_CHUNKS=-(-K // bk), num_warps=max(1, min(8, bm * bk // (32 * 16))))


def _amax_programs(x: Tensor, num_tiles: int) -> int:
    if x.is_cuda:
        cap = _sm_count(x.device) * _AMAX_CTAS_PER_SM
    else:
        cap = _CPU_AMAX_PROGRAMS
    # Bounded by _FINALIZE_BLOCK as well, so the finalize kernel reduces in a single iteration.
    return max(1, min(num_tiles, cap, _FINALIZE_BLOCK))


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------

def quantize_fp8_triton(x: Tensor, dtype: torch.dtype = torch.float8_e4m3fn, *, recipe: str = "tensorwise",
                        scale: Optional[Tensor] = None, transpose: bool = False
                        ) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
    """The Triton implementation of `quantize_fp8` (same arguments, minus backend; same outputs).
    A non-unit last-dim stride is copied away here."""
    if triton is None:
        raise RuntimeError("quantize_fp8_triton needs triton installed")
    _validate(x, dtype, recipe, scale, transpose)
    return _triton(x, dtype, recipe, scale, transpose)


def _triton(x: Tensor, dtype: torch.dtype, recipe: str, scale: Optional[Tensor], transpose: bool
            ) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
    """quantize_fp8_triton for validated arguments."""
    M, K = x.shape
    if K > 1 and x.stride(1) != 1:
        x = x.contiguous()  # the kernels need unit column stride (128-bit loads along K)
    dev = x.device
    fp8_max, floor = FP8_MAX[dtype], amax_floor(dtype)
    q = _alloc((M, K), dtype, dev)
    q_t = _alloc((K, M), dtype, dev) if transpose else None
    if recipe == "rowwise":
        amax = _alloc((M,), torch.float32, dev)
        out_scale = _alloc((M,), torch.float32, dev)
        if M == 0:
            return q, out_scale.view(M, 1), q_t, amax.view(M, 1)
        if K == 0:  # nothing to read: amax 0, scale at the floor
            amax.zero_()
            out_scale.fill_(floor / fp8_max)
            return q, out_scale.view(M, 1), q_t, amax.view(M, 1)
        meta = _rowwise_meta(M, K)
        with _device_ctx(x):
            _rowwise_kernel[(triton.cdiv(M, meta["BLOCK_M"]),)](
                x, q, out_scale, amax, _row_stride(x), _row_stride(q), M, K,
                BLOCK_M=meta["BLOCK_M"], BLOCK_K=meta["BLOCK_K"], NUM_CHUNKS=meta["NUM_CHUNKS"],
                FP8_MAX=fp8_max, FLOOR=floor, num_warps=meta["num_warps"])
        return q, out_scale.view(M, 1), q_t, amax.view(M, 1)

    amax = _alloc((), torch.float32, dev)
    out_scale = scale.reshape(()) if scale is not None else _alloc((), torch.float32, dev)
    if M == 0 or K == 0:
        amax.zero_()
        if scale is None:
            out_scale.fill_(floor / fp8_max)
        return q, out_scale, q_t, amax
    cast = _cast_meta(M, K)
    num_cast_tiles = triton.cdiv(M, cast["BLOCK_M"]) * triton.cdiv(K, cast["BLOCK_K"])
    with _device_ctx(x):
        if scale is None:
            am = _amax_meta(M, K)
            P = _amax_programs(x, triton.cdiv(M, am["BLOCK_M"]) * triton.cdiv(K, am["BLOCK_K"]))
            partial = _alloc((P,), torch.float32, dev)
            _amax_partial_kernel[(P,)](x, partial, _row_stride(x), M, K, BLOCK_M=am["BLOCK_M"],
                                       BLOCK_K=am["BLOCK_K"], num_warps=am["num_warps"])
            _amax_finalize_kernel[(1,)](partial, amax, out_scale, P, FP8_MAX=fp8_max, FLOOR=floor,
                                        BLOCK=_FINALIZE_BLOCK, WRITE_SCALE=True, num_warps=4)
        else:
            partial = _alloc((num_cast_tiles,), torch.float32, dev)
        _cast_kernel[(num_cast_tiles,)](
            x, q, q_t, out_scale, partial, _row_stride(x), _row_stride(q), _row_stride(q_t) if transpose else 0,
            M, K, BLOCK_M=cast["BLOCK_M"], BLOCK_K=cast["BLOCK_K"], FP8_MAX=fp8_max, WRITE_T=transpose,
            WRITE_AMAX=scale is not None, num_warps=cast["num_warps"])
        if scale is not None:
            _amax_finalize_kernel[(1,)](partial, amax, None, num_cast_tiles, FP8_MAX=fp8_max, FLOOR=floor,
                                        BLOCK=_FINALIZE_BLOCK, WRITE_SCALE=False, num_warps=4)
    return q, out_scale, q_t, amax


# --------------------------------------------------------------------------------------------
# Custom op: what torch.compile sees of a kernel backend
# --------------------------------------------------------------------------------------------

# Dynamo cannot trace into a Triton launch (under the interpreter not at all; on a GPU it would
# re-trace the kernel), so under torch.compile a kernel backend is one opaque op with a fake
# implementation for its shapes. Eager calls skip it: the op dispatcher costs more than these
# bandwidth-bound kernels at small sizes. Custom-op schemas cannot return None nor an output that
# aliases an input: an absent q_t and a given scale come back as (0,) placeholders, replaced by
# None and by the caller's own scale in `quantize_fp8`, so compiled calls return what eager ones do.

@torch.library.custom_op("nanofast::quantize_fp8", mutates_args=())
def _quantize_op(x: Tensor, dtype: torch.dtype, recipe: str, scale: Optional[Tensor], transpose: bool,
                 backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(q, scale, q_t, amax) of launcher `backend`; scale (0,) when given, q_t (0,) without transpose."""
    q, out_scale, q_t, amax = OP.launcher(backend).quantize(x, dtype, recipe, scale, transpose)
    if scale is not None:
        out_scale = x.new_empty((0,), dtype=torch.float32)
    return q, out_scale, q_t if q_t is not None else x.new_empty((0,), dtype=dtype), amax


@_quantize_op.register_fake
def _(x, dtype, recipe, scale, transpose, backend):
    M, K = x.shape
    stat = (M, 1) if recipe == "rowwise" else ()
    out_scale = x.new_empty((0,) if scale is not None else stat, dtype=torch.float32)
    q_t = x.new_empty((K, M) if transpose else (0,), dtype=dtype)
    return x.new_empty((M, K), dtype=dtype), out_scale, q_t, x.new_empty(stat, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------

def quantize_fp8(x: Tensor, dtype: torch.dtype = torch.float8_e4m3fn, *, recipe: str = "tensorwise",
                 scale: Optional[Tensor] = None, transpose: bool = False, backend: Optional[str] = None
                 ) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
    """Quantise x to FP8 with a per-tensor or per-row dequantisation scale.

    Args:
        x: (M, K) float32 / bfloat16 / float16, 2-D (callers flatten leading dims). Any row stride;
            a non-unit last-dim stride is copied once (backend="triton").
        dtype: torch.float8_e4m3fn (activations / weights, max 448) or torch.float8_e5m2
            (gradients, max 57344).
        recipe: "tensorwise" (one scale) or "rowwise" (one scale per row).
        scale: tensorwise only: a () (or (1,)) float32 dequantisation scale on x's device (delayed
            scaling, e.g. `DelayedScaling.scale()`). Then x is read ONCE: no amax pass first; amax
            is still computed in the same pass and returned. Must be positive and finite (not
            checked: that would need a host sync). None: computed from the current amax.
        transpose: tensorwise only: also return q_t, the quantised x^T with the same scale.
        backend: "torch" | "triton" | None (Triton on CUDA tensors, torch on CPU). "cuda" raises
            ValueError: there is no CUDA-source version of this kernel.
    Returns:
        (q, scale, q_t, amax):
          q: (M, K) `dtype`, contiguous: RNE(clamp(x / scale, -FP8_MAX, FP8_MAX)), so |q| <= FP8_MAX.
          scale: float32 dequantisation scale, x ~= q.float() * scale: () tensorwise (the given
              scale reshaped to () if one was passed), (M, 1) rowwise; max(amax, amax_floor) / FP8_MAX.
          q_t: (K, M) `dtype`, contiguous, bitwise q.t(), when transpose=True; else None.
          amax: float32 max |x|, () tensorwise, (M, 1) rowwise (NaN if x holds a NaN).
        Non-finite inputs: see the module docstring (given scale: +-inf saturate to +-FP8_MAX, NaN
        stays NaN; computed scale: the scale itself becomes inf / NaN).
    Raises:
        TypeError / ValueError naming the offending argument and the expected shape/dtype.
    Under torch.compile(fullgraph=True) a kernel backend runs as the `nanofast::quantize_fp8` custom
    op (the torch backend is traced as plain torch); the results are the same as eager.
    """
    OP.checks["quantize_fp8"](x, dtype, recipe, scale, transpose)
    be = resolve_backend(backend, x, OP.choices)
    if be == "torch":
        return _reference(x, dtype, recipe, scale, transpose)
    if not torch.compiler.is_compiling():
        return OP.launcher(be).quantize(x, dtype, recipe, scale, transpose)
    q, out_scale, q_t, amax = torch.ops.nanofast.quantize_fp8(x, dtype, recipe, scale, transpose, be)
    return q, scale.reshape(()) if scale is not None else out_scale, q_t if transpose else None, amax


# --------------------------------------------------------------------------------------------
# Delayed scaling
# --------------------------------------------------------------------------------------------

class DelayedScaling:
    """Amax history of one tensor, for delayed (per-tensor) scaling: the scale used at step t is
    computed from the amaxes of the *previous* `history` steps, so quantisation reads x once
    (no amax pass before the cast).

    Protocol, per step (all on the device, no host sync):

        scale = ds.scale()                     # None on the very first step (empty history)
        q, scale, q_t, amax = quantize_fp8(x, ds.dtype, scale=scale, transpose=...)
        ds.update(amax)                        # push this step's amax

    `scale()` returning None on the first step makes that step compute its scale from the current
    amax (just-in-time scaling, two passes over x); every later step passes the history's scale.
    `ds.quantize(x, ...)` does exactly these three lines.

    scale() = max(max(history), amax_floor(dtype)) / FP8_MAX[dtype], a () float32 tensor on the
    history's device. Entries not yet filled are 0 and never win the max (amaxes are >= 0). A
    non-finite amax is kept as is: an inf scales every later step to inf (q = 0, dequantised NaN)
    until it leaves the window, and NaN likewise -- overflow stays visible, never silently masked.
    """

    def __init__(self, history: int = 16, dtype: torch.dtype = torch.float8_e4m3fn) -> None:
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"history must be an int >= 1, got {history!r}")
        if dtype not in FP8_MAX:
            raise TypeError(f"dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {dtype!r}")
        self.history = history
        self.dtype = dtype
        self.amax_history: Optional[Tensor] = None  # (history,) fp32, allocated on the first update's device
        self.steps = 0  # number of update() calls (host-side counter: no device read)

    def scale(self) -> Optional[Tensor]:
        """The () float32 scale for the next quantisation, or None while the history is empty."""
        if self.steps == 0:
            return None
        return self.amax_history.amax().clamp(min=amax_floor(self.dtype)) / FP8_MAX[self.dtype]

    def update(self, amax: Tensor) -> None:
        """Push one step's amax (a () float32 tensor, as quantize_fp8 returns; kept on its device)."""
        if not isinstance(amax, Tensor) or amax.shape != torch.Size([]) or amax.dtype != torch.float32:
            raise ValueError(f"amax must be a () float32 tensor (quantize_fp8's tensorwise amax), got "
                             f"{getattr(amax, 'dtype', type(amax).__name__)} {tuple(getattr(amax, 'shape', ()))}")
        if self.amax_history is None:
            self.amax_history = torch.zeros(self.history, dtype=torch.float32, device=amax.device)
        elif amax.device != self.amax_history.device:
            raise ValueError(f"amax must be on the history's device {self.amax_history.device}, got {amax.device}")
        # A device-side copy into the ring buffer slot: no .item(), no sync.
        self.amax_history[self.steps % self.history].copy_(amax)
        self.steps += 1

    def quantize(self, x: Tensor, *, transpose: bool = False, backend: Optional[str] = None
                 ) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
        """One step of the protocol: quantise x (tensorwise) with `scale()`, then `update(amax)`."""
        out = quantize_fp8(x, self.dtype, scale=self.scale(), transpose=transpose, backend=backend)
        self.update(out[3])
        return out


# --------------------------------------------------------------------------------------------
# What an H100 compiles: the compile gate (tests) compiles exactly these.
# --------------------------------------------------------------------------------------------

_SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
          torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}


def _amax_config(M: int, K: int, xdtype: torch.dtype) -> dict:
    m = _amax_meta(M, K)
    const = {"BLOCK_M": m["BLOCK_M"], "BLOCK_K": m["BLOCK_K"]}
    sig = gate_signature(_amax_partial_kernel, const, _TL_DTYPE[xdtype], {"PARTIAL": "*fp32"})
    # What Triton's launcher specialises for contiguous activations: 16-byte aligned pointers, row
    # stride and K multiples of 16.
    return dict(fn=_amax_partial_kernel, signature=sig, constexprs=const,
                num_warps=m["num_warps"], num_stages=3, aligned=("X", "PARTIAL", "stride_x", "K"),
                config=f"amax {M}x{K} {_SHORT[xdtype]} BLOCK={m['BLOCK_M']}x{m['BLOCK_K']} warps={m['num_warps']}")


def _finalize_config(dtype: torch.dtype, write_scale: bool) -> dict:
    const = {"FP8_MAX": FP8_MAX[dtype], "FLOOR": amax_floor(dtype), "BLOCK": _FINALIZE_BLOCK, "WRITE_SCALE": write_scale}
    if not write_scale:
        const["SCALE"] = None
    sig = gate_signature(_amax_finalize_kernel, const, "fp32")
    return dict(fn=_amax_finalize_kernel, signature=sig, constexprs=const, num_warps=4, num_stages=3,
                aligned=("PARTIAL",), config=f"finalize {_SHORT[dtype]}{' +scale' if write_scale else ''} "
                                             f"BLOCK={_FINALIZE_BLOCK} warps=4")


def _cast_config(M: int, K: int, xdtype: torch.dtype, dtype: torch.dtype, transpose: bool, write_amax: bool) -> dict:
    m = _cast_meta(M, K)
    q = f"*{_TL_DTYPE[dtype]}"
    const = {"BLOCK_M": m["BLOCK_M"], "BLOCK_K": m["BLOCK_K"], "FP8_MAX": FP8_MAX[dtype], "WRITE_T": transpose,
             "WRITE_AMAX": write_amax}
    if not transpose:
        const["QT"] = None
    if not write_amax:
        const["PARTIAL"] = None
    sig = gate_signature(_cast_kernel, const, _TL_DTYPE[xdtype], {"Q": q, "QT": q, "SCALE": "*fp32", "PARTIAL": "*fp32"})
    aligned = tuple(a for a in ("X", "Q", "QT", "PARTIAL", "stride_x", "stride_q", "stride_qt", "M", "K")
                    if sig[a] != "constexpr")
    return dict(fn=_cast_kernel, signature=sig, constexprs=const, num_warps=m["num_warps"], num_stages=3,
                aligned=aligned,
                config=f"cast {M}x{K} {_SHORT[xdtype]}->{_SHORT[dtype]}{' +T' if transpose else ''}"
                       f"{' +amax' if write_amax else ''} BLOCK={m['BLOCK_M']}x{m['BLOCK_K']} warps={m['num_warps']}")


def _rowwise_config(M: int, K: int, xdtype: torch.dtype, dtype: torch.dtype) -> dict:
    m = _rowwise_meta(M, K)
    const = {"BLOCK_M": m["BLOCK_M"], "BLOCK_K": m["BLOCK_K"], "NUM_CHUNKS": m["NUM_CHUNKS"],
             "FP8_MAX": FP8_MAX[dtype], "FLOOR": amax_floor(dtype)}
    sig = gate_signature(_rowwise_kernel, const, _TL_DTYPE[xdtype],
                         {"Q": f"*{_TL_DTYPE[dtype]}", "SCALE": "*fp32", "AMAX": "*fp32"})
    return dict(fn=_rowwise_kernel, signature=sig, constexprs=const, num_warps=m["num_warps"], num_stages=3,
                aligned=("X", "Q", "SCALE", "AMAX", "stride_x", "stride_q", "K"),
                config=f"rowwise {M}x{K} {_SHORT[xdtype]}->{_SHORT[dtype]} "
                       f"BLOCK={m['BLOCK_M']}x{m['BLOCK_K']}x{m['NUM_CHUNKS']} warps={m['num_warps']}")


def _kernel_configs() -> list[dict]:
    if triton is None:
        return []
    bf16, fp32 = torch.bfloat16, torch.float32
    e4, e5 = torch.float8_e4m3fn, torch.float8_e5m2
    # nanochat-scale activations: 16 x 2048 tokens x d_model 1536 (and the 4x MLP width).
    M, K = 32768, 1536
    return [
        _amax_config(M, K, bf16),
        _finalize_config(e4, write_scale=True),
        _finalize_config(e4, write_scale=False),
        # Forward activations / weights -> e4m3 with the transpose the backward GEMMs need.
        _cast_config(M, K, bf16, e4, transpose=True, write_amax=False),
        # Delayed scaling: one pass, tile amax partials written alongside.
        _cast_config(M, K, bf16, e4, transpose=True, write_amax=True),
        # Gradients -> e5m2 (transposed for the weight-gradient GEMM).
        _cast_config(M, 4 * K, bf16, e5, transpose=True, write_amax=False),
        _cast_config(M, K, bf16, e4, transpose=False, write_amax=False),
        _cast_config(M, K, fp32, e4, transpose=True, write_amax=False),
        # Rowwise: register-resident rows (1536), and chunked rows (16384: two walks).
        _rowwise_config(M, K, bf16, e4),
        _rowwise_config(M, 4 * K, bf16, e4),
        _rowwise_config(M, 16384, bf16, e4),
    ]


KERNEL_CONFIGS: list[dict] = _kernel_configs()
"""Each entry: keyword arguments of `compile_gate.compile_triton` (fn, signature, constexprs,
num_warps, num_stages, aligned, config), built from the same meta functions the launcher uses, so
`compile_triton(**cfg, arch=90)` compiles exactly what an H100 launches. Compile them in a process
without TRITON_INTERPRET=1 (see compile_gate.configs_facts)."""


def cost(tokens: int, d: int, recipe: str = "tensorwise+T", itemsize: int = 2) -> dict:
    """One call on (tokens, d), each tensor once: read x; write q (1 byte per element) [+ q_t for
    "tensorwise+T"]; scales and amax (fp32). ~3 FLOPs per element (abs-max, scale, round)."""
    n = tokens * d
    if recipe == "tensorwise+T":
        return {"bytes": n * itemsize + 2 * n + 8, "flops": 3 * n}
    if recipe != "rowwise":
        raise ValueError(f"recipe must be 'tensorwise+T' or 'rowwise', got {recipe!r}")
    return {"bytes": n * itemsize + n + 8 * tokens, "flops": 3 * n}


OP = Op(name="fp8_quant", vendor="torch", kernels=("triton",), unmeasured="triton",
        why="memory-bound: amax, scale, cast (and the transpose) in two passes over x instead of several",
        checks={"quantize_fp8": _validate}, references={"quantize_fp8": quantize_fp8_reference},
        vendor_path=quantize_fp8_reference, launchers={"triton": SimpleNamespace(quantize=_triton)}, cost=cost,
        configs=lambda arch=90: KERNEL_CONFIGS, part_of="fp8_linear")
