"""The model's op boundaries against independent dense references, on awkward shapes."""
import math

import pytest
import torch

from nanofast import ops


def dense_attention(q, k, v, window):
    """O(T^2) attention with an explicit (T, T) band mask, fp64."""
    T, D = q.size(1), q.size(-1)
    rep = q.size(2) // k.size(2)
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q.double(), k.double()) / math.sqrt(D)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    scores = scores.masked_fill(~((j <= i) & (j >= i - window)), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v.double())


SHAPES = [  # (B, T, Hq, Hkv, D)
    (1, 1, 1, 1, 8), (2, 5, 3, 1, 8), (1, 17, 4, 2, 12), (2, 33, 6, 3, 16), (1, 64, 2, 2, 8), (3, 9, 5, 5, 4),
]


@pytest.mark.parametrize("B,T,Hq,Hkv,D", SHAPES)
@pytest.mark.parametrize("window", [0, 1, 3, 8, 10_000])
def test_attention_matches_dense_reference_forward_and_backward(B, T, Hq, Hkv, D, window):
    torch.manual_seed(T * 31 + window)
    # Non-contiguous inputs: slices of a wider buffer, as the model's views are.
    q = torch.randn(B, T, Hq, D + 3)[..., :D].requires_grad_()
    k = torch.randn(B, T, Hkv, D + 3)[..., :D].requires_grad_()
    v = torch.randn(B, T, Hkv, D + 3)[..., :D].requires_grad_()
    out = ops.attention(q, k, v, window)
    ref = dense_attention(q, k, v, window)
    assert out.shape == (B, T, Hq, D)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=2e-5)  # fp32 budget
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g.double())
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-4)


def test_attention_half_precision_error_within_budget():
    """bf16/fp16 attention against fp64: within a few bf16 ulps of activations of size ~1."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 40, 4, 16), torch.randn(2, 40, 2, 16), torch.randn(2, 40, 2, 16)
    ref = dense_attention(q, k, v, 7)
    for dtype, tol in [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)]:
        out = ops.attention(q.to(dtype), k.to(dtype), v.to(dtype), 7)
        assert out.dtype == dtype
        assert (out.double() - ref).abs().max() < tol


def rotate_complex(x, theta_base=100_000.0):
    """Independent rotary: pair (x1_i, x2_i) as the complex number x1 + i x2, multiplied by e^{-i t w_i}."""
    B, T, H, D = x.shape
    d = D // 2
    w = theta_base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * w[None, :]
    z = torch.complex(x[..., :d].double(), x[..., d:].double()) * torch.exp(-1j * angle)[None, :, None, :]
    return torch.cat([z.real, z.imag], dim=-1)


@pytest.mark.parametrize("T,D", [(1, 2), (7, 8), (33, 64), (5, 6)])
def test_rotary_is_rotation_by_minus_theta(T, D):
    x = torch.randn(2, T, 3, D)
    cos, sin = ops.rotary_tables(T, D)
    torch.testing.assert_close(ops.apply_rotary(x, cos, sin).double(), rotate_complex(x), atol=1e-5, rtol=1e-5)


def test_qk_norm_rope_order_does_not_matter_and_scales():
    q, k = torch.randn(2, 9, 4, 16), torch.randn(2, 9, 2, 16)
    cos, sin = ops.rotary_tables(9, 16)
    qo, ko = ops.qk_norm_rope(q, k, cos, sin, scale=1.2)
    torch.testing.assert_close(qo, ops.apply_rotary(ops.norm(q), cos, sin) * 1.2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ko.pow(2).mean(-1), torch.full((2, 9, 2), 1.44), atol=1e-4, rtol=1e-4)


def test_softcap_cross_entropy_matches_manual_and_ignores():
    logits = torch.randn(2, 5, 11) * 30
    targets = torch.randint(0, 11, (2, 5))
    targets[0, 1] = -1
    capped = 15 * torch.tanh(logits.double() / 15)
    nll = -capped.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    keep = targets >= 0
    none = ops.softcap_cross_entropy(logits, targets, reduction="none")
    assert none.shape == targets.shape and none[0, 1] == 0
    torch.testing.assert_close(none[keep].double(), nll[keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.softcap_cross_entropy(logits, targets).double(), nll[keep].mean(), atol=1e-5, rtol=1e-5)
    assert ops.softcap_logits(logits).abs().max() < 15


@pytest.mark.parametrize("grad", [True, False])
def test_softcap_logits_is_the_tanh_cap_and_leaves_its_input(grad):
    # inference on CPU computes it through sigmoid (faster there): within 1e-5 of tanh's, any range
    logits = torch.cat([torch.linspace(-400, 400, 4001), torch.linspace(-1e-3, 1e-3, 101)])[None].repeat(3, 1)
    before = logits.clone()
    with torch.set_grad_enabled(grad):
        capped = ops.softcap_logits(logits)
    assert torch.equal(logits, before)
    torch.testing.assert_close(capped.double(), 15 * torch.tanh(logits.double() / 15), rtol=0, atol=1e-5)
    assert capped.abs().max() <= 15  # (near 0 sigmoid rounds to 1/2: an absolute error, within the bound)


def test_linear_casts_master_weight_to_activation_dtype():
    w = torch.randn(6, 4)
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    y = ops.linear(x, w)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, (x.float() @ w.bfloat16().float().T).bfloat16(), atol=3e-2, rtol=3e-2)


def test_norm_is_parameter_free_rms_norm():
    x = torch.randn(3, 5, 7)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)
    torch.testing.assert_close(ops.norm(x), ref)


def test_norm_with_residual_returns_the_new_stream():
    x, r = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    y, h = ops.norm(x, residual=r)
    torch.testing.assert_close(h, x + r, rtol=0, atol=0)
    torch.testing.assert_close(y, ops.norm(x + r), rtol=0, atol=0)
