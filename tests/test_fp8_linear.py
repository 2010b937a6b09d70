"""fp8_linear (forward and backward) against fp32 maths, across backends and recipes; the model's
per-class GEMM precision; training a tiny model in fp8 / fp16 vs bf16; the precision report.

Error budgets (relative Frobenius error vs the fp32 result, K >= 64): e4m3 has 3 mantissa bits
(unit roundoff 2^-4), e5m2 2 bits (2^-3); a dot product of K such products averages the
independent rounding errors, so the output error sits well below one unit roundoff:
    forward y (e4m3 x e4m3)        <= 0.05
    dx (e5m2 grad x e4m3 weight)   <= 0.10
    dw (e5m2 grad x e4m3 x)        <= 0.10
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from nanofast import ops
from nanofast.kernels import fp8_linear
from nanofast.model import GPT, config_for_depth, parse_linear_precision
from nanofast.optim import MuonAdamW
from nanofast.precision import precision_report, precision_table
from nanofast.trainer import LossScaler, backward_and_step

BUDGET = {"y": 0.05, "dx": 0.10, "dw": 0.10}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _case(M=37, K=64, N=48, seed=0, dtype=torch.float32, outlier=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    if outlier:
        # One token 1e5x larger: with one scale per tensor every other row lands in e4m3's
        # subnormal range (below 2^-6 of the max), where the relative precision collapses.
        x[3] *= 1e5
    w = torch.randn(N, K, generator=g) / math.sqrt(K)
    gy = torch.randn(M, N, generator=g)
    return x.to(dtype), w, gy.to(dtype)


def _run(x, w, gy, **kw):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    y = fp8_linear(x, w, **kw)
    y.backward(gy)
    return y.detach(), x.grad, w.grad


def _exact(x, w, gy):
    x = x.double().requires_grad_()
    w = w.double().requires_grad_()
    y = x @ w.t()
    y.backward(gy.double())
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("backend", ["torch", "scaled_mm", "triton", "triton_persistent"])
@pytest.mark.parametrize("shape", [(1, 64, 16), (37, 64, 48), (130, 96, 64), (64, 48, 32)],
                         ids=lambda s: "x".join(map(str, s)))
def test_fp8_linear_within_budget_and_backends_agree(shape, backend, recipe):
    x, w, gy = _case(*shape)
    got = _run(x, w, gy, recipe=recipe, backend=backend)
    want = _exact(x, w, gy)
    # Every backend quantises to the same fp8 codes (the Triton kernels round to the fp8 grid before
    # their conversion, so the interpreter's conversion does not matter: tests/test_fp8_quant.py):
    # one budget for all.
    for name, a, b in zip(("y", "dx", "dw"), got, want):
        assert _rel(a, b) <= BUDGET[name], (name, _rel(a, b))
    assert got[0].dtype == x.dtype and got[2].dtype == w.dtype
    if backend == "scaled_mm":  # the same quantised operands: only the fp32 summation order differs
        ref = _run(x, w, gy, recipe=recipe, backend="torch")
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tokens", [64, 37, 1])
def test_persistent_backend_takes_tma_for_any_token_count(monkeypatch, tokens):
    """backend='triton_persistent': forward, dgrad and the tensorwise weight gradient all run the
    persistent TMA kernel, whatever the token count M: the weight gradient reduces over M, and
    fp8_linear pads M to a multiple of 16 with zero rows (as CUDA's _scaled_mm needs too), so its
    operands always have 16-byte rows."""
    gemm = importlib.import_module("nanofast.kernels.fp8_gemm")  # the module (the package exports the function)

    calls = []

    def spy(persistent, launch):
        def run(*args, **kwargs):
            calls.append(persistent)
            return launch(*args, **kwargs)
        return run

    for persistent, launchers in ((False, gemm.TRITON_LAUNCHERS), (True, gemm.TRITON_PERSISTENT_LAUNCHERS)):
        monkeypatch.setattr(launchers, "gemm", spy(persistent, launchers.gemm))
    x, w, gy = _case(tokens, 48, 32)
    got = _run(x, w, gy, recipe="tensorwise", backend="triton_persistent")
    assert calls == [True, True, True]
    for name, a, b in zip(("y", "dx", "dw"), got, _exact(x, w, gy)):
        assert _rel(a, b) <= 4.0 * BUDGET[name], (name, _rel(a, b))


def test_rowwise_beats_tensorwise_on_outlier_rows():
    x, w, gy = _case(outlier=True)
    want = _exact(x, w, gy)[0]
    errs = {r: _rel(_run(x, w, gy, recipe=r, backend="torch")[0][torch.arange(37) != 3],
                    want[torch.arange(37) != 3]) for r in ("tensorwise", "rowwise")}
    assert errs["rowwise"] < errs["tensorwise"] / 2, errs


def test_leading_dims_bf16_activations_and_bias():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, 32, generator=g).to(torch.bfloat16)
    w, b = torch.randn(16, 32, generator=g) / 6, torch.randn(16, generator=g)
    y = fp8_linear(x, w, b, backend="scaled_mm")
    assert y.shape == (2, 3, 5, 16) and y.dtype == torch.bfloat16
    assert _rel(y, x.double() @ w.double().t() + b.double()) <= BUDGET["y"]


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(x=torch.randn(4, 20), w=torch.randn(16, 20)), ValueError, "multiples of 16"),
    (dict(x=torch.randn(4, 32), w=torch.randn(24, 32)), ValueError, "multiples of 16"),
    (dict(x=torch.randn(4, 32), w=torch.randn(16, 48)), ValueError, "must equal weight's K"),
    (dict(x=torch.randn(4, 32).to(torch.int32), w=torch.randn(16, 32)), TypeError, "x must be"),
    (dict(x=torch.randn(4, 32), w=torch.randn(16, 32), recipe="blockwise"), ValueError, "recipe"),
    (dict(x=torch.randn(4, 32), w=torch.randn(16, 32), backend="te"), ValueError, "backend"),
    (dict(x=torch.randn(4, 32), w=torch.randn(16, 32), bias=torch.randn(3)), ValueError, "bias"),
])
def test_errors(kwargs, exc, msg):
    x, w = kwargs.pop("x"), kwargs.pop("w")
    with pytest.raises(exc, match=msg):
        fp8_linear(x, w, **kwargs)


# ---- the model's GEMM precision ----------------------------------------------------------------

def _tiny(seed=0, dtype=torch.float32) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config_for_depth(2, vocab_size=256, sequence_len=32, head_dim=32), compute_dtype=dtype)
    model.init_weights()
    return model


def test_parse_and_set_linear_precision():
    assert parse_linear_precision("fp8") == {"attn": "fp8", "mlp": "fp8"}
    assert parse_linear_precision("attn=fp16,lm_head=bf16") == {"attn": "fp16", "lm_head": "bf16"}
    assert parse_linear_precision(None) == {}
    for bad in ("fp4", "attn=fp4", "head=fp8"):
        with pytest.raises(ValueError):
            parse_linear_precision(bad)
    model = _tiny()
    with torch.no_grad():  # the zero-initialised output projections would hide every GEMM's rounding
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randint(0, 256, (2, 32))
    base = model(x)
    model.set_linear_precision({"attn": "fp8", "mlp": "fp8"})
    assert {m.precision for m in model.linears()["attn"]} == {"fp8"} and model.lm_head.precision is None
    model.train()
    assert not torch.equal(model(x), base)  # fp8 GEMMs in training
    model.eval()
    assert torch.equal(model(x), base)  # ... and the compute dtype for evaluation and inference


def _markov_batches(steps: int, batch: int = 8, T: int = 33, vocab: int = 128):
    """Sequences from a fixed random Markov chain: the best achievable loss is the chain's entropy,
    so the loss keeps meaning something after the easy part is learned."""
    g = torch.Generator().manual_seed(5)
    probs = torch.softmax(torch.randn(vocab, vocab, generator=g) * 3, dim=-1)
    entropy = -(probs * probs.log()).sum(-1).mean().item()
    out = []
    for _ in range(steps):
        seq = [torch.randint(0, vocab, (batch,), generator=g)]
        for _ in range(T - 1):
            seq.append(torch.multinomial(probs[seq[-1]], 1, generator=g)[:, 0])
        out.append(torch.stack(seq, 1))
    return out, entropy


def _train(precision: str | None, dtype: torch.dtype, batches: list[torch.Tensor]) -> float:
    """Final loss (mean of the last 20 steps) of a depth-1 model (d_model 64, vocab 128): small
    enough that bf16/fp16 matmuls, emulated on CPU, stay fast."""
    torch.manual_seed(0)
    model = GPT(config_for_depth(1, vocab_size=128, sequence_len=32, head_dim=32), compute_dtype=dtype)
    model.init_weights()
    model.set_linear_precision(parse_linear_precision(precision))
    opt = MuonAdamW(model.param_groups())
    scaler = LossScaler() if dtype == torch.float16 else None  # fp16 trains with loss scaling
    losses = []
    for seq in batches:
        loss = model(seq[:, :-1], seq[:, 1:])
        backward_and_step(loss, opt, scaler)
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return sum(losses[-20:]) / 20


def test_tiny_model_trains_in_fp8_and_fp16_about_as_well_as_bf16():
    """200 steps on the same batches: fp8 (tensorwise, torch._scaled_mm) and fp16 (loss scaling)
    end within 0.05 nats of bf16, all well below the uniform loss ln(128) = 4.85."""
    batches, entropy = _markov_batches(200)
    ops.set_fp8_backend("scaled_mm")
    try:
        final = {"bf16": _train(None, torch.bfloat16, batches), "fp8": _train("fp8", torch.bfloat16, batches),
                 "fp16": _train(None, torch.float16, batches)}
    finally:
        ops.set_fp8_backend(None)
    assert final["bf16"] < math.log(128) - 1.0, (final, entropy)  # it learned the chain's structure
    for name in ("fp8", "fp16"):
        assert abs(final[name] - final["bf16"]) <= 0.05, (final, entropy)


def test_precision_report_orders_the_formats():
    model = _tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randint(0, 256, (2, 32))
    report = precision_report(model, x, x)
    s = report["settings"]
    mean = {k: sum(v["gemms"].values()) / len(v["gemms"]) for k, v in s.items()}
    assert mean["fp16"] < mean["bf16"] < mean["fp8"]  # 10, 7 and 3 mantissa bits
    assert len(s["fp8"]["gemms"]) == 2 * 6 + 1 and all(0 < e < 0.1 for e in s["fp8"]["gemms"].values())
    assert "| fp8 |" in precision_table(report)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_linear_custom_ops_pass_opcheck_and_compile_like_eager(recipe):
    """torch.compile sees fp8_linear as custom ops (Dynamo cannot trace a Triton launch under the
    interpreter): their fakes must describe the kernels' outputs, and the compiled forward and
    backward must give the eager results (same kernels, so within fp32 rounding of the epilogue)."""
    torch.manual_seed(0)
    x = torch.randn(24, 64, dtype=torch.float16)
    w = 0.1 * torch.randn(32, 64)
    op = torch.ops.nanofast.fp8_linear_tensorwise_fwd if recipe == "tensorwise" else torch.ops.nanofast.fp8_linear_rowwise_fwd
    torch.library.opcheck(op, (x, w, None, "triton", "triton"), test_utils=("test_schema", "test_faketensor"))

    def run(fn):
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = fn(xg, wg)
        out.float().square().sum().backward()
        return out.detach(), xg.grad, wg.grad

    eager = run(lambda a, b: fp8_linear(a, b, recipe=recipe, backend="triton"))
    compiled = run(torch.compile(lambda a, b: fp8_linear(a, b, recipe=recipe, backend="triton"), fullgraph=True))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-3, atol=1e-3)


def test_set_fp8_backend_takes_the_kernels_own_list():
    """One list of fp8 backends, the kernel module's: every entry is accepted, anything else named."""
    from nanofast import kernels, ops

    try:
        for backend in (*kernels.FP8_BACKENDS, None):
            ops.set_fp8_backend(backend)
    finally:
        ops.set_fp8_backend(None)
    with pytest.raises(ValueError, match="triton_persistent"):
        ops.set_fp8_backend("cublas")


# ---- FP8Linear: the nn.Linear drop-in ----------------------------------------------------------

def _linear_pair(bias=True, seed=3, **fp8_kwargs):
    from nanofast.kernels.fp8_linear import FP8Linear

    torch.manual_seed(seed)
    ref = torch.nn.Linear(64, 48, bias=bias)
    fp8 = FP8Linear(64, 48, bias=bias, **fp8_kwargs)
    fp8.load_state_dict(ref.state_dict())
    return ref, fp8


def _fwd_bwd(module, x, gy):
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(gy)
    return y.detach(), x.grad, module.weight.grad, None if module.bias is None else module.bias.grad


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp8_linear_module_matches_nn_linear_within_budget(recipe, backend):
    """FP8Linear vs nn.Linear with the same parameters, fp32, leading dims (2, 5): 10 tokens, so
    fp8_linear's zero-row padding runs too. y, dx and dW within the file's fp8 budgets; the bias
    gradient (an fp32 sum of the output gradient, no fp8 on its path) to fp32 rounding."""
    ref, fp8 = _linear_pair(recipe=recipe, backend=backend)
    g = torch.Generator().manual_seed(4)
    x, gy = torch.randn(2, 5, 64, generator=g), torch.randn(2, 5, 48, generator=g)
    want, got = _fwd_bwd(ref, x, gy), _fwd_bwd(fp8, x, gy)
    assert got[0].shape == (2, 5, 48) and got[0].dtype == torch.float32 and got[2].dtype == torch.float32
    for name, a, b in zip(("y", "dx", "dw"), got, want):
        assert _rel(a, b) <= BUDGET[name], (name, _rel(a, b))
    torch.testing.assert_close(got[3], want[3], rtol=1e-5, atol=1e-5)
    # The layer really quantised: fp8's error is far above fp32 rounding (a guard against a forward
    # that fell back to F.linear).
    assert _rel(got[0], want[0]) > 1e-3


def test_fp8_linear_module_is_fp8_linear_on_bf16_activations_without_bias():
    ref, fp8 = _linear_pair(bias=False, recipe="rowwise")
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(5)).bfloat16()
    y = fp8(x)
    assert y.dtype == torch.bfloat16 and fp8.bias is None and set(fp8.state_dict()) == {"weight"}
    assert torch.equal(y, fp8_linear(x, ref.weight, recipe="rowwise"))


