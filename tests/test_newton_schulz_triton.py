"""Triton Newton-Schulz kernels (run by the Triton interpreter, see tests/conftest.py) against torch
matmuls, end to end against backend="torch", and compiled for sm_90 by the compile gate.

bf16 is not run here (the interpreter multiplies bf16 bit patterns); the kernels differ between
fp16 and bf16 only in dtype, and the bf16 configurations are compiled and checked below.
"""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from nanofast.kernels.newton_schulz import POLAR_EXPRESS_COEFFS, nesterov_normalize_, newton_schulz
from nanofast.kernels.newton_schulz_triton import (KERNEL_CONFIGS, KERNEL_CONFIGS_SM80, NS_CONFIGS,
                                                   NS_GRAM_CONFIGS, NS_ITERATION_CONFIGS, NS_UPDATE_CONFIGS,
                                                   PROLOGUE_CONFIGS, TileConfig, _config_meta, _meta,
                                                   _ns_upper_tile, newton_schulz_triton, ns_gram_triton,
                                                   ns_poly_triton, ns_update_triton)
from compile_gate_helpers import check_common_facts, config_ids, gate_facts_fixture

# Small tiles (16 is tl.dot's minimum) so that shapes of a few dozen rows already have several
# tile rows, off-diagonal mirrored tiles, partial edge tiles and a multi-step K loop.
SMALL = dict(BLOCK=16, BLOCK_K=16, num_warps=4, num_stages=1)
# (batch, m, n) with m <= n: 1x1, 1x9, non-multiples of the tile (17, 33, 70, 130) and an exact one.
SHAPES = [(1, 1, 1), (3, 1, 9), (1, 17, 40), (3, 33, 70), (1, 64, 64), (1, 70, 130)]
DTYPES = [torch.float32, torch.float16]
DT_ID = {torch.float32: "fp32", torch.float16: "fp16"}


def _meta_for(dtype: torch.dtype) -> dict:
    return dict(SMALL, PRECISION="ieee" if dtype == torch.float32 else "tf32")


def _budget(out: torch.Tensor, ref64: torch.Tensor, torch_out: torch.Tensor, dtype: torch.dtype) -> None:
    """fp32: within 8x torch's own fp32 error (+ a few ulps of the largest entry; a different but
    equally valid summation order). fp16: within 2x torch's fp16 error vs fp64 plus one fp16 ulp of
    the largest entry (the output is rounded to fp16 once, exactly like torch's)."""
    err = (out.double() - ref64).abs().max().item()
    torch_err = (torch_out.double() - ref64).abs().max().item()
    scale = ref64.abs().max().item()
    if dtype == torch.float32:
        bound = 8 * torch_err + 8 * torch.finfo(torch.float32).eps * scale + 1e-30
    else:
        bound = 2 * torch_err + torch.finfo(torch.float16).eps * scale + 1e-30
    assert err <= bound, (err, torch_err, bound)


