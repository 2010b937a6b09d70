"""The GPT against an independent, plainly written forward of nanochat's mathematics."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from nanofast.checkpoint import CheckpointError, load_nanochat
from nanofast.model import GPT, GPTConfig, config_for_depth, has_value_embed, window_sizes


def reference_logits(sd: dict, cfg: dict, idx: torch.Tensor) -> torch.Tensor:
    """nanochat's forward, from its description, straight off a state dict, in fp64."""
    sd = {k: v.double() for k, v in sd.items()}
    L, H, Hkv, C, T = cfg["n_layer"], cfg["n_head"], cfg["n_kv_head"], cfg["n_embd"], idx.size(1)
    D = C // H
    rms = lambda x: x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)
    inv = 100_000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]

    def rope(x):
        x1, x2 = x[..., :D // 2], x[..., D // 2:]
        return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], -1)

    long, short = T_cfg, -(-T_cfg // 4 // 128) * 128
    pattern = cfg["window_pattern"]
    x = rms(sd["transformer.wte.weight"][idx])
    gate = sd["smear_lambda"] * torch.sigmoid(x[:, 1:, :24] @ sd["smear_gate.weight"].T)
    x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], 1)
    x0, x_mid = x, None
    for i in range(L):
        p = f"transformer.h.{i}."
        x = sd["resid_lambdas"][i] * x + sd["x0_lambdas"][i] * x0
        h = rms(x)
        B = idx.size(0)
        q = (h @ sd[p + "attn.c_q.weight"].T).view(B, T, H, D)
        k = (h @ sd[p + "attn.c_k.weight"].T).view(B, T, Hkv, D)
        v = (h @ sd[p + "attn.c_v.weight"].T).view(B, T, Hkv, D)
        if f"value_embeds.{i}.weight" in sd:
            g = 3 * torch.sigmoid(h[..., :12] @ sd[p + "attn.ve_gate.weight"].T)
            v = v + g[..., None] * sd[f"value_embeds.{i}.weight"][idx].view(B, T, Hkv, D)
        q, k = rms(rope(q)) * 1.2, rms(rope(k)) * 1.2
        w = long if (i == L - 1 or pattern[i % len(pattern)] == "L") else short
        k, v = k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
        s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
        a, b = torch.arange(T)[:, None], torch.arange(T)[None, :]
        s = s.masked_fill(~((b <= a) & (b >= a - w)), float("-inf"))
        y = torch.einsum("bhts,bshd->bthd", s.softmax(-1), v).reshape(B, T, C)
        x = x + y @ sd[p + "attn.c_proj.weight"].T
        m = F.relu(rms(x) @ sd[p + "mlp.c_fc.weight"].T).square()
        x = x + m @ sd[p + "mlp.c_proj.weight"].T
        if i == L // 2:
            x_mid = x
    x = rms(x - sd["backout_lambda"] * x_mid)
    logits = (x @ sd["lm_head.weight"].T)[..., :cfg["vocab_size"]]
    return 15 * torch.tanh(logits / 15)


T_cfg = 256  # the model's sequence_len in these tests: S windows are 128 tokens


