"""The one training loop. Pretraining, mid-training and SFT differ only in data and settings."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from tqdm import tqdm

from nanofast import checkpoint
from nanofast.common import Dist, print0
from nanofast.optim import FINAL_LR_FRAC, WARMDOWN_RATIO, WARMUP_STEPS, apply_schedules


class NonFiniteLoss(ValueError):
    """The training loss became NaN or infinite."""


class LossScaler:
    """Dynamic loss scaling for fp16 training that every rank agrees on.

    fp16's largest value is 65504 and its smallest normal 6e-5: gradients underflow unless the loss
    is multiplied up, and an overflow (inf/NaN) must skip the step. torch's GradScaler decides per
    process; nanofast's optimizer averages gradients inside its step (no DDP), so a rank that skips
    while another steps would deadlock the collectives. Here the overflow flag is all-reduced (MAX)
    before anyone steps, so all ranks skip or step together.

    Scale starts at `init_scale`, halves on an overflow (the update is skipped: parameters and
    optimizer state stay; the step still counts), doubles after `growth_interval` clean steps.
    """

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 200):
        if init_scale <= 0 or growth_factor <= 1 or not 0 < backoff_factor < 1 or growth_interval < 1:
            raise ValueError("LossScaler needs init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1, "
                             "growth_interval >= 1")
        self.scale_value, self.good_steps = float(init_scale), 0
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.skipped = 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale_value

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Unscale the gradients in place; step unless any rank saw inf/NaN. True if it stepped."""
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        found = torch.zeros(1, device=device)
        inv = torch.full((1,), 1.0 / self.scale_value, device=device)
        by_type: dict[tuple, list[torch.Tensor]] = {}
        for g in grads:  # the fused check-and-unscale wants one device and dtype per call
            by_type.setdefault((g.device, g.dtype), []).append(g)
        for group in by_type.values():
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, inv)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(found, op=dist.ReduceOp.MAX)
        if found.item() > 0:
            self.scale_value *= self.backoff_factor
            self.good_steps = 0
            self.skipped += 1
            return False
        optimizer.step()
        self.good_steps += 1
        if self.good_steps % self.growth_interval == 0:
            self.scale_value *= self.growth_factor
        return True

    def state_dict(self) -> dict:
        return {"scale": self.scale_value, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.scale_value, self.good_steps = float(state["scale"]), int(state["good_steps"])
        self.skipped = int(state.get("skipped", 0))


def backward(loss: torch.Tensor, scaler: LossScaler | None = None) -> None:
    """loss.backward(), the loss scaled first when training in fp16 with a LossScaler."""
    (loss if scaler is None else scaler.scale(loss)).backward()


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: LossScaler | None = None) -> bool:
    """optimizer.step(); with a LossScaler the gradients are unscaled first and the step is skipped,
    on every rank alike, when one overflowed. True if it stepped. Gradients are left for the caller
    to zero."""
    if scaler is None:
        optimizer.step()
        return True
    return scaler.step(optimizer)


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: LossScaler | None = None) -> None:
    """One batch, one step: `backward` then `optimizer_step`."""
    backward(loss, scaler)
    optimizer_step(optimizer, scaler)


class Checkpointer:
    """When a training loop saves, and which of its checkpoints stay. Holds no tensors.

    A step is saved when it is the last, every `every` steps, and when `minutes` of wall clock have
    passed since the last save (or since the loop began): a run killed after an hour loses at most
    `minutes`. Clocks differ between ranks, so the time rule is agreed over them (one flag,
    all-reduced with MAX): every rank saves the same steps, or a resume would find steps some rank
    never wrote. After each save rank 0 deletes the steps older than the `keep` newest complete
    ones (0: keep all), so a long run's checkpoints do not fill the disk.
    """

    def __init__(self, directory: str | Path, dist_info: Dist, device: torch.device, every: int = -1,
                 minutes: float = 0.0, keep: int = 0):
        self.directory, self.dist, self.device = Path(directory), dist_info, device
        self.every, self.minutes, self.keep = every, minutes, keep
        self.last_save = time.monotonic()

    def due(self, step: int, is_last: bool) -> bool:
        """Whether to save `step`. A collective when the time rule is on and there are several
        ranks: every rank calls it at the same steps."""
        if is_last or (self.every > 0 and step % self.every == 0):
            return True
        if self.minutes <= 0:
            return False
        late = time.monotonic() - self.last_save >= 60 * self.minutes
        if self.dist.world_size > 1:
            flag = torch.tensor(float(late), device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            late = flag.item() > 0
        return late

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict,
             rank_state: dict | None = None) -> None:
        checkpoint.save_checkpoint(self.directory, step, model, optimizer, meta, rank=self.dist.rank,
                                   rank_state=rank_state)
        self.last_save = time.monotonic()
        if self.dist.is_master and self.keep > 0:
            checkpoint.prune(self.directory, self.keep, self.dist.world_size)


