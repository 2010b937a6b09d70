"""kernels/vendor.py: the CUDA contracts of torch._scaled_mm and flash-attn, kept on the CPU.

Each rule both ways (a call that obeys runs, one that breaks it raises ContractError, a RuntimeError
and a ValueError as torch's TORCH_CHECK / TORCH_CHECK_VALUE are, naming the rule and its source),
and every fp8 and attention path of nanofast run through the module on the CPU: fp8_linear in both
recipes with odd token counts and biases, a training step of the model in fp8, the precision
report, attention with the windows -1 / 0 / T / > T, the paged decode and prefill paths.
"""
from __future__ import annotations

import json
import math
import re
import sys
import weakref

import pytest
import torch

from nanofast import attention, ops
from nanofast.kernels import fp8_linear, paged_decode_attention, plan_paged_decode, vendor
from nanofast.model import GPT, config_for_depth
from nanofast.precision import SETTINGS, precision_report

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def _fp8(shape, dtype=E4, seed=0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 4).to(dtype)


def _mm_args(m=32, k=64, n=48, a=E4, b=E4, rowwise=False, out=BF16, bias=None):
    """A valid torch._scaled_mm call: mat1 (M, K) row-major, mat2 = w.t() of a contiguous (N, K) w."""
    mat1, mat2 = _fp8((m, k), a, 1), _fp8((n, k), b, 2).t()
    sa = torch.rand(m, 1) + 0.5 if rowwise else torch.tensor(0.5)
    sb = torch.rand(1, n) + 0.5 if rowwise else torch.tensor(2.0)
    return dict(mat1=mat1, mat2=mat2, scale_a=sa, scale_b=sb, out_dtype=out, bias=bias)


def _call(kw):
    kw = dict(kw)
    return vendor.scaled_mm(kw.pop("mat1"), kw.pop("mat2"), kw.pop("scale_a"), kw.pop("scale_b"), **kw)


# ---- torch._scaled_mm: every rule both ways --------------------------------------------------

OBEYS = {  # rule -> calls that obey it (and every other rule)
    "fp8-operands": [_mm_args(), _mm_args(a=E5, b=E4), _mm_args(a=E4, b=E5)],
    "no-e5m2-pair": [_mm_args(a=E5, b=E4)],
    "layout": [_mm_args()],
    "multiple-of-16": [_mm_args(m=37, k=16, n=16), _mm_args(m=1, k=32, n=64)],  # M is free
    "scales": [_mm_args(), _mm_args(rowwise=True), _mm_args(m=1, rowwise=True)],
    "rowwise-out-bf16": [_mm_args(rowwise=True, out=BF16), _mm_args(rowwise=False, out=F32),
                         _mm_args(rowwise=False, out=F16)],
    "rowwise-mat2-e4m3": [_mm_args(rowwise=True, a=E5, b=E4)],
    "bias": [_mm_args(bias=torch.randn(48).to(BF16)), _mm_args(out=F16, bias=torch.randn(48).half()),
             _mm_args(rowwise=True, bias=torch.randn(48).to(BF16))],
}

BREAKS = {  # rule -> calls that break it (CPU torch accepts several of them: see the last test)
    "fp8-operands": [dict(_mm_args(), mat1=torch.randn(32, 64).to(BF16)), dict(_mm_args(), mat2=_fp8((64,), E4))],
    "no-e5m2-pair": [_mm_args(a=E5, b=E5)],
    "layout": [dict(_mm_args(), mat2=_fp8((64, 48), E4)),  # row-major mat2
               dict(_mm_args(), mat1=_fp8((64, 32), E4).t())],  # column-major mat1
    "multiple-of-16": [_mm_args(k=40), _mm_args(n=40), _mm_args(m=48, k=37, n=16)],
    "scales": [dict(_mm_args(), scale_a=torch.tensor(0.5, dtype=torch.float64)),
               dict(_mm_args(), scale_b=torch.rand(1, 48)),  # tensor-wise a with row-wise b
               dict(_mm_args(rowwise=True), scale_a=torch.rand(32))],  # (M,) is not (M, 1)
    "rowwise-out-bf16": [_mm_args(rowwise=True, out=F32), _mm_args(rowwise=True, out=F16)],
    "rowwise-mat2-e4m3": [_mm_args(rowwise=True, a=E4, b=E5)],
    "bias": [_mm_args(out=F32, bias=torch.randn(48).to(BF16)), _mm_args(out=F32, bias=torch.randn(48)),
             _mm_args(bias=torch.randn(48)), _mm_args(bias=torch.randn(48).half()),
             _mm_args(out=F16, bias=torch.randn(48).to(BF16)), _mm_args(bias=torch.randn(47).to(BF16))],
}