def test_fp8_linear_from_linear_shares_parameters():
    from nanofast.kernels.fp8_linear import FP8Linear

    ref, _ = _linear_pair()
    ref.eval()
    fp8 = FP8Linear.from_linear(ref, recipe="rowwise", backend="torch")
    assert isinstance(fp8, torch.nn.Linear) and fp8.weight is ref.weight and fp8.bias is ref.bias
    assert (fp8.in_features, fp8.out_features, fp8.recipe, fp8.backend) == (64, 48, "rowwise", "torch")
    assert not fp8.training and fp8.weight.device.type == "cpu"
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(6))
    assert torch.equal(fp8(x), fp8_linear(x, ref.weight, ref.bias, recipe="rowwise", backend="torch"))
    # Shared, not copied: an optimizer step on the old layer's parameters moves the new layer.
    before = fp8(x).detach()
    with torch.no_grad():
        ref.weight.mul_(2)
    assert not torch.equal(fp8(x), before)
    no_bias = FP8Linear.from_linear(torch.nn.Linear(32, 16, bias=False))
    assert no_bias.bias is None and no_bias.recipe == "tensorwise" and no_bias.backend is None
    text = repr(fp8)
    assert "in_features=64, out_features=48, bias=True" in text and "recipe='rowwise'" in text and "backend='torch'" in text


