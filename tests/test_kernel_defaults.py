"""Kernels called with their defaults (no eps, no scale, no block sizes, no dtype) give what the
torch path gives with *its* defaults, for fp32, fp16 and bf16 inputs: the norms, QK-norm+rotary,
paged decode attention and KV write, Newton-Schulz and its prologue, FP8 quantisation, GEMM and
linear.

The model calls the kernels this way on a GPU, so a default that differs from torch's (an eps
taken from the input dtype instead of F.rms_norm's fp32 epsilon, say) changes a GPU run's numerics
while every test that passes explicit arguments to both sides stays green. The inputs are chosen
to expose such differences: rows with a mean square of ~1e-3, where eps = 7.8e-3 (finfo(bf16).eps)
instead of 1.2e-7 scales a normalised row by ~0.35.

Budgets are relative to max|torch| per dtype: kernels compute in fp32 and round once, torch rounds
after each op in the input dtype, so a few ulps of the dtype (and fp32-level slack for fp32).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nanofast import kernels, ops

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RTOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
CUDA_SOURCED = ["triton", "cuda"]  # kernels with a CUDA source run on both backends


def close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, rtol: float | None = None) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    budget = (rtol or RTOL[dtype]) * max(ref.float().abs().max().item(), 1e-30)
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= budget, f"max error {err:.3e} > budget {budget:.3e}"


def small(*shape: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """N(0, 0.03^2) entries: mean square ~1e-3, where the choice of eps shows."""
    g = torch.Generator().manual_seed(seed)
    return (0.03 * torch.randn(*shape, generator=g)).to(dtype)


@pytest.mark.parametrize("backend", CUDA_SOURCED)
@pytest.mark.parametrize("name", DTYPES)
def test_rms_norm_defaults_match_f_rms_norm(name, backend):
    dtype = DTYPES[name]
    x = small(5, 3, 96, dtype=dtype)
    close(kernels.rms_norm(x, backend=backend), F.rms_norm(x, (96,)), dtype)
    module = kernels.RMSNorm(96, backend=backend, dtype=dtype)
    close(module(x), torch.nn.RMSNorm(96, dtype=dtype)(x), dtype)


@pytest.mark.parametrize("backend", CUDA_SOURCED)
@pytest.mark.parametrize("name", DTYPES)
def test_qk_norm_rope_defaults_match_the_torch_path(name, backend):
    """The model's call: ops.qk_norm_rope on the kernel vs on torch (rotary, F.rms_norm, scale 1)."""
    dtype = DTYPES[name]
    q, k = small(2, 7, 3, 64, dtype=dtype, seed=1), small(2, 7, 1, 64, dtype=dtype, seed=2)
    cos, sin = ops.rotary_tables(7, 64)
    cos, sin = cos.to(dtype), sin.to(dtype)
    ref_q, ref_k = F.rms_norm(ops.apply_rotary(q, cos, sin), (64,)), F.rms_norm(ops.apply_rotary(k, cos, sin), (64,))
    out_q, out_k = kernels.qk_norm_rope(q, k, cos, sin, backend=backend)
    close(out_q, ref_q, dtype)
    close(out_k, ref_k, dtype)
    mod_q, mod_k = kernels.QKNormRope(64, backend=backend)(q, k, cos, sin)
    close(mod_q, ref_q, dtype)
    close(mod_k, ref_k, dtype)


@pytest.mark.parametrize("backend", CUDA_SOURCED)
@pytest.mark.parametrize("name", DTYPES)
def test_qk_norm_rope_inplace_defaults_match_the_torch_path(name, backend):
    dtype = DTYPES[name]
    hq, hk, d, n = 3, 1, 64, 6
    qkv = small(n, (hq + 2 * hk) * d, dtype=dtype, seed=3)
    positions = torch.tensor([0, 5, 2, 9, 9, 1])
    cos, sin = ops.rotary_tables(16, d)
    expected = qkv.clone()
    q = qkv[:, :hq * d].unflatten(-1, (hq, d))[None]
    k = qkv[:, hq * d:(hq + hk) * d].unflatten(-1, (hk, d))[None]
    c, s = cos[positions].to(dtype), sin[positions].to(dtype)
    expected[:, :hq * d] = F.rms_norm(ops.apply_rotary(q, c, s), (d,))[0].flatten(-2)
    expected[:, hq * d:(hq + hk) * d] = F.rms_norm(ops.apply_rotary(k, c, s), (d,))[0].flatten(-2)
    kernels.qk_norm_rope_inplace(qkv, positions, torch.cat([cos, sin], dim=-1), hq, hk, backend=backend)
    close(qkv, expected, dtype)


