"""Tests for nanofast.optim: MuonAdamW against a plain per-parameter reference, schedules,
state_dict round trip, errors, and 2 gloo processes against 1 process."""
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanofast.kernels.newton_schulz import CLASSIC_NS_COEFFS, POLAR_EXPRESS_COEFFS
from nanofast.optim import (MuonAdamW, apply_schedules, finetune_momentum, lr_multiplier, muon_momentum,
                            muon_weight_decay)
from newton_schulz_fp64 import fro, orthogonalise

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("dist_optim_worker", HERE / "dist_optim_worker.py")
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)


# -----------------------------------------------------------------------------
# A straightforward reference: one parameter at a time, fp64, explicit loops over rows/columns.

def ref_muon(p, g, st, group):
    m, n = p.shape
    mu, beta2 = group["momentum"], group["beta2"]
    if not st:
        st["m"] = torch.zeros_like(p)
        st["v"] = torch.zeros(m if m >= n else n, dtype=p.dtype)
    st["m"] = mu * st["m"] + (1 - mu) * g
    u = (1 - mu) * g + mu * st["m"]
    # row equilibration: every row rescaled to the mean row norm
    target = fro(u) / math.sqrt(m)
    u = torch.stack([u[i] * (target / max(fro(u[i]), 1e-6)) for i in range(m)])
    coeffs = {"polar_express": POLAR_EXPRESS_COEFFS, "classic": CLASSIC_NS_COEFFS * group["ns_steps"]}
    u = orthogonalise(u, coeffs[group.get("ns_coefficients", "polar_express")][:group["ns_steps"]])
    u = u * (math.sqrt(min(m, n)) / max(fro(u), 1e-6))
    # NorMuon: one second-moment entry per row (m >= n) or per column
    lines = [u[i] for i in range(m)] if m >= n else [u[:, j] for j in range(n)]
    for k, line in enumerate(lines):
        st["v"][k] = beta2 * st["v"][k] + (1 - beta2) * float((line ** 2).mean())
    scales = [1 / math.sqrt(max(float(st["v"][k]), 1e-10)) for k in range(len(lines))]
    scaled = torch.stack([u[i] * scales[i] for i in range(m)]) if m >= n else \
        torch.stack([u[:, j] * scales[j] for j in range(n)], dim=1)
    u = scaled * (fro(u) / max(fro(scaled), 1e-10))
    lr = group["lr"] * math.sqrt(max(1.0, m / n))
    new = p.clone()
    for i in range(m):
        for j in range(n):
            decay = group["weight_decay"] * p[i, j] if u[i, j] * p[i, j] >= 0 else 0.0
            new[i, j] = p[i, j] - lr * (u[i, j] + decay)
    return new


def ref_adamw(p, g, st, group):
    b1, b2 = group["betas"]
    if not st:
        st.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
    st["t"] += 1
    p = p * (1 - group["lr"] * group["weight_decay"])
    st["m"] = b1 * st["m"] + (1 - b1) * g
    st["v"] = b2 * st["v"] + (1 - b2) * g * g
    m_hat = st["m"] / (1 - b1 ** st["t"])
    v_hat = st["v"] / (1 - b2 ** st["t"])
    return p - group["lr"] * m_hat / (v_hat.sqrt() + group["eps"])


def ref_train(P, steps=W.STEPS, ns_coefficients="polar_express"):
    """The worker's training loop with the reference update and schedules written out."""
    idx, target = W.make_batch()
    groups, state = W.param_groups(P), {}
    for group in groups:
        group["ns_coefficients"] = ns_coefficients
    for step in range(steps):
        for ps in P.values():
            for p in ps:
                p.grad = None
        W.loss_fn(P, idx, target).backward()
        lrm = min((step + 1) / 2, 1.0)  # warmup_steps=2, and the warmdown starts after step 3
        mom = (1 - step / 400) * 0.85 + step / 400 * 0.97
        with torch.no_grad():
            for group in groups:
                group = dict(group, lr=group["lr"] * lrm)
                if group["kind"] == "muon":
                    group["momentum"] = mom
                    group["weight_decay"] *= 0.5 * (1 + math.cos(math.pi * step / W.NUM_ITERATIONS))
                update = ref_muon if group["kind"] == "muon" else ref_adamw
                for p in group["params"]:
                    p.copy_(update(p.detach().clone(), p.grad, state.setdefault(id(p), {}), group))


