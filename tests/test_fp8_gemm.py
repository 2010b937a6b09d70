"""FP8 GEMM: the Triton kernel (run by the Triton interpreter, see tests/conftest.py) and
torch._scaled_mm against the fp64 dequantised product, argument checks, and the kernel compiled
for sm_90 (fp8 warpgroup MMAs, no spills, shared memory, the split accumulator's fp32 adds).

Error budgets, per element, against ref64 = (a * scale_a) @ (b * scale_b)^T + bias in fp64:
    fp32 out:       |out - ref64| <= (2 sqrt(K) + 4) eps32 * mag, mag = |a s_a| @ |b s_b|^T + |bias|
                    (fp8 x fp8 products are exact in fp32; the sum rounds ~sqrt(K) times the unit of
                    the running magnitude; scales, bias and the store add <= 4 roundings).
    fp16/bf16 out:  |out - rnd(ref64)| <= 1 ulp of rnd(ref64) in the out dtype, plus the fp32
                    budget (only visible where cancellation leaves a tiny result).
The interpreter's fp32 -> bf16 cast truncates instead of rounding to nearest (checked here:
2045 of 4096 random values differ from torch's cast), so bf16 outputs are tested with the same
1-ulp budget, which truncation also meets; the compiled kernel's cast is cvt.rn (checked in the
compile gate). The interpreter evaluates tl.dot exactly in fp32 (np.matmul + accumulator) whatever
use_fast_accum says, so both modes must meet the same budget here; the reduced-precision tensor
core accumulator only exists on a GPU.
"""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from nanofast.kernels.fp8_gemm import (FP8_GEMM_CONFIGS, KERNEL_CONFIGS, TileConfig, _config_meta, _meta,
                                       fp8_gemm, fp8_gemm_reference, fp8_gemm_triton)
from nanofast.kernels import vendor
from compile_gate_helpers import MAX_SHARED, config_ids, run_uninterpreted

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2
# Small tiles (16/32: tl.dot's minimum is 16) with BLOCK_M != BLOCK_N so a transposed index shows,
# GROUP_M = 2 so the grouped ordering has several groups and a ragged last one.
SMALL = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)
# (M, N, K): 1x1, non-multiples of every tile side (17, 33, 70, 130, 200), K below / not a multiple
# of BLOCK_K (16, 48: masked tail) and exact (64, 96, 256), and a K that is not a multiple of 16.
SHAPES = [(1, 1, 16), (17, 33, 48), (64, 64, 64), (70, 130, 96), (128, 200, 256), (5, 7, 17), (37, 48, 80)]
# The interpreter's cost is per program: the largest shape takes 32x64x64 tiles (4 x 4 tiles, a
# ragged N edge, 4 K-steps) to keep the suite fast.
MEDIUM = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=2, num_warps=4, num_stages=1)
OUT_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
PAIRS = [(E4, E4), (E5, E4), (E4, E5)]


