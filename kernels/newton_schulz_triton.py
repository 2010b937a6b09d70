"""Triton kernels for one Newton-Schulz / Polar Express step, batched over a stack of matrices.

Per step, for a stack X of (batch, m, n) matrices with m <= n (wide; the caller transposes tall
inputs, see `newton_schulz.newton_schulz`), three launches, each ONE grid over
(batch, tile_m, tile_n) with fp32 accumulation and outputs in X's dtype:

    1. A = X X^T                 (m x m, symmetric)   `ns_gram_triton`
    2. B = b A + c (A @ A)       (m x m, symmetric)   `ns_poly_triton`
    3. X' = a X + B @ X          (m x n)              `ns_update_triton`

A and B are symmetric, so kernels 1 and 2 only launch the upper-triangle tiles (tile_m <= tile_n)
and store each off-diagonal tile twice (itself and its transpose): about half the tensor-core
FLOPs of a dense product. Diagonal tiles are symmetrised explicitly (lower half := transposed
upper half), so the outputs are *bitwise* symmetric whatever order the MMA hardware sums in; that
keeps B = bA + cA^2 exactly symmetric too, as the maths assumes.

Supported: fp16 / bf16 / fp32 (fp32 dots run in IEEE fp32, not TF32, to match torch's fp32
matmul); tile sizes are fixed per shape class by `_meta` (no start-up autotuning).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .backend import target_arch
from .compile_gate import gate_signature
from .launch import TL_DTYPE as _TL_DTYPE

try:  # triton is optional: backend="torch" works without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on installs without triton
    triton = None
    tl = None

__all__ = ["newton_schulz_triton", "newton_schulz_iterate_op", "ns_gram_triton", "ns_poly_triton", "ns_update_triton",
           "nesterov_rows_triton", "scale_rows_triton", "KERNEL_CONFIGS", "PROLOGUE_CONFIGS", "TRITON_DTYPES"]

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _ns_sym_store(out_ptr, acc, rows, cols, pid_m, pid_n, M, stride_om, BLOCK: tl.constexpr):
        """Store the (BLOCK, BLOCK) fp32 tile `acc` of a symmetric (M, M) matrix at tile
        (pid_m, pid_n), pid_m <= pid_n, and its transpose at (pid_n, pid_m); diagonal tiles are
        symmetrised. rows / cols: global row / column indices of the tile (unit column stride)."""
        val = acc.to(out_ptr.dtype.element_ty)
        # Round first, then transpose: the mirrored tile holds the very same bits.
        val_t = tl.trans(val)
        local = tl.arange(0, BLOCK)
        # keep (r, c) of the tile itself unless it lies below the diagonal of a diagonal tile:
        # written as an index comparison (pid_n - pid_m >= 1 makes it always true) rather than a
        # scalar predicate, which broadcasts the same way compiled and interpreted.
        keep = local[:, None] <= local[None, :] + (pid_n - pid_m) * BLOCK
        # Diagonal tile: the lower half is the transposed upper half, so A == A^T bitwise even if
        # the MMA's summation order differed between element (r, c) and (c, r).
        val = tl.where(keep, val, val_t)
        mask = (rows[:, None] < M) & (cols[None, :] < M)
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], val, mask=mask)
        # Mirror: element (c, r) of the transposed tile. Rows of the store are `cols`, so the
        # contiguous dim is still the tile's fastest dim (Triton converts the layout through
        # shared memory for coalesced 128-bit stores).
        # Only off-diagonal tiles are mirrored: their rows all lie before tile pid_n's first row.
        mask_t = (cols[:, None] < M) & (rows[None, :] < pid_n * BLOCK) & (rows[None, :] < M)
        tl.store(out_ptr + cols[:, None] * stride_om + rows[None, :], val_t, mask=mask_t)

    @triton.jit
    def _ns_upper_tile(pid):
        """Tile (row, col), row <= col, of the pid-th upper-triangle tile, enumerated column by
        column: pid = col * (col + 1) / 2 + row. Launching only these programs (rather than a full
        tiles x tiles grid whose lower half exits) halves the CTAs the scheduler has to retire.
        col = floor((sqrt(8 pid + 1) - 1) / 2) in fp32: exact for the integers involved (< 2^24),
        and the neighbouring perfect squares are >= 8 apart, far beyond the rounding of the sqrt;
        the two integer corrections make the result exact regardless."""
        col = ((tl.sqrt((8 * pid + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
        col = tl.where(col * (col + 1) // 2 > pid, col - 1, col)
        col = tl.where((col + 1) * (col + 2) // 2 <= pid, col + 1, col)
        return pid - col * (col + 1) // 2, col

    @triton.jit
    def _ns_gram_kernel(X, A, M, N, stride_xb, stride_xm, stride_ab, stride_am,
                        BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        """A[b] = X[b] X[b]^T. X: (batch, M, N), A: (batch, M, M), unit column strides.
        Grid (batch, tiles * (tiles + 1) / 2): one program per upper-triangle tile."""
        pid_b = tl.program_id(0)
        pid_m, pid_n = _ns_upper_tile(tl.program_id(1))
        # int64 batch offsets: a stack of 4096^2 matrices passes 2^31 elements after 128 of them.
        xb = X + pid_b.to(tl.int64) * stride_xb
        rows = pid_m * BLOCK + tl.arange(0, BLOCK)
        cols = pid_n * BLOCK + tl.arange(0, BLOCK)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
        for k0 in range(0, N, BLOCK_K):
            k = k0 + ks
            kmask = k[None, :] < N
            # Zero-filled masked loads: padding rows/columns contribute exactly 0 to every dot.
            a = tl.load(xb + rows[:, None] * stride_xm + k[None, :], mask=(rows[:, None] < M) & kmask, other=0.0)
            b = tl.load(xb + cols[:, None] * stride_xm + k[None, :], mask=(cols[:, None] < M) & kmask, other=0.0)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        _ns_sym_store(A + pid_b.to(tl.int64) * stride_ab, acc, rows, cols, pid_m, pid_n, M, stride_am, BLOCK)

    @triton.jit
    def _ns_tile_matmul(L, stride_l, R, stride_r, rows, cols, M, K, N,
                        BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        """fp32 (BLOCK, BLOCK) tile of L @ R at `rows` x `cols`: L (M, K), R (K, N), both with unit
        column strides. Zero-filled masked loads: padding contributes exactly 0 to every dot."""
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + ks
            a = tl.load(L + rows[:, None] * stride_l + k[None, :], mask=(rows[:, None] < M) & (k[None, :] < K),
                        other=0.0)
            b = tl.load(R + k[:, None] * stride_r + cols[None, :], mask=(k[:, None] < K) & (cols[None, :] < N),
                        other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _ns_poly_kernel(A, B, M, stride_ab, stride_am, stride_bb, stride_bm, coef_b, coef_c,
                        BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        """B[b] = coef_b * A[b] + coef_c * A[b] @ A[b] for symmetric A: (batch, M, M), unit column
        strides. Grid (batch, tiles * (tiles + 1) / 2): one program per upper-triangle tile."""
        pid_b = tl.program_id(0)
        pid_m, pid_n = _ns_upper_tile(tl.program_id(1))
        ab = A + pid_b.to(tl.int64) * stride_ab
        rows = pid_m * BLOCK + tl.arange(0, BLOCK)
        cols = pid_n * BLOCK + tl.arange(0, BLOCK)
        acc = _ns_tile_matmul(ab, stride_am, ab, stride_am, rows, cols, M, M, M, BLOCK, BLOCK_K, PRECISION)
        # Fused epilogue in fp32: one rounding of b*A + c*A^2 instead of rounding A^2 first.
        # tl.cast: scalars arrive as Python floats interpreted and fp32 compiled; compute in fp32.
        mask = (rows[:, None] < M) & (cols[None, :] < M)
        a_tile = tl.load(ab + rows[:, None] * stride_am + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc = tl.cast(coef_b, tl.float32) * a_tile + tl.cast(coef_c, tl.float32) * acc
        _ns_sym_store(B + pid_b.to(tl.int64) * stride_bb, acc, rows, cols, pid_m, pid_n, M, stride_bm, BLOCK)

    @triton.jit
    def _ns_update_kernel(X, B, Y, M, N, stride_xb, stride_xm, stride_bb, stride_bm, stride_yb, stride_ym, coef_a,
                          BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        """Y[b] = coef_a * X[b] + B[b] @ X[b]. X, Y: (batch, M, N), B: (batch, M, M), unit column
        strides; Y must not alias X (other programs still read X). Grid (batch, M tiles, N tiles)."""
        pid_b = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_n = tl.program_id(2)
        xb = X + pid_b.to(tl.int64) * stride_xb
        bb = B + pid_b.to(tl.int64) * stride_bb
        rows = pid_m * BLOCK + tl.arange(0, BLOCK)
        cols = pid_n * BLOCK + tl.arange(0, BLOCK)
        acc = _ns_tile_matmul(bb, stride_bm, xb, stride_xm, rows, cols, M, M, N, BLOCK, BLOCK_K, PRECISION)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        x_tile = tl.load(xb + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc = tl.cast(coef_a, tl.float32) * x_tile + acc
        tl.store(Y + pid_b.to(tl.int64) * stride_yb + rows[:, None] * stride_ym + cols[None, :],
                 acc.to(Y.dtype.element_ty), mask=mask)


    @triton.jit
    def _lerp(start, end, w):
        """torch.lerp's formula (fp32): from whichever end is nearer, so lerp(a, b, 1) == b exactly."""
        return tl.where(w < 0.5, start + w * (end - start), end - (end - start) * (1.0 - w))

    @triton.jit
    def _nesterov_rows_kernel(G, Mom, RowSq, N, mu, BLOCK_N: tl.constexpr):
        """Row r of the (R, N) views: m' = lerp(m, g, 1 - mu) -> Mom, u = lerp(g, m', mu) -> G,
        sum(u^2) in fp32 -> RowSq[r]. One program per row: each element is read and written once."""
        row = tl.program_id(0)
        base = row.to(tl.int64) * N  # R * N passes 2^31 for a stack of a few hundred 4096^2 matrices
        mu = tl.cast(mu, tl.float32)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            mask = cols < N
            g = tl.load(G + base + cols, mask=mask, other=0.0).to(tl.float32)
            m = tl.load(Mom + base + cols, mask=mask, other=0.0).to(tl.float32)
            # Round m' and u to their storage dtypes before using them, exactly as the two
            # in-place torch lerps do, so the sums of squares describe the u that is stored.
            m = _lerp(m, g, 1.0 - mu).to(Mom.dtype.element_ty)
            u = _lerp(g, m.to(tl.float32), mu).to(G.dtype.element_ty)
            tl.store(Mom + base + cols, m, mask=mask)
            tl.store(G + base + cols, u, mask=mask)
            uf = u.to(tl.float32)
            acc += uf * uf
        tl.store(RowSq + row, tl.sum(acc, axis=0))

    @triton.jit
    def _scale_rows_kernel(U, S, X, N, BLOCK_N: tl.constexpr):
        """X[r, :] = U[r, :] * S[r] rounded once to X's dtype; (R, N) views, S fp32 (R,)."""
        row = tl.program_id(0)
        base = row.to(tl.int64) * N
        s = tl.load(S + row)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            mask = cols < N
            u = tl.load(U + base + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(X + base + cols, (u * s).to(X.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launch meta-parameters (shared by the launchers and KERNEL_CONFIGS)
# --------------------------------------------------------------------------------------------

# Shape classes. nanochat's Gram sides (m = 768 .. 1664) give only 6..13 row tiles of 128, i.e.
# 21..91 upper-triangle CTAs per matrix for 132 SMs: 64-wide tiles (4 warps, one m64 warpgroup MMA)
# quadruple the CTA count. At m = 4096, 128-wide tiles (8 warps) halve the operand traffic per
# FLOP and still give 528 CTAs. 4 stages of 64x64 + 64x64 16-bit operands are 64 KB of shared
# memory, 3 stages of 128x64 + 64x128 are 96 KB: both leave room for the transposed-store buffer.
_LARGE_M = 2048


def _meta(m: int, dtype: torch.dtype, arch: int = 90) -> dict:
    """BLOCK, BLOCK_K, num_warps, num_stages and dot precision for Gram side m, dtype and sm_`arch`."""
    wide = dtype == torch.float32
    if m > _LARGE_M:
        # fp32 operands are twice the bytes: a 32-deep K step keeps 3 stages inside 227 KB.
        meta = dict(BLOCK=128, BLOCK_K=32 if wide else 64, num_warps=8, num_stages=3)
    else:
        # Ampere's mma.sync keeps the accumulators in registers the 4-stage pipeline also needs:
        # the gram kernel spilled there (compile gate, sm_80), 3 stages do not.
        meta = dict(BLOCK=64, BLOCK_K=32 if wide else 64, num_warps=4, num_stages=4 if arch >= 90 else 3)
    # fp32 stays IEEE fp32 (torch's fp32 matmul default); 16-bit inputs take the tensor-core path.
    meta["PRECISION"] = "ieee" if wide else "tf32"
    return meta


def _check_stack(x: Tensor, name: str, square: bool = False) -> None:
    if not isinstance(x, Tensor) or x.ndim != 3:
        raise ValueError(f"{name} must be a (batch, m, n) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if x.dtype not in TRITON_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32 for the Triton kernels, got {x.dtype}")
    if square and x.size(1) != x.size(2):
        raise ValueError(f"{name} must be a stack of square matrices, got shape {tuple(x.shape)}")


def _unit_cols(x: Tensor) -> Tensor:
    # The kernels assume unit column stride (coalesced, vectorisable rows); anything else is copied.
    return x if x.stride(-1) == 1 or x.size(-1) <= 1 else x.contiguous()


def _launch_args(meta: dict) -> tuple[dict, dict]:
    const = {k: meta[k] for k in ("BLOCK", "BLOCK_K", "PRECISION")}
    return const, {"num_warps": meta["num_warps"], "num_stages": meta["num_stages"]}


def ns_gram_triton(X: Tensor, meta: dict | None = None) -> Tensor:
    """A = X X^T per matrix. X: (batch, m, n) fp16/bf16/fp32 -> A: (batch, m, m), X's dtype,
    bitwise symmetric. `meta` overrides the tile configuration (tests use small tiles)."""
    _check_stack(X, "X")
    X = _unit_cols(X)
    bsz, m, n = X.shape
    A = torch.empty((bsz, m, m), dtype=X.dtype, device=X.device)
    if A.numel() == 0:
        return A
    meta = meta or _meta(m, X.dtype, target_arch(X))
    tiles = triton.cdiv(m, meta["BLOCK"])
    const, opts = _launch_args(meta)
    _ns_gram_kernel[(bsz, tiles * (tiles + 1) // 2)](X, A, m, n, X.stride(0), X.stride(1), A.stride(0), A.stride(1),
                                         **const, **opts)
    return A


def ns_poly_triton(A: Tensor, b: float, c: float, meta: dict | None = None) -> Tensor:
    """B = b A + c A @ A per matrix, for symmetric A: (batch, m, m) fp16/bf16/fp32 -> B, A's dtype,
    bitwise symmetric. Only A's upper triangle of tiles drives the output; A must be symmetric."""
    _check_stack(A, "A", square=True)
    A = _unit_cols(A)
    bsz, m, _ = A.shape
    B = torch.empty_like(A, memory_format=torch.contiguous_format)
    if B.numel() == 0:
        return B
    meta = meta or _meta(m, A.dtype, target_arch(A))
    tiles = triton.cdiv(m, meta["BLOCK"])
    const, opts = _launch_args(meta)
    _ns_poly_kernel[(bsz, tiles * (tiles + 1) // 2)](A, B, m, A.stride(0), A.stride(1), B.stride(0), B.stride(1),
                                         float(b), float(c), **const, **opts)
    return B


def ns_update_triton(X: Tensor, B: Tensor, a: float, meta: dict | None = None) -> Tensor:
    """X' = a X + B @ X per matrix. X: (batch, m, n), B: (batch, m, m), same fp16/bf16/fp32 dtype
    -> X': (batch, m, n), a new tensor in X's dtype."""
    _check_stack(X, "X")
    _check_stack(B, "B", square=True)
    if B.shape[0] != X.shape[0] or B.shape[1] != X.shape[1] or B.dtype != X.dtype or B.device != X.device:
        raise ValueError(f"B must be (batch, m, m) = {(X.shape[0], X.shape[1], X.shape[1])} with X's dtype and "
                         f"device, got {tuple(B.shape)} {B.dtype} {B.device}")
    X, B = _unit_cols(X), _unit_cols(B)
    bsz, m, n = X.shape
    Y = torch.empty((bsz, m, n), dtype=X.dtype, device=X.device)
    if Y.numel() == 0:
        return Y
    meta = meta or _meta(m, X.dtype, target_arch(X))
    const, opts = _launch_args(meta)
    grid = (bsz, triton.cdiv(m, meta["BLOCK"]), triton.cdiv(n, meta["BLOCK"]))
    _ns_update_kernel[grid](X, B, Y, m, n, X.stride(0), X.stride(1), B.stride(0), B.stride(1), Y.stride(0),
                            Y.stride(1), float(a), **const, **opts)
    return Y


def newton_schulz_triton(X: Tensor, coefficients: Sequence[tuple[float, float, float]], dtype: torch.dtype,
                         meta: dict | None = None) -> Tensor:
    """Run the iteration X <- a X + (b A + c A^2) X, A = X X^T, once per (a, b, c) in `coefficients`.

    Args:
        X: (..., m, n) with m <= n (wide: the caller transposes tall matrices), already normalised
            (singular values inside (0, 1)); leading dims are a batch run in one grid per launch.
        coefficients: resolved (a, b, c) float tuples, one per step.
        dtype: iteration dtype, float16 / bfloat16 / float32 (X is cast to it).
    Returns:
        (..., m, n) tensor in `dtype`.
    """
    if triton is None:
        raise RuntimeError("newton_schulz_triton needs triton installed")
    if dtype not in TRITON_DTYPES:
        raise TypeError(f"dtype must be float16, bfloat16 or float32 for the Triton iteration, got {dtype}")
    if not isinstance(X, Tensor) or X.ndim < 2:
        raise ValueError("X must be a (..., m, n) tensor")
    if X.size(-2) > X.size(-1):
        raise ValueError(f"X must be wide (m <= n; transpose tall matrices first), got shape {tuple(X.shape)}")
    lead, (m, n) = X.shape[:-2], X.shape[-2:]
    x = X.to(dtype).reshape(-1, m, n)
    for a, b, c in coefficients:
        A = ns_gram_triton(x, meta)
        B = ns_poly_triton(A, b, c, meta)
        x = ns_update_triton(x, B, a, meta)
    return x.reshape(*lead, m, n)


# Row kernels: 1024 columns per loop step over 4 warps is 8 elements per thread, two 128-bit
# fp32 loads per operand; rows are long (768 .. 6656), so one program per row streams them.
_ROW_BLOCK, _ROW_WARPS = 1024, 4


def _row_block(n: int) -> int:
    return min(_ROW_BLOCK, triton.next_power_of_2(max(n, 1)))


def nesterov_rows_triton(grad: Tensor, momentum_buf: Tensor, momentum: float) -> Tensor:
    """In place: momentum_buf <- lerp(m, g, 1 - momentum), grad <- lerp(g, m', momentum).
    grad, momentum_buf: (..., m, n) contiguous, same fp16/bf16/fp32 dtype. Returns the fp32 sum of
    squares of each row of the new grad, shape (..., m)."""
    n = grad.size(-1)
    row_sq = torch.empty(grad.shape[:-1], dtype=torch.float32, device=grad.device)
    if row_sq.numel() and n:
        _nesterov_rows_kernel[(row_sq.numel(),)](grad, momentum_buf, row_sq, n, float(momentum),
                                                 BLOCK_N=_row_block(n), num_warps=_ROW_WARPS)
    else:
        row_sq.zero_()
    return row_sq


def scale_rows_triton(u: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """u: (..., m, n) contiguous; scales: (..., m, 1) fp32. Returns u * scales in `dtype`, (..., m, n)."""
    n = u.size(-1)
    out = torch.empty(u.shape, dtype=dtype, device=u.device)
    if out.numel():
        _scale_rows_kernel[(out.numel() // n,)](u, scales.contiguous(), out, n, BLOCK_N=_row_block(n),
                                                num_warps=_ROW_WARPS)
    return out


@torch.library.custom_op("nanofast::newton_schulz_iterate", mutates_args=())
def newton_schulz_iterate_op(X: Tensor, coefficients: list[float]) -> Tensor:
    """`newton_schulz_triton` as a torch.library op, so torch.compile (e.g. a compiled optimizer
    step) keeps the Triton launches in its graph instead of breaking it. X: (..., m, n) wide, in
    the iteration dtype; coefficients: the (a, b, c) tuples flattened, 3 floats per step.
    Returns a new contiguous (..., m, n) tensor in X's dtype."""
    if len(coefficients) == 0 or len(coefficients) % 3:
        raise ValueError(f"coefficients must hold 3 floats per step (a, b, c), got {len(coefficients)} floats")
    steps = [tuple(coefficients[i:i + 3]) for i in range(0, len(coefficients), 3)]
    return newton_schulz_triton(X, steps, X.dtype)


@newton_schulz_iterate_op.register_fake
def _(X, coefficients):
    return X.new_empty(X.shape)


# --------------------------------------------------------------------------------------------
# Configurations an H100 runs (compiled and checked by the compile gate)
# --------------------------------------------------------------------------------------------

def _aligned(sig: dict[str, str]) -> tuple[str, ...]:
    """Every pointer and int argument: what Triton's launcher specialises as divisible by 16 for
    contiguous nanochat matrices (aligned pointers; sizes and strides multiples of 16, as every
    nanochat width is)."""
    return tuple(a for a, ty in sig.items() if ty.startswith("*") or ty == "i32")


def _config(kernel: str, m: int, n: int, dtype: torch.dtype, arch: int = 90) -> dict:
    t = _TL_DTYPE[dtype]
    meta = _meta(m, dtype, arch)
    const, opts = _launch_args(meta)
    fn = {"gram": _ns_gram_kernel, "poly": _ns_poly_kernel, "update": _ns_update_kernel}[kernel]
    sig = gate_signature(fn, const, t)
    return dict(fn=fn, signature=sig, constexprs=const, aligned=_aligned(sig), **opts,
                config=f"{kernel} m={m} n={n} {t} BLOCK={meta['BLOCK']}x{meta['BLOCK_K']} "
                       f"warps={meta['num_warps']} stages={meta['num_stages']}")


def _kernel_configs(arch: int = 90) -> list[dict]:
    if triton is None:
        return []
    out = []
    # Small class (nanochat d = 768 .. 1664; the d x 4d shapes share the Gram side d) and large (4096).
    for m, n, dtypes in ((768, 3072, (torch.bfloat16, torch.float16)), (1664, 6656, (torch.bfloat16,)),
                         (4096, 4096, (torch.bfloat16, torch.float16))):
        for dt in dtypes:
            for kernel in ("gram", "poly", "update"):
                out.append(_config(kernel, m, n, dt, arch))
    return out


KERNEL_CONFIGS: list[dict] = _kernel_configs()
KERNEL_CONFIGS_SM80: list[dict] = _kernel_configs(80)  # what an A100 launches (for compile_triton(..., arch=80))
"""Each entry: keyword arguments of `compile_gate.compile_triton` built from the launchers' `_meta`,
so `compile_triton(**cfg, arch=90)` compiles exactly what an H100 launches. Compile them in a
process without TRITON_INTERPRET=1 (see `compile_gate.configs_facts`)."""


def _prologue_configs() -> list[dict]:
    if triton is None:
        return []
    out = []
    # fp32 master weights' gradients (nanochat's default) and bf16 ones; X_0 out in bf16.
    for gdt in (torch.float32, torch.bfloat16):
        g = _TL_DTYPE[gdt]
        for kernel, fn, types in (("nesterov_rows", _nesterov_rows_kernel, {"RowSq": "*fp32"}),
                                  ("scale_rows", _scale_rows_kernel, {"S": "*fp32", "X": "*bf16"})):
            const = {"BLOCK_N": _ROW_BLOCK}
            sig = gate_signature(fn, const, g, types)
            out.append(dict(fn=fn, signature=sig, constexprs=const, aligned=_aligned(sig), num_warps=_ROW_WARPS,
                            num_stages=1,
                            config=f"{kernel} {g}{'->bf16' if kernel == 'scale_rows' else ''} "
                                   f"BLOCK_N={_ROW_BLOCK} warps={_ROW_WARPS}"))
    return out


PROLOGUE_CONFIGS: list[dict] = _prologue_configs()  # the row kernels of nesterov_normalize_ (any arch)