def test_every_rule_names_its_source_and_is_tested():
    for rules in (vendor.SCALED_MM_RULES, vendor.FLASH_ATTN_RULES):
        for rule, (need, source) in rules.items():
            assert need and re.fullmatch(r"(torch|flash-attn) \S+\.(cpp|py|cu)::\w+.*", source), (rule, source)
    assert set(OBEYS) == set(BREAKS) == set(vendor.SCALED_MM_RULES)
    assert set(FA_BREAKS) == set(vendor.FLASH_ATTN_RULES)


@pytest.mark.parametrize("rule", list(vendor.SCALED_MM_RULES))
def test_scaled_mm_rule_both_ways(rule):
    for kw in OBEYS[rule]:
        out = _call(kw)  # runs torch._scaled_mm (its CPU kernel here)
        m, n = kw["mat1"].size(0), kw["mat2"].size(1)
        assert out.shape == (m, n) and out.dtype == kw["out_dtype"]
        want = (kw["mat1"].float() * kw["scale_a"]) @ (kw["mat2"].float() * kw["scale_b"])
        if kw["bias"] is not None:
            want = want + kw["bias"].float()
        torch.testing.assert_close(out.float(), want, rtol=1e-2, atol=1e-2)
    for kw in BREAKS[rule]:
        with pytest.raises(vendor.ContractError, match=rf"\[{rule}; torch ") as err:
            _call(kw)
        assert isinstance(err.value, RuntimeError) and isinstance(err.value, ValueError)


def test_cpu_torch_accepts_what_cuda_refuses():
    """Why the module exists: torch's CPU _scaled_mm runs calls CUDA refuses (here: row-wise with
    fp32 output, a K that is no multiple of 16, a float32 bias)."""
    for kw in (_mm_args(rowwise=True, out=F32), _mm_args(k=40), _mm_args(bias=torch.randn(48))):
        a = dict(kw)
        out = torch._scaled_mm(a.pop("mat1"), a.pop("mat2"), a.pop("scale_a"), a.pop("scale_b"), **a)
        assert out.isfinite().all()
        with pytest.raises(vendor.ContractError):
            _call(kw)


# ---- flash-attn: every rule both ways --------------------------------------------------------

def _qkv(B=2, T=5, hq=4, hkv=2, D=8, dtype=F16):
    g = torch.Generator().manual_seed(B * T + hq)
    return [torch.randn(B, T, h, D, generator=g).to(dtype) for h in (hq, hkv, hkv)]


def _varlen(dtype=F16, cu=None, max_q=3, max_k=4, **kw):
    q, k, v = (torch.randn(n, h, 8).to(dtype) for n, h in ((5, 4), (7, 2), (7, 2)))
    cu_q = torch.tensor([0, 2, 5], dtype=torch.int32) if cu is None else cu
    cu_k = torch.tensor([0, 3, 7], dtype=torch.int32)
    return (q, k, v, cu_q, cu_k, max_q, max_k), kw


