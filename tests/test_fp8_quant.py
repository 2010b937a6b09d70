"""Tests for nanofast.kernels.fp8_quant.

The Triton kernels run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
and everything they return is compared *bitwise* with the plain-torch reference
(`quantize_fp8_reference`, torch's own `.to(fp8)`): amax, scale, x / scale, the saturating clamp,
every index and mask, and the fp8 codes q and q_t, NaN codes included.

That holds for q only because the kernels round to the fp8 grid themselves, in fp32 / int32
(`_round_to_fp8_grid`: round-to-nearest-even on the fp8 mantissa, the fixed quantum of the fp8
subnormals, NaN as the fp8 NaN code), before the final `.to(fp8)`. That conversion then has
nothing left to round, and every implementation converts an on-grid value exactly. The
interpreter's own conversion (a numpy routine, `triton.runtime.interpreter._convert_float`) is
not IEEE round-to-nearest-even (triton issue 8322: no exponent carry, so 127.9 -> 64 instead of
128 in e4m3; ties away from zero; fp8 subnormals truncated; NaN turned into a finite e4m3 code):
on a few percent of a random tensor's elements (measured: 1.8% in e4m3, 4.7% in e5m2 of the
values in the normal range, a quarter or more in the subnormal range) it differs from torch's
cast. `test_fp8_grid_edge_cases` feeds exactly those inputs (ties at normal and subnormal positions, values just below each power
of two, subnormals, saturation, zeros, NaN) through every kernel path.

On an H100 the conversion is Hopper's `cvt.rn.satfinite` (F2FP.SATFINITE in SASS, asserted by the
compile gate below, with the fp32 add / subtract pair of the subnormal rounding), IEEE RNE: the
same bits. `test_gpu_bitwise_equals_torch_cast` checks q against torch bitwise there.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from nanofast.kernels.fp8_quant import (FP8_MAX, KERNEL_CONFIGS, DelayedScaling, amax_floor, quantize_fp8,
                                        quantize_fp8_reference, quantize_fp8_triton)
from compile_gate_helpers import check_common_facts, config_ids, run_uninterpreted
from oob_guard import GuardedAlloc

fq = importlib.import_module("nanofast.kernels.fp8_quant")

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_DTYPES = [E4, E5]
IN_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_ID = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", E4: "e4m3", E5: "e5m2"}
# fp8 formats: mantissa bits, smallest normal exponent (2^e), subnormal quantum 2^-q.
FMT = {E4: dict(mbits=3, min_normal=2.0 ** -6, quantum=2.0 ** -9),
       E5: dict(mbits=2, min_normal=2.0 ** -14, quantum=2.0 ** -16)}
GPU = torch.cuda.is_available()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _wide_range(shape, dtype, gen, decades: float = 3.0) -> torch.Tensor:
    """Normal values times a log-uniform magnitude spread over `decades` powers of ten either way,
    so the quantised values cover every fp8 binade, the fp8 subnormals included."""
    mag = torch.exp(torch.empty(shape).uniform_(-decades * 2.3, decades * 2.3, generator=gen))
    return (torch.randn(shape, generator=gen) * mag).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a (contiguous copy of a) tensor: fp8 codes compared bitwise, NaN codes too."""
    return t.contiguous().view(torch.uint8)


def check_q(q: torch.Tensor, rq: torch.Tensor, name: str) -> None:
    """The kernel's q equals the reference's (torch's cast) bit for bit."""
    assert q.dtype == rq.dtype and q.shape == rq.shape and q.is_contiguous(), name
    if not torch.equal(bits(q), bits(rq)):
        bad = (bits(q) != bits(rq)).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: q differs from torch's cast at {bad} (of {q.numel()})")


def _same_float(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal fp32 values, except that any NaN equals any NaN (payloads may differ)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan = torch.isnan(a)
    return bool(torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32)))


# ------------------------------------------------------------------------------------------------
# The reference: the definition, checked against properties rather than against itself
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_reference_properties(dtype, recipe):
    g = _gen(1)
    x = _wide_range((37, 91), torch.float32, g)
    q, scale, q_t, amax = quantize_fp8_reference(x, dtype, recipe=recipe)
    fmax = FP8_MAX[dtype]
    want_amax = x.abs().amax() if recipe == "tensorwise" else x.abs().amax(dim=1, keepdim=True)
    assert torch.equal(amax, want_amax) and q_t is None
    assert scale.shape == want_amax.shape and scale.dtype == torch.float32
    assert torch.equal(scale, want_amax / fmax)  # no row is below the floor here
    qf = q.float()
    assert qf.abs().max() <= fmax
    # The largest |x| (of the tensor / of each row) maps to FP8_MAX exactly.
    assert torch.equal(qf.abs().amax(dim=None if recipe == "tensorwise" else 1, keepdim=recipe == "rowwise"),
                       torch.full_like(want_amax, fmax))
    # RNE to fp8: |q - x / scale| <= half an fp8 ulp (relative 2^-(m+1) for normals, half the
    # subnormal quantum below), plus the fp32 rounding of x / scale (relative 2^-24).
    y = x.double() / scale.double()
    f = FMT[dtype]
    bound = torch.maximum(y.abs() * 2.0 ** -(f["mbits"] + 1), torch.tensor(f["quantum"] / 2)) * (1 + 2.0 ** -20)
    assert ((qf.double() - y).abs() <= bound).all()
    # And the dequantised tensor approximates x to the same relative precision.
    assert ((qf.double() * scale.double() - x.double()).abs() <= bound * scale.double()).all()