def _fp8(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # randn * 2 spans e4m3's subnormals (< 2^-6) to ~8: exercises the whole significand range
    # without saturating (e4m3fn has no inf: out-of-range casts would give NaN).
    return (torch.randn(shape, generator=g) * 2).to(dtype)


def _scales(kind: str, m: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale_a, scale_b): tensorwise () values, rowwise (m, 1) / (1, n) ones spread over a few
    binades (like amax-derived scales of different rows), or 'mixed' (rowwise a, tensorwise b)."""
    g = torch.Generator().manual_seed(seed)

    def rowwise(count: int) -> torch.Tensor:
        return (torch.rand(count, generator=g) + 0.5) * 2.0 ** torch.randint(-3, 3, (count,), generator=g).float()

    sa = torch.tensor(0.37) if kind == "tensorwise" else rowwise(m).reshape(m, 1)
    sb = torch.tensor(1.25) if kind in ("tensorwise", "mixed") else rowwise(n).reshape(1, n)
    return sa, sb


def _ref64(a, b, sa, sb, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact product in fp64 and its magnitude |a s_a| @ |b s_b|^T + |bias|."""
    a64 = a.double() * (sa.double().reshape(-1, 1) if sa.numel() > 1 else sa.double().reshape(()))
    b64 = b.double() * (sb.double().reshape(-1, 1) if sb.numel() > 1 else sb.double().reshape(()))
    ref, mag = a64 @ b64.T, a64.abs() @ b64.abs().T
    if bias is not None:
        ref, mag = ref + bias.double(), mag + bias.double().abs()
    return ref, mag


_MANT = {torch.float16: 10, torch.bfloat16: 7}


def _assert_within_budget(out: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, k: int, where: str) -> None:
    assert torch.isfinite(out).all(), where
    fp32_budget = (2 * math.sqrt(k) + 4) * torch.finfo(torch.float32).eps * mag
    err = (out.double() - ref).abs()
    if out.dtype == torch.float32:
        bound = fp32_budget
    else:
        fi = torch.finfo(out.dtype)
        rounded = ref.to(out.dtype).double()
        ulp = torch.exp2(torch.floor(torch.log2(rounded.abs().clamp_min(fi.tiny))) - _MANT[out.dtype])
        err = (out.double() - rounded).abs()
        bound = ulp + fp32_budget
    worst = (err - bound).max().item()
    assert worst <= 0, f"{where}: max err {err.max().item():.3g}, over budget by {worst:.3g}"


@pytest.mark.parametrize("out_dtype", list(OUT_DTYPES), ids=OUT_DTYPES.get)
@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise", "mixed"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_fp64_reference(shape, scaling, out_dtype):
    """Triton (fast and split accumulation), the torch reference and torch._scaled_mm, each within
    the budget of the exact product. Operand pairs and bias dtypes rotate over the parameters, so
    every pair meets every scaling and out dtype across the shapes."""
    m, n, k = shape
    idx = SHAPES.index(shape) + ["tensorwise", "rowwise", "mixed"].index(scaling)
    da, db = PAIRS[idx % 3]
    # a bias only with a 16-bit output, in its dtype (torch._scaled_mm's rule, held on every backend)
    bias = None if idx % 2 or out_dtype == torch.float32 else \
        torch.randn(n, generator=torch.Generator().manual_seed(idx)).to(out_dtype)
    a, b = _fp8((m, k), da, seed=idx), _fp8((n, k), db, seed=idx + 100)
    sa, sb = _scales(scaling, m, n, seed=idx)
    ref, mag = _ref64(a, b, sa, sb, bias)
    where = f"{da}x{db} bias={None if bias is None else bias.dtype}"
    meta = MEDIUM if m * n > 10_000 else SMALL
    for fast in (False, True):
        out = fp8_gemm_triton(a, b, sa, sb, out_dtype=out_dtype, bias=bias, use_fast_accum=fast, meta=meta)
        assert out.shape == (m, n) and out.dtype == out_dtype
        _assert_within_budget(out, ref, mag, k, f"triton fast={fast} {where}")
        if k % 16:  # TMA needs 16-byte rows: refused (the error test checks the message)
            continue
        # The persistent TMA kernel on 3 programs (several tiles each, a ragged last round), into
        # an out view whose row stride is padded to 16 bytes as TMA requires.
        buf = torch.full((m, -(-n * out_dtype.itemsize // 16) * 16 // out_dtype.itemsize), float("nan"),
                         dtype=out_dtype)
        out = fp8_gemm_triton(a, b, sa, sb, out_dtype=out_dtype, bias=bias, use_fast_accum=fast,
                              meta=dict(meta, NUM_SMS=3), out=buf[:, :n], persistent=True)
        _assert_within_budget(out, ref, mag, k, f"persistent fast={fast} {where}")
        assert buf[:, n:].isnan().all(), "persistent kernel wrote past N"
    _assert_within_budget(fp8_gemm_reference(a, b, sa, sb, out_dtype=out_dtype, bias=bias), ref, mag, k,
                          "reference " + where)
    # torch._scaled_mm under its CUDA contract (kernels/vendor.py): K, N % 16; row-wise (mixed
    # scales are passed as two row-wise ones) writes bf16 with an e4m3 b. Refused otherwise, on CPU too.
    rowwise = sa.numel() > 1 or sb.numel() > 1
    if k % 16 or n % 16 or (rowwise and (out_dtype != torch.bfloat16 or db != E4)):
        with pytest.raises(vendor.ContractError, match=r"torch\._scaled_mm: .*\[.*; torch "):
            fp8_gemm(a, b, sa, sb, out_dtype=out_dtype, bias=bias, backend="scaled_mm")
    else:
        out = fp8_gemm(a, b, sa, sb, out_dtype=out_dtype, bias=bias, backend="scaled_mm")
        _assert_within_budget(out, ref, mag, k, "scaled_mm " + where)


def _nan_guarded(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """An fp8 view one row and 16 columns inside a NaN-filled buffer: reading past any edge shows."""
    rows, k = shape
    buf = torch.empty(rows + 3, k + 16, dtype=E4)
    buf.view(torch.uint8).fill_(0x7F)  # e4m3fn NaN
    buf[1:rows + 1, :k] = _fp8((rows, k), E4, seed)
    return buf[1:rows + 1, :k]


@pytest.mark.parametrize("k", [48, 64], ids=["masked-K", "even-K"])
def test_guard_bands_and_strided_operands(k):
    """Operands are views into fp8 buffers whose extra rows / columns are NaN, and the output is a
    view into a NaN buffer: the result must be finite (nothing past K or past M / N was read) and
    every element outside the (M, N) window must still be NaN (nothing written past the edges)."""
    m, n = 37, 45
    a, b = _nan_guarded((m, k), 1), _nan_guarded((n, k), 2)
    sa, sb = _scales("rowwise", m, n, seed=3)
    bias = torch.randn(n).half()
    out_buf = torch.full((m + 4, n + 40), float("nan"), dtype=torch.float16)
    out = out_buf[2:m + 2, 3:n + 3]
    got = fp8_gemm_triton(a, b, sa, sb, out_dtype=torch.float16, bias=bias, meta=SMALL, out=out)
    assert got.data_ptr() == out.data_ptr()
    ref, mag = _ref64(a, b, sa, sb, bias)
    _assert_within_budget(out, ref, mag, k, "strided")
    guard = torch.ones_like(out_buf, dtype=torch.bool)
    guard[2:m + 2, 3:n + 3] = False
    assert out_buf[guard].isnan().all()


def test_persistent_guard_bands_and_tma_zero_fill():
    """The persistent kernel reads operands through TMA boxes that hang over every edge (M, N and
    the K tail): the descriptors' bounds must zero-fill them, so the NaN guard bands around the
    operand views are never read, and its clipped stores leave the NaN around the out view alone."""
    m, n, k = 37, 45, 48  # K = 48: a 32-wide K tail box half out of bounds
    a, b = _nan_guarded((m, k), 1), _nan_guarded((n, k), 2)  # 16-byte aligned rows and bases
    sa, sb = _scales("rowwise", m, n, seed=3)
    bias = torch.randn(n).half()
    out_buf = torch.full((m + 4, 88), float("nan"), dtype=torch.float16)  # 176-byte rows
    out = out_buf[2:m + 2, 8:n + 8]
    for meta in (dict(SMALL, NUM_SMS=3), dict(MEDIUM, NUM_SMS=1)):
        out_buf.fill_(float("nan"))
        got = fp8_gemm_triton(a, b, sa, sb, out_dtype=torch.float16, bias=bias, meta=meta, out=out, persistent=True)
        assert got.data_ptr() == out.data_ptr()
        ref, mag = _ref64(a, b, sa, sb, bias)
        _assert_within_budget(out, ref, mag, k, f"persistent {meta}")
        guard = torch.ones_like(out_buf, dtype=torch.bool)
        guard[2:m + 2, 8:n + 8] = False
        assert out_buf[guard].isnan().all()


def test_persistent_refuses_unaligned_rows():
    """TMA rows must be 16-byte aligned: each misaligned tensor is named, nothing is launched."""
    s = torch.tensor(1.0)
    a, b = _fp8((8, 32), E4, 0), _fp8((16, 32), E4, 1)
    cases = [
        (dict(a=_fp8((8, 24), E4, 0), b=_fp8((16, 24), E4, 1)), "^a: the persistent TMA kernel"),
        (dict(b=_fp8((16, 40), E4, 3)[:, :32]), "^b: the persistent TMA kernel"),
        (dict(a=_fp8((8 * 32 + 8,), E4, 4)[8:].view(8, 32)), "^a: .*data_ptr % 16 = 8"),
        (dict(out=torch.empty(8, 20, dtype=torch.bfloat16)[:, :16]), "^out: the persistent TMA kernel"),
    ]
    for over, msg in cases:
        kw = dict(dict(a=a, b=b), **over)
        with pytest.raises(ValueError, match=msg):
            fp8_gemm_triton(kw["a"], kw["b"], s, s, out=kw.get("out"), meta=SMALL, persistent=True)
    # a 48-byte row stride is 16-byte aligned: accepted
    wide = _fp8((8, 48), E4, 2)[:, :32]
    ref, mag = _ref64(wide, b, s, s, None)
    _assert_within_budget(fp8_gemm_triton(wide, b, s, s, out_dtype=torch.float32, meta=dict(SMALL, NUM_SMS=2),
                                          persistent=True), ref, mag, 32, "strided a")
    with pytest.raises(ValueError, match="^a: the persistent TMA kernel"):
        fp8_gemm(_fp8((8, 24), E4, 0), _fp8((16, 24), E4, 1), s, s, backend="triton_persistent")


def test_launcher_default_tiles_and_dispatch():
    """The launcher's own tile classes (64x128x128 for M <= 64, 128x128x128 above) and the backend
    dispatch: None on CPU is the reference, 'triton' the kernel, 'scaled_mm' torch._scaled_mm."""
    assert (_meta(32, 4096, 1280)["BLOCK_M"], _meta(4096, 4096, 1280)["BLOCK_M"]) == (64, 128)
    for m, n, k in [(3, 130, 256), (70, 130, 96)]:
        a, b = _fp8((m, k), E4, 7), _fp8((n, k), E5, 8)
        sa, sb = torch.tensor(1.5), _scales("rowwise", m, n, 9)[1]
        ref, mag = _ref64(a, b, sa, sb, None)
        _assert_within_budget(fp8_gemm(a, b, sa, sb, out_dtype=torch.float32, backend="triton"), ref, mag, k, "tri")
        want = fp8_gemm_reference(a, b, sa, sb, out_dtype=torch.float16)
        assert torch.equal(fp8_gemm(a, b, sa, sb, out_dtype=torch.float16), want)
        assert torch.equal(fp8_gemm(a, b, sa, sb, out_dtype=torch.float16, backend="torch"), want)
        # 'triton_persistent' allocates a contiguous out: TMA needs N * 4 bytes % 16 == 0 for fp32
        out = fp8_gemm(a, b[:128], sa, sb[:, :128], out_dtype=torch.float32, backend="triton_persistent")
        _assert_within_budget(out, ref[:, :128], mag[:, :128], k, "persistent")
    with pytest.raises(ValueError, match="backend must be one of"):
        fp8_gemm(a, b, sa, sb, backend="cuda")


def test_empty_and_zero_k():
    sa = torch.tensor(2.0)
    for m, n in [(0, 5), (4, 0)]:
        out = fp8_gemm_triton(_fp8((m, 16), E4, 0), _fp8((n, 16), E4, 1), sa, sa, meta=SMALL)
        assert out.shape == (m, n) and out.dtype == torch.bfloat16
    # K = 0: the sum is empty, the output is the bias (rounded once) or zero.
    a, b = torch.empty(3, 0, dtype=E4), torch.empty(5, 0, dtype=E4)
    bias = torch.randn(5).half()
    out = fp8_gemm_triton(a, b, sa, sa, out_dtype=torch.float16, bias=bias, meta=SMALL)
    assert torch.equal(out, bias.half().expand(3, 5))
    assert torch.equal(fp8_gemm_triton(a, b, sa, sa, out_dtype=torch.float32, meta=SMALL), torch.zeros(3, 5))
    # the persistent kernel has no K = 0 box to load: the pointer kernel writes the empty sum
    out = torch.empty(3, 8, dtype=torch.float16)[:, :5]
    fp8_gemm_triton(a, b, sa, sa, out_dtype=torch.float16, bias=bias, meta=SMALL, out=out, persistent=True)
    assert torch.equal(out, bias.half().expand(3, 5))


def test_errors_name_the_argument():
    a, b = _fp8((8, 32), E4, 0), _fp8((16, 32), E4, 1)
    s = torch.tensor(1.0)
    cases = [
        (dict(a=a.float()), TypeError, "a must be float8_e4m3fn or float8_e5m2"),
        (dict(b=b.half()), TypeError, "b must be float8"),
        (dict(a=[1.0]), TypeError, "a must be a tensor"),
        (dict(a=a[0]), ValueError, r"a must be 2-D \(M, K\)"),
        (dict(b=b.unsqueeze(0)), ValueError, r"b must be 2-D \(N, K\)"),
        (dict(b=_fp8((16, 48), E4, 2)), ValueError, "b must be .N, K. with K = a.shape.1. = 32"),
        (dict(a=a.float().to(E5), b=b.float().to(E5)), ValueError, "both float8_e5m2"),
        (dict(a=_fp8((32, 8), E4, 3).t()), ValueError, "a must have unit stride along K"),
        (dict(b=_fp8((32, 16), E4, 4).t()), ValueError, "b must have unit stride along K"),
        (dict(scale_a=torch.tensor(1.0, dtype=torch.float64)), TypeError, "scale_a must be float32"),
        (dict(scale_b=2.0), TypeError, "scale_b must be a float32 tensor"),
        (dict(scale_a=torch.ones(1, 8)), ValueError, r"scale_a must be .* rowwise of shape \(8, 1\)"),
        (dict(scale_b=torch.ones(16, 1)), ValueError, r"scale_b must be .* rowwise of shape \(1, 16\)"),
        (dict(out_dtype=torch.float8_e4m3fn), TypeError, "out_dtype must be"),
        (dict(bias=torch.zeros(15)), ValueError, r"bias must have shape \(N,\) = \(16,\)"),
        (dict(bias=torch.zeros(16, dtype=torch.float16)), TypeError, "bias must be out_dtype"),
        (dict(bias=torch.zeros(16)), TypeError, r"bias must be out_dtype \(torch.bfloat16\), got torch.float32"),
        (dict(bias=torch.zeros(16), out_dtype=torch.float32), ValueError, "bias needs a bf16 or fp16 out_dtype"),
        (dict(use_fast_accum=1), TypeError, "use_fast_accum must be a bool"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
    ]
    for over, exc, msg in cases:
        kw = dict(a=a, b=b, scale_a=s, scale_b=s, out_dtype=torch.bfloat16, backend="triton")
        kw.update(over)
        for backend in ({kw["backend"]} if "backend" in over else {"triton", "torch", "scaled_mm"}):
            args = dict(kw, backend=backend)
            with pytest.raises(exc, match=msg):
                fp8_gemm(args.pop("a"), args.pop("b"), args.pop("scale_a"), args.pop("scale_b"), **args)
    with pytest.raises(ValueError, match="out must be"):
        fp8_gemm_triton(a, b, s, s, out=torch.empty(8, 16), meta=SMALL)  # fp32 buffer for bf16 out


# --------------------------------------------------------------------------------------------
# The configuration space: every entry runs in both kernels (interpreter) at the smallest shapes
# that still give a partial edge tile in M and N and a K loop with a partial last step, within the
# budgets above; the entries' limits are refused with errors that name config.
# --------------------------------------------------------------------------------------------

def test_config_space_is_named_documented_and_holds_the_defaults():
    names = [c.name for c in FP8_GEMM_CONFIGS]
    assert len(set(names)) == len(names) and 3 <= len(names) <= 8
    for c in FP8_GEMM_CONFIGS:
        assert c.why and c.name == f"{c.BLOCK_M}x{c.BLOCK_N}x{c.BLOCK_K}-w{c.num_warps}-s{c.num_stages}-g{c.GROUP_M}"
        # fp8 wgmma: a warpgroup (4 warps) per 64 rows, N <= 256, k32 steps
        assert c.num_warps == 4 * (c.BLOCK_M // 64) and c.BLOCK_N <= 256 and c.BLOCK_K % 32 == 0
        assert c.num_stages * c.stage_bytes(1) <= 227 * 1024
        if c.persistent_out_bytes:  # load stages + the TMA epilogue tile of the widest output it takes
            assert c.num_stages * c.stage_bytes(1) + c.BLOCK_M * c.BLOCK_N * c.persistent_out_bytes <= 227 * 1024
        # split accumulation doubles the accumulator: only tiles whose two copies fit 128 registers
        assert c.fast_accum_only == (2 * c.acc_registers() > 128), c.name
    for m in (1, 64, 65, 65536):
        assert any(_config_meta(c) == _meta(m, 1280, 1280) for c in FP8_GEMM_CONFIGS), m
    assert {c.GROUP_M for c in FP8_GEMM_CONFIGS} == {1, 8}  # row-major and grouped program order


@pytest.mark.parametrize("persistent", [False, True], ids=["tiled", "persistent"])
@pytest.mark.parametrize("cfg", FP8_GEMM_CONFIGS, ids=lambda c: c.name)
def test_config_space_executes(cfg, persistent):
    m, n, k = cfg.BLOCK_M + 3, cfg.BLOCK_N + 5, cfg.BLOCK_K + 48  # K % 16 == 0 (TMA rows), a partial K step
    out_dtype = torch.float32 if persistent and cfg.persistent_out_bytes >= 4 else torch.bfloat16
    a, b = _fp8((m, k), E4, seed=20), _fp8((n, k), E5 if persistent else E4, seed=21)
    sa, sb = _scales("rowwise", m, n, seed=22)
    bias = None if out_dtype == torch.float32 else torch.randn(n, generator=torch.Generator().manual_seed(23)).to(out_dtype)
    ref, mag = _ref64(a, b, sa, sb, bias)
    # a padded out view: an odd N of 16-bit elements is no 16-byte TMA row on its own
    buf = torch.full((m, n + 11), float("nan"), dtype=out_dtype)
    got = fp8_gemm_triton(a, b, sa, sb, out_dtype=out_dtype, bias=bias, use_fast_accum=cfg.fast_accum_only,
                          config=cfg.name, out=buf[:, :n] if persistent else None, persistent=persistent)
    assert got.shape == (m, n) and got.dtype == out_dtype
    _assert_within_budget(got, ref, mag, k, f"{cfg.name} persistent={persistent}")
    if persistent:
        assert buf[:, n:].isnan().all(), "persistent kernel wrote past N"


def test_fp8_gemm_takes_a_config_for_the_triton_backends():
    a, b = _fp8((70, 64), E4, seed=24), _fp8((40, 64), E4, seed=25)
    s = torch.tensor(0.5)
    ref, mag = _ref64(a, b, s, s, None)
    for backend in ("triton", "triton_persistent"):
        out = fp8_gemm(a, b, s, s, out_dtype=torch.float32, backend=backend, config="128x128x64-w8-s6-g8")
        _assert_within_budget(out, ref, mag, 64, backend)
    cfg = FP8_GEMM_CONFIGS[0]  # the TileConfig itself works as well as its name
    _assert_within_budget(fp8_gemm_triton(a, b, s, s, out_dtype=torch.float32, config=cfg), ref, mag, 64, cfg.name)


def test_config_errors_name_the_argument():
    a, b = _fp8((8, 32), E4, 0), _fp8((16, 32), E4, 1)
    s = torch.tensor(1.0)
    wide = next(c for c in FP8_GEMM_CONFIGS if c.fast_accum_only)
    cases = [
        (dict(config="128x128x128"), r"^config must be one of \['64x128x128-w4-s4-g8'"),
        (dict(config=128), "config must be one of"),
        (dict(config=TileConfig("mine", 64, 64, 64, 4, 2)), "config='mine' is not an entry of the fp8_gemm_triton"),
        (dict(config="128x128x128-w8-s4-g8", meta=SMALL), "pass config= or meta=, not both"),
        (dict(config=wide.name), f"config='{wide.name}' needs use_fast_accum=True: .* 256 registers per thread"),
        (dict(config=wide.name, use_fast_accum=True, persistent=True, out_dtype=torch.float32),
         f"config='{wide.name}' with persistent=True takes outputs of at most 2 bytes"),
        (dict(meta=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)), r"meta must have the keys .* missing \['GROUP_M'"),
        (dict(meta=dict(SMALL, BLOCK=16)), r"unknown \['BLOCK'\]"),
        (dict(meta=dict(SMALL, BLOCK_N=48)), r"meta\['BLOCK_N'\] must be a positive int .a power of two"),
        (dict(meta=[16, 16, 16]), "meta must be a dict"),
    ]
    for over, msg in cases:
        kw = dict(out_dtype=torch.bfloat16)
        kw.update(over)
        with pytest.raises(ValueError, match=msg):
            fp8_gemm_triton(a, b, s, s, **kw)
    # the wide entry with fast accumulation and a bf16 out is accepted in both kernels
    fp8_gemm_triton(a, b, s, s, config=wide, use_fast_accum=True, persistent=True)
    for backend in ("torch", "scaled_mm", None):  # None on CPU resolves to torch
        with pytest.raises(ValueError, match="config='128x128x128-w8-s4-g8' picks the Triton kernels' tiles"):
            fp8_gemm(a, b, s, s, backend=backend, config="128x128x128-w8-s4-g8")
    with pytest.raises(ValueError, match="config must be one of"):
        fp8_gemm(a, b, s, s, backend="triton", config="nope")


# --------------------------------------------------------------------------------------------
# Compile gate: every H100 configuration compiled for sm_90 in a child process without the
# interpreter; facts from compile_gate plus the SASS text (fp8 MMA mnemonics, FADD count) and PTX.
# --------------------------------------------------------------------------------------------

MAX_REGISTERS = 255

_CHILD = r"""
import json, os, re, subprocess, sys, tempfile
from collections import Counter
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nanofast.kernels.compile_gate import cuda_tool, cubin_facts
from nanofast.kernels.fp8_gemm import KERNEL_CONFIGS

rows = []
for cfg in KERNEL_CONFIGS:
    names = list(cfg["signature"])
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in cfg["aligned"]}
    src = ASTSource(fn=cfg["fn"], signature=cfg["signature"], constexprs=cfg["constexprs"], attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
    facts = cubin_facts(ck.asm["cubin"], cfg["fn"].__name__, cfg["config"], 90)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(ck.asm["cubin"])
        sass = subprocess.run([cuda_tool("nvdisasm"), path], capture_output=True, text=True, check=True).stdout
    ops = Counter(re.findall(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)", sass, flags=re.M))
    ttir = ck.asm["ttir"]
    rows.append(dict(config=cfg["config"], registers=facts.registers,
                     shared=max(facts.shared_bytes, ck.metadata.shared), local=facts.local_bytes,
                     instructions=facts.instructions,
                     gmma={op: c for op, c in ops.items() if "GMMA" in op},
                     fadd=sum(c for op, c in ops.items() if op == "FADD" or op.startswith("FADD.")),
                     cvt_rn_bf16=ck.asm["ptx"].count("cvt.rn.bf16"),
                     i64_muls=len(re.findall(r"arith\.muli [^\n]*: i64", ttir))))
print(json.dumps(rows))
"""


@pytest.fixture(scope="module")
def gate_facts() -> list[dict]:
    return run_uninterpreted(_CHILD)


def test_kernel_configs_follow_the_launcher():
    by_name = {c.name: c for c in FP8_GEMM_CONFIGS}
    assert len({c["config"] for c in KERNEL_CONFIGS}) == len(KERNEL_CONFIGS)
    for c in KERNEL_CONFIGS:
        assert list(c["signature"]) == list(c["fn"].arg_names), c["config"]
        m, n, k = (int(tok.split("=")[1]) for tok in c["config"].split()[1:4])
        named = [tok[len("config="):] for tok in c["config"].split() if tok.startswith("config=")]
        meta = _config_meta(by_name[named[0]]) if named else _meta(m, n, k)
        assert c["num_warps"] == meta["num_warps"] and c["num_stages"] == meta["num_stages"], c["config"]
        assert all(c["constexprs"][key] == meta[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"))
        if c["fn"].__name__ == "_fp8_gemm_persistent_kernel":
            assert c["config"].endswith(" persistent") and c["constexprs"]["NUM_SMS"] == 132
            # the descriptors' boxes are the launcher's tiles
            bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
            assert [c["signature"][d].split("[")[1] for d in ("a_desc", "b_desc", "c_desc")] == [
                f"{bm}, {bk}]>", f"{bn}, {bk}]>", f"{bm}, {bn}]>"], c["config"]
        else:
            assert c["constexprs"]["EVEN_K"] == (k % meta["BLOCK_K"] == 0)
    labels = " | ".join(c["config"] for c in KERNEL_CONFIGS)
    for needed in ("fp8e4nvxfp8e4nv->bf16", "fp8e5xfp8e4nv->bf16", "fp8e5xfp8e4nv->fp32", "tensorwise", "rowwise",
                   " fast", " split", "persistent"):
        assert needed in labels, needed


def test_kernel_configs_cover_every_entry_of_the_space():
    """Every entry is compiled in both kernels, in its most demanding allowed use: the split
    accumulator unless fast-only, and (persistent) the widest output it takes."""
    for cfg in FP8_GEMM_CONFIGS:
        meta = _config_meta(cfg)
        for fn in ("_fp8_gemm_kernel", "_fp8_gemm_persistent_kernel"):
            hits = [c for c in KERNEL_CONFIGS if c["fn"].__name__ == fn and c["num_warps"] == meta["num_warps"]
                    and c["num_stages"] == meta["num_stages"]
                    and all(c["constexprs"][key] == meta[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"))]
            assert any(c["constexprs"]["FAST_ACCUM"] == cfg.fast_accum_only for c in hits), (cfg.name, fn)
            if fn == "_fp8_gemm_persistent_kernel" and cfg.persistent_out_bytes >= 4:
                assert any("fp32" in c["signature"]["c_desc"] for c in hits), (cfg.name, "fp32 out")


@pytest.mark.parametrize("index", range(len(KERNEL_CONFIGS)), ids=config_ids(KERNEL_CONFIGS))
def test_compile_gate_sm90(gate_facts, index):
    cfg, f = KERNEL_CONFIGS[index], gate_facts[index]
    where = json.dumps(f)
    assert f["config"] == cfg["config"], where
    # Hopper's fp8 warpgroup MMA is QGMMA in SASS (HGMMA is the fp16/bf16 one), with the operand
    # formats in the mnemonic: e.g. QGMMA.64x128x32.F32.E5M2.E4M3 for an e5m2 x e4m3 dot.
    fmt = {"fp8e4nv": "E4M3", "fp8e5": "E5M2"}
    persistent = cfg["fn"].__name__ == "_fp8_gemm_persistent_kernel"
    a_t, b_t = (re.search(r"(fp8e4nv|fp8e5)", cfg["signature"][name]).group(1)
                for name in (("a_desc", "b_desc") if persistent else ("A", "B")))
    want = f"QGMMA.64x{cfg['constexprs']['BLOCK_N']}x32.F32.{fmt[a_t]}.{fmt[b_t]}"
    assert set(f["gmma"]) == {want}, where
    # One k32 instruction per 32 of BLOCK_K, per m64 warpgroup row (the loop body is emitted once).
    assert f["gmma"][want] == cfg["constexprs"]["BLOCK_K"] // 32, where
    assert f["local"] == 0 and f["instructions"].get("STL", 0) == 0, "register spills: " + where
    assert f["registers"] <= MAX_REGISTERS and f["shared"] <= MAX_SHARED[90], where
    if persistent:
        # Tiles move by TMA (bulk tensor copies: one instruction per box), none by cp.async.
        assert f["instructions"].get("UTMALDG", 0) > 0 and f["instructions"].get("UTMASTG", 0) > 0, where
        assert f["instructions"].get("LDGSTS.E.BYPASS.128", 0) == 0, where
    else:
        # cp.async 16-byte tile loads (the software pipeline) and 128-bit output stores.
        assert f["instructions"].get("LDGSTS.E.BYPASS.128", 0) > 0, "tile loads not vectorised: " + where
        assert f["instructions"].get("STG.E.128", 0) > 0, "stores not vectorised: " + where
    # The split accumulator survives compilation as CUDA-core fp32 adds (one per accumulator
    # element per thread and K-step: BLOCK_M * BLOCK_N / threads); fast accumulation has none.
    c = cfg["constexprs"]
    per_thread = c["BLOCK_M"] * c["BLOCK_N"] // (32 * cfg["num_warps"])
    if c["FAST_ACCUM"]:
        assert f["fadd"] == 0, where
    else:
        assert f["fadd"] >= per_thread, where
    # bf16 output rounds to nearest even in compiled code (the interpreter truncates).
    if "bf16" in cfg["signature"]["c_desc" if persistent else "C"]:
        assert f["cvt_rn_bf16"] > 0, where
    if not persistent:  # TMA coordinates are int32 box indices; the descriptor holds 64-bit strides
        assert f["i64_muls"] > 0, "no int64 panel offsets: " + where