FA_BREAKS = {
    "dtype": [lambda: vendor.check_flash_attn(*_qkv(dtype=F32)),
              lambda: vendor.check_flash_attn(*_qkv()[:2], _qkv(dtype=BF16)[2])],
    "layout": [lambda: vendor.check_flash_attn(*_qkv()[:2], _qkv(T=6)[2]),
               lambda: vendor.check_flash_attn(torch.randn(2, 5, 4, 16).half()[..., ::2], *_qkv()[1:]),
               lambda: vendor.check_flash_attn(_qkv()[0][0], *_qkv()[1:])],
    "head-dim": [lambda: vendor.check_flash_attn(*_qkv(D=12)), lambda: vendor.check_flash_attn(*_qkv(D=264))],
    "gqa": [lambda: vendor.check_flash_attn(*_qkv(hq=3, hkv=2))],
    "window": [lambda: vendor.check_flash_attn(*_qkv(), window_size=(-2, 0)),
               lambda: vendor.check_flash_attn(*_qkv(), window_size=(1.5, 0)),
               lambda: vendor.check_flash_attn(*_qkv(), window_size=[3, 0]),
               lambda: vendor.left_window(-2)],
    "cu-seqlens": [lambda: vendor.check_flash_attn_varlen(*_varlen(cu=torch.tensor([0, 2, 5]))[0]),
                   lambda: vendor.check_flash_attn_varlen(*_varlen(cu=torch.tensor([0, 5], dtype=torch.int32))[0]),
                   lambda: vendor.check_flash_attn_varlen(*_varlen(cu=torch.tensor([1, 2, 5], dtype=torch.int32))[0]),
                   lambda: vendor.check_flash_attn_varlen(*_varlen(max_q=3.0)[0])],
}


@pytest.mark.parametrize("rule", list(vendor.FLASH_ATTN_RULES))
def test_flash_attn_rule_both_ways(rule):
    for window in ((-1, -1), (3, 0), (0, 0), (-1, 0)):
        vendor.check_flash_attn(*_qkv(), window_size=window)
        vendor.check_flash_attn(*_qkv(dtype=BF16, D=256, hq=6, hkv=3), window_size=window)
        vendor.check_flash_attn_varlen(*_varlen()[0], window_size=window)
    for call in FA_BREAKS[rule]:
        with pytest.raises(vendor.ContractError, match=rf"\[{rule}; flash-attn "):
            call()


def test_left_window_is_flash_attns_rule():
    assert vendor.left_window(-1) is None and vendor.left_window(0) == 0 and vendor.left_window(7) == 7
    for bad in (True, 1.5, "3", None):
        with pytest.raises(TypeError, match="window must be an int >= -1"):
            vendor.left_window(bad)


# ---- the attention paths: -1 means unlimited everywhere, below -1 raises everywhere -----------

def _causal(q, k, v, window):
    """Plain causal attention with a left window (None: unlimited), fp64."""
    T, rep = q.size(1), q.size(2) // k.size(2)
    k, v = k.repeat_interleave(rep, 2).double(), v.repeat_interleave(rep, 2).double()
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k) / math.sqrt(q.size(-1))
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    keep = (j <= i) if window is None else (j <= i) & (j >= i - window)
    return torch.einsum("bhqk,bkhd->bqhd", s.masked_fill(~keep, float("-inf")).softmax(-1), v)


class _FakeFlashAttn:
    """flash_attn_func's contract written plainly (window_size (left, 0), -1 unlimited)."""

    def __init__(self):
        self.windows = []

    def flash_attn_func(self, q, k, v, causal, window_size):
        assert causal and window_size[1] == 0
        self.windows.append(window_size)
        left = None if window_size[0] < 0 else window_size[0]
        return _causal(q, k, v, left).to(q.dtype), None  # FA3 returns (out, lse)


@pytest.mark.parametrize("window", [-1, 0, 9, 10, 1000])  # T = 10: -1, 0, < T, = T, > T
def test_attention_windows_on_sdpa_and_flash_attn(monkeypatch, window):
    q, k, v = (x.float() for x in _qkv(B=2, T=10, hq=4, hkv=2, D=8))
    want = _causal(q, k, v, None if window == -1 else window)
    torch.testing.assert_close(ops.attention(q, k, v, window).double(), want, rtol=1e-5, atol=1e-5)
    fake = _FakeFlashAttn()
    monkeypatch.setattr(vendor, "flash_attn_module", lambda q: fake)
    got = ops.attention(q.half(), k.half(), v.half(), window)  # fp16: through vendor.flash_attn_func
    assert fake.windows == [(window, 0)]
    torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-3)


