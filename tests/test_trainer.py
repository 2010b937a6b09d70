"""The training loop's own behaviour, on a tiny model and an in-memory loader."""
import pytest
import torch

from nanofast.checkpoint import incomplete_steps, latest_step
from nanofast.common import Dist
from nanofast.model import GPT, config_for_depth
from nanofast.optim import MuonAdamW
from nanofast.trainer import LoopSettings, NonFiniteLoss, train, warm_start


def tiny():
    torch.manual_seed(0)
    model = GPT(config_for_depth(1, vocab_size=50, sequence_len=16, head_dim=64))
    model.init_weights()
    return model, MuonAdamW(model.param_groups())


def batches():
    """An endless stream of (x, y, state) batches of random tokens."""
    g = torch.Generator().manual_seed(1)
    i = 0
    while True:
        x = torch.randint(0, 50, (2, 16), generator=g)
        yield x, x, {"i": i}
        i += 1


class PoisonAfter(torch.nn.Module):
    """Wraps the model; its loss turns NaN from call `n` on (a diverging run)."""

    def __init__(self, model, n):
        super().__init__()
        self.model, self.n, self.calls = model, n, 0

    def forward(self, x, y, loss_reduction="mean"):
        self.calls += 1
        loss = self.model(x, y, loss_reduction=loss_reduction)
        return loss * float("nan") if self.calls >= self.n else loss


def test_non_finite_loss_stops_with_step_and_last_good_checkpoint(tmp_path):
    model, opt = tiny()
    settings = LoopSettings(num_iterations=10, save_every=2, eval_every=0, log_every=0, tokens_per_step=32)
    with pytest.raises(NonFiniteLoss) as e:
        train(model, opt, batches(), settings, tmp_path, Dist(), {}, step_model=PoisonAfter(model, 5))
    message = str(e.value)
    assert "at step 5" in message and "model_000004.pt" in message and "\n" not in message
    assert latest_step(tmp_path) == 4  # nothing written after the bad step


def test_non_finite_loss_before_any_checkpoint(tmp_path):
    model, opt = tiny()
    settings = LoopSettings(num_iterations=3, eval_every=0, log_every=0)
    with pytest.raises(NonFiniteLoss, match="at step 1: stopped; last good checkpoint: none in"):
        train(model, opt, batches(), settings, tmp_path, Dist(), {}, step_model=PoisonAfter(model, 1))


def test_loop_records_losses_and_saves_the_end(tmp_path):
    model, opt = tiny()
    settings = LoopSettings(num_iterations=4, eval_every=2, log_every=0, tokens_per_step=32)
    state = train(model, opt, batches(), settings, tmp_path, Dist(), {}, evaluate=lambda step: {"score": 1.0})
    assert [s for s, _ in state.losses] == [1, 2, 3, 4]
    assert [e["step"] for e in state.evals] == [0, 2, 4]
    assert latest_step(tmp_path) == 4 and len(state.tokens_per_second) == 4


# ---- fp16 loss scaling -------------------------------------------------------------------------

from nanofast.trainer import LossScaler  # noqa: E402


def _scaled_step(model, opt, scaler, poison: bool) -> bool:
    x = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(7))
    scaler.scale(model(x, x)).backward()
    if poison:
        model.lm_head.weight.grad[0, 0] = float("inf")  # an fp16 overflow somewhere in the backward
    stepped = scaler.step(opt)
    model.zero_grad(set_to_none=True)
    return stepped


