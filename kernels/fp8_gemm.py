"""FP8 GEMM for Hopper: out = (a * scale_a) @ (b * scale_b)^T (+ bias), one rounding to out_dtype.

Layouts follow `F.linear`: a is the (M, K) activation, b the (N, K) weight, both with unit stride
along K, so both operand tiles are K-contiguous (K-major), which is the only layout Hopper's fp8
wgmma accepts for both A and B. Scales are fp32, tensorwise (one value) or rowwise (one per row of
a / per output column of b); they are applied once to the fp32 accumulator in the epilogue, never
to the operands, so the tensor cores see the raw fp8 bytes.

Backends (`fp8_gemm(..., backend=)`):
    "torch"      `fp8_gemm_reference`: dequantise to fp32, fp32 matmul (exact products, fp32 sums).
    "triton"     the kernel below (sm_90 SASS: QGMMA.64xNx32.F32.E4M3.E4M3 / .E5M2.E4M3, the fp8
                 warpgroup MMA; HGMMA is the 16-bit one), fp32 accumulator; on CPU tensors
                 it runs through the Triton interpreter.
    "triton_persistent"  the same product from a persistent kernel (one CTA per SM looping over
                 tiles) that moves tiles with TMA (sm_90 SASS: UTMALDG / UTMASTG, QGMMA); needs
                 16-byte aligned rows (K % 16 == 0). Which of the two is faster on which shapes is
                 for `bench/test_bench_fp8_gemm.py` to say on an H100; unmeasured so far.
    "scaled_mm"  `torch._scaled_mm` through `vendor.scaled_mm` (cuBLASLt on CUDA; torch's CPU kernel
                 elsewhere, held to the CUDA contract: K, N % 16, row-wise to bf16, the bias rule).
    None         "triton" on CUDA tensors, "torch" on CPU tensors.

Accumulation (`use_fast_accum`): an fp8 wgmma does not accumulate in full fp32 -- the H100 tensor
core keeps only about 14 bits of the running sum's mantissa inside the instruction chain
(DeepSeek-V3 technical report, "Increasing Accumulation Precision"). Triton chains every k32 wgmma
of one `tl.dot` into its accumulator, and on sm_90 it also chains *across* dots when the
accumulator is passed in (`max_num_imprecise_acc` defaults to 2^30 for fp8 there), so:
    use_fast_accum=True   acc = tl.dot(a, b, acc): the whole K reduction stays inside the tensor
                          core's reduced-precision accumulator (fastest; nanochat/torchao use it in
                          the forward pass only, where K is d and errors do not compound).
    use_fast_accum=False  acc += tl.dot(a, b): each BLOCK_K (= 128) slice is reduced by the tensor
                          core from a zeroed temporary and then promoted into an fp32 register
                          accumulator with a CUDA-core FADD ("split accumulator"; the same promotion
                          interval DeepSeek-V3 uses). Use it for the backward GEMMs, whose K is the
                          token count (up to 2^19).
Triton's interpreter evaluates every dot as an fp32 numpy matmul plus the accumulator, so on CPU
both modes compute the same fp32 sum; the difference only exists on the GPU.

Shapes: any M, N, K >= 0 (edges are masked / clamped, K need not be a multiple of 16 or of the
tile); fast paths need what Triton's launcher specialises on: 16-byte aligned base pointers and row
strides (K % 16 == 0 for contiguous operands), which every nanochat width is. Supported operand
pairs: e4m3 x e4m3, e4m3 x e5m2, e5m2 x e4m3; e5m2 x e5m2 is rejected, as `torch._scaled_mm` on CUDA
rejects it (cuBLASLt has no such kernel; the CPU build of torch 2.13 would accept it). Hopper's
wgmma itself could do it, but a recipe that only works on one backend is a trap: gradients are e5m2
on one side only.

Tiles: FP8_GEMM_CONFIGS is the configuration space, a small tuple of named `TileConfig`s (tile
shape, stages, warps, GROUP_M of the grouped program order) with the reason for each entry, every
one compiled for sm_90 in both kernels by the compile gate (KERNEL_CONFIGS). `fp8_gemm(...,
config=)` / `fp8_gemm_triton(..., config=)` run one entry; None keeps the default tiles of the shape
class, since no GPU has measured any entry against another yet.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
from torch import Tensor

from . import vendor
from .backend import resolve_backend, target_arch
from .compile_gate import gate_signature
from .op import Op
from .launch import TL_DTYPE as _TL_DTYPE, sm_count
from .tile_config import TileConfig, select_config

try:  # triton is optional: backend="torch" / "scaled_mm" work without it
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - exercised only on installs without triton
    triton = None
    tl = None

__all__ = ["fp8_gemm", "fp8_gemm_reference", "fp8_gemm_scaled_mm", "fp8_gemm_triton", "tma_aligned", "FP8_DTYPES",
           "OUT_DTYPES", "KERNEL_CONFIGS", "FP8_GEMM_CONFIGS", "TileConfig"]

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _fp8_gemm_kernel(A, B, C, SA, SB, BIAS, M, N, K, stride_am, stride_bn, stride_cm,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, ROWWISE_A: tl.constexpr,
                         ROWWISE_B: tl.constexpr, HAS_BIAS: tl.constexpr, FAST_ACCUM: tl.constexpr):
        """C[m, n] = sa[m] sb[n] sum_k A[m, k] B[n, k] (+ BIAS[n]), fp32 accumulation, one rounding.

        A: (M, K) fp8, B: (N, K) fp8, both unit K stride; C: (M, N), unit column stride; SA: fp32
        scalar or (M,) (ROWWISE_A); SB: fp32 scalar or (N,) (ROWWISE_B); BIAS: (N,) any float dtype.
        Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),), one program per output tile.
        """
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        # Grouped ordering: consecutive programs sweep GROUP_M row tiles for each column tile, so a
        # wave of 132 CTAs touches ~GROUP_M row panels of A and ~132 / GROUP_M column panels of B,
        # which stay L2-resident, instead of streaming all of B once per row of tiles.
        group = GROUP_M * num_pid_n
        first_m = (pid // group) * GROUP_M
        group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % group_m
        pid_n = (pid % group) // group_m

        row0 = pid_m * BLOCK_M
        col0 = pid_n * BLOCK_N
        # int64 panel bases: M * K passes 2^31 at M = 2^19 tokens and K >= 4096; offsets inside
        # a tile (< BLOCK * stride) stay int32.
        a_base = A + row0.to(tl.int64) * stride_am
        b_base = B + col0.to(tl.int64) * stride_bn
        rm = row0 + tl.arange(0, BLOCK_M)
        rn = col0 + tl.arange(0, BLOCK_N)
        # Edge tiles re-read the last valid row / column instead of masking: loads stay unpredicated
        # and in bounds, and the duplicated rows / columns are never stored.
        am = tl.minimum(rm, M - 1) - row0
        bn = tl.minimum(rn, N - 1) - col0
        rk = tl.arange(0, BLOCK_K)
        a_ptrs = a_base + am[:, None] * stride_am + rk[None, :]
        b_ptrs = b_base + bn[:, None] * stride_bn + rk[None, :]

        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                # Zero-filled K tail: padding contributes exactly 0 to every dot.
                kmask = rk[None, :] < K - k0
                a = tl.load(a_ptrs, mask=kmask, other=0.0)
                b = tl.load(b_ptrs, mask=kmask, other=0.0)
            # B tile is (BLOCK_N, BLOCK_K) K-major: its transpose is the K-major B operand wgmma wants.
            if FAST_ACCUM:
                acc = tl.dot(a, tl.trans(b), acc)
            else:
                # Fresh zero accumulator per K-step, promoted with an fp32 add (split accumulator).
                acc += tl.dot(a, tl.trans(b))
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K

        # Epilogue in fp32: scales, then bias, then the single rounding to C's dtype.
        if ROWWISE_A:
            acc = acc * tl.load(SA + tl.minimum(rm, M - 1))[:, None]
            if ROWWISE_B:
                acc = acc * tl.load(SB + tl.minimum(rn, N - 1))[None, :]
            else:
                acc = acc * tl.load(SB)
        else:
            if ROWWISE_B:
                acc = acc * (tl.load(SA) * tl.load(SB + tl.minimum(rn, N - 1)))[None, :]
            else:
                acc = acc * (tl.load(SA) * tl.load(SB))  # tensorwise: one multiply per element
        if HAS_BIAS:
            acc = acc + tl.load(BIAS + tl.minimum(rn, N - 1)).to(tl.float32)[None, :]
        c_ptrs = C + row0.to(tl.int64) * stride_cm + (rm - row0)[:, None] * stride_cm + rn[None, :]
        tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


    @triton.jit
    def _fp8_gemm_persistent_kernel(a_desc, b_desc, c_desc, SA, SB, BIAS, M, N, K,
                                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                    GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, ROWWISE_A: tl.constexpr,
                                    ROWWISE_B: tl.constexpr, HAS_BIAS: tl.constexpr, FAST_ACCUM: tl.constexpr):
        """The same product as `_fp8_gemm_kernel`, persistent and through TMA.

        a_desc / b_desc: TMA descriptors of A (M, K) and B (N, K) with [BLOCK_M | BLOCK_N, BLOCK_K]
        boxes; c_desc: C (M, N) with a [BLOCK_M, BLOCK_N] box. Grid: (min(NUM_SMS, tiles),); program
        p computes tiles p, p + NUM_SMS, ... in the grouped order.

        Why: one CTA per SM for the whole GEMM, so the 132 SMs never wait on a ragged last wave of
        short-lived CTAs, and `flatten=True` hands the software pipeliner the tile and K loops as
        one loop, so that the next tile's TMA loads can be in flight during this tile's epilogue
        (the intent; whether it pays is what the GPU benchmark is for). TMA (one thread issues a whole 16 KB box copy, tracked by
        an mbarrier) replaces 256 threads' address arithmetic and cp.async per stage, and its
        out-of-bounds boxes are zero-filled on load and clipped on store: no edge clamping or
        masks anywhere, and the K tail needs no EVEN_K variant.
        """
        start = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        group = GROUP_M * num_pid_n
        for tile in tl.range(start, num_pid_m * num_pid_n, NUM_SMS, flatten=True):
            first_m = (tile // group) * GROUP_M
            group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
            row0 = (first_m + (tile % group) % group_m) * BLOCK_M
            col0 = ((tile % group) // group_m) * BLOCK_N
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for kt in range(k_tiles):
                a = a_desc.load([row0, kt * BLOCK_K])
                b = b_desc.load([col0, kt * BLOCK_K])
                if FAST_ACCUM:
                    acc = tl.dot(a, b.T, acc)
                else:
                    acc += tl.dot(a, b.T)  # split accumulator, as in _fp8_gemm_kernel
            rm = row0 + tl.arange(0, BLOCK_M)
            rn = col0 + tl.arange(0, BLOCK_N)
            if ROWWISE_A:
                acc = acc * tl.load(SA + rm, mask=rm < M, other=0.0)[:, None]
                if ROWWISE_B:
                    acc = acc * tl.load(SB + rn, mask=rn < N, other=0.0)[None, :]
                else:
                    acc = acc * tl.load(SB)
            else:
                if ROWWISE_B:
                    acc = acc * (tl.load(SA) * tl.load(SB + rn, mask=rn < N, other=0.0))[None, :]
                else:
                    acc = acc * (tl.load(SA) * tl.load(SB))
            if HAS_BIAS:
                acc = acc + tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            c_desc.store([row0, col0], acc.to(c_desc.dtype))


# --------------------------------------------------------------------------------------------
# Launch meta-parameters (shared by the launcher and KERNEL_CONFIGS)
# --------------------------------------------------------------------------------------------

# The configuration space (`fp8_gemm_triton(config=)` picks an entry by name; both kernels, the
# tiled one and the persistent TMA one, take every entry). The arithmetic, for sm_90:
#   * fp8 wgmma is QGMMA.64xNx32: 4 warps (a warpgroup) per 64 rows, k32 per instruction, N <= 256;
#     BLOCK_K = 128 fp8 bytes is one 128-byte swizzled shared-memory row and 4 k32 instructions;
#   * shared memory per stage = (BLOCK_M + BLOCK_N) * BLOCK_K * 1 byte; the persistent kernel also
#     stages the output tile for its TMA store: BLOCK_M * BLOCK_N * out bytes; 227 KB per CTA;
#   * the fp32 accumulator is BLOCK_M * BLOCK_N / (32 * num_warps) registers per thread; the split
#     accumulator (use_fast_accum=False) needs a second copy for each K step's partial sum, so twice
#     that, of 255.
# Measured numbers: the compile gate's (e4m3, rowwise, bf16 out unless said), as committed in
# bench/baselines/kernel_facts.json. No GPU has timed any entry: the defaults are what they were.
# Dropped: 128x256 with the split accumulator (2 x 128 acc registers: 255 registers and 168 B of
# stack spilled, measured; at 16 warps the 128-register cap per thread spills too) -- the 128x256
# entry is fast-accumulation only; 64x256x128 with 4 warps likewise (split: 232 B spilled).
_FP8_DECODE = TileConfig(
    "64x128x128-w4-s4-g8", 64, 128, 128, num_warps=4, num_stages=4, GROUP_M=8,
    why="default for M <= 64 (decode): one m64 warpgroup, no MMA rows wasted on padding; "
        "4 x (64 + 128) x 128 B = 96 KB (+ 32 KB fp32 epilogue, persistent); 64 acc registers/thread, "
        "128 split (164 measured)")
_FP8_DEFAULT = TileConfig(
    "128x128x128-w8-s4-g8", 128, 128, 128, num_warps=8, num_stages=4, GROUP_M=8,
    why="default for M > 64: two m64 warpgroups; 4 x (128 + 128) x 128 B = 128 KB (+ 64 KB fp32 "
        "epilogue, persistent: 192 KB); 64 acc registers/thread, 128 split (160..173 measured)")
_FP8_K64 = TileConfig(
    "128x128x64-w8-s6-g8", 128, 128, 64, num_warps=8, num_stages=6, GROUP_M=8,
    why="half-depth K steps, 6 in flight: 6 x (128 + 128) x 64 B = 96 KB; the split accumulator "
        "promotes every 64 instead of 128 (2 k32 QGMMAs per promotion: more FADDs, shorter "
        "reduced-precision chains; split: 151 registers measured)")
_FP8_WIDE = TileConfig(
    "128x256x128-w8-s3-g8", 128, 256, 128, num_warps=8, num_stages=3, GROUP_M=8, fast_accum_only=True,
    persistent_out_bytes=2,
    why="the largest tile, use_fast_accum=True only: 128x256 needs 8 warps (two m64n256 warpgroups), "
        "128 acc registers/thread (189 measured); 3 x (128 + 256) x 128 B = 144 KB, + 64 KB bf16 "
        "epilogue when persistent = 208 KB (209 KB measured; fp32 out: + 128 KB = 272 KB > 227 KB, refused)")
_FP8_ROW_MAJOR = TileConfig(
    "128x128x128-w8-s4-g1", 128, 128, 128, num_warps=8, num_stages=4, GROUP_M=1,
    why="the default tile in plain row-major program order (GROUP_M = 1): what the grouped order's "
        "L2-reuse claim has to be measured against (split: 160 registers measured)")
FP8_GEMM_CONFIGS: tuple[TileConfig, ...] = (_FP8_DECODE, _FP8_DEFAULT, _FP8_K64, _FP8_WIDE, _FP8_ROW_MAJOR)

_SMALL_M = 64


def _config_meta(cfg: TileConfig) -> dict:
    return dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _meta(m: int, n: int, k: int, arch: int = 90) -> dict:
    """Tile configuration for an (m, n, k) GEMM on sm_`arch`; fixed per shape class, no autotuning.

    sm_90: `_FP8_DECODE` for M <= 64 (decode), else `_FP8_DEFAULT` (see FP8_GEMM_CONFIGS for the
    arithmetic); 128x256 would double the accumulator to 128 fp32 registers per thread, which the
    split accumulator's second copy cannot afford (it spills: compile gate).
    """
    if arch >= 90:
        return _config_meta(_FP8_DECODE if m <= _SMALL_M else _FP8_DEFAULT)
    # Ada (sm_89 mma.sync e4m3) has ~100 KB of shared memory per SM: 3 stages of 64-deep tiles.
    # Not compile-gated; correctness only.
    return dict(BLOCK_M=64 if m <= _SMALL_M else 128, BLOCK_N=128, BLOCK_K=64, num_warps=4 if m <= _SMALL_M else 8,
                num_stages=3, GROUP_M=8)


_META_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")


def _check_meta(meta: object) -> dict:
    """A caller's `meta` dict, validated (ValueError naming meta); NUM_SMS is optional."""
    if not isinstance(meta, dict):
        raise ValueError(f"meta must be a dict of {list(_META_KEYS)} (and optionally NUM_SMS), got "
                         f"{type(meta).__name__}")
    missing = [key for key in _META_KEYS if key not in meta]
    unknown = sorted(set(meta) - set(_META_KEYS) - {"NUM_SMS"})
    if missing or unknown:
        raise ValueError(f"meta must have the keys {list(_META_KEYS)} (and optionally NUM_SMS); missing {missing}, "
                         f"unknown {unknown}")
    if meta["BLOCK_K"] < 16 or meta["BLOCK_M"] < 16 or meta["BLOCK_N"] < 16:
        raise ValueError(f"meta tiles must be >= 16 (tl.dot's minimum), got {meta}")
    for key in _META_KEYS:
        v = meta[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1 or (key != "num_stages" and key != "GROUP_M"
                                                                       and v & (v - 1)):
            raise ValueError(f"meta[{key!r}] must be a positive int (a power of two for tiles and warps), got {v!r}")
    return dict(meta)


def _config_for(config: object, a: Tensor, out_dtype: torch.dtype, use_fast_accum: bool, persistent: bool) -> dict:
    """The launch meta of space entry `config` for this call; ValueError naming config when the entry
    was not compile-gated for it (a GPU older than sm_90, split accumulation, a too-wide output)."""
    cfg = select_config(config, FP8_GEMM_CONFIGS, "config", "fp8_gemm_triton")
    if target_arch(a) < 90:
        raise ValueError(f"config={cfg.name!r} is compiled for sm_90; this GPU is sm_{target_arch(a)} "
                         "(use the default tiles, or meta=)")
    if cfg.fast_accum_only and not use_fast_accum:
        raise ValueError(f"config={cfg.name!r} needs use_fast_accum=True: with the split accumulator its "
                         f"{cfg.BLOCK_M}x{cfg.BLOCK_N} tile holds two fp32 accumulators, "
                         f"{2 * cfg.acc_registers()} registers per thread, and spills (compile gate)")
    if persistent and out_dtype.itemsize > cfg.persistent_out_bytes:
        raise ValueError(f"config={cfg.name!r} with persistent=True takes outputs of at most "
                         f"{cfg.persistent_out_bytes} bytes, got {out_dtype}: the {cfg.BLOCK_M}x{cfg.BLOCK_N} TMA "
                         f"epilogue tile ({cfg.BLOCK_M * cfg.BLOCK_N * out_dtype.itemsize // 1024} KB) and "
                         f"{cfg.num_stages} load stages ({cfg.num_stages * cfg.stage_bytes(1) // 1024} KB) exceed "
                         "227 KB of shared memory")
    return _config_meta(cfg)


def _num_sms(x: Tensor) -> int:
    """Persistent grid size: the GPU's SM count (132 on an H100 SXM); on CPU (the interpreter) a
    few programs, so that each of them loops over several tiles."""
    return sm_count(x.device) if x.is_cuda else 4


def tma_aligned(x: Tensor) -> bool:
    """Whether a 2-D tensor's rows can be TMA boxes: 16-byte aligned base pointer and row stride
    (the persistent kernel's requirement on a, b and out)."""
    return x.data_ptr() % 16 == 0 and (x.size(0) <= 1 or x.stride(0) * x.element_size() % 16 == 0)


def _check_tma(x: Tensor, name: str) -> None:
    if not tma_aligned(x):
        raise ValueError(f"{name}: the persistent TMA kernel needs a 16-byte aligned base and row stride, got "
                         f"shape {tuple(x.shape)}, strides {x.stride()} ({x.dtype}, data_ptr % 16 = "
                         f"{x.data_ptr() % 16}); use persistent=False")


# --------------------------------------------------------------------------------------------
# Argument checks (shared by every backend, so all of them accept exactly the same calls)
# --------------------------------------------------------------------------------------------

def _scale_kind(scale: object, name: str, rowwise_shape: tuple[int, int]) -> bool:
    """True for a rowwise scale of shape `rowwise_shape`, False for a tensorwise one (a single
    value: shape (), (1,) or (1, 1)); raises naming `name` otherwise."""
    if not isinstance(scale, Tensor):
        raise TypeError(f"{name} must be a float32 tensor, got {type(scale).__name__}")
    if scale.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {scale.dtype}")
    if scale.ndim <= 2 and scale.numel() == 1:
        return False
    if tuple(scale.shape) == rowwise_shape:
        return True
    raise ValueError(f"{name} must be a single value (tensorwise, shape ()) or rowwise of shape {rowwise_shape}, "
                     f"got {tuple(scale.shape)}")


def _check(a: object, b: object, scale_a: object, scale_b: object, out_dtype: object, bias: object,
           use_fast_accum: object) -> tuple[bool, bool]:
    """Validate the arguments of `fp8_gemm`; returns (scale_a rowwise, scale_b rowwise)."""
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.ndim != 2:
            raise ValueError(f"{name} must be 2-D ({'M' if name == 'a' else 'N'}, K), got shape {tuple(x.shape)}")
        if x.dtype not in FP8_DTYPES:
            raise TypeError(f"{name} must be float8_e4m3fn or float8_e5m2, got {x.dtype}")
        # K-major operands: the layout fp8 wgmma needs (and F.linear's weight already has).
        if x.stride(1) != 1 and x.size(1) > 1:
            raise ValueError(f"{name} must have unit stride along K (row-major {tuple(x.shape)}), got strides "
                             f"{x.stride()}; a transposed view needs .contiguous()")
    if a.dtype == torch.float8_e5m2 and b.dtype == torch.float8_e5m2:
        raise ValueError("a and b are both float8_e5m2: e5m2 x e5m2 is not supported (as torch._scaled_mm on CUDA); "
                         "keep one operand in float8_e4m3fn")
    if b.size(1) != a.size(1):
        raise ValueError(f"b must be (N, K) with K = a.shape[1] = {a.size(1)}, got shape {tuple(b.shape)}")
    if b.device != a.device:
        raise ValueError(f"b must be on a's device {a.device}, got {b.device}")
    m, n = a.size(0), b.size(0)
    rowwise_a = _scale_kind(scale_a, "scale_a", (m, 1))
    rowwise_b = _scale_kind(scale_b, "scale_b", (1, n))
    for name, s in (("scale_a", scale_a), ("scale_b", scale_b)):
        if s.device != a.device:
            raise ValueError(f"{name} must be on a's device {a.device}, got {s.device}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be torch.bfloat16, torch.float16 or torch.float32, got {out_dtype}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape (N,) = ({n},), got {tuple(bias.shape)}")
        # torch._scaled_mm's bias rule (vendor.SCALED_MM_RULES["bias"]) on every backend, so a call
        # that works on one backend works on all: add an fp32 bias after an fp32 GEMM instead.
        if out_dtype == torch.float32:
            raise ValueError("bias needs a bf16 or fp16 out_dtype (torch._scaled_mm refuses a bias with "
                             "float32 output): add it after the GEMM")
        if bias.dtype != out_dtype:
            raise TypeError(f"bias must be out_dtype ({out_dtype}), got {bias.dtype}")
        if bias.device != a.device:
            raise ValueError(f"bias must be on a's device {a.device}, got {bias.device}")
    if not isinstance(use_fast_accum, bool):
        raise TypeError(f"use_fast_accum must be a bool, got {type(use_fast_accum).__name__}")
    return rowwise_a, rowwise_b


# --------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------

def fp8_gemm_reference(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, *,
                       out_dtype: torch.dtype = torch.bfloat16, bias: Tensor | None = None,
                       use_fast_accum: bool = False) -> Tensor:
    """Plain torch: (a.float() * scale_a) @ (b.float() * scale_b).T (+ bias) in fp32, then out_dtype.

    Same arguments and checks as `fp8_gemm`; `use_fast_accum` is accepted for signature parity and
    has no effect (torch's fp32 matmul always accumulates in fp32). Returns (M, N) in out_dtype.
    """
    rowwise = _check(a, b, scale_a, scale_b, out_dtype, bias, use_fast_accum)
    return _reference(a, b, scale_a, scale_b, rowwise, out_dtype=out_dtype, bias=bias, use_fast_accum=use_fast_accum)


def _reference(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, rowwise: tuple[bool, bool], *,
               out_dtype: torch.dtype, bias: Tensor | None, use_fast_accum: bool) -> Tensor:
    """fp8_gemm_reference for validated arguments (`rowwise`: whether scale_a and scale_b are row-wise)."""
    rowwise_a, rowwise_b = rowwise
    # Every fp8 value and every scaled fp8 value up to the scale's rounding is exact in fp32.
    sa = scale_a.reshape(-1, 1) if rowwise_a else scale_a.reshape(())
    sb = scale_b.reshape(-1, 1) if rowwise_b else scale_b.reshape(())
    out = (a.float() * sa) @ (b.float() * sb).T
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def fp8_gemm_scaled_mm(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, *,
                       out_dtype: torch.dtype = torch.bfloat16, bias: Tensor | None = None,
                       use_fast_accum: bool = False) -> Tensor:
    """`torch._scaled_mm(a, b.t(), scale_a, scale_b, bias=, out_dtype=, use_fast_accum=)` through
    `vendor.scaled_mm`, which holds every device to CUDA's contract (torch's CPU kernel would accept
    more): K and N multiples of 16, row-wise scales with bf16 output and an e4m3 `b` only; anything
    else raises `vendor.ContractError` before any work. torch refuses a tensorwise scale mixed with
    a rowwise one ("Invalid scaling configuration"), so a mixed pair is passed as two rowwise scales
    (the tensorwise one broadcast: the same product, under the row-wise rules).
    """
    rowwise = _check(a, b, scale_a, scale_b, out_dtype, bias, use_fast_accum)
    return _scaled_mm(a, b, scale_a, scale_b, rowwise, out_dtype=out_dtype, bias=bias, use_fast_accum=use_fast_accum)


def _scaled_mm(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, rowwise: tuple[bool, bool], *,
               out_dtype: torch.dtype, bias: Tensor | None, use_fast_accum: bool) -> Tensor:
    """fp8_gemm_scaled_mm for validated arguments (`rowwise`: whether scale_a and scale_b are row-wise)."""
    rowwise_a, rowwise_b = rowwise
    if rowwise_a != rowwise_b:  # e.g. a rowwise GEMM over a single row, whose (1, 1) scale reads as tensorwise
        sa = scale_a.reshape(-1, 1).expand(a.size(0), 1).contiguous()
        sb = scale_b.reshape(1, -1).expand(1, b.size(0)).contiguous()
    else:
        sa = scale_a if rowwise_a else scale_a.reshape(())
        sb = scale_b if rowwise_b else scale_b.reshape(())
    return vendor.scaled_mm(a, b.t(), sa, sb, bias=bias, out_dtype=out_dtype, use_fast_accum=use_fast_accum)


def fp8_gemm_triton(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, *,
                    out_dtype: torch.dtype = torch.bfloat16, bias: Tensor | None = None,
                    use_fast_accum: bool = False, meta: dict | None = None, out: Tensor | None = None,
                    persistent: bool = False, config: str | TileConfig | None = None) -> Tensor:
    """The Triton kernel. Arguments as `fp8_gemm`, plus:

    config: one entry of FP8_GEMM_CONFIGS, by name (e.g. "128x128x64-w8-s6-g8") or the TileConfig;
        None: the default tiles of the shape class (`_meta`). No GPU has measured one entry against
        another, so the default stays what it was. Entries are compile-gated for sm_90; one marked
        fast_accum_only needs use_fast_accum=True, and persistent=True needs an output no wider than
        its persistent_out_bytes: anything else raises ValueError naming config.
    meta: raw tile override instead of config (BLOCK_M, BLOCK_N, BLOCK_K >= 16, GROUP_M, num_warps,
        num_stages, and NUM_SMS for the persistent kernel); tests use small tiles so that small
        shapes have several tiles, edge tiles and multi-step K loops.
    out: optional (M, N) out_dtype destination with unit column stride (any row stride, e.g. a view
        into a larger buffer); written in place and returned.
    persistent: the persistent TMA kernel (`_fp8_gemm_persistent_kernel`). TMA reads and writes
        16-byte aligned rows, so a, b and out need 16-byte aligned base pointers and row strides
        (K % 16 == 0 for contiguous fp8 operands; N % 8 for a contiguous 16-bit out, N % 4 for
        fp32); anything else raises ValueError naming the tensor.
    Returns (M, N) in out_dtype.
    """
    if triton is None:
        raise RuntimeError("fp8_gemm_triton needs triton installed")
    rowwise = _check(a, b, scale_a, scale_b, out_dtype, bias, use_fast_accum)
    return _triton(a, b, scale_a, scale_b, rowwise, out_dtype=out_dtype, bias=bias, use_fast_accum=use_fast_accum,
                   meta=meta, out=out, persistent=persistent, config=config)


def _triton(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, rowwise: tuple[bool, bool], *,
            out_dtype: torch.dtype, bias: Tensor | None, use_fast_accum: bool, meta: dict | None = None,
            out: Tensor | None = None, persistent: bool = False, config: str | TileConfig | None = None) -> Tensor:
    """fp8_gemm_triton for validated arguments (`rowwise`: whether scale_a and scale_b are row-wise)."""
    rowwise_a, rowwise_b = rowwise
    (m, k), n = a.shape, b.size(0)
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    elif (not isinstance(out, Tensor) or tuple(out.shape) != (m, n) or out.dtype != out_dtype
          or out.device != a.device or (out.stride(1) != 1 and n > 1)):
        raise ValueError(f"out must be an ({m}, {n}) {out_dtype} tensor on {a.device} with unit column stride")
    if config is not None:
        if meta is not None:
            raise ValueError("fp8_gemm_triton: pass config= or meta=, not both")
        meta = _config_for(config, a, out_dtype, use_fast_accum, persistent)
    elif meta is not None:
        meta = _check_meta(meta)
    if m == 0 or n == 0:
        return out
    meta = dict(meta or _meta(m, n, k, target_arch(a)))
    sa = scale_a.reshape(-1).contiguous() if rowwise_a else scale_a.reshape(())
    sb = scale_b.reshape(-1).contiguous() if rowwise_b else scale_b.reshape(())
    if persistent and k > 0:  # K = 0 (an empty sum: bias or zeros) has no TMA box to load
        for name, x in (("a", a), ("b", b), ("out", out)):
            _check_tma(x, name)
        bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
        num_sms = meta.get("NUM_SMS") or _num_sms(a)
        grid = (min(num_sms, triton.cdiv(m, bm) * triton.cdiv(n, bn)),)
        _fp8_gemm_persistent_kernel[grid](
            TensorDescriptor.from_tensor(a, [bm, bk]), TensorDescriptor.from_tensor(b, [bn, bk]),
            TensorDescriptor.from_tensor(out, [bm, bn]), sa, sb, bias if bias is not None else sa, m, n, k,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=meta["GROUP_M"], NUM_SMS=num_sms, ROWWISE_A=rowwise_a,
            ROWWISE_B=rowwise_b, HAS_BIAS=bias is not None, FAST_ACCUM=use_fast_accum, num_warps=meta["num_warps"],
            num_stages=meta["num_stages"])
        return out
    grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    # max(stride, 1): a (M, 0) operand may report row stride 0; with K = 0 nothing is loaded anyway.
    # BIAS gets a dummy pointer when absent (HAS_BIAS=False compiles the load away).
    _fp8_gemm_kernel[grid](
        a, b, out, sa, sb, bias if bias is not None else sa, m, n, k, max(a.stride(0), 1), max(b.stride(0), 1),
        max(out.stride(0), 1),
        BLOCK_M=meta["BLOCK_M"], BLOCK_N=meta["BLOCK_N"], BLOCK_K=meta["BLOCK_K"], GROUP_M=meta["GROUP_M"],
        EVEN_K=k % meta["BLOCK_K"] == 0, ROWWISE_A=rowwise_a, ROWWISE_B=rowwise_b, HAS_BIAS=bias is not None,
        FAST_ACCUM=use_fast_accum, num_warps=meta["num_warps"], num_stages=meta["num_stages"])
    return out


# Under torch.compile a kernel backend is one opaque op (Dynamo cannot trace into a Triton launch,
# and under the interpreter not at all); eager calls skip the op dispatcher. `config` travels by
# name (a schema takes no TileConfig), `rowwise` as the two flags `_check` derived.

@torch.library.custom_op("nanofast::fp8_gemm", mutates_args=())
def _fp8_gemm_op(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, out_dtype: torch.dtype,
                 bias: Tensor | None, use_fast_accum: bool, rowwise_a: bool, rowwise_b: bool, config: str | None,
                 backend: str) -> Tensor:
    """(M, N) out_dtype: launcher `backend`'s GEMM of validated arguments."""
    return OP.launcher(backend).gemm(a, b, scale_a, scale_b, (rowwise_a, rowwise_b), config=config,
                                     out_dtype=out_dtype, bias=bias, use_fast_accum=use_fast_accum)


@_fp8_gemm_op.register_fake
def _(a, b, scale_a, scale_b, out_dtype, bias, use_fast_accum, rowwise_a, rowwise_b, config, backend):
    return a.new_empty((a.size(0), b.size(0)), dtype=out_dtype)


def fp8_gemm(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, *, out_dtype: torch.dtype = torch.bfloat16,
             bias: Tensor | None = None, use_fast_accum: bool = False, backend: str | None = None,
             config: str | None = None) -> Tensor:
    """out = (a.float() * scale_a) @ (b.float() * scale_b).T (+ bias), fp32 accumulation, rounded once.

    Args:
        a: (M, K) float8_e4m3fn or float8_e5m2, unit stride along K (row-major activations).
        b: (N, K) float8_e4m3fn or float8_e5m2, unit stride along K (F.linear's weight layout).
            e5m2 x e4m3 and e4m3 x e5m2 are allowed (backward GEMMs take e5m2 gradients);
            e5m2 x e5m2 raises ValueError, as torch._scaled_mm does on CUDA.
        scale_a: fp32, tensorwise (shape (), (1,) or (1, 1)) or rowwise (M, 1) (per row of a).
        scale_b: fp32, tensorwise or rowwise (1, N) (per row of b = per output column).
        out_dtype: torch.bfloat16, torch.float16 or torch.float32.
        bias: optional (N,) in out_dtype, which must then be bf16 or fp16 (torch._scaled_mm's rule,
            held on every backend); added in fp32 before the single rounding.
        use_fast_accum: False promotes partial sums to an fp32 accumulator every BLOCK_K (split
            accumulator); True keeps the whole reduction in the tensor core's accumulator (faster,
            less accurate on Hopper; the forward pass only). See the module docstring.
        backend: "torch", "triton", "triton_persistent", "scaled_mm" or None (triton on CUDA,
            torch on CPU).
        config: the Triton kernels' tiles, a name from FP8_GEMM_CONFIGS (see `fp8_gemm_triton`), or
            None for the default; only with a Triton backend (ValueError otherwise).
    Returns:
        (M, N) tensor in out_dtype, contiguous, on a's device. Under torch.compile(fullgraph=True) a
        Triton backend runs as the `nanofast::fp8_gemm` custom op (torch and scaled_mm are traced).
    """
    if backend is not None and backend not in OP.choices:
        raise ValueError(f"backend must be one of {OP.choices} or None, got {backend!r}")
    if config is not None and backend in ("torch", "scaled_mm"):
        raise ValueError(f"config={config!r} picks the Triton kernels' tiles; backend={backend!r} has none")
    if not isinstance(a, Tensor):
        raise TypeError(f"a must be a tensor, got {type(a).__name__}")
    be = resolve_backend(backend, a, OP.choices)  # a Triton backend on CPU needs the interpreter
    if config is not None and be == "torch":
        raise ValueError(f"config={config!r} picks the Triton kernels' tiles, but backend resolved to 'torch' "
                         "(pass backend='triton' or 'triton_persistent')")
    rowwise = OP.checks["fp8_gemm"](a, b, scale_a, scale_b, out_dtype, bias, use_fast_accum)
    kwargs = dict(out_dtype=out_dtype, bias=bias, use_fast_accum=use_fast_accum)
    if be == "torch":
        return _reference(a, b, scale_a, scale_b, rowwise, **kwargs)
    if be == "scaled_mm":
        return _scaled_mm(a, b, scale_a, scale_b, rowwise, **kwargs)
    if not torch.compiler.is_compiling():
        return OP.launcher(be).gemm(a, b, scale_a, scale_b, rowwise, config=config, **kwargs)
    if config is not None:  # checked here, so a bad config raises at trace time as it would eagerly
        config = select_config(config, FP8_GEMM_CONFIGS, "config", "fp8_gemm_triton").name
    return torch.ops.nanofast.fp8_gemm(a, b, scale_a, scale_b, out_dtype, bias, use_fast_accum, *rowwise, config, be)


# --------------------------------------------------------------------------------------------
# Configurations an H100 runs (compiled and checked by the compile gate)
# --------------------------------------------------------------------------------------------

def _config(m: int, n: int, k: int, a_dtype: torch.dtype, b_dtype: torch.dtype, out_dtype: torch.dtype,
            rowwise: bool, fast_accum: bool, bias: bool = False, persistent: bool = False,
            cfg: TileConfig | None = None) -> dict:
    """compile_triton kwargs of one launch: the default tiles of (m, n, k), or entry `cfg`."""
    meta = _meta(m, n, k, 90) if cfg is None else _config_meta(cfg)
    bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
    a_t, b_t, c_t = _TL_DTYPE[a_dtype], _TL_DTYPE[b_dtype], _TL_DTYPE[out_dtype]
    const = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=meta["GROUP_M"])
    if persistent:
        # The descriptors' types carry their box shapes; the launcher asserts the 16-byte rows.
        const["NUM_SMS"] = 132  # H100 SXM
        types = {"a_desc": f"tensordesc<{a_t}[{bm}, {bk}]>", "b_desc": f"tensordesc<{b_t}[{bn}, {bk}]>",
                 "c_desc": f"tensordesc<{c_t}[{bm}, {bn}]>"}
        aligned = ("SA", "SB", "BIAS", "N", "K")
    else:
        const["EVEN_K"] = k % bk == 0
        types = {"A": f"*{a_t}", "B": f"*{b_t}"}
        # What Triton's launcher specialises for contiguous nanochat operands: 16-byte aligned
        # pointers, sizes and row strides multiples of 16 (every nanochat width is).
        aligned = ("A", "B", "C", "SA", "SB", "BIAS", "N", "K", "stride_am", "stride_bn", "stride_cm")
    const.update(ROWWISE_A=rowwise, ROWWISE_B=rowwise, HAS_BIAS=bias, FAST_ACCUM=fast_accum)
    fn = _fp8_gemm_persistent_kernel if persistent else _fp8_gemm_kernel
    sig = gate_signature(fn, const, c_t, {**types, "SA": "*fp32", "SB": "*fp32"})
    label = (f"{a_t}x{b_t}->{c_t} m={m} n={n} k={k} {'rowwise' if rowwise else 'tensorwise'} "
             f"{'fast' if fast_accum else 'split'}{' bias' if bias else ''}"
             f"{'' if cfg is None else ' config=' + cfg.name} BLOCK={bm}x{bn}x{bk} "
             f"warps={meta['num_warps']} stages={meta['num_stages']}{' persistent' if persistent else ''}")
    return dict(fn=fn, signature=sig, constexprs=const, aligned=aligned, num_warps=meta["num_warps"],
                num_stages=meta["num_stages"], config=label)