def _rand(shape, dtype, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


@triton.jit
def _upper_tile_probe(out, n, BLOCK: tl.constexpr):
    pids = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    r, c = _ns_upper_tile(pids)
    tl.store(out + 2 * pids, r, mask=pids < n)
    tl.store(out + 2 * pids + 1, c, mask=pids < n)


def test_upper_tile_enumeration_covers_each_upper_tile_once():
    """The symmetric kernels launch tiles * (tiles + 1) / 2 programs and decode their tile from
    the program id: every upper-triangle tile must come out exactly once, up to 2^12 tile rows
    (m = 2^18 at 64-wide tiles, far past any Gram side Muon meets)."""
    for tiles in (1, 2, 3, 7, 64, 4096):
        n = tiles * (tiles + 1) // 2
        got = torch.full((n, 2), -1, dtype=torch.int32)
        _upper_tile_probe[(triton.cdiv(n, 1 << 16),)](got, n, BLOCK=1 << 16)
        rows, cols = torch.triu_indices(tiles, tiles)
        order = torch.argsort(cols * tiles + rows)  # column by column, rows ascending
        expected = torch.stack([rows[order], cols[order]], dim=1).to(torch.int32)
        assert torch.equal(got, expected), tiles


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gram_matches_torch_and_is_exactly_symmetric(shape, dtype):
    X = _rand(shape, dtype)
    A = ns_gram_triton(X, _meta_for(dtype))
    assert A.shape == (shape[0], shape[1], shape[1]) and A.dtype == dtype
    assert torch.equal(A, A.mT)  # bitwise, including the diagonal tiles
    _budget(A, X.double() @ X.double().mT, X @ X.mT, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_poly_matches_torch_and_is_exactly_symmetric(shape, dtype):
    bsz, m, _ = shape
    Y = _rand((bsz, m, m), torch.float64, seed=1)
    A = (Y + Y.mT).to(dtype)  # exactly symmetric input, as the Gram kernel produces
    b, c = -2.808917465908714, 0.5000178451051316
    B = ns_poly_triton(A, b, c, _meta_for(dtype))
    assert torch.equal(B, B.mT)
    A64 = A.double()
    _budget(B, b * A64 + c * (A64 @ A64), b * A + c * (A @ A), dtype)


@pytest.mark.parametrize("shape", [(1, 33, 33), (2, 70, 70)], ids=lambda s: "x".join(map(str, s)))
def test_poly_output_is_the_mirrored_upper_triangle(shape):
    # The interpreter's dot is symmetric anyway, so feed a NON-symmetric A: only the explicit
    # diagonal-tile symmetrisation and the off-diagonal-only mirror store make the output the
    # upper triangle of the dense product mirrored, and bitwise symmetric.
    A = _rand(shape, torch.float32, seed=6)
    B = ns_poly_triton(A, 0.5, 0.25, _meta_for(torch.float32))
    A64 = A.double()
    dense = 0.5 * A64 + 0.25 * (A64 @ A64)
    expected = dense.triu() + dense.triu(1).mT
    assert torch.equal(B, B.mT)
    assert (B.double() - expected).abs().max().item() <= 1e-5 * dense.abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_update_matches_torch(shape, dtype):
    bsz, m, n = shape
    X = _rand(shape, dtype, seed=2)
    B = _rand((bsz, m, m), dtype, seed=3)
    a = 3.8916678022926607
    # Guard: the output is a fresh tensor and X is left untouched (other programs read it).
    X_before = X.clone()
    out = ns_update_triton(X, B, a, _meta_for(dtype))
    assert torch.equal(X, X_before) and out.data_ptr() != X.data_ptr()
    _budget(out, a * X.double() + B.double() @ X.double(), a * X + B @ X, dtype)


def test_launcher_default_meta_and_non_contiguous_input():
    # The launchers' own tile classes (64-wide here) and a strided view (copied to unit stride).
    X = _rand((2, 40, 130), torch.float32, seed=4)[:, :, ::2]
    A = ns_gram_triton(X)
    assert torch.equal(A, A.mT)
    _budget(A, X.double() @ X.double().mT, X @ X.mT, torch.float32)
    assert _meta(768, torch.bfloat16)["BLOCK_M"] == 64 and _meta(4096, torch.bfloat16)["BLOCK_M"] == 128


# --------------------------------------------------------------------------------------------
# The configuration spaces: every entry runs (interpreter, fp16: the spaces are gated for 16-bit
# operands) at the smallest shapes that still give a partial edge tile in M and N and a masked K
# tail, against torch with the budgets above. Big tiles are slow interpreted: batch 1, one shape.
# --------------------------------------------------------------------------------------------

def _space_shape(cfg: TileConfig) -> tuple[int, int, int]:
    """(batch, m, n), m <= n, both odd: one full and one partial tile row; n one partial column tile
    past BLOCK_N and a K loop (over n for gram, over m for poly / update) with a masked tail."""
    m = cfg.BLOCK_M + 3
    return 1, m, max(m, cfg.BLOCK_N) + 5


def test_config_spaces_are_named_documented_and_hold_the_defaults():
    for kernel, space in NS_CONFIGS.items():
        names = [c.name for c in space]
        assert len(names) == len(set(names)) and 3 <= len(space) <= 8, kernel
        for c in space:
            assert c.why and c.name == f"{c.BLOCK_M}x{c.BLOCK_N}x{c.BLOCK_K}-w{c.num_warps}-s{c.num_stages}"
            # wgmma: 4 warps (one warpgroup) per 64 rows; 128x256 at most; stages fit 227 KB
            assert c.num_warps == 4 * (c.BLOCK_M // 64) and c.BLOCK_M <= 128 and c.BLOCK_N <= 256
            assert c.num_stages * c.stage_bytes(2) <= 227 * 1024
            if kernel != "update":
                assert c.BLOCK_M == c.BLOCK_N, (kernel, c.name)  # the mirrored store needs square tiles
        # the defaults of both shape classes are entries of every space (fp32: half the K depth, and
        # 2 stages for the small class, where 4 spilled)
        for m in (768, 4096):
            for dt in (torch.bfloat16, torch.float32):
                want = _meta(m, dt)
                if dt == torch.float32 and m == 768:
                    assert want["num_stages"] == 2
                    want = dict(want, num_stages=4)
                assert any(_config_meta(c, dt) == want for c in space), (kernel, m, dt)
    assert {c.name for c in NS_ITERATION_CONFIGS} == {c.name for c in NS_GRAM_CONFIGS}
    assert any(c.BLOCK_M != c.BLOCK_N for c in NS_UPDATE_CONFIGS)


@pytest.mark.parametrize("cfg", NS_GRAM_CONFIGS, ids=lambda c: c.name)
def test_gram_config_space_executes(cfg):
    bsz, m, n = _space_shape(cfg)
    X = _rand((bsz, m, n), torch.float16, seed=12)
    A = ns_gram_triton(X, config=cfg.name)
    assert A.shape == (bsz, m, m) and torch.equal(A, A.mT)
    _budget(A, X.double() @ X.double().mT, X @ X.mT, torch.float16)


@pytest.mark.parametrize("cfg", NS_GRAM_CONFIGS, ids=lambda c: c.name)
def test_poly_config_space_executes(cfg):
    bsz, m, _ = _space_shape(cfg)
    Y = _rand((bsz, m, m), torch.float64, seed=13)
    A = (Y + Y.mT).to(torch.float16)
    b, c = -2.808917465908714, 0.5000178451051316
    B = ns_poly_triton(A, b, c, config=cfg)  # the TileConfig itself works as well as its name
    assert torch.equal(B, B.mT)
    A64 = A.double()
    _budget(B, b * A64 + c * (A64 @ A64), b * A + c * (A @ A), torch.float16)


@pytest.mark.parametrize("cfg", NS_UPDATE_CONFIGS, ids=lambda c: c.name)
def test_update_config_space_executes(cfg):
    bsz, m, n = _space_shape(cfg)
    X = _rand((bsz, m, n), torch.float16, seed=14)
    B = _rand((bsz, m, m), torch.float16, seed=15)
    a = 3.8916678022926607
    out = ns_update_triton(X, B, a, config=cfg.name)
    assert out.shape == (bsz, m, n)
    _budget(out, a * X.double() + B.double() @ X.double(), a * X + B @ X, torch.float16)


def test_rectangular_meta_for_the_update():
    """meta= takes BLOCK_M != BLOCK_N for the update (small tiles, several of them, fp32)."""
    X, B = _rand((2, 37, 70), torch.float32, seed=16), _rand((2, 37, 37), torch.float32, seed=17)
    out = ns_update_triton(X, B, 1.5, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=1))
    _budget(out, 1.5 * X.double() + B.double() @ X.double(), 1.5 * X + B @ X, torch.float32)


def test_newton_schulz_with_a_config_matches_the_torch_backend():
    """newton_schulz(config=) runs the entry in all three kernels; fp16 budget of the end-to-end test."""
    cfg = "64x64x64-w4-s4"
    g = torch.Generator().manual_seed(18)
    G = torch.randn(2, 67, 75, generator=g)  # two tile rows (one partial), a masked K tail
    out = newton_schulz(G, steps=2, dtype=torch.float16, backend="triton", config=cfg)
    ref = newton_schulz(G, steps=2, dtype=torch.float16, backend="torch")
    ref64 = newton_schulz(G.double(), steps=2, dtype=torch.float64, backend="torch")
    err = (out.double() - ref64).abs().max().item()
    torch_err = (ref.double() - ref64).abs().max().item()
    assert err <= 2 * torch_err + 8 * 2.0 ** -10, (err, torch_err)


def test_config_errors_name_the_argument():
    X16, A16 = _rand((1, 8, 12), torch.float16), _rand((1, 8, 8), torch.float16)
    wide = "128x256x64-w8-s3"  # update only
    cases = [
        (lambda: ns_gram_triton(X16, config="64x64"), r"^config must be one of \['64x64x64-w4-s4'"),
        (lambda: ns_gram_triton(X16, config=64), "config must be one of"),
        (lambda: ns_gram_triton(X16, config=wide), r"config must be one of .* for ns_gram_triton"),
        (lambda: ns_poly_triton(A16, 1.0, 1.0, config=wide), "for ns_poly_triton"),
        (lambda: ns_update_triton(X16, A16, 1.0, config=TileConfig("x", 64, 64, 64, 4, 4)),
         r"config='x' is not an entry of the ns_update_triton configuration space"),
        (lambda: ns_gram_triton(X16, meta=_meta_for(torch.float16), config="64x64x64-w4-s4"),
         "pass config= or meta=, not both"),
        (lambda: ns_gram_triton(X16.float(), config="64x64x64-w4-s4"),
         "compile-gated for bfloat16 / float16 operands only, got torch.float32"),
        (lambda: ns_gram_triton(X16, meta=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=1)),
         "meta: the symmetric kernels .* need square tiles"),
        (lambda: ns_gram_triton(X16, meta=dict(BLOCK=24, BLOCK_K=16, num_warps=4, num_stages=1)),
         r"meta\['BLOCK_M'\] must be a power of two >= 16"),
        (lambda: ns_gram_triton(X16, meta=dict(BLOCK=16, BLOCK_K=16, num_warps=4, num_stages=1, GROUP_M=8)),
         r"meta has unknown keys \['GROUP_M'\]"),
        (lambda: ns_gram_triton(X16, meta=dict(BLOCK=16, BLOCK_K=16, num_warps=3, num_stages=1)),
         r"meta\['num_warps'\] must be a power of two"),
        (lambda: ns_gram_triton(X16, meta="64x64x64-w4-s4"), "meta must be a dict"),
        (lambda: newton_schulz_triton(X16, [(1.0, 0.0, 0.0)], torch.float16, config=wide),
         "for newton_schulz_triton .square tiles."),
        (lambda: newton_schulz(X16[0], backend="triton", dtype=torch.float16, config=wide),
         "for newton_schulz .square tiles."),
        (lambda: newton_schulz(X16[0], backend="triton", dtype=torch.float32, config="64x64x64-w4-s4"),
         "compile-gated for bfloat16 / float16 iterations only"),
        (lambda: newton_schulz(X16[0], backend="torch", config="64x64x64-w4-s4"),
         "picks the Triton kernels' tiles, but backend resolved to 'torch'"),
    ]
    for call, msg in cases:
        with pytest.raises(ValueError, match=msg):
            call()


# End to end: both backends iterate on the same normalised X_0 (shared code in newton_schulz).
# fp32: the kernels agree with torch's fp32 iteration to rounding (measured max 2.5e-6 over these
# shapes and several seeds). fp16: measured against the fp64 iteration, within 2x torch's own fp16
# error plus 8 fp16 ulps (2^-10) of the O(1) outputs: the first Polar Express step has slope ~8 at
# zero, so a single rounding difference in X_0-sized entries is amplified; measured worst (seeds
# 0..3): Triton 0.024 where torch's fp16 error was 0.020, and Triton 0.008 where torch's was 0.001.
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("coefficients", ["polar_express", "classic"])
def test_end_to_end_matches_torch_backend(coefficients, dtype):
    g = torch.Generator().manual_seed(5)
    for shape in [(1, 1), (1, 9), (5, 3), (17, 40), (2, 33, 20)]:
        G = torch.randn(shape, generator=g)
        ref = newton_schulz(G, coefficients=coefficients, dtype=dtype, backend="torch")
        out = newton_schulz(G, coefficients=coefficients, dtype=dtype, backend="triton")
        assert out.shape == G.shape and out.dtype == G.dtype
        if dtype == torch.float32:
            err = (out - ref).abs().max().item()
            assert err <= 2e-5, (shape, err)
        else:
            ref64 = newton_schulz(G.double(), coefficients=coefficients, dtype=torch.float64, backend="torch")
            err = (out.double() - ref64).abs().max().item()
            torch_err = (ref.double() - ref64).abs().max().item()
            assert err <= 2 * torch_err + 8 * 2.0 ** -10, (shape, err, torch_err)


# The bands measured for the torch reference in tests/test_newton_schulz.py.
BANDS = {"polar_express": (0.858, 1.142), "classic": (0.681, 1.203)}


@pytest.mark.parametrize("name", list(BANDS))
def test_singular_values_in_reference_band(name):
    lo, hi = BANDS[name]
    torch.manual_seed(2)
    # fp32 iteration; spectra well-conditioned enough for the band's precondition (see test_newton_schulz).
    for G in [torch.randn(32, 96), torch.randn(48, 24), torch.randn(3, 20, 20)]:
        s = torch.linalg.svdvals(newton_schulz(G, coefficients=name, backend="triton").double())
        assert lo <= s.min() and s.max() <= hi, (s.min().item(), s.max().item())


def test_nan_propagates_only_within_its_matrix():
    G = torch.randn(3, 9, 20)
    G[1, 4, 7] = float("nan")
    out = newton_schulz(G, backend="triton")
    assert out[1].isnan().all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()
    ref = newton_schulz(G, backend="torch")
    assert torch.allclose(out[0], ref[0], atol=2e-5) and torch.allclose(out[2], ref[2], atol=2e-5)


def test_zero_matrix_and_errors():
    assert torch.equal(newton_schulz(torch.zeros(2, 5, 7), backend="triton"), torch.zeros(2, 5, 7))
    with pytest.raises(ValueError, match="cuda"):
        newton_schulz(torch.randn(4, 4), backend="cuda")
    with pytest.raises(TypeError, match="dtype"):
        newton_schulz(torch.randn(4, 4), dtype=torch.float64, backend="triton")
    with pytest.raises(ValueError, match="wide"):
        newton_schulz_triton(torch.randn(5, 3), [(1.0, 0.0, 0.0)], torch.float32)
    with pytest.raises(TypeError, match="float16"):
        ns_gram_triton(torch.randn(1, 3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="square"):
        ns_poly_triton(torch.randn(1, 3, 4), 1.0, 1.0)
    # fp64 input with the default dtype iterates in fp32 and returns fp64.
    out = newton_schulz(torch.randn(6, 10, dtype=torch.float64), backend="triton")
    assert out.dtype == torch.float64


# --------------------------------------------------------------------------------------------
# Compile gate: every H100 configuration compiled for sm_90 (in a child process without the
# interpreter), with the facts that make it a tensor-core kernel that fits the SM.
# --------------------------------------------------------------------------------------------

MAX_REGISTERS = 255


def test_opcheck_iterate_op():
    """The torch.library registration: fake tensor, schema and dispatch checks of the op that
    newton_schulz(backend="triton") calls (small tiles keep the interpreter fast)."""
    op = torch.ops.nanofast.newton_schulz_iterate.default
    coeffs = [v for abc in POLAR_EXPRESS_COEFFS[:2] for v in abc]
    for shape, dtype in [((2, 5, 9), torch.float32), ((1, 3, 3), torch.float16), ((2, 3, 4, 6), torch.float32)]:
        torch.library.opcheck(op, (_rand(shape, dtype, seed=5) * 0.2, coeffs))
    torch.library.opcheck(op, (_rand((1, 3, 5), torch.float16, seed=5) * 0.2, coeffs, "64x64x64-w4-s4"))
    with pytest.raises(ValueError, match="3 floats per step"):
        op(_rand((1, 3, 4), torch.float32), [1.0, 2.0])


def test_torch_compile_fullgraph_keeps_the_triton_iteration(monkeypatch):
    """A compiled function (as a compiled optimizer step would be) traces newton_schulz without a
    graph break and runs the Triton kernels, matching eager."""
    import nanofast.kernels.newton_schulz_triton as nst

    calls = []
    real = nst.newton_schulz_triton
    monkeypatch.setattr(nst, "newton_schulz_triton", lambda *a, **k: calls.append(1) or real(*a, **k))

    def step(g):
        return newton_schulz(g * 2.0, steps=2, backend="triton") + 1.0

    G = _rand((2, 20, 12), torch.float32, seed=6)  # tall: transposed around the op
    eager = step(G)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)(G)
    assert len(calls) == 2
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# The fused Muon prologue: Nesterov momentum + row equilibration + normalisation
# --------------------------------------------------------------------------------------------

def _unfused_prologue(g: torch.Tensor, m: torch.Tensor, mu: float, equilibrate: bool, eps: float = 1e-6):
    """What the optimizer computed before the fusion, in fp64: two lerps, equilibration, NS's
    normalisation."""
    m = m.double().lerp(g.double(), 1 - mu)
    u = g.double().lerp(m, mu)
    if equilibrate:
        target = torch.linalg.matrix_norm(u, keepdim=True) / u.size(-2) ** 0.5
        u = u * (target / u.norm(dim=-1, keepdim=True).clamp_min(1e-6))
    return u / (torch.linalg.matrix_norm(u, keepdim=True) * 1.01 + eps), m, g.double().lerp(m, mu)


# (stack..., m, n): 1x1, 1xN, Nx1, a stack of 3, more columns than one 1024-wide loop step.
PROLOGUE_SHAPES = [(1, 1), (1, 9), (9, 1), (3, 5, 7), (2, 2, 3, 4), (3, 1030)]


@pytest.mark.parametrize("equilibrate", [True, False], ids=["equilibrate", "plain"])
@pytest.mark.parametrize("shape", PROLOGUE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("gdt,odt", [(torch.float32, torch.float32), (torch.float32, torch.float16),
                                     (torch.float16, torch.float16)], ids=["fp32", "fp32-fp16", "fp16"])
def test_nesterov_normalize_matches_the_unfused_steps(shape, gdt, odt, equilibrate):
    """Both backends against the unfused fp64 maths. Budget, in ulps of the largest entry: X_0 in
    fp32 64 (sums of squares over a row, in another order), in fp16 1 (it is rounded once); the
    in-place m' and u 4 (a lerp is three roundings, and u is built from the rounded m')."""
    g, m = _rand(shape, gdt, seed=7), _rand(shape, gdt, seed=8)
    m[..., 0, :] = 0  # a zero row in the momentum...
    if len(shape) > 2 or shape[0] > 1:
        g[..., -1, :], m[..., -1, :] = 0, 0  # ... and an all-zero row of u: its norm is clamped, not 0/0
    want, want_m, want_u = _unfused_prologue(g, m, 0.9, equilibrate)
    for backend in ("torch", "triton"):
        gi, mi = g.clone(), m.clone()
        x0 = nesterov_normalize_(gi, mi, 0.9, equilibrate_rows=equilibrate, dtype=odt, backend=backend)
        assert x0.shape == g.shape and x0.dtype == odt and torch.isfinite(x0).all()
        for got, ref, dt in ((x0, want, odt), (mi, want_m, gdt), (gi, want_u, gdt)):
            ulps = (64 if dt == torch.float32 else 1) if got is x0 else 4
            bound = ulps * torch.finfo(dt).eps * max(ref.abs().max().item(), 1e-30)
            assert (got.double() - ref).abs().max().item() <= bound, (backend, dt)


def test_nesterov_normalize_feeds_newton_schulz():
    """nesterov_normalize_ + newton_schulz(normalized=True) equals the lerps + newton_schulz(u),
    for wide and tall stacks, both backends (the optimizer's path)."""
    for shape in [(2, 12, 20), (3, 20, 12)]:
        g, m = _rand(shape, torch.float32, seed=9), _rand(shape, torch.float32, seed=10)
        u = g.lerp(m.lerp(g, 0.05), 0.95)
        want = newton_schulz(u, steps=3, backend="torch")
        for backend in ("torch", "triton"):
            x0 = nesterov_normalize_(g.clone(), m.clone(), 0.95, equilibrate_rows=False, backend=backend)
            got = newton_schulz(x0, steps=3, backend=backend, normalized=True)
            torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def test_nesterov_normalize_nan_stays_in_its_matrix_and_zero_maps_to_zero():
    g, m = _rand((3, 4, 6), torch.float32, seed=11), torch.zeros(3, 4, 6)
    g[1, 2, 3] = float("nan")
    g[2] = 0
    x0 = nesterov_normalize_(g, m, 0.9, backend="triton")
    assert torch.isnan(x0[1]).all() and torch.isfinite(x0[0]).all()
    assert torch.equal(x0[2], torch.zeros(4, 6))


def test_nesterov_normalize_errors():
    g, m = torch.zeros(4, 6), torch.zeros(4, 6)
    cases = [
        (dict(grad=torch.zeros(6)), ValueError, "G must have shape"),
        (dict(grad=torch.zeros(4, 6, dtype=torch.int32)), TypeError, "floating dtype"),
        (dict(momentum_buf=torch.zeros(4, 5)), ValueError, "momentum_buf must be a tensor of grad's shape"),
        (dict(momentum_buf=torch.zeros(4, 6, dtype=torch.float64)), ValueError, "momentum_buf must be"),
        (dict(grad=torch.zeros(6, 4).mT, momentum_buf=torch.zeros(6, 4).mT), ValueError, "grad must be contiguous"),
        (dict(momentum=1.5), ValueError, "momentum must be a float in"),
        (dict(momentum=True), ValueError, "momentum must be a float in"),
        (dict(eps=-1.0), ValueError, "eps must be"),
        (dict(dtype=torch.int8), TypeError, "dtype must be a floating"),
        (dict(dtype=torch.float64, backend="triton"), TypeError, "dtype must be float16, bfloat16 or float32"),
        (dict(backend="cuda"), ValueError, "backend='cuda' is not available"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
    ]
    for over, exc, msg in cases:
        kw = dict(grad=g, momentum_buf=m, momentum=0.9, backend="torch")
        kw.update(over)
        with pytest.raises(exc, match=msg):
            nesterov_normalize_(kw.pop("grad"), kw.pop("momentum_buf"), kw.pop("momentum"), **kw)


prologue_facts = gate_facts_fixture("nanofast.kernels.newton_schulz_triton", attr="PROLOGUE_CONFIGS")
gate_facts = gate_facts_fixture("nanofast.kernels.newton_schulz_triton")
gate_facts_sm80 = gate_facts_fixture("nanofast.kernels.newton_schulz_triton", attr="KERNEL_CONFIGS_SM80", arch=80)


@pytest.mark.parametrize("index", range(len(PROLOGUE_CONFIGS)), ids=[c["config"].replace(" ", "-")
                                                                      for c in PROLOGUE_CONFIGS])
def test_prologue_compile_gate_sm90(prologue_facts, index):
    """The row kernels are memory-bound streams: 128-bit loads and stores, no spills, int64 row
    offsets, no atomics (the row sums are written once per row: deterministic)."""
    cfg, f = PROLOGUE_CONFIGS[index], prologue_facts[(index, 90)]
    where = check_common_facts(cfg, f, 90, 64)
    assert f["instructions"].get("LDG.E.128", 0) > 0 and f["instructions"].get("STG.E.128", 0) > 0, where
    assert f["i64_muls"] > 0 and f["atomics"] == 0, where


def test_kernel_configs_cover_h100_shapes():
    labels = [c["config"] for c in KERNEL_CONFIGS]
    assert {c["signature"]["X" if "X" in c["signature"] else "A"] for c in KERNEL_CONFIGS} == {"*bf16", "*fp16", "*fp32"}
    assert {lbl.split()[0] for lbl in labels} == {"gram", "poly", "update"}
    assert any("m=768 " in lbl for lbl in labels) and any("m=1664 " in lbl for lbl in labels)
    assert any("m=4096 " in lbl for lbl in labels)
    assert len(set(labels)) == len(labels)
    by_name = {c.name: c for space in NS_CONFIGS.values() for c in space}
    for c in KERNEL_CONFIGS:
        assert list(c["signature"]) == list(c["fn"].arg_names), c["config"]
        named = [tok[len("config="):] for tok in c["config"].split() if tok.startswith("config=")]
        m = int(c["config"].split()[1][2:])
        dt = torch.float32 if " fp32 " in c["config"] else torch.bfloat16
        meta = _config_meta(by_name[named[0]], dt) if named else _meta(m, dt)
        assert c["num_warps"] == meta["num_warps"] and c["num_stages"] == meta["num_stages"]
        tiles = ({"BLOCK": meta["BLOCK_M"]} if c["config"].split()[0] != "update"
                 else {"BLOCK_M": meta["BLOCK_M"], "BLOCK_N": meta["BLOCK_N"]})
        assert {k: c["constexprs"][k] for k in tiles} == tiles and c["constexprs"]["BLOCK_K"] == meta["BLOCK_K"]


def test_kernel_configs_cover_every_entry_of_the_spaces():
    """Each entry of each launcher's space is compiled (bf16) by the gate below: the defaults through
    the shape classes, the others under their names."""
    fns = {"gram": "_ns_gram_kernel", "poly": "_ns_poly_kernel", "update": "_ns_update_kernel"}
    for kernel, space in NS_CONFIGS.items():
        for cfg in space:
            meta = _config_meta(cfg, torch.bfloat16)
            hits = [c for c in KERNEL_CONFIGS if c["fn"].__name__ == fns[kernel] and c["signature"]["M"] == "i32"
                    and "bf16" in c["config"] and c["num_warps"] == meta["num_warps"]
                    and c["num_stages"] == meta["num_stages"] and c["constexprs"]["BLOCK_K"] == meta["BLOCK_K"]
                    and c["constexprs"].get("BLOCK", c["constexprs"].get("BLOCK_M")) == meta["BLOCK_M"]
                    and c["constexprs"].get("BLOCK", c["constexprs"].get("BLOCK_N")) == meta["BLOCK_N"]]
            assert hits, (kernel, cfg.name)


@pytest.mark.parametrize("index", range(len(KERNEL_CONFIGS)), ids=config_ids(KERNEL_CONFIGS))
def test_compile_gate_sm90(gate_facts, index):
    cfg, f = KERNEL_CONFIGS[index], gate_facts[(index, 90)]
    where = check_common_facts(cfg, f, 90, MAX_REGISTERS)
    if cfg["signature"]["M"] and " fp32 " in cfg["config"]:
        # fp32 is IEEE (torch's fp32 matmul): FFMA, never the TF32 tensor cores
        assert "HGMMA" not in f["instructions"] and "HMMA" not in f["instructions"], where
    else:
        assert f["instructions"].get("HGMMA", 0) > 0, "no Hopper warpgroup MMA: " + where
    # cp.async 16-byte tile loads: the software pipeline of the operand tiles
    assert f["instructions"].get("LDGSTS.E.BYPASS.128", 0) > 0, "tile loads not pipelined: " + where
    assert f["instructions"].get("STG.E.128", 0) > 0, "stores not vectorised: " + where
    # int64 batch offsets (a stack passes 2^31 elements quickly at 4096^2).
    assert f["i64_muls"] > 0 and f["atomics"] == 0, where


@pytest.mark.parametrize("index", range(len(KERNEL_CONFIGS_SM80)), ids=config_ids(KERNEL_CONFIGS_SM80))
def test_compile_gate_sm80(gate_facts_sm80, index):
    """The A100 tile configurations: mma.sync tensor cores (HMMA), no spills, and the pipelined
    tiles fit its smaller shared memory."""
    cfg, f = KERNEL_CONFIGS_SM80[index], gate_facts_sm80[(index, 80)]
    where = check_common_facts(cfg, f, 80, MAX_REGISTERS)
    assert f["instructions"].get("HMMA", 0) > 0 and f["instructions"].get("HGMMA", 0) == 0, where