def test_window_below_minus_one_raises_on_every_attention_path():
    q, k, v = (x.float() for x in _qkv(T=6))
    kc, vc = torch.randn(4, 4, 2, 8), torch.randn(4, 4, 2, 8)
    table, lens = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), torch.tensor([5, 8], dtype=torch.int32)
    calls = [lambda: ops.attention(q, k, v, -2),
             lambda: attention.paged_decode_attention(q[:, 0], kc, vc, table, lens, -2),
             lambda: attention.paged_prefill_attention(q[0, :3], kc, vc, table[0].long(), 5, -2),
             lambda: attention.paged_prefill_attention_batched(q[0, :3], kc, vc, table, [(0, 0, 3)], [5, 8], -2),
             lambda: paged_decode_attention(q[:, 0], kc, vc, table, lens, window=-2),
             lambda: plan_paged_decode([5, 8], 2, window=-2)]
    for call in calls:
        with pytest.raises(vendor.ContractError, match=r"window=-2.*\[window; flash-attn"):
            call()


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_paged_decode_window_minus_one_is_full_causal(backend):
    g = torch.Generator().manual_seed(3)
    q, kc, vc = torch.randn(2, 4, 8, generator=g), torch.randn(6, 4, 2, 8, generator=g), torch.randn(6, 4, 2, 8, generator=g)
    table, lens = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32), torch.tensor([9, 12], dtype=torch.int32)
    full = paged_decode_attention(q, kc, vc, table, lens, window=None, backend="torch")
    got = paged_decode_attention(q, kc, vc, table, lens, window=-1, backend=backend)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    assert (plan_paged_decode([9, 12], 2, window=-1, sm_count=4) == plan_paged_decode([9, 12], 2, sm_count=4)).all()
    if backend == "torch":  # the model's own decode path (gather + SDPA)
        torch.testing.assert_close(attention.paged_decode_attention(q, kc, vc, table, lens, -1), full,
                                   rtol=1e-5, atol=1e-5)


def test_paged_prefill_window_minus_one_is_full_causal():
    g = torch.Generator().manual_seed(4)
    q, kc, vc = torch.randn(3, 4, 8, generator=g), torch.randn(4, 4, 2, 8, generator=g), torch.randn(4, 4, 2, 8, generator=g)
    pages = torch.tensor([2, 0])
    full = attention.paged_prefill_attention(q, kc, vc, pages, 7, 10_000)
    torch.testing.assert_close(attention.paged_prefill_attention(q, kc, vc, pages, 7, -1), full)
    table = torch.tensor([[2, 0]], dtype=torch.int32)
    torch.testing.assert_close(attention.paged_prefill_attention_batched(q, kc, vc, table, [(0, 0, 3)], [7], -1),
                               full, rtol=1e-6, atol=1e-6)


# ---- fp8: every path's _scaled_mm calls obey the contract -------------------------------------