def _kernel_configs() -> list[dict]:
    if triton is None:
        return []
    e4, e5, bf16, f32 = torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.float32
    big, small = 65536, 32  # B*T rows of a training step; a decode-sized M
    out = [
        # forward (e4m3 x e4m3 -> bf16), tensorwise and rowwise, fast and split accumulation
        _config(big, 1280, 1280, e4, e4, bf16, rowwise=False, fast_accum=True),
        _config(big, 1280, 1280, e4, e4, bf16, rowwise=False, fast_accum=False),
        _config(big, 5120, 1280, e4, e4, bf16, rowwise=True, fast_accum=True),
        _config(big, 5120, 1280, e4, e4, bf16, rowwise=True, fast_accum=False, bias=True),
        # backward: dgrad = dY (e5m2) @ W (e4m3); wgrad = dY^T (e5m2) @ X^T (e4m3), K = tokens
        _config(big, 1280, 5120, e5, e4, bf16, rowwise=False, fast_accum=False),
        _config(1280, 5120, big, e5, e4, bf16, rowwise=True, fast_accum=False),
        # small M (decode), and a K that is not a multiple of BLOCK_K (masked tail)
        _config(small, 65536, 1280, e4, e4, bf16, rowwise=True, fast_accum=True),
        _config(big, 768, 784, e4, e4, bf16, rowwise=False, fast_accum=False),
        # the persistent TMA kernel: fp8_linear's forward, dgrad and fp32 wgrad (the largest
        # epilogue staging buffer: a 64 KB fp32 tile on top of the 4 load stages), and decode M
        _config(big, 5120, 1280, e4, e4, bf16, rowwise=False, fast_accum=True, persistent=True),
        _config(big, 1280, 5120, e5, e4, bf16, rowwise=True, fast_accum=False, bias=True, persistent=True),
        _config(1280, 5120, big, e5, e4, f32, rowwise=False, fast_accum=False, persistent=True),
        _config(small, 65536, 1280, e4, e4, bf16, rowwise=True, fast_accum=True, persistent=True),
    ]
    return out + _space_configs(out)