def max_rel_err(A, B):
    worst = 0.0
    for k in A:
        for a, b in zip(A[k], B[k]):
            worst = max(worst, ((a.detach().double() - b.detach().double()).abs().max() /
                                b.detach().double().abs().max()).item())
    return worst


def moved(P0, P1):
    return min((a.detach() - b.detach()).abs().max().item() for k in P0 for a, b in zip(P0[k], P1[k]))


# -----------------------------------------------------------------------------

def test_matches_reference_fp64():
    P_impl, P_ref = W.make_params(torch.float64), W.make_params(torch.float64)
    W.train(P_impl, MuonAdamW(W.param_groups(P_impl)), *W.make_batch())
    ref_train(P_ref)
    assert moved(P_ref, W.make_params(torch.float64)) > 1e-4  # every param really was updated
    assert max_rel_err(P_impl, P_ref) < 1e-6


def test_matches_reference_fp32():
    P_impl, P_ref = W.make_params(torch.float32), W.make_params(torch.float64)
    W.train(P_impl, MuonAdamW(W.param_groups(P_impl)), *W.make_batch())
    ref_train(P_ref)
    assert max_rel_err(P_impl, P_ref) < 1e-4  # fp32 rounding, amplified by the 5 quintic steps


def test_classic_coefficients_match_reference():
    P_impl, P_ref = W.make_params(torch.float64), W.make_params(torch.float64)
    groups = W.param_groups(P_impl)
    for g in groups:
        if g["kind"] == "muon":
            g["ns_coefficients"] = "classic"
    W.train(P_impl, MuonAdamW(groups), *W.make_batch(), steps=2)
    ref_train(P_ref, steps=2, ns_coefficients="classic")
    assert max_rel_err(P_impl, P_ref) < 1e-6


def test_state_dict_round_trip_continues_exactly():
    idx, target = W.make_batch()
    P = W.make_params()
    opt = MuonAdamW(W.param_groups(P))
    W.train(P, opt, idx, target, start=0, steps=2)
    saved_params = {k: [p.detach().clone() for p in ps] for k, ps in P.items()}
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    W.train(P, opt, idx, target, start=2, steps=3)

    P2 = {k: [p.clone().requires_grad_() for p in ps] for k, ps in saved_params.items()}
    opt2 = MuonAdamW(W.param_groups(P2))
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf))
    assert "momentum_buffer" in opt2.state[P2["wide"][0]] and opt2.state[P2["emb"][0]]["step"] == 2
    W.train(P2, opt2, idx, target, start=2, steps=3)
    for k in P:
        for a, b in zip(P[k], P2[k]):
            assert torch.equal(a, b), k


def test_defaults_and_initial_values():
    p = torch.zeros(4, 4, requires_grad=True)
    q = torch.zeros(3, requires_grad=True)
    opt = MuonAdamW([dict(kind="muon", params=[p], weight_decay=0.2), dict(kind="adamw", params=[q], lr=0.1)])
    muon, adamw = opt.param_groups
    assert (muon["lr"], muon["momentum"], muon["ns_steps"], muon["beta2"]) == (0.02, 0.95, 5, 0.9)
    assert muon["initial_lr"] == 0.02 and muon["initial_weight_decay"] == 0.2
    assert adamw["eps"] == 1e-10 and adamw["initial_lr"] == 0.1


def test_skips_params_without_grad():
    p = torch.randn(4, 6, requires_grad=True)
    q = torch.randn(3, requires_grad=True)
    opt = MuonAdamW([dict(kind="muon", params=[p]), dict(kind="adamw", params=[q], lr=0.1)])
    before = (p.detach().clone(), q.detach().clone())
    opt.step()
    assert torch.equal(p, before[0]) and torch.equal(q, before[1]) and not opt.state