def test_reference_transpose_and_given_scale():
    g = _gen(2)
    x = _wide_range((19, 23), torch.bfloat16, g, decades=1)
    s = torch.tensor(0.0123, dtype=torch.float32)
    q, scale, q_t, amax = quantize_fp8_reference(x, scale=s, transpose=True)
    assert scale.data_ptr() == s.data_ptr() and scale.shape == ()  # the given scale, as a () view
    assert torch.equal(amax, x.float().abs().amax())
    assert q_t.shape == (23, 19) and q_t.is_contiguous() and torch.equal(bits(q_t), bits(q.t()))
    q1, scale1, _, _ = quantize_fp8_reference(x, scale=s.reshape(1))  # (1,) is accepted too
    assert scale1.shape == () and torch.equal(bits(q1), bits(q))


# ------------------------------------------------------------------------------------------------
# The fp8 rounding itself: the inputs where a conversion that is not IEEE RNE goes wrong
# ------------------------------------------------------------------------------------------------

def _fp8_grid(dtype: torch.dtype) -> torch.Tensor:
    """All finite non-negative fp8 values, ascending."""
    v = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    v = v[torch.isfinite(v) & (v >= 0)]
    return torch.unique(v)


def _edge_values(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Positive fp32 values (fp8 units, i.e. x / scale with scale 1) by the case they exercise."""
    f, fmax = FMT[dtype], FP8_MAX[dtype]
    grid = _fp8_grid(dtype)
    mids = (grid[1:] + grid[:-1]) / 2  # exact ties (exact in fp32), normal and subnormal positions
    up, down = (lambda t: torch.nextafter(t, torch.full_like(t, 1e9))), (lambda t: torch.nextafter(t, torch.zeros_like(t)))
    powers = grid[(torch.frexp(grid)[0] == 0.5) & (grid > f["quantum"])]  # powers of two, the fp8 subnormals' top included
    # Between the last tie below 2^e and 2^e (a quarter of the ulp below 2^e, and one fp32 ulp):
    # rounding up carries out of the mantissa into the exponent.
    below = powers - powers * 2.0 ** -(f["mbits"] + 3)
    sub = torch.linspace(0, f["min_normal"], 1001)[:-1]  # the fp8 subnormal range, finely
    return {
        "grid": grid,
        "ties": mids,
        "near-ties": torch.cat([up(mids), down(mids)]),
        "carry": torch.cat([below, down(powers)]),
        "subnormal": torch.cat([sub, torch.tensor([f["quantum"] / 2, 1e-30, 1e-40, 1e-45])]),  # fp32 denormals too
        "saturate": torch.tensor([fmax, up(torch.tensor(fmax)).item(), fmax + fmax * 2.0 ** -(f["mbits"] + 1),
                                  2 * fmax, 1e30, 3.0e38]),
    }


def _hard_tensor(dtype: torch.dtype, width: int = 97) -> torch.Tensor:
    """Every edge value with both signs, zeros and -0, laid out (M, width) (padded with zeros): the
    fp8 rounding cases through the tiled kernels, across several tiles."""
    vals = torch.cat(list(_edge_values(dtype).values()))
    vals = torch.cat([vals, -vals, torch.tensor([0.0, -0.0])])
    pad = -len(vals) % width
    return torch.cat([vals, torch.zeros(pad)]).reshape(-1, width)


@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=DT_ID.get)
def test_fp8_grid_edge_cases(dtype):
    """q bitwise equal to torch's cast on the inputs a conversion that is not IEEE RNE gets wrong:
    exact ties (to even, at normal and subnormal positions) and their fp32 neighbours, values just
    below each power of two (rounding up carries into the exponent), the fp8 subnormal range and
    fp32 denormals, values beyond FP8_MAX (saturation), zeros and -0, NaN and +-inf; through every
    kernel path. Each row holds a +-FP8_MAX, so computed scales are exactly 1 (x / scale == x): the
    values reach the rounding as written."""
    fmax = FP8_MAX[dtype]
    x = _hard_tensor(dtype).clamp(-fmax, fmax)  # the computed-scale paths: amax = FP8_MAX, scale 1
    x = torch.cat([torch.full((x.shape[0], 1), fmax), x], dim=1)
    one = torch.tensor(1.0)
    for variant, kw in [("tensorwise+T", dict(transpose=True)), ("rowwise", dict(recipe="rowwise")),
                        ("given-scale+T", dict(scale=one, transpose=True))]:
        q, scale, q_t, _ = quantize_fp8(x, dtype, backend="triton", **kw)
        rq, rscale, _, _ = quantize_fp8_reference(x, dtype, **kw)
        assert torch.equal(scale, rscale) and (scale == 1).all(), variant
        check_q(q, rq, f"{DT_ID[dtype]} {variant}")
        if q_t is not None:
            assert torch.equal(bits(q_t), bits(rq.t())), variant
    # Unclamped, with NaN and +-inf, through the given-scale path (a computed scale would be NaN).
    x = _hard_tensor(dtype)
    x[0, :4] = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf")])
    q, _, q_t, amax = quantize_fp8(x, dtype, scale=one, transpose=True, backend="triton")
    rq = quantize_fp8_reference(x, dtype, scale=one)[0]
    assert torch.isnan(amax)
    check_q(q, rq, f"{DT_ID[dtype]} given scale, NaN / inf / beyond FP8_MAX")  # NaN codes (0x7F / 0xFF) included
    assert torch.isnan(q[0, :2].float()).all() and torch.equal(q[0, 2:4].float(), torch.tensor([fmax, -fmax]))
    assert torch.equal(bits(q_t), bits(rq.t()))
    # A few values spelled out (torch is the ground truth, these say what it means).
    f = FMT[dtype]
    ulp1 = 2.0 ** -f["mbits"]  # fp8 ulp of [1, 2)
    Q = f["quantum"]
    cases = [(127.9, 128.0), (1 + ulp1 / 2, 1.0), (1 + 1.5 * ulp1, 1 + 2 * ulp1),  # carry; ties to even
             (2 - ulp1 / 2, 2.0), (Q / 2, 0.0), (1.5 * Q, 2 * Q), (2.5 * Q, 2 * Q), (-0.0, -0.0),
             (f["min_normal"] - Q / 2, f["min_normal"]),  # the subnormal tie that carries into the normals
             (fmax * (1 + 2.0 ** -(f["mbits"] + 2)), fmax)]
    xs = torch.tensor([[c[0] for c in cases]])
    got = quantize_fp8(xs, dtype, scale=one, backend="triton")[0].float()
    want = torch.tensor([[c[1] for c in cases]])
    assert torch.equal(got, want) and torch.equal(torch.signbit(got), torch.signbit(want)), (got, want)


# ------------------------------------------------------------------------------------------------
# Triton vs reference
# ------------------------------------------------------------------------------------------------

SHAPES = [(1, 1), (1, 33), (17, 1), (17, 33), (64, 128), (130, 257)]
VARIANTS = ["tensorwise", "tensorwise+T", "given-scale+T", "rowwise"]


def _make_input(shape, layout: str, dtype, gen) -> torch.Tensor:
    M, K = shape
    x = _wide_range(shape, torch.float32, gen, decades=2).to(dtype)
    if layout == "row-stride":  # a column slice: row stride K + 7, unit column stride
        buf = torch.full((M, K + 7), 1e4, dtype=dtype)  # values outside the view would win the amax
        buf[:, 3:3 + K] = x
        return buf[:, 3:3 + K]
    if layout == "transposed":  # unit *row* stride: the launcher copies it
        return x.t().contiguous().t()
    return x


def _run_variant(x, dtype, variant, backend):
    if variant == "rowwise":
        return quantize_fp8(x, dtype, recipe="rowwise", backend=backend)
    scale = None
    if variant == "given-scale+T":
        # Half the just-in-time scale: the largest values saturate.
        scale = (x.float().abs().amax().clamp(min=amax_floor(dtype)) / FP8_MAX[dtype] / 2).reshape(())
    return quantize_fp8(x, dtype, scale=scale, transpose=variant.endswith("+T"), backend=backend)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_triton_matches_reference(shape, in_dtype, dtype, variant):
    """bf16 inputs run too: the kernels only load them and upcast to fp32 (exact), which the
    interpreter supports; no bf16 arithmetic is involved."""
    x = _make_input(shape, "contiguous", in_dtype, _gen(10 * SHAPES.index(shape) + VARIANTS.index(variant)))
    q, scale, q_t, amax = _run_variant(x, dtype, variant, "triton")
    rq, rscale, rq_t, ramax = _run_variant(x, dtype, variant, "torch")
    name = f"{shape} {in_dtype}->{dtype} {variant}"
    assert torch.equal(scale, rscale) and torch.equal(amax, ramax), name  # fp32, bitwise
    assert scale.shape == rscale.shape and amax.shape == ramax.shape
    check_q(q, rq, name)
    if variant == "given-scale+T":  # half the JIT scale: the largest |x| saturates to FP8_MAX exactly
        assert q.float().abs().max() == FP8_MAX[dtype] == rq.float().abs().max(), name
    if variant.endswith("+T"):
        assert q_t.shape == (shape[1], shape[0]) and q_t.is_contiguous() and q_t.dtype == dtype
        assert torch.equal(bits(q_t), bits(q.t())), name
        assert rq_t is not None
    else:
        assert q_t is None and rq_t is None


@pytest.mark.parametrize("layout", ["row-stride", "transposed"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_strided_inputs_equal_contiguous(layout, variant):
    shape = (33, 70)
    x = _make_input(shape, layout, torch.float16, _gen(4))
    assert not x.is_contiguous()
    got = _run_variant(x, E4, variant, "triton")
    want = _run_variant(x.contiguous(), E4, variant, "triton")
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(bits(a) if a.element_size() == 1 else a,
                                                      bits(b) if b.element_size() == 1 else b)


def test_triton_multi_tile_and_chunked_rows():
    """Shapes that make the persistent amax CTAs loop over several tiles (spike in the last tile),
    the cast grid span several tiles in both dims, and rowwise rows take the chunked path
    (K > 4096: two walks over each row)."""
    g = _gen(5)
    x = _wide_range((150, 700), torch.float32, g, decades=1)
    x[149, 699] = 1e3  # the global max, in the last tile of the last program's last iteration
    for variant in VARIANTS:
        q, scale, q_t, amax = _run_variant(x, E4, variant, "triton")
        rq, rscale, _, ramax = _run_variant(x, E4, variant, "torch")
        assert torch.equal(scale, rscale) and torch.equal(amax, ramax), variant
        check_q(q, rq, variant)
    for K in (4097, 9000):
        x = _wide_range((5, K), torch.bfloat16, g, decades=1)
        x[3, K - 1] = -500.0  # the row's max sits in the last chunk
        q, scale, _, amax = quantize_fp8(x, E5, recipe="rowwise", backend="triton")
        rq, rscale, _, ramax = quantize_fp8_reference(x, E5, recipe="rowwise")
        assert fq._rowwise_meta(5, K)["NUM_CHUNKS"] > 1
        assert torch.equal(scale, rscale) and torch.equal(amax, ramax) and amax[3, 0] == 500.0
        check_q(q, rq, f"rowwise K={K}")


def test_given_scale_is_a_single_pass(monkeypatch):
    """With a scale, x is read by the cast kernel only: the amax-partial kernel must not launch,
    and the returned amax (from the cast kernel's tile partials) is still exact."""
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("the amax pass ran although a scale was given")

    monkeypatch.setattr(fq, "_amax_partial_kernel", NoLaunch())
    x = _wide_range((70, 150), torch.float16, _gen(6), decades=1)
    s = torch.tensor(0.01)
    q, scale, q_t, amax = quantize_fp8(x, scale=s, transpose=True, backend="triton")
    assert torch.equal(amax, x.float().abs().amax()) and torch.equal(scale, s)
    check_q(q, quantize_fp8_reference(x, scale=s)[0], "given scale")
    assert torch.equal(bits(q_t), bits(q.t()))
    with pytest.raises(AssertionError, match="amax pass ran"):
        quantize_fp8(x, backend="triton")  # without a scale it does run (the spy works)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=DT_ID.get)
def test_saturation(backend, dtype):
    """Values beyond FP8_MAX * scale saturate to exactly +-FP8_MAX (torch's raw e5m2 cast would give inf)."""
    fmax = FP8_MAX[dtype]
    s = torch.tensor(0.5)
    x = torch.tensor([[1.0, -2.0 * fmax, 3.0 * fmax, 2.0 * fmax + 1, 1e30, -1e30, 0.25 * fmax]])
    q, scale, q_t, amax = quantize_fp8(x, dtype, scale=s, transpose=True, backend=backend)
    want = torch.tensor([[2.0, -fmax, fmax, fmax, fmax, -fmax, 0.5 * fmax]])
    assert torch.equal(q.float(), want) and torch.equal(q_t.float(), want.t())
    assert torch.equal(amax, torch.tensor(1e30))
    assert not torch.isfinite((x / s).to(E5).float()).all()  # what the clamp prevents (e5m2 overflows)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16], ids=DT_ID.get)
def test_zeros_get_a_finite_scale(backend, dtype, in_dtype):
    x = torch.zeros(9, 40, dtype=in_dtype)
    floor_scale = torch.tensor(torch.finfo(torch.float32).tiny)  # = amax_floor / FP8_MAX, exactly
    for transpose in (False, True):
        q, scale, q_t, amax = quantize_fp8(x, dtype, transpose=transpose, backend=backend)
        assert torch.equal(scale, floor_scale) and torch.equal(amax, torch.tensor(0.0))
        assert (bits(q) == 0).all() and (q_t is None or (bits(q_t) == 0).all())
    # Rowwise: zero rows get the floor scale; the other rows are unaffected.
    x[2, 5] = 3.0
    q, scale, _, amax = quantize_fp8(x, dtype, recipe="rowwise", backend=backend)
    want_scale = torch.full((9, 1), torch.finfo(torch.float32).tiny)
    want_scale[2, 0] = torch.tensor(3.0) / FP8_MAX[dtype]
    assert torch.equal(scale, want_scale) and amax[2, 0] == 3.0 and (amax[torch.arange(9) != 2] == 0).all()
    assert q[2, 5].float() == FP8_MAX[dtype] and (bits(q).sum() == bits(q)[2, 5])
    assert torch.isfinite(q.float() * scale).all()


# inf / inf = NaN is part of the tested semantics; numpy (the interpreter) warns about it.
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16], ids=DT_ID.get)
def test_nan_and_inf(backend, dtype, in_dtype):
    """The documented non-finite semantics (module docstring)."""
    inf, nan = float("inf"), float("nan")
    fmax = FP8_MAX[dtype]
    x = torch.tensor([[1.0, inf, -inf, 2.0], [nan, -1.0, 0.5, 4.0]], dtype=in_dtype)
    s = torch.tensor(0.25)
    # Given scale: +-inf saturate, NaN stays NaN, finite values as usual; amax reports the NaN.
    q, scale, q_t, amax = quantize_fp8(x, dtype, scale=s, transpose=True, backend=backend)
    assert torch.isnan(amax)
    qf = q.float()
    assert qf[0, 1] == fmax and qf[0, 2] == -fmax
    assert torch.equal(qf[0, [0, 3]], torch.tensor([4.0, 8.0])) and torch.equal(qf[1, 1:], torch.tensor([-4.0, 2.0, 16.0]))
    assert torch.equal(bits(q_t), bits(q.t()))
    assert torch.isnan(qf[1, 0])
    check_q(q, quantize_fp8_reference(x, dtype, scale=s)[0], "given scale")  # the NaN code too
    # Only +-inf, given scale: amax is inf.
    q, _, _, amax = quantize_fp8(x[:1], dtype, scale=s, backend=backend)
    assert amax == inf and torch.equal(q.float(), torch.tensor([[4.0, fmax, -fmax, 8.0]]))
    # Computed scale with an inf: scale = inf, finite -> 0, +-inf -> NaN (inf / inf); x ~= q * scale
    # is NaN everywhere -- the overflow is loud.
    q, scale, _, amax = quantize_fp8(x[:1], dtype, backend=backend)
    assert amax == inf and scale == inf
    assert torch.isnan(q.float() * scale).all()
    assert (q.float()[0, [0, 3]] == 0).all() and torch.isnan(q.float()[0, 1:3]).all()
    check_q(q, quantize_fp8_reference(x[:1], dtype)[0], "computed inf scale")
    # Computed scale with a NaN: amax and scale NaN (torch.amax semantics).
    _, scale, _, amax = quantize_fp8(x, dtype, backend=backend)
    assert torch.isnan(amax) and torch.isnan(scale)
    # Rowwise: only the NaN row's amax / scale are NaN, the inf row's are inf.
    q, scale, _, amax = quantize_fp8(x, dtype, recipe="rowwise", backend=backend)
    assert amax[0, 0] == inf and torch.isnan(amax[1, 0]) and scale[0, 0] == inf and torch.isnan(scale[1, 0])
    _, rscale, _, ramax = quantize_fp8_reference(x, dtype, recipe="rowwise")
    assert _same_float(scale, rscale) and _same_float(amax, ramax)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_inputs(backend):
    for M, K in [(0, 5), (4, 0), (0, 0)]:
        x = torch.empty(M, K, dtype=torch.bfloat16)
        q, scale, q_t, amax = quantize_fp8(x, transpose=True, backend=backend)
        assert q.shape == (M, K) and q_t.shape == (K, M) and amax == 0 and scale == torch.finfo(torch.float32).tiny
        q, scale, _, amax = quantize_fp8(x, E5, recipe="rowwise", backend=backend)
        assert q.shape == (M, K) and scale.shape == (M, 1) and amax.shape == (M, 1)
        assert (amax == 0).all() and (scale == torch.finfo(torch.float32).tiny).all()