def _space_configs(done: list[dict]) -> list[dict]:
    """Every entry of FP8_GEMM_CONFIGS in both kernels, in its most demanding allowed use (the split
    accumulator unless fast-only; persistent: the widest output it takes), unless `done` already
    compiles that (kernel, tiles, accumulation, output dtype)."""
    e4, bf16, f32 = torch.float8_e4m3fn, torch.bfloat16, torch.float32

    def key(c: dict) -> tuple:
        k = c["constexprs"]
        out_t = c["signature"]["c_desc" if "c_desc" in c["signature"] else "C"]
        return (c["fn"], k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], k["GROUP_M"], c["num_warps"], c["num_stages"],
                k["FAST_ACCUM"], "fp32" in out_t)

    seen = {key(c) for c in done}
    out = []
    for cfg in FP8_GEMM_CONFIGS:
        for persistent in (False, True):
            out_dtype = f32 if persistent and cfg.persistent_out_bytes >= 4 else bf16
            m = 32 if cfg.BLOCK_M == 64 else 65536  # the label's shape class (M is a runtime argument)
            c = _config(m, 5120, 1280, e4, e4, out_dtype, rowwise=True, fast_accum=cfg.fast_accum_only,
                        persistent=persistent, cfg=cfg)
            if key(c) not in seen:
                out.append(c)
    return out