@pytest.fixture
def scaled_mm_calls(monkeypatch):
    """Every torch._scaled_mm call, checked against the contract independently of who called it."""
    calls, real = [], torch._scaled_mm

    def spy(mat1, mat2, scale_a, scale_b, bias=None, out_dtype=None, **kw):
        vendor.check_scaled_mm(mat1, mat2, scale_a, scale_b, bias=bias, out_dtype=out_dtype)
        calls.append((tuple(mat1.shape), tuple(mat2.shape), out_dtype, scale_a.numel() > 1))
        return real(mat1, mat2, scale_a, scale_b, bias=bias, out_dtype=out_dtype, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    return calls


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("m", [1, 37, 64])
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp8_linear_on_scaled_mm_obeys_the_contract(scaled_mm_calls, recipe, m, dtype, with_bias):
    """Odd token counts (the weight gradient reduces over them), fp32 and bf16 activations, a bias,
    both recipes: forward and backward through torch._scaled_mm, every call within CUDA's rules, the
    results those of the torch reference backend (the same quantisation and roundings)."""
    g = torch.Generator().manual_seed(m)
    x, w = torch.randn(m, 64, generator=g).to(dtype), torch.randn(48, 64, generator=g) / 8
    b = torch.randn(48, generator=g) if with_bias else None
    gy = torch.randn(m, 48, generator=g).to(dtype)
    results = {}
    for backend in ("scaled_mm", "torch"):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        br = None if b is None else b.clone().requires_grad_()
        y = fp8_linear(xr, wr, br, recipe=recipe, backend=backend)
        y.backward(gy)
        results[backend] = (y, xr.grad, wr.grad, None if br is None else br.grad)
        assert y.shape == (m, 48) and y.dtype == dtype and xr.grad.dtype == dtype and wr.grad.dtype == F32
    assert len(scaled_mm_calls) == 3  # forward, dgrad, wgrad: only the scaled_mm backend calls it
    assert all(k % 16 == 0 for _, (k, _), _, _ in scaled_mm_calls)  # wgrad's K = padded M
    for got, want in zip(*results.values()):
        if want is not None:
            torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def _tiny(seq_len=25, dtype=F32):
    torch.manual_seed(0)
    model = GPT(config_for_depth(1, vocab_size=256, sequence_len=seq_len, head_dim=32), compute_dtype=dtype)
    model.init_weights()
    return model


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_model_training_step_in_fp8_goes_through_the_contract(scaled_mm_calls, recipe):
    """The CPU default for fp8 linears is the GPU's vendor call (torch._scaled_mm through
    vendor.scaled_mm), so a training step exercises CUDA's rules: 2 x 25 = 50 tokens (not a
    multiple of 16), bf16 activations."""
    assert ops.decide_backend("fp8_linear", torch.device("cpu")) == "scaled_mm"
    model = _tiny(dtype=BF16)
    model.set_linear_precision({"attn": "fp8", "mlp": "fp8", "lm_head": "fp8"}, recipe)
    model.train()
    x = torch.randint(0, 256, (2, 25))
    loss = model(x, x)
    loss.backward()
    assert math.isfinite(loss.item())
    n_linears = sum(len(v) for v in model.linears().values())
    assert len(scaled_mm_calls) == 3 * n_linears
    assert all(rw == (recipe == "rowwise") for *_, rw in scaled_mm_calls)


def test_precision_report_goes_through_the_contract(scaled_mm_calls):
    """The report's fp8 settings run on an fp32 copy of the model: fp32 activations, row-wise too
    (row-wise GEMMs write bf16 under the contract, cast back)."""
    model = _tiny(seq_len=32)
    x = torch.randint(0, 256, (3, 32))
    report = precision_report(model, x, x, max_tokens=64)
    assert report["tokens"] == 64 and set(report["settings"]) == set(SETTINGS)
    assert any(rw for *_, rw in scaled_mm_calls) and any(not rw for *_, rw in scaled_mm_calls)
    for name, r in report["settings"].items():
        assert math.isfinite(r["loss"]) and 0 < r["logits_rel_err"] < 0.5, (name, r)
        errs = list(r["gemms"].values())  # c_proj starts at zero (nanochat's init): its error is 0
        assert len(errs) == 6 + 1 and all(0 <= e < 0.2 for e in errs) and max(errs) > 0, (name, r["gemms"])


def test_precision_report_releases_each_layer_input_and_leaves_the_model_alone(monkeypatch):
    """Bounded memory: when the last layer (lm_head) is measured, the inputs of the layers before it
    are gone (the old report kept all 145 of d24's alive: ~34 GB); no hook outlives the report; the
    given model keeps training's dtypes, precisions and weights."""
    model = _tiny(seq_len=32, dtype=BF16)
    model.set_linear_precision({"mlp": "fp8"}, "rowwise")
    before = {n: (p.dtype, p.clone()) for n, p in model.named_parameters()}
    vocab = model.lm_head.weight.size(0)
    inputs, alive_at_head, real = [], [], ops.linear

    def spy(inp, weight, precision=None, recipe="tensorwise"):
        if precision is None:  # the fp32 copy's own forward: remember each layer's input
            inputs.append(weakref.ref(inp))
        elif weight.size(0) == vocab and not alive_at_head:  # the report measures lm_head
            alive_at_head.append(sum(r() is not None for r in inputs))
        return real(inp, weight, precision, recipe)

    monkeypatch.setattr(ops, "linear", spy)
    precision_report(model, torch.randint(0, 256, (2, 32)), torch.randint(0, 256, (2, 32)))
    assert len(inputs) >= 7 and alive_at_head and alive_at_head[0] <= 2, (len(inputs), alive_at_head)
    assert model.compute_dtype == BF16 and [m.precision for m in model.linears()["mlp"]] == ["fp8", "fp8"]
    assert all(not m._forward_hooks for m in model.modules())
    for n, p in model.named_parameters():
        assert p.dtype == before[n][0] and torch.equal(p, before[n][1]), n


# ---- FA3 without a source build: the kernel hub's client, found past nanofast's own kernels/ ---

def _fake_hub(tmp_path, body: str):
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text(body)
    info = site / "kernels-0.11.7.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.11.7\n")
    (info / "RECORD").write_text("")
    return site