def test_fp8_linear_state_dict_round_trips_with_nn_linear():
    from nanofast.kernels.fp8_linear import FP8Linear

    torch.manual_seed(7)
    fp8 = FP8Linear(32, 16, dtype=torch.bfloat16)
    assert fp8.weight.dtype == torch.bfloat16 and fp8.weight.shape == (16, 32) and fp8.bias.shape == (16,)
    plain = torch.nn.Linear(32, 16, dtype=torch.bfloat16)
    plain.load_state_dict(fp8.state_dict())  # strict: the same keys, shapes and dtypes
    back = FP8Linear(32, 16, dtype=torch.bfloat16)
    back.load_state_dict(plain.state_dict())
    assert list(back.state_dict()) == list(plain.state_dict()) == ["weight", "bias"]
    for k, v in fp8.state_dict().items():
        assert torch.equal(back.state_dict()[k], v) and torch.equal(plain.state_dict()[k], v)
    # nn.Linear's initialisation, not zeros or a constant: the weight bound is 1/sqrt(in_features).
    assert 0 < fp8.weight.float().abs().max() <= 32 ** -0.5 and fp8.weight.float().std() > 0.05


@pytest.mark.parametrize("make, exc, msg", [
    (lambda C: C(20, 16), ValueError, "in_features must be a positive multiple of 16"),
    (lambda C: C(32, 24), ValueError, "out_features must be a positive multiple of 16"),
    (lambda C: C(0, 16), ValueError, "in_features"),
    (lambda C: C(32.0, 16), TypeError, "in_features must be an int"),
    (lambda C: C(True, 16), TypeError, "in_features must be an int"),
    (lambda C: C(32, 16, bias="yes"), TypeError, "bias must be a bool"),
    (lambda C: C(32, 16, recipe="blockwise"), ValueError, "recipe must be one of"),
    (lambda C: C(32, 16, backend="te"), ValueError, "backend must be one of"),
    (lambda C: C.from_linear(torch.nn.Conv1d(32, 16, 1)), TypeError, "linear must be a torch.nn.Linear"),
    (lambda C: C.from_linear(torch.nn.Linear(20, 16)), ValueError, "in_features must be a positive multiple"),
    (lambda C: C.from_linear(torch.nn.Linear(32, 16), recipe="delayed"), ValueError, "recipe"),
    (lambda C: C(32, 16)(torch.randn(4, 48)), ValueError, "must equal weight's K"),
])
def test_fp8_linear_module_errors(make, exc, msg):
    from nanofast.kernels.fp8_linear import FP8Linear

    with pytest.raises(exc, match=msg):
        make(FP8Linear)