def test_loss_scaler_skips_overflowing_steps_and_recovers():
    model, opt = tiny()
    scaler = LossScaler(init_scale=1024.0, growth_interval=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not _scaled_step(model, opt, scaler, poison=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing moved
    assert scaler.scale_value == 512.0 and scaler.skipped == 1 and not opt.state
    assert _scaled_step(model, opt, scaler, poison=False)
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert _scaled_step(model, opt, scaler, poison=False) and scaler.scale_value == 1024.0  # grew back
    # unscaling is exact: a scaled step equals an unscaled one
    m1, o1 = tiny()
    m2, o2 = tiny()
    x = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(8))
    LossScaler(init_scale=256.0).scale(m1(x, x)).backward()
    for p in m1.parameters():
        if p.grad is not None:
            p.grad.div_(256.0)
    o1.step()
    s2 = LossScaler(init_scale=256.0)
    s2.scale(m2(x, x)).backward()
    s2.step(o2)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    state = scaler.state_dict()
    fresh = LossScaler()
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    with pytest.raises(ValueError, match="backoff_factor"):
        LossScaler(backoff_factor=2.0)


def _scaler_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model, opt = tiny()
    scaler = LossScaler(init_scale=64.0)
    stepped = [_scaled_step(model, opt, scaler, poison=(rank == 1)),  # only rank 1 overflows...
               _scaled_step(model, opt, scaler, poison=False)]
    torch.save({"stepped": stepped, "scale": scaler.scale_value,
                "params": [p.detach().clone() for p in model.parameters()]}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_loss_scaler_ranks_skip_together(tmp_path):
    """...and both ranks skip that step (a lone skip would deadlock the optimizer's collectives),
    then step together, ending with identical parameters."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "res")
    mp.spawn(_scaler_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert r0["stepped"] == r1["stepped"] == [False, True]
    assert r0["scale"] == r1["scale"] == 32.0
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)


def test_throughput_counts_computed_and_loss_bearing_tokens_apart(tmp_path):
    """tokens_per_second prices every computed position (what MFU needs); the target rate counts
    only positions with a loss (y >= 0), which is what SFT's padding and masked turns reduce."""
    def masked():
        for x, y, st in batches():
            y = y.clone()
            y[:, 12:] = -1  # the last 4 of 16 positions carry no loss: 24 of 32 per batch
            yield x, y, st

    model, opt = tiny()
    settings = LoopSettings(num_iterations=3, eval_every=0, log_every=0, tokens_per_step=32)
    state = train(model, opt, masked(), settings, tmp_path, Dist(), {})
    assert len(state.target_tokens_per_second) == 3
    for computed, useful in zip(state.tokens_per_second, state.target_tokens_per_second):
        assert useful == pytest.approx(computed * 24 / 32)


def test_backward_and_step_with_and_without_a_scaler():
    """The one-call step the RL stage uses: plain, it equals backward + step; with a scaler it
    equals the scaled step (same parameters: unscaling is exact) and skips on an overflow."""
    from nanofast.trainer import backward_and_step

    x = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(9))
    runs = []
    for scaler in (None, LossScaler(init_scale=256.0)):
        model, opt = tiny()
        backward_and_step(model(x, x), opt, scaler)
        runs.append(list(model.parameters()))
    manual, opt = tiny()
    manual(x, x).backward()
    opt.step()
    for plain, scaled, ref in zip(*runs, manual.parameters()):
        assert torch.equal(plain, ref)
        torch.testing.assert_close(scaled, ref, rtol=1e-6, atol=1e-7)
    model, opt = tiny()
    before = [p.clone() for p in model.parameters()]
    scaler = LossScaler()
    backward_and_step(model(x, x) * float("inf"), opt, scaler)  # every gradient overflows
    assert scaler.skipped == 1 and all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_every_target_token_of_a_step_weighs_the_same(tmp_path):
    """grad_accum micro-batches with very different target counts (one with none at all, as a long
    masked user turn gives in SFT) step on the gradient of the mean loss over all the step's
    targets; the logged loss is that mean. A per-micro-batch mean would be NaN here (0/0)."""
    x = torch.randint(0, 50, (2, 2, 16), generator=torch.Generator().manual_seed(3))
    y = x.clone()
    y[0, :, 5:] = -1  # 10 targets
    y[1] = -1         # none

    class Recording(MuonAdamW):
        def step(self, *args, **kwargs):
            self.grads = [p.grad.clone() for g in self.param_groups for p in g["params"]]
            return super().step(*args, **kwargs)

    model, _ = tiny()
    opt = Recording(model.param_groups())
    reference, _ = tiny()
    expected_loss = reference(x.view(4, 16), y.view(4, 16))  # mean over the 10 targets
    expected_loss.backward()
    settings = LoopSettings(num_iterations=1, grad_accum=2, eval_every=0, log_every=0)
    state = train(model, opt, iter([(x[0], y[0], {}), (x[1], y[1], {})]), settings, tmp_path, Dist(), {})
    assert state.losses[0][1] == pytest.approx(expected_loss.item(), rel=1e-6)
    ref_grads = [p.grad for g in reference.param_groups() for p in g["params"]]
    for got, want in zip(opt.grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


# ---- checkpoint cadence and retention ----------------------------------------------------------

from nanofast.trainer import Checkpointer  # noqa: E402


def test_time_rule_saves_and_only_the_newest_checkpoints_stay(tmp_path):
    """save_minutes ~0: every step is due; keep_checkpoints=2: only the two newest stay."""
    model, opt = tiny()
    settings = LoopSettings(num_iterations=4, eval_every=0, log_every=0, save_minutes=1e-9, keep_checkpoints=2)
    train(model, opt, batches(), settings, tmp_path, Dist(), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "meta_000003.json", "meta_000004.json", "model_000003.pt", "model_000004.pt",
        "optim_000003_rank0.pt", "optim_000004_rank0.pt"]


def test_without_a_rule_only_the_last_step_is_saved(tmp_path):
    model, opt = tiny()
    train(model, opt, batches(), LoopSettings(num_iterations=3, eval_every=0, log_every=0), tmp_path, Dist(), {})
    assert latest_step(tmp_path) == 3 and len(list(tmp_path.glob("model_*.pt"))) == 1


def _due_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    # rank 1's clock says a save is due, rank 0's does not (a save 60 minutes from now)
    saver = Checkpointer(out, Dist(rank, rank, world), torch.device("cpu"), minutes=1e-9 if rank else 60.0)
    torch.save([saver.due(1, False), saver.due(2, True)], f"{out}.{rank}")
    dist.destroy_process_group()


def test_ranks_agree_on_a_time_rule_save(tmp_path):
    """Clocks differ between ranks; a save one rank skips would leave a step no resume can use."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "due")
    mp.spawn(_due_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    assert torch.load(f"{out}.0") == torch.load(f"{out}.1") == [True, True]


def _touch_step(directory, step: int, ranks: range, meta: bool = True) -> None:
    (directory / f"model_{step:06d}.pt").touch()
    if meta:
        (directory / f"meta_{step:06d}.json").touch()
    for r in ranks:
        (directory / f"optim_{step:06d}_rank{r}.pt").touch()


def test_latest_step_and_prune_count_only_steps_every_rank_finished(tmp_path):
    from nanofast.checkpoint import prune

    for step in (2, 4, 6):
        _touch_step(tmp_path, step, range(2))
    _touch_step(tmp_path, 8, range(1))            # killed while rank 1 was saving step 8
    _touch_step(tmp_path, 10, range(0), meta=False)  # killed right after rank 0's model file
    assert latest_step(tmp_path) == 8 and latest_step(tmp_path, world_size=2) == 6  # meta: the commit marker
    assert incomplete_steps(tmp_path, world_size=2) == {
        8: "the optimizer shard of rank(s) [1] missing (killed while saving?)",
        10: "meta_000010.json and the optimizer shard of rank(s) [0, 1] missing (killed while saving?)"}
    assert prune(tmp_path, keep=2, world_size=2) == [2]
    assert prune(tmp_path, keep=2, world_size=2) == []
    assert prune(tmp_path, keep=1, world_size=2) == [4]
    # the steps newer than the newest complete one may still be being written: untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "meta_000006.json", "meta_000008.json", "model_000006.pt", "model_000008.pt", "model_000010.pt",
        "optim_000006_rank0.pt", "optim_000006_rank1.pt", "optim_000008_rank0.pt"]
    with pytest.raises(ValueError, match="keep must be >= 1"):
        prune(tmp_path, keep=0, world_size=2)


def test_warm_start_takes_the_moments_and_keeps_its_own_hyperparameters(tmp_path):
    """Fine-tuning starts from the previous stage's optimizer moments (nanochat's SFT) but with
    its own LRs and weight decay, which torch's load_state_dict would otherwise overwrite."""
    model, opt = tiny()
    train(model, opt, batches(), LoopSettings(num_iterations=3, eval_every=0, log_every=0), tmp_path, Dist(), {})
    fresh = MuonAdamW(model.param_groups(weight_decay=0.0, lr_frac=0.5))
    own = [(g["lr"], g["initial_lr"], g["weight_decay"], g.get("initial_weight_decay")) for g in fresh.param_groups]
    assert warm_start(fresh, tmp_path) == 3
    assert [(g["lr"], g["initial_lr"], g["weight_decay"], g.get("initial_weight_decay"))
            for g in fresh.param_groups] == own
    for p in model.parameters():
        saved, loaded = opt.state[p], fresh.state[p]
        assert saved.keys() == loaded.keys() and saved
        for k, v in saved.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(loaded[k])), k
    assert warm_start(MuonAdamW(model.param_groups()), tmp_path, world_size=2) is None  # saved by 1 rank
    assert warm_start(MuonAdamW(model.param_groups()), tmp_path / "empty") is None