KERNEL_CONFIGS: list[dict] = _kernel_configs()
"""Keyword arguments of `compile_gate.compile_triton`, built from the launcher's `_meta` and from
every entry of FP8_GEMM_CONFIGS, so `compile_triton(**cfg, arch=90)` compiles exactly what an H100
launches. Compile them in a process without TRITON_INTERPRET=1 (see `compile_gate.configs_facts`)."""


def cost(m: int, n: int, k: int, out_itemsize: int = 2) -> dict:
    """One (M, K) x (N, K)^T GEMM in fp8: both operands read once (1 byte each), the output written
    once (and read for nothing else), 2 M N K FLOPs."""
    return {"bytes": m * k + n * k + out_itemsize * m * n, "flops": 2 * m * n * k}


# The Triton backends' launchers (inputs trusted): the tiled kernel and the persistent TMA kernel.
TRITON_LAUNCHERS = SimpleNamespace(gemm=functools.partial(_triton, persistent=False))
TRITON_PERSISTENT_LAUNCHERS = SimpleNamespace(gemm=functools.partial(_triton, persistent=True))

OP = Op(name="fp8_gemm", vendor="scaled_mm", kernels=("triton", "triton_persistent"), unmeasured="scaled_mm",
        why="GEMM-class: torch._scaled_mm (cuBLASLt) is known correct and fast; the Triton fp8 GEMMs are unmeasured "
            "on a GPU",
        checks={"fp8_gemm": _check}, references={"fp8_gemm": fp8_gemm_reference}, vendor_path=fp8_gemm_scaled_mm,
        launchers={"triton": TRITON_LAUNCHERS, "triton_persistent": TRITON_PERSISTENT_LAUNCHERS}, cost=cost,
        configs=lambda arch=90: KERNEL_CONFIGS, part_of="fp8_linear")