@pytest.mark.parametrize("groups, match", [
    ([dict(kind="sgd", params=[torch.zeros(2, 2)])], "'kind' must be 'adamw' or 'muon', got 'sgd'"),
    ([dict(params=[torch.zeros(2, 2)])], "'kind' must be 'adamw' or 'muon', got None"),
    ([dict(kind="adamw", params=[torch.zeros(2)])], "'adamw' needs an 'lr'"),
    ([dict(kind="muon", params=[torch.zeros(4)])], "muon params must have shape \\(..., m, n\\)"),
    ([dict(kind="muon", params=[torch.zeros(2, 3), torch.zeros(3, 2)])], "must all have the same shape"),
    ([dict(kind="muon", params=[torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64)])], "one dtype"),
    ([dict(kind="muon", params=[torch.zeros(2, 3)], ns_steps=6)], "steps must be <= 5"),
    ([dict(kind="muon", params=[torch.zeros(2, 3)], ns_coefficients="foo")], "coefficients must be one of"),
])
def test_bad_groups(groups, match):
    with pytest.raises(ValueError, match=match):
        MuonAdamW(groups)


def test_partial_grads_in_muon_group():
    a, b = torch.randn(2, 3, requires_grad=True), torch.randn(2, 3, requires_grad=True)
    opt = MuonAdamW([dict(kind="muon", params=[a, b])])
    a.grad = torch.ones(2, 3)
    with pytest.raises(ValueError, match="all have a .grad or all have none"):
        opt.step()


# -----------------------------------------------------------------------------
# Schedules

def test_lr_multiplier_key_steps():
    n = 1000  # warmdown = 650 steps, starting after step 350
    assert lr_multiplier(0, n) == pytest.approx(1 / 40)
    assert lr_multiplier(39, n) == 1.0 and lr_multiplier(40, n) == 1.0 and lr_multiplier(350, n) == 1.0
    assert lr_multiplier(351, n) == pytest.approx(649 / 650 + (1 / 650) * 0.05)
    assert lr_multiplier(675, n) == pytest.approx(0.5 + 0.5 * 0.05)
    assert lr_multiplier(n, n) == pytest.approx(0.05)
    assert lr_multiplier(0, 10, warmup_steps=0, warmdown_ratio=0.0) == 1.0


def test_muon_momentum_key_steps():
    n = 2000  # warmdown = 1300 steps from step 700
    assert muon_momentum(0, n) == pytest.approx(0.85)
    assert muon_momentum(200, n) == pytest.approx(0.91)
    assert muon_momentum(400, n) == muon_momentum(700, n) == pytest.approx(0.97)
    assert muon_momentum(1350, n) == pytest.approx(0.935)
    assert muon_momentum(n, n) == pytest.approx(0.90)
    assert muon_momentum(500, 500, warmdown_ratio=0.0) == pytest.approx(0.97)


def test_finetune_momentum_ramps_to_095_and_stays():
    assert finetune_momentum(0) == pytest.approx(0.85)
    assert finetune_momentum(150) == pytest.approx(0.90)
    assert finetune_momentum(300) == finetune_momentum(5000) == pytest.approx(0.95)
    model = torch.nn.Linear(8, 8, bias=False)
    opt = MuonAdamW([dict(kind="muon", params=[model.weight], lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9,
                          weight_decay=0.0)])
    apply_schedules(opt, 150, 1000, warmup_steps=0, warmdown_ratio=0.5, final_lr_frac=0.0, finetune=True)
    assert opt.param_groups[0]["momentum"] == pytest.approx(0.90) and opt.param_groups[0]["weight_decay"] == 0.0
    apply_schedules(opt, 750, 1000, warmup_steps=0, warmdown_ratio=0.5, final_lr_frac=0.0, finetune=True)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)  # half way through the second half's decay


def test_muon_weight_decay_cosine():
    assert muon_weight_decay(0, 100, 0.2) == pytest.approx(0.2)
    assert muon_weight_decay(50, 100, 0.2) == pytest.approx(0.1)
    assert muon_weight_decay(25, 100, 0.2) == pytest.approx(0.1 * (1 + math.sqrt(0.5)))
    assert muon_weight_decay(100, 100, 0.2) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("fn", [lambda s, n: lr_multiplier(s, n), lambda s, n: muon_momentum(s, n),
                                lambda s, n: muon_weight_decay(s, n, 0.1)])