def test_a_kill_between_model_and_meta_falls_back_to_the_last_complete_step(tmp_path, capsys):
    """Killed after step 4's model file, before its meta (the commit marker, written last): loading
    and resuming take step 2 and say which step they skipped and why."""
    from nanofast.checkpoint import load_nanochat
    from nanofast.trainer import resume_state

    model, opt = tiny()
    train(model, opt, batches(), LoopSettings(num_iterations=4, save_every=2, eval_every=0, log_every=0),
          tmp_path, Dist(), {})
    (tmp_path / "meta_000004.json").unlink()
    loaded = load_nanochat(tmp_path)
    assert "skipped step 4, meta_000004.json missing" in capsys.readouterr().err
    fresh, fresh_opt = tiny()
    state, _ = resume_state(tmp_path, fresh, fresh_opt)
    assert state.step == 2 and "skipped step 4, meta_000004.json missing (killed while saving?): resuming from step 2" \
        in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), fresh.state_dict().values()))
    assert not list(tmp_path.glob("*.tmp"))  # every file went through its temporary name and was renamed


def test_a_crafted_optimizer_pickle_is_refused_before_it_runs(tmp_path):
    """weights_only loading: a shard whose pickle would call os.system is refused in one line, and
    the command never runs."""
    import os

    from nanofast.checkpoint import CheckpointError, load_optimizer_shard
    from nanofast.trainer import resume_state

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    model, opt = tiny()
    train(model, opt, batches(), LoopSettings(num_iterations=2, eval_every=0, log_every=0), tmp_path, Dist(), {})
    torch.save({"optimizer": Payload(), "rng": torch.get_rng_state()}, tmp_path / "optim_000002_rank0.pt")
    for load in (lambda: load_optimizer_shard(tmp_path, 2), lambda: resume_state(tmp_path, *tiny())):
        with pytest.raises(CheckpointError) as e:
            load()
        assert "would construct posix.system when loaded: refused" in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()
    (tmp_path / "optim_000002_rank0.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load_optimizer_shard(tmp_path, 2)