# ------------------------------------------------------------------------------------------------
# Out-of-bounds protection: poisoned inputs, guarded outputs
# ------------------------------------------------------------------------------------------------

GUARD_SENTINEL = -256.0  # exact in fp32 and both fp8 formats


def _poisoned(t: torch.Tensor) -> torch.Tensor:
    """t's values in a view whose surroundings are NaN: a stray read poisons amax (NaN propagates)."""
    n, d = t.shape
    buf = torch.full((n + 2, d + 7), float("nan"), dtype=t.dtype)
    view = buf[1:n + 1, 3:3 + d]
    view.copy_(t)
    return view


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16], ids=DT_ID.get)
@pytest.mark.parametrize("M,K", [(1, 1), (33, 100), (130, 257), (3, 4500)])
def test_poisoned_guard_bands(monkeypatch, M, K, in_dtype):
    x = _wide_range((M, K), torch.float32, _gen(7), decades=1).to(in_dtype)
    s = torch.tensor(0.003)
    cases = [dict(transpose=True), dict(scale=s, transpose=True), dict(dtype=E5), dict(recipe="rowwise")]
    expected = [quantize_fp8_triton(x, **kw) for kw in cases]  # plain allocator, contiguous input
    alloc = GuardedAlloc(GUARD_SENTINEL)
    monkeypatch.setattr(fq, "_alloc", alloc)
    for kw, want in zip(cases, expected):
        got = quantize_fp8_triton(_poisoned(x), **kw)
        for a, b in zip(got, want):
            if b is None:
                assert a is None
            else:
                assert a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a,
                                                          b.view(torch.uint8) if b.element_size() == 1 else b)
    alloc.check()
    # Among the checked buffers: the amax partials of the persistent grid (one per program) and of
    # the single-pass cast (one per tile), each fully written and nothing written around them.
    am, cm = fq._amax_meta(M, K), fq._cast_meta(M, K)
    amax_tiles = -(-M // am["BLOCK_M"]) * -(-K // am["BLOCK_K"])
    cast_tiles = -(-M // cm["BLOCK_M"]) * -(-K // cm["BLOCK_K"])
    sizes = [v.numel() for _, v in alloc.buffers if v.ndim == 1 and v.dtype == torch.float32]
    assert min(amax_tiles, fq._CPU_AMAX_PROGRAMS) in sizes and cast_tiles in sizes


# ------------------------------------------------------------------------------------------------
# Backend selection and argument errors
# ------------------------------------------------------------------------------------------------

def test_backend_selection(monkeypatch):
    x = torch.randn(4, 8)

    def boom(*a, **k):
        raise AssertionError("the triton launcher ran")

    monkeypatch.setattr(fq.OP.launcher("triton"), "quantize", boom)
    q, scale, _, amax = quantize_fp8(x)  # CPU tensor, backend None -> the torch reference
    rq, rscale, _, ramax = quantize_fp8_reference(x)
    assert torch.equal(bits(q), bits(rq)) and torch.equal(scale, rscale) and torch.equal(amax, ramax)
    with pytest.raises(AssertionError, match="triton launcher ran"):
        quantize_fp8(x, backend="triton")
    with pytest.raises(ValueError, match="no CUDA-source"):
        quantize_fp8(x, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        quantize_fp8(x, backend="tensorrt")


_X = torch.randn(4, 8)
BAD_CALLS = [
    ("x-1d", dict(x=torch.randn(8)), ValueError, r"x must be 2-D"),
    ("x-3d", dict(x=torch.randn(2, 4, 8)), ValueError, r"x must be 2-D"),
    ("x-int", dict(x=torch.ones(4, 8, dtype=torch.int32)), TypeError, r"x must be float32"),
    ("x-fp64", dict(x=torch.randn(4, 8, dtype=torch.float64)), TypeError, r"x must be float32"),
    ("x-list", dict(x=[[1.0]]), TypeError, r"x must be a torch.Tensor"),
    ("dtype", dict(dtype=torch.float16), TypeError, r"dtype must be torch.float8_e4m3fn"),
    ("recipe", dict(recipe="blockwise"), ValueError, r"recipe must be one of"),
    ("transpose-rowwise", dict(recipe="rowwise", transpose=True), ValueError, r"transpose=True needs .*column scales"),
    ("scale-rowwise", dict(recipe="rowwise", scale=torch.tensor(1.0)), ValueError, r"scale may only be given"),
    ("scale-shape", dict(scale=torch.ones(2)), ValueError, r"scale must have shape \(\)"),
    ("scale-dtype", dict(scale=torch.tensor(1.0, dtype=torch.float16)), TypeError, r"scale must have dtype torch.float32"),
    ("scale-device", dict(scale=torch.tensor(1.0, device="meta")), ValueError, r"scale must be on x's device"),
    ("scale-float", dict(scale=1.0), TypeError, r"scale must be a 0-d float32 torch.Tensor"),
    ("transpose-int", dict(transpose=1), TypeError, r"transpose must be a bool"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_raise_naming_the_argument(case, backend):
    _, kwargs, exc, pattern = case
    kwargs = dict(kwargs)
    x = kwargs.pop("x", _X)
    dtype = kwargs.pop("dtype", E4)
    with pytest.raises(exc, match=pattern):
        quantize_fp8(x, dtype, backend=backend, **kwargs)
    with pytest.raises(exc, match=pattern):
        quantize_fp8_reference(x, dtype, **kwargs)


# ------------------------------------------------------------------------------------------------
# Delayed scaling
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_delayed_scaling_protocol(backend):
    ds = DelayedScaling(history=3, dtype=E4)
    assert ds.scale() is None  # empty history: the first step scales just in time
    g = _gen(8)
    peaks = [2.0, 50.0, 3.0, 1.0, 0.5, 0.25]
    seen = []
    for step, peak in enumerate(peaks):
        x = torch.randn(16, 24, generator=g)
        x = (x / x.abs().max() * peak).to(torch.bfloat16)
        amax_now = x.float().abs().amax()
        expect_scale = None if step == 0 else torch.stack(seen[-3:]).amax() / 448.0
        q, scale, q_t, amax = ds.quantize(x, transpose=True, backend=backend)
        if step == 0:
            assert torch.equal(scale, amax_now / 448.0)  # just in time: from this step's amax
        else:
            # Delayed: the max over the previous (at most 3) steps' amaxes, NOT this step's.
            assert torch.equal(scale, expect_scale), step
        assert torch.equal(amax, amax_now)
        rq, _, _, _ = quantize_fp8_reference(x, E4, scale=scale)
        check_q(q, rq, f"step {step}")
        seen.append(amax_now)
        assert ds.steps == step + 1
    # Step 1 saw only the 2.0 peak; step 4 no longer sees the 50.0 of step 1 (window of 3).
    assert torch.equal(ds.scale(), torch.stack(seen[-3:]).amax() / 448.0)
    assert ds.scale() == torch.tensor(1.0) / 448.0


def test_delayed_scaling_manual_protocol_and_edge_cases():
    ds = DelayedScaling(history=2, dtype=E5)
    x = torch.randn(5, 7)
    q, scale, _, amax = quantize_fp8(x, ds.dtype, scale=ds.scale())  # None the first time
    ds.update(amax)
    assert torch.equal(ds.scale(), scale) and ds.scale().shape == () and ds.scale().dtype == torch.float32
    # All-zero history entries: the floor scale.
    ds0 = DelayedScaling(dtype=E4)
    ds0.update(torch.tensor(0.0))
    assert ds0.scale() == torch.finfo(torch.float32).tiny
    # An inf amax poisons the scale until it leaves the window (history=2).
    ds.update(torch.tensor(float("inf")))
    assert ds.scale() == float("inf")
    ds.update(torch.tensor(1.0))
    assert ds.scale() == float("inf")
    ds.update(torch.tensor(1.0))
    assert ds.scale() == torch.tensor(1.0) / FP8_MAX[E5]
    with pytest.raises(ValueError, match="amax must be a \\(\\) float32"):
        ds.update(torch.ones(3, 1))
    with pytest.raises(ValueError, match="amax must be a \\(\\) float32"):
        ds.update(torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="history must be an int"):
        DelayedScaling(history=0)
    with pytest.raises(TypeError, match="dtype must be"):
        DelayedScaling(dtype=torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# GPU only: the real conversion is IEEE RNE, so q equals torch's cast bitwise
# ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not GPU, reason="needs a CUDA device (the compiled kernels, hardware fp8 conversion)")
@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=DT_ID.get)
def test_gpu_bitwise_equals_torch_cast(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(1000, 777, device="cuda", generator=g) * 10).to(torch.bfloat16)
    x[0, 5] = float("nan")  # row 0 only: the comparisons below run on the finite rows x[1:]
    for variant in VARIANTS:
        got = _run_variant(x[1:], dtype, variant, "triton")
        want = _run_variant(x[1:], dtype, variant, "torch")
        assert torch.equal(bits(got[0]), bits(want[0])) and torch.equal(got[1], want[1]), variant
        assert torch.equal(got[3], want[3]) and (got[2] is None or torch.equal(bits(got[2]), bits(want[2]))), variant
    s = torch.tensor(0.1, device="cuda")
    q, _, q_t, amax = quantize_fp8(x, dtype, scale=s, transpose=True, backend="triton")
    assert torch.isnan(q[0, 5].float()) and torch.isnan(q_t[5, 0].float()) and torch.isnan(amax)
    nan = torch.isnan(x)
    assert torch.equal(bits(q)[~nan], bits(quantize_fp8_reference(x, dtype, scale=s)[0])[~nan])


# ------------------------------------------------------------------------------------------------
# Compile gate: the H100 configurations, compiled for sm_90, machine code read
# ------------------------------------------------------------------------------------------------

MAX_REGISTERS = 64  # >= 1024 resident threads per SM (50% occupancy): a bandwidth kernel needs the warps
X_READERS = ("_amax_partial_kernel", "_cast_kernel", "_rowwise_kernel")
CASTERS = ("_cast_kernel", "_rowwise_kernel")


# Compiles every config in a child process without the interpreter (as compile_gate.configs_facts
# does), through compile_gate.compile_triton for the standard facts (registers, spills, key SASS
# instructions, TTIR counts), while a spy on triton.compile keeps the compiled kernel so the child
# can also read what those facts do not carry: the PTX conversion and division instructions and
# the F2FP opcodes in the SASS. One compilation per config.
_CHILD = r"""
import dataclasses, json, re, subprocess, sys, tempfile
import triton
from nanofast.kernels import compile_gate
from nanofast.kernels.fp8_quant import KERNEL_CONFIGS
compiled = []
real_compile = triton.compile
def spy(*args, **kwargs):
    compiled.append(real_compile(*args, **kwargs))
    return compiled[-1]
triton.compile = spy
out = []
for cfg in KERNEL_CONFIGS:
    facts = compile_gate.compile_triton(**cfg, arch=90)
    asm = compiled[-1].asm
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(asm["cubin"]); f.flush()
        sass = subprocess.run([compile_gate.cuda_tool("nvdisasm"), f.name], capture_output=True, text=True, check=True).stdout
    ops = re.findall(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass, flags=re.M)
    out.append(dict(facts=dict(dataclasses.asdict(facts), **facts.ttir),
                    cvt=sorted(set(re.findall(r"cvt\.[\w.]*(?:e4m3|e5m2)[\w.]*", asm["ptx"]))),
                    div_full=len(re.findall(r"div\.full\.f32", asm["ptx"])),
                    div_rn=len(re.findall(r"div\.rn\.f32", asm["ptx"])),
                    f2fp={op: ops.count(op) for op in set(ops) if op.startswith("F2FP")},
                    lds_sts=sum(op.startswith(("LDS", "STS")) for op in ops),
                    fadd_imm=re.findall(r"FADD\S*\s[^;]*,\s*(-?[0-9][0-9.e+]*)\s*;", sass)))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled_facts() -> list[dict]:
    return run_uninterpreted(_CHILD)


def test_kernel_configs_match_launcher_meta():
    names = {c["fn"].__name__ for c in KERNEL_CONFIGS}
    assert names == {"_amax_partial_kernel", "_amax_finalize_kernel", "_cast_kernel", "_rowwise_kernel"}
    for c in KERNEL_CONFIGS:
        assert list(c["signature"]) == list(c["fn"].arg_names), c["config"]
        fn = c["fn"].__name__
        if fn == "_amax_finalize_kernel":
            continue
        M, K = map(int, c["config"].split()[1].split("x"))
        meta = {"_amax_partial_kernel": fq._amax_meta, "_cast_kernel": fq._cast_meta,
                "_rowwise_kernel": fq._rowwise_meta}[fn](M, K)
        assert c["num_warps"] == meta["num_warps"], c["config"]
        assert all(c["constexprs"][k] == v for k, v in meta.items() if k != "num_warps"), c["config"]
    # The brief's three must-haves: bf16 -> e4m3, tensorwise with transpose, rowwise.
    configs = [c["config"] for c in KERNEL_CONFIGS]
    assert any("bf16->e4m3 +T" in s for s in configs) and any(s.startswith("rowwise") for s in configs)


@pytest.mark.parametrize("index", range(len(KERNEL_CONFIGS)), ids=config_ids(KERNEL_CONFIGS))
def test_compile_gate_sm90(compiled_facts, index):
    cfg, a = KERNEL_CONFIGS[index], compiled_facts[index]
    f = a["facts"]
    fn = cfg["fn"].__name__
    where = check_common_facts(cfg, f, 90, MAX_REGISTERS, f"{cfg['config']}: {f} {a}")
    assert f["atomics"] == 0 and f["stores"] > 0, where  # partial maxima: plain stores, no atomics
    if fn in X_READERS:
        assert f["instructions"].get("LDG.E.128", 0) > 0, where  # 128-bit loads of x
        assert f["i64_muls"] > 0, where  # row * stride in 64 bits: M * K may exceed 2^31
    if fn in CASTERS:
        assert f["instructions"].get("STG.E.128", 0) > 0, where  # 16 fp8 values per store
        # The conversion is Hopper's hardware cvt, round-to-nearest-even, saturating finite values
        # and keeping NaN: two values per F2FP.SATFINITE instruction.
        fp8 = "e4m3" if "->e4m3" in cfg["config"] else "e5m2"
        assert a["cvt"] == [f"cvt.rn.satfinite.{fp8}x2.f32"], where
        f2fp = f"F2FP.SATFINITE.{fp8.upper()}.F32.PACK_AB_MERGE_C"
        assert set(a["f2fp"]) == {f2fp} and a["f2fp"][f2fp] > 0, where
        # The rounding to the fp8 grid before it survives compilation: the fp8 subnormals' add and
        # subtract of C = 2^(emin - mbits + 23) (a compiler that reassociated fp32 adds would fold
        # them into nothing and leave the conversion to round).
        f8 = FMT[E4 if fp8 == "e4m3" else E5]
        c = 2.0 ** (round(math.log2(f8["quantum"])) + 23)
        adds, subs = a["fadd_imm"].count(f"{c:g}"), a["fadd_imm"].count(f"{-c:g}")
        assert adds > 0 and adds == subs, (where, sorted(set(a["fadd_imm"])))
        # x / scale is the IEEE division (div.rn), never the approximate div.full.
        assert a["div_rn"] > 0 and a["div_full"] == 0, where
    else:
        assert not a["f2fp"] and not a["cvt"], where
    if fn == "_cast_kernel" and cfg["constexprs"]["WRITE_T"]:
        # The transposed tile goes through shared memory (the layout conversion), and q_t is still
        # written with 128-bit stores: twice the STG.E.128 of the same tile without transpose.
        assert f["shared_bytes"] >= cfg["constexprs"]["BLOCK_M"] * cfg["constexprs"]["BLOCK_K"], where
        assert a["lds_sts"] > 0 and f["instructions"].get("BAR.SYNC", 0) > 0, where
        plain = next(i for i, c in enumerate(KERNEL_CONFIGS) if c["fn"] is cfg["fn"] and not c["constexprs"]["WRITE_T"])
        assert f["instructions"]["STG.E.128"] == 2 * compiled_facts[plain]["facts"]["instructions"]["STG.E.128"], where
    if fn == "_amax_finalize_kernel" and cfg["constexprs"]["WRITE_SCALE"]:
        assert a["div_rn"] == 1 and a["div_full"] == 0, where