@dataclass
class LoopSettings:
    num_iterations: int
    grad_accum: int = 1
    # the LR schedule (optim.lr_multiplier); by default pretraining's settings (nanofast.presets)
    warmup_steps: int = WARMUP_STEPS
    warmdown_ratio: float = WARMDOWN_RATIO
    final_lr_frac: float = FINAL_LR_FRAC
    finetune: bool = False      # fine-tuning's Muon momentum schedule (optim.finetune_momentum)
    eval_every: int = 250       # <= 0: only at the end
    save_every: int = -1        # <= 0: only at the end (and by save_minutes)
    save_minutes: float = 0.0   # also save once this much wall clock passed since the last save; <= 0: off
    keep_checkpoints: int = 0   # newest complete checkpoints kept; <= 0: all
    log_every: int = 10
    tokens_per_step: int = 0    # global tokens per optimizer step, for throughput
    flops_per_token: float = 0.0
    peak_flops: float | None = None  # per device; None -> MFU not applicable


@dataclass
class LoopState:
    """Everything besides model/optimizer/loader that an exact resume needs, JSON-able."""
    step: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    tokens_per_second: list[float] = field(default_factory=list)  # computed positions (padding included)
    # positions with a target (y >= 0): equal to the above in pretraining; in SFT padding and the
    # user's turns are computed but carry no loss, so this is the useful throughput
    target_tokens_per_second: list[float] = field(default_factory=list)
    loss_scaler: dict | None = None  # LossScaler.state_dict() when training in fp16
    # per step, what a loss_fn reports besides the loss (RL: reward, sampler/trainer mismatch), with
    # the step, loss and seconds; empty for the language-modelling loss
    stats: list[dict] = field(default_factory=list)