@pytest.mark.parametrize("backend", CUDA_SOURCED)
@pytest.mark.parametrize("name", DTYPES)
def test_paged_decode_attention_defaults_match_sdpa(name, backend):
    """Default scale 1/sqrt(D) and no window, as F.scaled_dot_product_attention's defaults."""
    dtype = DTYPES[name]
    batch, hq, hk, d, page, pages_per_seq = 2, 4, 2, 32, 4, 3
    q = torch.randn(batch, hq, d).to(dtype)
    k_cache = torch.randn(batch * pages_per_seq, page, hk, d).to(dtype)
    v_cache = torch.randn(batch * pages_per_seq, page, hk, d).to(dtype)
    block_table = torch.tensor([[4, 0, 2], [1, 5, 3]], dtype=torch.int32)
    seq_lens = torch.tensor([9, 12], dtype=torch.int32)
    refs = []
    for b in range(batch):
        n = int(seq_lens[b])
        keys = k_cache[block_table[b].long()].flatten(0, 1)[:n].transpose(0, 1)  # (Hk, n, D)
        vals = v_cache[block_table[b].long()].flatten(0, 1)[:n].transpose(0, 1)
        refs.append(F.scaled_dot_product_attention(q[b, :, None], keys, vals, enable_gqa=True)[:, 0])
    out = kernels.paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, backend=backend)
    close(out, torch.stack(refs), dtype)


@pytest.mark.parametrize("backend", CUDA_SOURCED)
@pytest.mark.parametrize("name", DTYPES)
def test_paged_kv_write_defaults_match_the_reference(name, backend):
    dtype = DTYPES[name]
    k, v = torch.randn(5, 2, 16).to(dtype), torch.randn(5, 2, 16).to(dtype)
    caches = [torch.randn(4, 3, 2, 16).to(dtype) for _ in range(2)]
    caches += [c.clone() for c in caches]
    slots = torch.tensor([7, 0, -1, 11, 4])
    kernels.paged_kv_write(k, v, caches[0], caches[1], slots, backend=backend)
    kernels.paged_kv_write_reference(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


@pytest.mark.parametrize("name", DTYPES)
def test_newton_schulz_and_its_prologue_defaults_match_torch(name):
    dtype = DTYPES[name]
    g = torch.randn(2, 48, 80).to(dtype)
    close(kernels.newton_schulz(g, backend="triton"), kernels.newton_schulz(g, backend="torch"), dtype)
    grads, mom = [g.clone(), g.clone()], [torch.randn_like(g), None]
    mom[1] = mom[0].clone()
    x_triton = kernels.nesterov_normalize_(grads[0], mom[0], 0.95, backend="triton")
    x_torch = kernels.nesterov_normalize_(grads[1], mom[1], 0.95, backend="torch")
    close(x_triton, x_torch, dtype)
    close(grads[0], grads[1], dtype)
    close(mom[0], mom[1], dtype)


# ---- FP8: the defaults are e4m3, tensorwise, a bf16 GEMM output ------------------------------------
# Everything bitwise: the scales and amaxes are fp32 arithmetic done alike, and q is torch's cast
# bit for bit (the kernels round to the fp8 grid before their conversion: tests/test_fp8_quant.py).

@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("name", DTYPES)
def test_quantize_fp8_defaults_match_the_torch_path(name, recipe):
    dtype = DTYPES[name]
    x = small(37, 48, dtype=dtype)
    q, scale, q_t, amax = kernels.quantize_fp8(x, recipe=recipe, backend="triton")
    rq, rscale, rq_t, ramax = kernels.quantize_fp8(x, recipe=recipe, backend="torch")
    assert q.dtype == rq.dtype == torch.float8_e4m3fn and q_t is rq_t is None
    assert torch.equal(scale, rscale) and torch.equal(amax, ramax)
    assert q.shape == rq.shape and q.is_contiguous()
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)), f"{name} {recipe}"


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_gemm_defaults_match_the_reference(recipe):
    a, sa, _, _ = kernels.quantize_fp8(small(33, 64, dtype=torch.float32, seed=1), recipe=recipe, backend="torch")
    b, sb, _, _ = kernels.quantize_fp8(small(40, 64, dtype=torch.float32, seed=2), recipe=recipe, backend="torch")
    sb = sb.t() if recipe == "rowwise" else sb  # b's row scales as (1, N)
    out = kernels.fp8_gemm(a, b, sa, sb, backend="triton")
    ref = kernels.fp8_gemm_reference(a, b, sa, sb)
    # Same fp8 products summed in fp32 (in another order), rounded once to the default bf16 output.
    close(out, ref, torch.bfloat16, rtol=1e-2)


def rel_frobenius(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("name", DTYPES)
def test_fp8_linear_defaults_match_the_torch_path(name):
    """fp8_linear(x, w) as the model calls it, forward and backward, Triton against torch. The
    budgets are tests/test_fp8_linear.py's (relative Frobenius error; y 0.05, dx and dw 0.10 from
    e4m3/e5m2 rounding); both backends quantise to the same fp8 codes, so what differs is the GEMMs'
    fp32 summation order."""
    dtype = DTYPES[name]
    x = small(2, 9, 64, dtype=dtype).requires_grad_()
    w = (torch.randn(48, 64, generator=torch.Generator().manual_seed(5)) / 8).requires_grad_()
    gy = small(2, 9, 48, dtype=dtype, seed=6)
    results = []
    for backend in ("triton", "torch"):
        out = kernels.fp8_linear(x, w, backend=backend)
        dx, dw = torch.autograd.grad(out, (x, w), gy)
        results.append((out, dx, dw))
    for got, want, budget in zip(*results, (0.05, 0.10, 0.10)):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert rel_frobenius(got, want) <= budget, rel_frobenius(got, want)