@pytest.mark.parametrize("online", [True, False])
def test_fa3_from_the_kernel_hub(monkeypatch, tmp_path, online):
    body = ("import types\n"
            "def get_kernel(name):\n"
            + ("    return types.SimpleNamespace(flash_attn_interface=types.SimpleNamespace(name=name))\n" if online
               else "    raise OSError('offline: cannot reach the hub')\n"))
    monkeypatch.syspath_prepend(str(_fake_hub(tmp_path, body)))
    monkeypatch.delitem(sys.modules, "kernels", raising=False)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # no locally built FA3
    module, why = vendor.load_flash_attn_3()
    if online:
        assert module.name == vendor.HUB_FA3 and why == f"kernel hub {vendor.HUB_FA3}"
    else:
        assert module is None and "not loadable (OSError: offline" in why
    monkeypatch.setenv("NANOFAST_HUB_FA3", "0")
    assert vendor.load_flash_attn_3() == (None, "NANOFAST_HUB_FA3=0")


def test_attention_backend_on_cpu_is_sdpa():
    assert vendor.attention_backend("cpu", BF16) == "SDPA (CPU)"
    assert vendor.flash_attn_module(torch.zeros(1, 1, 1, 8, dtype=BF16)) is None


def test_smoke_pretrain_in_rowwise_fp8_writes_the_precision_report(scaled_mm_calls, tmp_path):
    """`python train.py --stage pretrain --preset smoke --linear-precision fp8 --fp8-recipe rowwise`
    on CPU: every GEMM of the training steps and of the precision report through torch._scaled_mm
    under its CUDA contract, and the report's section written (the old report crashed on a GPU)."""
    import train
    from nanofast.presets import default_run_name, make_settings

    base = str(tmp_path)
    assert train.main(["--stage", "tokenizer", "--preset", "smoke", "--base-dir", base]) == 0
    assert train.main(["--stage", "pretrain", "--preset", "smoke", "--base-dir", base, "--linear-precision", "fp8",
                       "--fp8-recipe", "rowwise", "--num-iterations", "3", "--eval-every", "0"]) == 0
    run = default_run_name(make_settings("smoke"))
    section = json.loads((tmp_path / "runs" / run / "report" / "pretrain.json").read_text())
    report = section["precision_report"]
    assert set(report["settings"]) == set(SETTINGS) and all(math.isfinite(r["loss"]) for r in report["settings"].values())
    assert any(rw and out == BF16 for *_, out, rw in scaled_mm_calls)  # row-wise GEMMs, bf16 out