Batches = Iterator[tuple[Any, torch.Tensor, dict]]
LossFn = Callable[[torch.nn.Module, Any, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


def token_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The language-modelling loss of pretraining and fine-tuning: cross-entropy summed over the
    targets >= 0, with nothing else to report."""
    return model(inputs, targets, loss_reduction="sum"), {}


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: Batches, settings: LoopSettings,
          checkpoint_dir: str | Path, dist_info: Dist, meta: dict,
          evaluate: Callable[[int], dict] | None = None, state: LoopState | None = None,
          step_model: torch.nn.Module | None = None, scaler: LossScaler | None = None,
          log: Callable[[dict], None] | None = None, loss_fn: LossFn = token_loss) -> LoopState:
    """Run optimizer steps `state.step .. num_iterations`, evaluating, logging and checkpointing.

    loader yields (inputs, targets, loader_state); the loader state after the last consumed batch is
    saved with every checkpoint (per rank), so a resumed loop sees exactly the batches it would have seen.
    `step_model` is the (possibly compiled) module that runs the training step; `model` is saved.
    `loss_fn(step_model, inputs, targets)` returns the loss summed over the targets >= 0, which the
    loop weighs by the step's global target count, and a dict of numbers to report (averaged over
    micro-batches and ranks into `state.stats`); the default is the language-modelling loss, RL
    passes its policy-gradient loss. `log`, if given, receives every step's and every evaluation's
    numbers as a dict with their `step` (the caller passes it on rank 0 only).
    Returns the final loop state (losses, evaluations, throughput).
    """
    state = state or LoopState()
    step_model = model if step_model is None else step_model  # `or` would call len() on a compiled module
    if scaler is not None and state.loss_scaler:
        scaler.load_state_dict(state.loss_scaler)
    world = dist_info.world_size
    last = settings.num_iterations
    bar = tqdm(total=last, initial=state.step, disable=not dist_info.is_master, desc="train", unit="step",
               dynamic_ncols=True)
    saver = Checkpointer(checkpoint_dir, dist_info, _device(model), settings.save_every, settings.save_minutes,
                         settings.keep_checkpoints)
    loader_state: dict | None = None
    start_step = state.step  # a checkpoint of this step exists (or it is step 0): never re-save it
    while True:
        step = state.step
        is_last = step == last
        fresh = step > start_step or start_step == 0  # a resumed step was evaluated before the save
        if evaluate is not None and fresh and (is_last or (settings.eval_every > 0 and step % settings.eval_every == 0)):
            model.eval()
            result = dict(evaluate(step), step=step)
            model.train()
            state.evals.append(result)
            if log is not None:
                log(result)
            bar.write(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in result.items()
                                                          if isinstance(v, float)))
        if step > start_step and saver.due(step, is_last):
            # Each rank reads its own share of the data, so each saves its own loader position.
            saver.save(step, model, optimizer, dict(meta, loop_state=asdict(state)),
                       rank_state={"loader_state": loader_state})
        if is_last:
            break

        t0 = time.perf_counter()
        apply_schedules(optimizer, step, last, warmup_steps=settings.warmup_steps,
                        warmdown_ratio=settings.warmdown_ratio, final_lr_frac=settings.final_lr_frac,
                        finetune=settings.finetune)
        # Every target token of the step weighs the same, on whichever rank and micro-batch it
        # fell: each micro-batch's summed loss is divided by the step's global target count. A
        # per-micro-batch mean would weigh SFT's sparse targets unevenly, and a micro-batch whose
        # targets are all masked (a long user turn) would be 0/0 = NaN for every rank. The count
        # stays a device tensor (no host sync); x world because the optimizer averages gradients.
        batches = [next(loader) for _ in range(settings.grad_accum)]
        loader_state = batches[-1][2]
        target_total = sum((y >= 0).sum() for _, y, _ in batches).float()
        if world > 1:
            dist.all_reduce(target_total, op=dist.ReduceOp.SUM)
        weight = world / target_total.clamp(min=1)
        loss_sum = torch.zeros((), device=_device(model))
        reported: list[dict[str, float]] = []
        for x, y, _ in batches:
            loss, stats = loss_fn(step_model, x, y)
            reported.append(stats)
            loss_sum += loss.detach()
            backward(loss * weight, scaler)
        optimizer_step(optimizer, scaler)  # with a scaler, an overflowing step is skipped on every rank alike
        if scaler is not None:
            state.loss_scaler = scaler.state_dict()
        model.zero_grad(set_to_none=True)
        # The loss and the reported numbers summed over micro-batches and ranks in one collective,
        # in fp64 so that a reward of 1/3 reads back as 1/3.
        names = list(reported[0])
        sums = torch.cat([loss_sum.double().view(1), torch.tensor([sum(r[n] for r in reported) for n in names],
                                                                  dtype=torch.float64, device=loss_sum.device)])
        if world > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        *sums, target_total = torch.cat([sums, target_total.double().view(1)]).tolist()  # a device sync: honest timing
        loss_total, stats = sums[0], {n: v / (len(reported) * world) for n, v in zip(names, sums[1:])}
        train_loss = loss_total / max(target_total, 1.0)  # the mean over the step's target tokens
        dt = time.perf_counter() - t0
        if not math.isfinite(train_loss):
            # The optimizer already applied a non-finite update: going on would only spread NaN.
            last_good = checkpoint.latest_step(checkpoint_dir)
            where = (f"{Path(checkpoint_dir) / f'model_{last_good:06d}.pt'}" if last_good is not None
                     else f"none in {checkpoint_dir}")
            raise NonFiniteLoss(f"training loss is {train_loss} at step {step + 1}: stopped; "
                                f"last good checkpoint: {where}")

        state.step = step + 1
        state.train_seconds += dt
        state.losses.append((state.step, train_loss))
        tps = settings.tokens_per_step / dt if settings.tokens_per_step else 0.0
        state.tokens_per_second.append(tps)
        state.target_tokens_per_second.append(target_total / dt)
        if stats:
            state.stats.append(dict(step=state.step, loss=train_loss, seconds=dt, **stats))
        mfu = mfu_percent(settings.flops_per_token, tps, settings.peak_flops, world)
        if log is not None:
            log(dict(step=state.step, loss=train_loss, seconds=dt, tokens_per_second=tps,
                     target_tokens_per_second=target_total / dt, mfu=mfu, **stats))
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tps:,.0f}")
        if settings.log_every > 0 and (state.step % settings.log_every == 0 or state.step == 1):
            bar.write(f"step {state.step:05d}/{last} | loss {train_loss:.4f} | {dt * 1000:.0f} ms | "
                      f"{tps:,.0f} tok/s | MFU {'n/a (CPU or unknown GPU)' if mfu is None else f'{mfu:.1f}%'}"
                      + "".join(f" | {k} {v:.3g}" for k, v in stats.items()))
    bar.close()
    return state


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def mfu_percent(flops_per_token: float, tokens_per_second: float, peak_flops: float | None, world: int) -> float | None:
    """Model FLOPs utilisation in percent, or None where the peak is unknown (CPU)."""
    if peak_flops is None:
        return None
    return 100 * flops_per_token * tokens_per_second / (peak_flops * world)


def resume_state(checkpoint_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 rank: int = 0, world_size: int = 1) -> tuple[LoopState, dict | None] | None:
    """Load the latest checkpoint in `checkpoint_dir` that every one of `world_size` ranks finished
    saving into model and optimizer (and the RNG).

    Returns (loop_state, this rank's loader state) or None when there is nothing to resume.
    """
    step = checkpoint.latest_step(checkpoint_dir, world_size)
    for skipped, why in checkpoint.incomplete_steps(checkpoint_dir, world_size).items():
        print0(f"{checkpoint_dir}: skipped step {skipped}, {why}: resuming from "
               f"{'step ' + str(step) if step is not None else 'the start'}")
    if step is None:
        return None
    meta = checkpoint.read_meta(checkpoint_dir, step)
    state = checkpoint.load_state_dict_file(Path(checkpoint_dir) / f"model_{step:06d}.pt")
    try:
        model.load_state_dict(state)  # copies into the existing parameters, keeping their dtypes
    except RuntimeError as e:
        raise checkpoint.CheckpointError(f"cannot resume from {checkpoint_dir}: the checkpoint does not match "
                                         f"the model ({str(e).splitlines()[0]})") from None
    shard = checkpoint.load_optimizer_shard(checkpoint_dir, step, rank)
    optimizer.load_state_dict(shard["optimizer"])
    torch.set_rng_state(shard["rng"])
    if shard.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(shard["cuda_rng"])
    loop = meta.get("loop_state") or {}
    loop_state = LoopState(step=step, losses=[tuple(x) for x in loop.get("losses", [])], evals=loop.get("evals", []),
                           train_seconds=loop.get("train_seconds", 0.0),
                           tokens_per_second=loop.get("tokens_per_second", []),
                           target_tokens_per_second=loop.get("target_tokens_per_second", []),
                           loss_scaler=loop.get("loss_scaler"), stats=loop.get("stats", []))
    print0(f"resumed from {checkpoint_dir} at step {step}")
    return loop_state, shard.get("loader_state")


def warm_start(optimizer: torch.optim.Optimizer, checkpoint_dir: str | Path, rank: int = 0,
               world_size: int = 1) -> int | None:
    """Load the optimizer state (Adam moments, Muon momentum buffers) of the latest checkpoint in
    `checkpoint_dir` that all `world_size` ranks saved, keeping `optimizer`'s own hyperparameters.

    Fine-tuning starts from the previous stage's moments, as nanochat's SFT does, instead of from
    zeros: Adam's second moments then need no re-estimation. torch's load_state_dict replaces every
    group setting with the saved one (pretraining's LRs, its decayed weight decay); they are put
    back. Returns the step loaded, or None (nothing saved by this many ranks: a fresh state)."""
    step = checkpoint.latest_step(checkpoint_dir, world_size)
    if step is None:
        return None
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(checkpoint.load_optimizer_shard(checkpoint_dir, step, rank)["optimizer"])
    for group, own in zip(optimizer.param_groups, hyper):
        group.update(own)
    return step