def test_schedule_errors(fn):
    with pytest.raises(ValueError, match="step must be in"):
        fn(11, 10)
    with pytest.raises(ValueError, match="step must be in"):
        fn(-1, 10)
    with pytest.raises(ValueError, match="num_iterations must be >= 1"):
        fn(0, 0)


def test_apply_schedules():
    p, q = torch.zeros(4, 4, requires_grad=True), torch.zeros(3, requires_grad=True)
    opt = MuonAdamW([dict(kind="muon", params=[p], lr=0.02, weight_decay=0.2),
                     dict(kind="adamw", params=[q], lr=0.1, weight_decay=0.01)])
    lrm = apply_schedules(opt, 500, 1000)
    muon, adamw = opt.param_groups
    assert lrm == pytest.approx(lr_multiplier(500, 1000))
    assert muon["lr"] == pytest.approx(0.02 * lrm) and adamw["lr"] == pytest.approx(0.1 * lrm)
    assert muon["momentum"] == pytest.approx(muon_momentum(500, 1000))
    assert muon["weight_decay"] == pytest.approx(0.1)
    assert adamw["weight_decay"] == 0.01 and "momentum" not in adamw
    apply_schedules(opt, 0, 1000)  # recomputed from the initial values, not compounded
    assert muon["lr"] == pytest.approx(0.02 / 40) and muon["weight_decay"] == pytest.approx(0.2)


# -----------------------------------------------------------------------------
# 2 processes (gloo) against 1 process on the full batch

def muon_owned(state_shapes: dict) -> set:
    suffix = ".momentum_buffer"
    return {k[:-len(suffix)] for k in state_shapes if k.endswith(suffix)}


def test_two_processes_match_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "dist_optim_worker.py"), str(tmp_path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, f"worker failed (rc={res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"

    P = W.make_params()
    W.train(P, MuonAdamW(W.param_groups(P)), *W.make_batch())
    assert moved(P, W.make_params()) > 1e-4
    for name in ("probed", "fallback"):
        D = torch.load(tmp_path / f"{name}.pt")
        for k in P:
            for a, b in zip(P[k], D[k]):
                torch.testing.assert_close(b, a.detach(), rtol=0, atol=1e-5, msg=f"{name} {k}")
        # The work really was sharded: each rank holds state only for what it owns.
        s0 = json.loads((tmp_path / f"{name}_state_rank0.json").read_text())
        s1 = json.loads((tmp_path / f"{name}_state_rank1.json").read_text())
        assert s0["emb.0.exp_avg"] == s1["emb.0.exp_avg"] == [W.VOCAB // 2, 32]  # reduce-scattered rows
        assert s0["head.0.exp_avg"] == [W.CLASSES, 48]  # dim 0 odd: all-reduced, full state
        assert muon_owned(s0) == {"wide.0", "wide.1", "square.0", "tall.0"}
        assert muon_owned(s1) == {"wide.2", "square.1"}  # wide.3 is padding; rank 1 owns no tall
        assert s1["wide.2.second_momentum_buffer"] == [1, 32] and s0["tall.0.second_momentum_buffer"] == [48, 1]
    support = json.loads((tmp_path / "support.json").read_text())
    assert set(support) == {"avg", "reduce_scatter", "gather_into_tensor"}


def test_muon_groups_can_run_newton_schulz_through_the_triton_kernels():
    """ns_backend='triton' (the Triton interpreter here) steps like the torch iteration."""
    from nanofast.optim import MuonAdamW

    torch.manual_seed(0)
    start = torch.randn(3, 24, 40)
    params = {b: torch.nn.Parameter(start.clone()) for b in ("torch", "triton")}
    grad = torch.randn(3, 24, 40)
    for backend, p in params.items():
        opt = MuonAdamW([dict(kind="muon", params=[p], lr=0.02, ns_backend=backend)])
        p.grad = grad.clone()
        opt.step()
    torch.testing.assert_close(params["triton"].data, params["torch"].data, atol=2e-6, rtol=1e-5)
    assert (params["triton"].data - start).abs().max() > 1e-3  # a real step was taken
