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
matmul); by default the tiles are fixed per shape class by `_meta` (no start-up autotuning).

Configuration spaces: NS_GRAM_CONFIGS, NS_POLY_CONFIGS (square tiles: the symmetric store mirrors
each tile) and NS_UPDATE_CONFIGS (also 64x128 and 128x256 tiles), each a small tuple of named
`TileConfig`s with the reason for each entry, all compiled for sm_90 by the compile gate
(KERNEL_CONFIGS). Every launcher takes `config=` (a name of its space) to run one entry; the default
(None) stays the shape class's tiles: no GPU has measured any entry against another yet.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .backend import target_arch
from .compile_gate import gate_signature
from .launch import TL_DTYPE as _TL_DTYPE
from .tile_config import TileConfig, select_config

try:  # triton is optional: backend="torch" works without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on installs without triton
    triton = None
    tl = None

__all__ = ["newton_schulz_triton", "newton_schulz_iterate_op", "ns_gram_triton", "ns_poly_triton", "ns_update_triton",
           "nesterov_rows_triton", "scale_rows_triton", "KERNEL_CONFIGS", "PROLOGUE_CONFIGS", "TRITON_DTYPES",
           "NS_CONFIGS", "NS_GRAM_CONFIGS", "NS_POLY_CONFIGS", "NS_UPDATE_CONFIGS", "NS_ITERATION_CONFIGS",
           "TileConfig"]

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
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        """fp32 (BLOCK_M, BLOCK_N) tile of L @ R at `rows` x `cols`: L (M, K), R (K, N), both with unit
        column strides. Zero-filled masked loads: padding contributes exactly 0 to every dot."""
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
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
        acc = _ns_tile_matmul(ab, stride_am, ab, stride_am, rows, cols, M, M, M, BLOCK, BLOCK, BLOCK_K, PRECISION)
        # Fused epilogue in fp32: one rounding of b*A + c*A^2 instead of rounding A^2 first.
        # tl.cast: scalars arrive as Python floats interpreted and fp32 compiled; compute in fp32.
        mask = (rows[:, None] < M) & (cols[None, :] < M)
        a_tile = tl.load(ab + rows[:, None] * stride_am + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc = tl.cast(coef_b, tl.float32) * a_tile + tl.cast(coef_c, tl.float32) * acc
        _ns_sym_store(B + pid_b.to(tl.int64) * stride_bb, acc, rows, cols, pid_m, pid_n, M, stride_bm, BLOCK)

    @triton.jit
    def _ns_update_kernel(X, B, Y, M, N, stride_xb, stride_xm, stride_bb, stride_bm, stride_yb, stride_ym, coef_a,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          PRECISION: tl.constexpr):
        """Y[b] = coef_a * X[b] + B[b] @ X[b]. X, Y: (batch, M, N), B: (batch, M, M), unit column
        strides; Y must not alias X (other programs still read X). Grid (batch, M tiles, N tiles).
        Not symmetric, so the tile may be rectangular (BLOCK_M x BLOCK_N)."""
        pid_b = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_n = tl.program_id(2)
        xb = X + pid_b.to(tl.int64) * stride_xb
        bb = B + pid_b.to(tl.int64) * stride_bb
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _ns_tile_matmul(bb, stride_bm, xb, stride_xm, rows, cols, M, M, N, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
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
# Configuration spaces and launch meta-parameters (shared by the launchers and KERNEL_CONFIGS)
# --------------------------------------------------------------------------------------------

# Each entry is written for, and config= accepts only, 16-bit operands (bf16 / fp16, the Hopper
# HGMMA path). The default for fp32 operands (IEEE fp32 dots, not tensor cores) is the default
# entry's tiles with HALF the K depth, so that a stage holds the same bytes (what _meta always did).
# The arithmetic behind every entry, for sm_90:
#   * a Hopper warpgroup MMA (wgmma) is 4 warps over 64 rows (m64): 64-row tiles take 4 warps, 128-row
#     tiles 8 (two m64 warpgroups), and the N side of one wgmma goes up to 256;
#   * shared memory per stage = (BLOCK_M + BLOCK_N) * BLOCK_K * 2 bytes; an H100 SM has 228 KB, at
#     most 227 KB per CTA; the symmetric kernels' transposed store reuses that buffer (compile gate);
#   * the fp32 accumulator is BLOCK_M * BLOCK_N / (32 * num_warps) registers per thread, of 255.
# Measured numbers (registers, shared bytes, bf16, sm_90) are the compile gate's, as committed in
# bench/baselines/kernel_facts.json. Which entry is fastest on which shape is for a GPU to measure;
# none has been measured, so the defaults stay what they were before the spaces existed.
_NS_64 = TileConfig(
    "64x64x64-w4-s4", 64, 64, 64, num_warps=4, num_stages=4,
    why="default for m <= 2048: nanochat's Gram sides (768..1664) give 78..351 upper-triangle CTAs per "
        "matrix at 64 (~4x those of 128-wide tiles) for 132 SMs; one m64 warpgroup; "
        "4 x (64 + 64) x 64 x 2 B = 64 KB; 32 acc registers/thread (gram: 88 measured)")
_NS_64_K128 = TileConfig(
    "64x64x128-w4-s3", 64, 64, 128, num_warps=4, num_stages=3,
    why="the same CTA count with half the K steps (8 k16 wgmmas per stage, not 4), one stage fewer: "
        "3 x (64 + 64) x 128 x 2 B = 96 KB (gram: 96 registers measured)")
_NS_128 = TileConfig(
    "128x128x64-w8-s3", 128, 128, 64, num_warps=8, num_stages=3,
    why="default for m > 2048: two m64 warpgroups, half the operand bytes per FLOP of 64x64 and still "
        "528 CTAs at m = 4096; 3 x (128 + 128) x 64 x 2 B = 96 KB; 64 acc registers/thread "
        "(poly: 140 measured)")
_NS_128_S4 = TileConfig(
    "128x128x64-w8-s4", 128, 128, 64, num_warps=8, num_stages=4,
    why="one more load stage in flight to hide HBM latency: 4 x 32 KB = 128 KB, still ~100 KB under "
        "the 227 KB per CTA (poly: 140 registers measured)")
# Update only: the symmetric kernels need square tiles (tile (i, j) is also stored as (j, i), and
# the upper-triangle enumeration counts square tiles), but X' = aX + BX is a plain m x n product.
_NS_UPD_64x128 = TileConfig(
    "64x128x64-w4-s4", 64, 128, 64, num_warps=4, num_stages=4,
    why="update only: MLP matrices are m x 4m, so N tiles twice as wide read each B row panel half as "
        "often; one warpgroup, m64n128 wgmma; 4 x (64 + 128) x 64 x 2 B = 96 KB; 64 acc registers/thread "
        "(128 measured)")
_NS_UPD_128x256 = TileConfig(
    "128x256x64-w8-s3", 128, 256, 64, num_warps=8, num_stages=3,
    why="update only: the largest tile, 128x256 needs 8 warps (two m64n256 warpgroups, 128 acc "
        "registers/thread; 246 of 255 measured, no headroom); 3 x (128 + 256) x 64 x 2 B = 144 KB; "
        "few CTAs on small matrices (m = 768, n = 3072: 6 x 12 per matrix)")
# The configuration space of each launcher (`config=` picks an entry by name).
NS_GRAM_CONFIGS: tuple[TileConfig, ...] = (_NS_64, _NS_64_K128, _NS_128, _NS_128_S4)
NS_POLY_CONFIGS: tuple[TileConfig, ...] = NS_GRAM_CONFIGS
NS_UPDATE_CONFIGS: tuple[TileConfig, ...] = NS_GRAM_CONFIGS + (_NS_UPD_64x128, _NS_UPD_128x256)
NS_CONFIGS = {"gram": NS_GRAM_CONFIGS, "poly": NS_POLY_CONFIGS, "update": NS_UPDATE_CONFIGS}
# What `newton_schulz_triton(config=)` / `newton_schulz(config=)` take: one tile for all three kernels.
NS_ITERATION_CONFIGS: tuple[TileConfig, ...] = tuple(c for c in NS_UPDATE_CONFIGS if c in NS_GRAM_CONFIGS)

# The operand dtypes the spaces (config=) are for. fp32 (IEEE dots: FFMA, no tensor cores; twice the
# bytes) runs only the default tiles with half the K depth and its own stage count (_meta), and those
# defaults are compile-gated on sm_90 like the 16-bit ones; a 128x256x32 update tile spilled 120 B in
# fp32, so the spaces stay 16-bit. GPUs iterate in bf16 (the default on CUDA); fp32 is the CPU's.
GATED_DTYPES = (torch.bfloat16, torch.float16)

# Shape classes of the default: m <= _LARGE_M takes _NS_64, larger Gram sides _NS_128.
_LARGE_M = 2048
_PRECISIONS = ("ieee", "tf32", "tf32x3")


def _config_meta(cfg: TileConfig, dtype: torch.dtype) -> dict:
    """The launch meta of a space entry for operands of `dtype` (fp32: half the K depth)."""
    wide = dtype == torch.float32
    # fp32 stays IEEE fp32 (torch's fp32 matmul default); 16-bit inputs take the tensor-core path.
    return dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K // 2 if wide else cfg.BLOCK_K,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, PRECISION="ieee" if wide else "tf32")


def _default_config(m: int) -> TileConfig:
    return _NS_128 if m > _LARGE_M else _NS_64


def _meta(m: int, dtype: torch.dtype, arch: int = 90) -> dict:
    """The default launch meta (BLOCK_M = BLOCK_N, BLOCK_K, num_warps, num_stages, PRECISION) for Gram
    side m, dtype and sm_`arch`: `_default_config(m)`'s tiles."""
    meta = _config_meta(_default_config(m), dtype)
    if arch < 90 and m <= _LARGE_M:
        # Ampere's mma.sync keeps the accumulators in registers the 4-stage pipeline also needs:
        # the gram kernel spilled there (compile gate, sm_80), 3 stages do not.
        meta["num_stages"] = 3
    if dtype == torch.float32 and m <= _LARGE_M:
        # IEEE fp32 dots are FFMA loops fed from registers: at 4 (or 3) stages ptxas held the gram
        # kernel to 128 registers and it spilled 16 B of stack (sm_90, compile gate); at 2 stages
        # it takes 166 registers and spills nothing (still 3 CTAs of 4 warps per SM).
        meta["num_stages"] = 2
    return meta


def _pow2(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0 and v & (v - 1) == 0


def _check_meta(meta: object, square: bool, dtype: torch.dtype) -> dict:
    """A caller's `meta` dict, validated and normalised to the launch meta; BLOCK sets both tile sides,
    PRECISION defaults by dtype. Raises ValueError naming `meta`."""
    keys = {"BLOCK", "BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "PRECISION"}
    if not isinstance(meta, dict):
        raise ValueError(f"meta must be a dict of {sorted(keys)}, got {type(meta).__name__}")
    unknown = set(meta) - keys
    if unknown:
        raise ValueError(f"meta has unknown keys {sorted(unknown)} (allowed: {sorted(keys)})")
    out = dict(meta)
    if "BLOCK" in out:
        block = out.pop("BLOCK")
        out.setdefault("BLOCK_M", block)
        out.setdefault("BLOCK_N", block)
    out.setdefault("PRECISION", "ieee" if dtype == torch.float32 else "tf32")
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        # tl.dot's minimum side is 16, and Triton tiles are powers of two.
        if not _pow2(out.get(key)) or out[key] < 16:
            raise ValueError(f"meta[{key!r}] must be a power of two >= 16 (BLOCK sets BLOCK_M and BLOCK_N), "
                             f"got {out.get(key)!r}")
    if not _pow2(out.get("num_warps")) or out["num_warps"] > 32:
        raise ValueError(f"meta['num_warps'] must be a power of two <= 32, got {out.get('num_warps')!r}")
    if not isinstance(out.get("num_stages"), int) or isinstance(out["num_stages"], bool) or out["num_stages"] < 1:
        raise ValueError(f"meta['num_stages'] must be an int >= 1, got {out.get('num_stages')!r}")
    if out["PRECISION"] not in _PRECISIONS:
        raise ValueError(f"meta['PRECISION'] must be one of {_PRECISIONS}, got {out['PRECISION']!r}")
    if square and out["BLOCK_M"] != out["BLOCK_N"]:
        raise ValueError(f"meta: the symmetric kernels (gram, poly) need square tiles, got BLOCK_M = "
                         f"{out['BLOCK_M']} != BLOCK_N = {out['BLOCK_N']}")
    return out


def _check_gated(cfg: TileConfig, x: Tensor, where: str) -> None:
    """config= runs only what the compile gate checked: 16-bit operands on sm_90 and later."""
    if x.dtype not in GATED_DTYPES:
        raise ValueError(f"{where}: config={cfg.name!r} is compile-gated for bfloat16 / float16 operands only, got "
                         f"{x.dtype} (fp32 runs the default tiles; meta= for ad-hoc tiles)")
    if target_arch(x) < 90:
        raise ValueError(f"{where}: config={cfg.name!r} is compiled for sm_90; this GPU is sm_{target_arch(x)} "
                         "(use the default tiles, or meta=)")


def _resolve_meta(kernel: str, x: Tensor, m: int, meta: dict | None, config: object) -> dict:
    """The launch meta of one call: `config` (an entry of NS_CONFIGS[kernel]), else `meta`, else the
    default for Gram side m."""
    if config is not None:
        if meta is not None:
            raise ValueError(f"ns_{kernel}_triton: pass config= or meta=, not both")
        cfg = select_config(config, NS_CONFIGS[kernel], "config", f"ns_{kernel}_triton")
        _check_gated(cfg, x, f"ns_{kernel}_triton")
        return _config_meta(cfg, x.dtype)
    if meta is None:
        return _meta(m, x.dtype, target_arch(x))
    return _check_meta(meta, kernel != "update", x.dtype)


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


def _launch_args(meta: dict, square: bool = True) -> tuple[dict, dict]:
    """(constexprs, launch options) of a launch meta: BLOCK for the symmetric kernels, BLOCK_M and
    BLOCK_N for the update."""
    tiles = {"BLOCK": meta["BLOCK_M"]} if square else {"BLOCK_M": meta["BLOCK_M"], "BLOCK_N": meta["BLOCK_N"]}
    const = dict(tiles, BLOCK_K=meta["BLOCK_K"], PRECISION=meta["PRECISION"])
    return const, {"num_warps": meta["num_warps"], "num_stages": meta["num_stages"]}


def ns_gram_triton(X: Tensor, meta: dict | None = None, config: str | TileConfig | None = None) -> Tensor:
    """A = X X^T per matrix. X: (batch, m, n) fp16/bf16/fp32 -> A: (batch, m, m), X's dtype,
    bitwise symmetric.

    Tiles: `config` names one entry of this launcher's space (NS_GRAM_CONFIGS, square tiles; e.g.
    "128x128x64-w8-s3", a name or the TileConfig); `meta` is a raw override (BLOCK or BLOCK_M /
    BLOCK_N, BLOCK_K, num_warps, num_stages, PRECISION; tests use 16-wide tiles); neither: the
    default tiles of the shape class (`_meta`), which no GPU measurement has shown another entry to
    beat or lose to (none has been made). config= takes bf16 / fp16 operands on sm_90+ (what the
    compile gate checked). Bad values raise ValueError naming config or meta.
    """
    _check_stack(X, "X")
    X = _unit_cols(X)
    bsz, m, n = X.shape
    meta = _resolve_meta("gram", X, m, meta, config)
    A = torch.empty((bsz, m, m), dtype=X.dtype, device=X.device)
    if A.numel() == 0:
        return A
    tiles = triton.cdiv(m, meta["BLOCK_M"])
    const, opts = _launch_args(meta)
    _ns_gram_kernel[(bsz, tiles * (tiles + 1) // 2)](X, A, m, n, X.stride(0), X.stride(1), A.stride(0), A.stride(1),
                                         **const, **opts)
    return A


def ns_poly_triton(A: Tensor, b: float, c: float, meta: dict | None = None,
                   config: str | TileConfig | None = None) -> Tensor:
    """B = b A + c A @ A per matrix, for symmetric A: (batch, m, m) fp16/bf16/fp32 -> B, A's dtype,
    bitwise symmetric. Only A's upper triangle of tiles drives the output; A must be symmetric.
    config / meta: as `ns_gram_triton`, from NS_POLY_CONFIGS (square tiles)."""
    _check_stack(A, "A", square=True)
    A = _unit_cols(A)
    bsz, m, _ = A.shape
    meta = _resolve_meta("poly", A, m, meta, config)
    B = torch.empty_like(A, memory_format=torch.contiguous_format)
    if B.numel() == 0:
        return B
    tiles = triton.cdiv(m, meta["BLOCK_M"])
    const, opts = _launch_args(meta)
    _ns_poly_kernel[(bsz, tiles * (tiles + 1) // 2)](A, B, m, A.stride(0), A.stride(1), B.stride(0), B.stride(1),
                                         float(b), float(c), **const, **opts)
    return B


def ns_update_triton(X: Tensor, B: Tensor, a: float, meta: dict | None = None,
                     config: str | TileConfig | None = None) -> Tensor:
    """X' = a X + B @ X per matrix. X: (batch, m, n), B: (batch, m, m), same fp16/bf16/fp32 dtype
    -> X': (batch, m, n), a new tensor in X's dtype. config / meta: as `ns_gram_triton`, from
    NS_UPDATE_CONFIGS (which adds rectangular tiles: 64x128, 128x256)."""
    _check_stack(X, "X")
    _check_stack(B, "B", square=True)
    if B.shape[0] != X.shape[0] or B.shape[1] != X.shape[1] or B.dtype != X.dtype or B.device != X.device:
        raise ValueError(f"B must be (batch, m, m) = {(X.shape[0], X.shape[1], X.shape[1])} with X's dtype and "
                         f"device, got {tuple(B.shape)} {B.dtype} {B.device}")
    X, B = _unit_cols(X), _unit_cols(B)
    bsz, m, n = X.shape
    meta = _resolve_meta("update", X, m, meta, config)
    Y = torch.empty((bsz, m, n), dtype=X.dtype, device=X.device)
    if Y.numel() == 0:
        return Y
    const, opts = _launch_args(meta, square=False)
    grid = (bsz, triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))
    _ns_update_kernel[grid](X, B, Y, m, n, X.stride(0), X.stride(1), B.stride(0), B.stride(1), Y.stride(0),
                            Y.stride(1), float(a), **const, **opts)
    return Y


def newton_schulz_triton(X: Tensor, coefficients: Sequence[tuple[float, float, float]], dtype: torch.dtype,
                         meta: dict | None = None, config: str | TileConfig | None = None) -> Tensor:
    """Run the iteration X <- a X + (b A + c A^2) X, A = X X^T, once per (a, b, c) in `coefficients`.

    Args:
        X: (..., m, n) with m <= n (wide: the caller transposes tall matrices), already normalised
            (singular values inside (0, 1)); leading dims are a batch run in one grid per launch.
        coefficients: resolved (a, b, c) float tuples, one per step.
        dtype: iteration dtype, float16 / bfloat16 / float32 (X is cast to it).
        meta: raw tile override for all three kernels (square: BLOCK), see `ns_gram_triton`.
        config: one entry of NS_ITERATION_CONFIGS (the square tiles every kernel has), by name, used by
            all three kernels; bf16 / fp16 only (what the compile gate checked). None: the default of
            the shape class (not claimed slower or faster than any other entry: no GPU has measured
            them). ValueError for a name outside the space.
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
    if config is not None:
        config = select_config(config, NS_ITERATION_CONFIGS, "config", "newton_schulz_triton (square tiles)")
    lead, (m, n) = X.shape[:-2], X.shape[-2:]
    x = X.to(dtype).reshape(-1, m, n)
    for a, b, c in coefficients:
        A = ns_gram_triton(x, meta, config)
        B = ns_poly_triton(A, b, c, meta, config)
        x = ns_update_triton(x, B, a, meta, config)
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
def newton_schulz_iterate_op(X: Tensor, coefficients: list[float], config: Optional[str] = None) -> Tensor:
    """`newton_schulz_triton` as a torch.library op, so torch.compile (e.g. a compiled optimizer
    step) keeps the Triton launches in its graph instead of breaking it. X: (..., m, n) wide, in
    the iteration dtype; coefficients: the (a, b, c) tuples flattened, 3 floats per step; config:
    the name of an NS_ITERATION_CONFIGS entry or None (the default tiles).
    Returns a new contiguous (..., m, n) tensor in X's dtype."""
    if len(coefficients) == 0 or len(coefficients) % 3:
        raise ValueError(f"coefficients must hold 3 floats per step (a, b, c), got {len(coefficients)} floats")
    steps = [tuple(coefficients[i:i + 3]) for i in range(0, len(coefficients), 3)]
    return newton_schulz_triton(X, steps, X.dtype, config=config)


@newton_schulz_iterate_op.register_fake
def _(X, coefficients, config=None):
    return X.new_empty(X.shape)


# --------------------------------------------------------------------------------------------
# Configurations an H100 runs (compiled and checked by the compile gate)
# --------------------------------------------------------------------------------------------

def _aligned(sig: dict[str, str]) -> tuple[str, ...]:
    """Every pointer and int argument: what Triton's launcher specialises as divisible by 16 for
    contiguous nanochat matrices (aligned pointers; sizes and strides multiples of 16, as every
    nanochat width is)."""
    return tuple(a for a, ty in sig.items() if ty.startswith("*") or ty == "i32")


def _config(kernel: str, m: int, n: int, dtype: torch.dtype, arch: int = 90, cfg: TileConfig | None = None) -> dict:
    """compile_triton kwargs of one launch: the default tiles of (m, dtype, arch), or entry `cfg`."""
    t = _TL_DTYPE[dtype]
    meta = _meta(m, dtype, arch) if cfg is None else _config_meta(cfg, dtype)
    const, opts = _launch_args(meta, square=kernel != "update")
    fn = {"gram": _ns_gram_kernel, "poly": _ns_poly_kernel, "update": _ns_update_kernel}[kernel]
    sig = gate_signature(fn, const, t)
    # Default tiles keep their historical labels (BLOCK=MxK for square tiles); entries name themselves.
    tiles = (f"{meta['BLOCK_M']}x{meta['BLOCK_K']}" if cfg is None
             else f"{meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']}")
    return dict(fn=fn, signature=sig, constexprs=const, aligned=_aligned(sig), **opts,
                config=f"{kernel} m={m} n={n} {t}{'' if cfg is None else ' config=' + cfg.name} BLOCK={tiles} "
                       f"warps={meta['num_warps']} stages={meta['num_stages']}")


# The shape the space's other entries are compiled at (a label only: m and n are runtime arguments,
# compiled as multiples of 16 like every nanochat width).
_SPACE_M, _SPACE_N = 1664, 6656


def _kernel_configs(arch: int = 90) -> list[dict]:
    if triton is None:
        return []
    out = []
    # Small class (nanochat d = 768 .. 1664; the d x 4d shapes share the Gram side d) and large (4096).
    # fp32 (IEEE FFMA dots) on sm_90 only: what an H100 runs for an fp32 iteration; Ampere iterates in 16 bits.
    wide = (torch.float32,) if arch >= 90 else ()
    for m, n, dtypes in ((768, 3072, (torch.bfloat16, torch.float16, *wide)), (1664, 6656, (torch.bfloat16,)),
                         (4096, 4096, (torch.bfloat16, torch.float16, *wide))):
        for dt in dtypes:
            for kernel in ("gram", "poly", "update"):
                out.append(_config(kernel, m, n, dt, arch))
    if arch >= 90:
        # Every other entry of each launcher's space (the defaults are compiled above), in bf16.
        defaults = (_default_config(0), _default_config(_LARGE_M + 1))
        for kernel, space in NS_CONFIGS.items():
            for cfg in space:
                if cfg not in defaults:
                    out.append(_config(kernel, _SPACE_M, _SPACE_N, torch.bfloat16, arch, cfg))
    return out


KERNEL_CONFIGS: list[dict] = _kernel_configs()
KERNEL_CONFIGS_SM80: list[dict] = _kernel_configs(80)  # what an A100 launches (for compile_triton(..., arch=80))
"""Each entry: keyword arguments of `compile_gate.compile_triton` built from the launchers' `_meta`
(and, for sm_90, from every other entry of NS_CONFIGS), so `compile_triton(**cfg, arch=90)` compiles
exactly what an H100 launches. Compile them in a
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