def random_model(cfg: GPTConfig, seed=0) -> GPT:
    """A model whose every weight is random (the real init zeroes projections, hiding bugs)."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.2) + (0.5 if "lambda" in name else 0))
    return model


CONFIGS = [
    GPTConfig(sequence_len=T_cfg, vocab_size=101, n_layer=3, n_head=2, n_kv_head=2, n_embd=64, window_pattern="SSSL"),
    GPTConfig(sequence_len=T_cfg, vocab_size=64, n_layer=4, n_head=6, n_kv_head=3, n_embd=96, window_pattern="SL"),
    GPTConfig(sequence_len=T_cfg, vocab_size=77, n_layer=1, n_head=3, n_kv_head=1, n_embd=48, window_pattern="L"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["mha-sssl", "gqa-sl", "mqa-1layer"])
@pytest.mark.parametrize("T", [1, 7, 150])
def test_logits_match_independent_reference(cfg, T):
    model = random_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, T))
    ref = reference_logits(model.state_dict(), cfg.to_dict(), idx)
    out = model(idx)
    assert out.shape == (2, T, cfg.vocab_size) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=1e-4)


def test_loss_at_init_is_uniform_and_backward_reaches_every_parameter():
    cfg = config_for_depth(2, vocab_size=300, sequence_len=32, head_dim=64)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights()
    idx = torch.randint(0, 300, (2, 32))
    loss = model(idx, idx)
    assert abs(loss.item() - math.log(300)) < 0.05  # lm_head ~ N(0, 0.001): near-uniform predictions
    rnd = random_model(cfg)
    rnd(idx, idx).backward()
    for name, p in rnd.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bf16_compute_keeps_fp32_masters_and_bf16_embeddings():
    cfg = config_for_depth(2, vocab_size=300, sequence_len=32, head_dim=64)
    model = GPT(cfg, compute_dtype=torch.bfloat16)
    model.init_weights()
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    assert model.transformer.h[0].attn.c_q.weight.dtype == torch.float32
    idx = torch.randint(0, 300, (1, 16))
    ref = GPT(cfg)
    ref.load_state_dict(model.state_dict())
    diff = (model(idx) - ref(idx)).abs().max()
    assert 0 < diff < 0.25  # bf16 activations: close to fp32, not identical


def test_depth_dial_and_windows():
    c4 = config_for_depth(4, 32768, 512)
    assert (c4.n_embd, c4.n_head, c4.head_dim, c4.padded_vocab_size) == (256, 2, 128, 32768)
    c6 = config_for_depth(6, 32768, 512, head_dim=64)
    assert (c6.n_embd, c6.n_head) == (384, 6)
    c20 = config_for_depth(20, 65, 2048)
    assert (c20.n_embd, c20.n_head, c20.padded_vocab_size) == (1280, 10, 128)
    assert window_sizes(config_for_depth(6, 100, 2048)) == [512, 512, 512, 2048, 512, 2048]
    assert window_sizes(config_for_depth(3, 100, 512, window_pattern="L")) == [512] * 3
    assert [has_value_embed(i, 5) for i in range(5)] == [True, False, True, False, True]


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_embd=100, n_head=3), "not divisible"),
    (dict(n_head=4, n_kv_head=3), "multiple of n_kv_head"),
    (dict(n_embd=60, n_head=20, n_kv_head=20), "even for rotary"),
    (dict(n_layer=0), "n_layer"),
    (dict(window_pattern="SXL"), "window_pattern"),
])
def test_impossible_shapes_raise_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        GPTConfig(**{**dict(n_embd=64, n_head=2, n_kv_head=2), **kwargs})
    assert "\n" not in str(e.value)


def test_impossible_depth():
    with pytest.raises(ValueError, match="depth"):
        config_for_depth(0, 100, 64)


def test_generate_greedy_is_deterministic_and_matches_argmax():
    cfg = config_for_depth(2, vocab_size=50, sequence_len=16, head_dim=64)
    model = random_model(cfg).eval()
    out = list(model.generate([1, 2, 3], 6))
    ids = [1, 2, 3]
    for tok in out:
        assert tok == model(torch.tensor([ids]))[0, -1].argmax().item()
        ids.append(tok)
    assert out == list(model.generate([1, 2, 3], 6))
    with pytest.raises(ValueError, match="non-empty prompt"):
        list(model.generate([], 2))


# ---- nanochat checkpoints -------------------------------------------------------------------------
def write_nanochat_checkpoint(directory, model: GPT, step: int, compiled_prefix=True):
    """A checkpoint as nanochat writes it: bf16 embeddings, `_orig_mod.` keys, meta json."""
    directory.mkdir(parents=True, exist_ok=True)
    sd = {("_orig_mod." if compiled_prefix else "") + k: (v.bfloat16() if "wte" in k or "value_embeds" in k else v)
          for k, v in model.state_dict().items()}
    torch.save(sd, directory / f"model_{step:06d}.pt")
    (directory / f"meta_{step:06d}.json").write_text(json.dumps({"step": step, "model_config": model.config.to_dict()}))


def test_load_nanochat_directory_and_file_give_reference_logits(tmp_path):
    cfg = CONFIGS[1]
    src = random_model(cfg, seed=3)
    write_nanochat_checkpoint(tmp_path, random_model(cfg, seed=9), 100)
    write_nanochat_checkpoint(tmp_path, src, 200)
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    expected_sd = {k: (v.bfloat16().float() if "wte" in k or "value_embeds" in k else v) for k, v in src.state_dict().items()}
    ref = reference_logits(expected_sd, cfg.to_dict(), idx)
    for path in (tmp_path, tmp_path / "model_000200.pt"):
        model = load_nanochat(path)
        assert not model.training
        torch.testing.assert_close(model(idx).double(), ref, atol=2e-4, rtol=1e-4)
    older = load_nanochat(tmp_path / "model_000100.pt")
    assert not torch.equal(older(idx), model(idx))


def test_load_nanochat_errors(tmp_path):
    cfg = CONFIGS[0]
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_nanochat(tmp_path)
    write_nanochat_checkpoint(tmp_path / "ok", random_model(cfg), 5)
    # corrupt model file
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "model_000001.pt").write_bytes(b"not a torch file")
    (bad / "meta_000001.json").write_text(json.dumps({"model_config": cfg.to_dict()}))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_nanochat(bad)
    # foreign checkpoint: another model's keys
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    torch.save({"encoder.weight": torch.zeros(3)}, foreign / "model_000001.pt")
    (foreign / "meta_000001.json").write_text(json.dumps({"model_config": cfg.to_dict()}))
    with pytest.raises(CheckpointError, match="not a nanochat/nanofast GPT"):
        load_nanochat(foreign)
    # meta without a model_config
    (foreign / "meta_000001.json").write_text(json.dumps({"step": 1}))
    with pytest.raises(CheckpointError, match="model_config"):
        load_nanochat(foreign)
    # garbled meta, missing meta, wrong file name
    (foreign / "meta_000001.json").write_text("{")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_nanochat(foreign)
    (foreign / "meta_000001.json").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_nanochat(foreign)
    other = tmp_path / "weights.pt"
    other.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="model_XXXXXX.pt"):
        load_nanochat(other)
    # a config that disagrees with the weights' shapes
    wrong = tmp_path / "ok" / "meta_000005.json"
    wrong.write_text(json.dumps({"model_config": dict(cfg.to_dict(), n_embd=128, n_head=4, n_kv_head=4)}))
    with pytest.raises(CheckpointError, match="shape"):
        load_nanochat(tmp_path / "ok")


# ---- the kernels inside the model --------------------------------------------------------------
@pytest.fixture
def kernel_backend():
    from nanofast import ops

    yield ops.set_kernel_backend
    ops.set_kernel_backend(None)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpt_with_kernels_equals_gpt_without(kernel_backend, backend):
    """Forward and backward of the GPT with the norm / qk-norm+rope kernels (Triton interpreter or
    the CPU emulation of the CUDA source) against the same GPT on plain torch; the kernel path
    includes each block's fused residual add + RMSNorm (rms_norm(x, residual=)) and its gradients."""
    cfg = GPTConfig(sequence_len=T_cfg, vocab_size=61, n_layer=2, n_head=3, n_kv_head=1, n_embd=48, window_pattern="SL")
    model = random_model(cfg, seed=5)
    idx = torch.randint(0, cfg.vocab_size, (2, 9))

    def run():
        model.zero_grad(set_to_none=True)
        loss = model(idx, idx)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    kernel_backend("torch")
    ref_loss, ref_grads = run()
    kernel_backend(backend)
    loss, grads = run()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_residual_norm_runs_on_the_kernel_path(kernel_backend, monkeypatch, backend):
    """Each block's second residual add goes into the rms_norm kernel (residual=) on a kernel
    backend, forward and backward agreeing with the torch path (the test above checks the values);
    the torch path calls no kernel."""
    from nanofast import ops

    calls = []
    real = ops.kernels.rms_norm

    def spy(x, *args, **kwargs):
        calls.append(kwargs.get("residual") is not None)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(ops.kernels, "rms_norm", spy)
    cfg = GPTConfig(sequence_len=T_cfg, vocab_size=61, n_layer=3, n_head=2, n_kv_head=1, n_embd=32, window_pattern="SL")
    model = random_model(cfg, seed=6)
    idx = torch.randint(0, cfg.vocab_size, (1, 5))
    kernel_backend(backend)
    loss = model(idx, idx)
    loss.backward()
    if backend == "torch":
        assert calls == []
    else:  # per block one fused call (the MLP's norm) and one plain (the attention's); plus embedding + head norms
        assert calls.count(True) == cfg.n_layer and calls.count(False) == cfg.n_layer + 2
    assert all(p.grad is not None for p in model.parameters())


def test_unknown_kernel_backend(kernel_backend):
    with pytest.raises(ValueError, match="kernel backend"):
        kernel_backend("cudnn")


def test_param_groups_are_nanochats_learning_rates_at_depth_24():
    """The speedrun's effective LRs (batch 2^20: lr_scale sqrt(2); d_model 1536: AdamW x (1536/768)^-0.5),
    as nanochat's base_train computes them; smear/backout is fixed at 0.2, not batch-scaled. lr_frac
    (fine-tuning) scales every group."""
    with torch.device("meta"):
        model = GPT(config_for_depth(24, vocab_size=32768, sequence_len=2048, head_dim=128))
    for frac in (1.0, 0.5):
        groups = model.param_groups(lr_scale=2 ** 0.5, lr_frac=frac)
        lrs = [round(g["lr"] / frac, 5) for g in groups]
        assert lrs[:6] == [0.008, 0.3, 0.15, 0.00707, 0.70711, 0.2]
        assert {round(g["lr"] / frac, 5) for g in groups[6:]} == {0.02828} and groups[6]["kind"] == "muon"
        assert all(g["initial_lr"] == g["lr"] for g in groups)
