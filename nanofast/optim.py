"""MuonAdamW: Muon for matrix parameters, AdamW for everything else, in one optimizer.

The same class runs on one process and on N processes (torch.distributed initialised with
world_size > 1) without a DDP wrapper: it averages the gradients itself, shards the optimizer
work and state across ranks (ZeRO-2 style), and gathers the updated parameters back.

Param groups are dicts with 'params' and 'kind':
  kind='adamw': lr (required), betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0 (decoupled).
  kind='muon':  lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.0,
                ns_coefficients='polar_express', ns_backend=None (the backend of
                newton_schulz and nesterov_normalize_; None = nanofast.ops.op_backend
                ("newton_schulz"): a forced kernel backend ("cuda" -> Triton), else torch
                on CPU and on CUDA the dispatch table's choice, torch.matmul where the GPU
                was never measured). All params of a Muon group share one
                shape (>= 2-D) so they are stacked and orthogonalised as one batch.
Each group also remembers initial_lr (and Muon groups initial_weight_decay) for the schedules.

Muon step per matrix, all in the stacked batch:
  1. Nesterov momentum:     m <- lerp(m, g, 1 - mu);  u <- lerp(g, m, mu)
  2. Row equilibration:     scale each row of u to the mean row norm ||u||_F / sqrt(rows)
                            (MuonEq: a better conditioned spectrum going into step 3)
  3. Polar Express:         u <- newton_schulz(u)          (bf16 on CUDA)
  4. Frobenius snap:        u <- u * sqrt(min(m, n)) / ||u||_F  (the norm of an exactly
                            semi-orthogonal matrix; corrects the iteration's under-convergence)
  5. NorMuon:               v <- lerp(v, mean(u^2 over the smaller dim), 1 - beta2), a factored
                            second moment with one entry per row (rows >= cols) or per column;
                            u <- u / sqrt(v), rescaled so ||u||_F is unchanged by this step
  6. Cautious update:       p <- p - lr' * (u + wd * p * [u * p >= 0]),
                            lr' = lr * sqrt(max(1, rows / cols))
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from nanofast import ops
from nanofast.kernels.newton_schulz import nesterov_normalize_, newton_schulz, resolve_coefficients

ADAMW_DEFAULTS: dict[str, Any] = dict(betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
MUON_DEFAULTS: dict[str, Any] = dict(lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.0,
                                     ns_coefficients="polar_express", ns_backend=None)
SMALL_PARAM_NUMEL = 1024  # AdamW params below this are all-reduced whole: sharding would not pay


# -----------------------------------------------------------------------------
# Schedules (used by the training loop once per step, before optimizer.step()). The defaults are
# nanochat's base_train schedule, which the run settings (nanofast.presets) take as theirs;
# fine-tuning and RL pass their own.

WARMUP_STEPS, WARMDOWN_RATIO, FINAL_LR_FRAC = 40, 0.65, 0.05

def _check_step(step: int, num_iterations: int) -> None:
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
    if not 0 <= step <= num_iterations:
        raise ValueError(f"step must be in [0, num_iterations={num_iterations}], got {step}")


def lr_multiplier(step: int, num_iterations: int, warmup_steps: int = WARMUP_STEPS,
                  warmdown_ratio: float = WARMDOWN_RATIO,
                  final_lr_frac: float = FINAL_LR_FRAC) -> float:
    """Linear warmup (step+1)/warmup_steps, then 1.0, then a linear warmdown over the last
    round(warmdown_ratio * num_iterations) steps that reaches final_lr_frac at num_iterations."""
    _check_step(step, num_iterations)
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step <= num_iterations - warmdown_iters:
        return 1.0
    progress = (num_iterations - step) / warmdown_iters
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int, num_iterations: int, warmdown_ratio: float = WARMDOWN_RATIO) -> float:
    """0.85 -> 0.97 linearly over the first 400 steps, then 0.97, then 0.97 -> 0.90 linearly
    during the LR warmdown (the warmup wins where the two overlap in very short runs)."""
    _check_step(step, num_iterations)
    warmdown_iters = round(warmdown_ratio * num_iterations)
    warmdown_start = num_iterations - warmdown_iters
    if step < 400:
        frac = step / 400
        return (1 - frac) * 0.85 + frac * 0.97
    if warmdown_iters > 0 and step >= warmdown_start:
        progress = (step - warmdown_start) / warmdown_iters
        return 0.97 * (1 - progress) + 0.90 * progress
    return 0.97


def finetune_momentum(step: int) -> float:
    """Fine-tuning's Muon momentum (nanochat's SFT): 0.85 -> 0.95 linearly over the first 300
    steps, then 0.95. It starts low again because the loss surface changes with the data."""
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def muon_weight_decay(step: int, num_iterations: int, base: float) -> float:
    """Cosine decay from `base` at step 0 to 0 at num_iterations."""
    _check_step(step, num_iterations)
    return base * 0.5 * (1 + math.cos(math.pi * step / num_iterations))


def apply_schedules(optimizer: "MuonAdamW", step: int, num_iterations: int,
                    warmup_steps: int = WARMUP_STEPS, warmdown_ratio: float = WARMDOWN_RATIO,
                    final_lr_frac: float = FINAL_LR_FRAC, finetune: bool = False) -> float:
    """Set every group's lr = initial_lr * lr_multiplier, and each Muon group's momentum
    (pretraining's `muon_momentum`, or `finetune_momentum`) and (cosine-decayed from
    initial_weight_decay) weight decay for `step`. Returns the multiplier."""
    lrm = lr_multiplier(step, num_iterations, warmup_steps, warmdown_ratio, final_lr_frac)
    momentum = finetune_momentum(step) if finetune else muon_momentum(step, num_iterations, warmdown_ratio)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"] = momentum
            group["weight_decay"] = muon_weight_decay(step, num_iterations, group["initial_weight_decay"])
    return lrm


# -----------------------------------------------------------------------------
# Update maths (stateless functions on tensors; the optimizer class owns state and comms)

@torch.no_grad()
def adamw_update_(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int,
                  lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """One AdamW step in place on p (any shape); exp_avg/exp_avg_sq have p's shape; step >= 1.

    The maths runs in fp32 (or fp64) and is copied back: 1 - beta2 and the tiny eps vanish in bf16.
    """
    beta1, beta2 = betas
    work = torch.promote_types(p.dtype, torch.float32)
    p32, m, v, g = p.to(work), exp_avg.to(work), exp_avg_sq.to(work), grad.to(work)
    p32.mul_(1 - lr * weight_decay)  # decoupled decay, before the gradient step
    m.lerp_(g, 1 - beta1)
    v.lerp_(g.square(), 1 - beta2)
    denom = (v / (1 - beta2 ** step)).sqrt_().add_(eps)
    p32.addcdiv_(m, denom, value=-lr / (1 - beta1 ** step))
    # .to() returned the tensors themselves when they already were in the work dtype
    for dst, src in ((p, p32), (exp_avg, m), (exp_avg_sq, v)):
        if dst is not src:
            dst.copy_(src)


def normuon_buffer_shape(shape: torch.Size, count: int) -> tuple[int, ...]:
    """Shape of the factored second moment for `count` stacked params of `shape` (..., m, n):
    one entry per row when m >= n, else one per column (the longer side keeps its resolution)."""
    if shape[-2] >= shape[-1]:
        return (count, *shape[:-1], 1)
    return (count, *shape[:-2], 1, shape[-1])


@torch.no_grad()
def muon_update_(params: Tensor, grads: Tensor, momentum_buf: Tensor, second_buf: Tensor, *, lr: float,
                 momentum: float, beta2: float, weight_decay: float, ns_steps: int = 5,
                 ns_coefficients: str = "polar_express", ns_backend: str | None = None) -> None:
    """One Muon (+NorMuon, cautious weight decay) step in place for a stack of matrices.

    Args:
        params, grads, momentum_buf: (k, ..., m, n) stacks, same dtype; grads is overwritten.
        second_buf: normuon_buffer_shape((..., m, n), k), same dtype as params.
        lr: base learning rate; scaled here by sqrt(max(1, m / n)).
    """
    m_rows, n_cols = params.size(-2), params.size(-1)
    red_dim = -1 if m_rows >= n_cols else -2  # average over the shorter side
    # Steps 1-2 and NS's input normalisation in one fused prologue (two passes over the data on
    # the Triton path); the row norms are accumulated in fp32, since they span orders of magnitude.
    x0 = nesterov_normalize_(grads, momentum_buf, momentum, backend=ns_backend)
    u = newton_schulz(x0, steps=ns_steps, coefficients=ns_coefficients, backend=ns_backend,
                      normalized=True).to(params.dtype)

    # Snap ||u||_F to sqrt(min(m, n)); the norms are in fp32 because bf16 sums lose digits.
    norm = torch.linalg.matrix_norm(u.float(), keepdim=True).clamp_min(1e-6)
    u = u * (math.sqrt(min(m_rows, n_cols)) / norm).to(u.dtype)

    # NorMuon: per-row (or per-column) adaptive step, then restore the pre-scaling Frobenius norm.
    v_mean = u.float().square().mean(dim=red_dim, keepdim=True)
    red_size = u.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * red_size).sqrt()
    second_buf.lerp_(v_mean.to(second_buf.dtype), 1 - beta2)
    scale = second_buf.clamp_min(1e-10).rsqrt().float()
    v_norm_new = (v_mean * red_size * scale.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    u = u * (scale * (v_norm / v_norm_new.clamp_min(1e-10))).to(u.dtype)

    # Cautious weight decay: only shrink coordinates the update already moves towards zero.
    lr_eff = lr * math.sqrt(max(1.0, m_rows / n_cols))
    mask = (u * params) >= 0
    params.sub_(lr_eff * u + (lr_eff * weight_decay) * params * mask)


# -----------------------------------------------------------------------------
# Collectives with fallbacks

@dataclass(frozen=True)
class CollectiveSupport:
    """Which collectives the process group's backend implements (NCCL: all of them).

    Fallbacks compute the same mathematics: without ReduceOp.AVG we reduce with SUM and divide by
    world_size; without reduce-scatter we all-reduce the whole buffer and keep our rank's slice;
    without all-gather-into-tensor we all-gather into a list of views of the output buffer.
    """
    avg: bool = True
    reduce_scatter: bool = True
    gather_into_tensor: bool = True


def _reduce_scatter_fn() -> Callable:
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather_fn() -> Callable:
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def probe_collectives(device: torch.device | str = "cpu",
                      group: dist.ProcessGroup | None = None) -> CollectiveSupport:
    """Find out what the backend supports for tensors on `device` by trying each op once on a tiny
    tensor (a collective: every rank must call it). Unsupported ops fail locally and identically on
    every rank before any communication, so a failed probe cannot desynchronise the group. gloo in
    torch 2.13 supports all three; older gloo builds lacked ReduceOp.AVG and reduce-scatter."""
    if dist.get_backend(group) == "nccl":
        return CollectiveSupport()
    world = dist.get_world_size(group)

    def works(fn: Callable[[], Any]) -> bool:
        try:
            fn()
            return True
        except (RuntimeError, ValueError):  # unsupported ops raise RuntimeError (or a subclass)
            return False

    def zeros(n: int) -> Tensor:
        return torch.zeros(n, device=device)

    avg = works(lambda: dist.all_reduce(zeros(1), op=dist.ReduceOp.AVG, group=group))
    rs = works(lambda: _reduce_scatter_fn()(zeros(1), zeros(world), group=group))
    ag = works(lambda: _all_gather_fn()(zeros(world), zeros(1), group=group))
    return CollectiveSupport(avg=avg, reduce_scatter=rs, gather_into_tensor=ag)


class _Pending:
    """An async collective plus the local work (divide, slice) that completes it."""

    def __init__(self, work: Any, finish: Callable[[], Tensor]):
        self.work, self.finish = work, finish

    def wait(self) -> Tensor:
        if self.work is not None:
            self.work.wait()
        return self.finish()


class _Comm:
    """Averaging collectives for one process group, using the fallbacks the backend needs."""

    def __init__(self, support: CollectiveSupport, rank: int, world: int):
        self.support, self.rank, self.world = support, rank, world

    def _reduce(self, t: Tensor) -> Any:
        op = dist.ReduceOp.AVG if self.support.avg else dist.ReduceOp.SUM
        return dist.all_reduce(t, op=op, async_op=True)

    def _averaged(self, t: Tensor) -> Tensor:
        return t if self.support.avg else t.div_(self.world)

    def all_reduce_avg(self, t: Tensor) -> _Pending:
        """Average t across ranks in place."""
        return _Pending(self._reduce(t), lambda: self._averaged(t))

    def reduce_scatter_avg(self, full: Tensor) -> _Pending:
        """Average `full` (world * k, ...) across ranks; this rank receives rows [rank*k, (rank+1)*k)."""
        k = full.size(0) // self.world
        if self.support.reduce_scatter:
            out = torch.empty_like(full[:k])
            op = dist.ReduceOp.AVG if self.support.avg else dist.ReduceOp.SUM
            work = _reduce_scatter_fn()(out, full, op=op, async_op=True)
            return _Pending(work, lambda: self._averaged(out))
        work = self._reduce(full)  # fallback: full all-reduce, then keep our rows
        return _Pending(work, lambda: self._averaged(full[self.rank * k:(self.rank + 1) * k]))

    def all_gather(self, out: Tensor, shard: Tensor) -> _Pending:
        """Concatenate every rank's `shard` (k, ...) along dim 0 into `out` (world * k, ...)."""
        if self.support.gather_into_tensor:
            return _Pending(_all_gather_fn()(out, shard, async_op=True), lambda: out)
        views = list(out.chunk(self.world))  # contiguous row blocks of `out`, filled in place
        return _Pending(dist.all_gather(views, shard, async_op=True), lambda: out)


# -----------------------------------------------------------------------------
# The optimizer

class MuonAdamW(torch.optim.Optimizer):
    """Muon for 2-D (and stacked >2-D) matrices, AdamW for embeddings, heads and scalars.

    One process: every group is updated locally. N processes (torch.distributed initialised,
    world_size > 1; call step() on every rank with each rank's local gradients):
      - Muon group of K params: grads stacked (zero-padded to ceil(K/N)*N), reduce-scattered with
        averaging so rank r owns params [r*c, (r+1)*c), c = ceil(K/N); the owner runs the update and
        keeps the momentum/NorMuon state for those params only; the updated stack is all-gathered.
      - AdamW param with numel >= 1024 and shape[0] % N == 0: grad reduce-scattered along dim 0,
        each rank updates (and keeps state for) its row slice, then the slices are all-gathered.
        Other AdamW params: grad all-reduced (averaged), full update on every rank.
    All reductions are launched asynchronously first, so later groups' communication overlaps
    earlier groups' compute; gathers likewise overlap the remaining updates.

    State is per parameter, so state_dict()/load_state_dict() round-trip through the torch base
    class; a distributed state_dict holds this rank's shard and must be loaded on the same rank of
    a run with the same world size.
    """

    def __init__(self, param_groups: Iterable[dict], *, collectives: CollectiveSupport | None = None):
        """param_groups: dicts as in the module docstring. collectives: override the backend
        probe (used by tests to exercise the fallbacks); None probes on the first distributed step."""
        self._collectives = collectives
        super().__init__(list(param_groups), defaults={})

    def add_param_group(self, param_group: dict) -> None:
        """Validate a group, fill in its kind's defaults and remember its initial lr/weight decay."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict with 'params' and 'kind', got {type(param_group).__name__}")
        kind = param_group.get("kind")
        if kind not in ("adamw", "muon"):
            raise ValueError(f"param_group 'kind' must be 'adamw' or 'muon', got {kind!r}")
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        if kind == "adamw":
            if "lr" not in param_group:
                raise ValueError("param_group of kind 'adamw' needs an 'lr'")
            group = {**ADAMW_DEFAULTS, **param_group, "params": params}
        else:
            group = {**MUON_DEFAULTS, **param_group, "params": params}
            self._check_muon_group(group)
        group.setdefault("initial_lr", group["lr"])
        if kind == "muon":
            group.setdefault("initial_weight_decay", group["weight_decay"])
        super().add_param_group(group)

    @staticmethod
    def _check_muon_group(group: dict) -> None:
        params = group["params"]
        if params and params[0].ndim < 2:
            raise ValueError(f"muon params must have shape (..., m, n) with >= 2 dims, got {tuple(params[0].shape)}")
        if any(p.shape != params[0].shape for p in params):
            shapes = sorted({tuple(p.shape) for p in params})
            raise ValueError(f"muon group params must all have the same shape to be stacked, got shapes {shapes}")
        if any(p.dtype != params[0].dtype or p.device != params[0].device for p in params):
            raise ValueError("muon group params must share one dtype and device to be stacked")
        resolve_coefficients(group["ns_coefficients"], group["ns_steps"])  # raises on bad values

    # ---- topology -----------------------------------------------------------

    def _comm(self) -> _Comm | None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        if self._collectives is None:
            first = next(p for group in self.param_groups for p in group["params"])
            self._collectives = probe_collectives(first.device)
        return _Comm(self._collectives, dist.get_rank(), dist.get_world_size())

    @staticmethod
    def _muon_grads(group: dict) -> list[Tensor] | None:
        """Grads of a Muon group, or None when the group took no part in the backward pass."""
        grads = [p.grad for p in group["params"]]
        if all(g is None for g in grads):
            return None
        if any(g is None for g in grads):
            raise ValueError("muon group params must all have a .grad or all have none (they are stacked)")
        return grads

    @staticmethod
    def _adamw_sharded(p: Tensor, world: int) -> bool:
        return world > 1 and p.numel() >= SMALL_PARAM_NUMEL and p.size(0) % world == 0 and p.is_contiguous()

    # ---- per-kind updates on local tensors -----------------------------------

    def _adamw_param(self, group: dict, p: Tensor, p_view: Tensor, grad: Tensor) -> None:
        """AdamW on p_view (p itself, or this rank's row slice of p) with the averaged grad."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p_view)
            state["exp_avg_sq"] = torch.zeros_like(p_view)
        state["step"] += 1
        adamw_update_(p_view, grad, state["exp_avg"], state["exp_avg_sq"], state["step"],
                      group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"])

    def _muon_owned(self, group: dict, owned: list[Tensor], grads: Tensor) -> Tensor:
        """Muon step for the `owned` params (stacked grads (len(owned), ...)); returns their new values."""
        shape = owned[0].shape
        for p in owned:
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
                state["second_momentum_buffer"] = torch.zeros(normuon_buffer_shape(shape, 1)[1:],
                                                              dtype=p.dtype, device=p.device)
        params = torch.stack(owned)
        mom = torch.stack([self.state[p]["momentum_buffer"] for p in owned])
        second = torch.stack([self.state[p]["second_momentum_buffer"] for p in owned])
        muon_update_(params, grads, mom, second, lr=group["lr"], momentum=group["momentum"],
                     beta2=group["beta2"], weight_decay=group["weight_decay"], ns_steps=group["ns_steps"],
                     ns_coefficients=group["ns_coefficients"],
                     ns_backend=group["ns_backend"] if group["ns_backend"] is not None
                     else ops.op_backend("newton_schulz", params))
        torch._foreach_copy_([self.state[p]["momentum_buffer"] for p in owned], list(mom.unbind(0)))
        torch._foreach_copy_([self.state[p]["second_momentum_buffer"] for p in owned], list(second.unbind(0)))
        return params

    # ---- step ------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Update every param that has a .grad (gradients are averaged across ranks first)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        comm = self._comm()
        if comm is None:
            self._step_local()
        else:
            self._step_distributed(comm)
        return loss

    def _step_local(self) -> None:
        for group in self.param_groups:
            if group["kind"] == "adamw":
                for p in group["params"]:
                    if p.grad is not None:
                        self._adamw_param(group, p, p, p.grad)
            else:
                grads = self._muon_grads(group)
                if grads is not None:
                    params = group["params"]
                    updated = self._muon_owned(group, params, torch.stack(grads))
                    torch._foreach_copy_(params, list(updated.unbind(0)))

    def _step_distributed(self, comm: _Comm) -> None:
        # Phase 1: launch every gradient reduction; none is waited on yet.
        launched = [self._launch_adamw(group, comm) if group["kind"] == "adamw" else self._launch_muon(group, comm)
                    for group in self.param_groups]
        # Phase 2: in group order, wait for a reduction, update, launch the gather of the result.
        gathers: list[tuple[_Pending, Callable[[Tensor], None]]] = []
        for group, pending in zip(self.param_groups, launched):
            if group["kind"] == "adamw":
                self._finish_adamw(group, pending, comm, gathers)
            elif pending is not None:
                self._finish_muon(group, pending, comm, gathers)
        # Phase 3: wait for the gathers and write the gathered values where they belong.
        for pending, write_back in gathers:
            write_back(pending.wait())

    def _launch_adamw(self, group: dict, comm: _Comm) -> list[tuple[Tensor, _Pending] | None]:
        out = []
        for p in group["params"]:
            if p.grad is None:
                out.append(None)
            elif self._adamw_sharded(p, comm.world):
                out.append((p, comm.reduce_scatter_avg(p.grad)))
            else:
                out.append((p, comm.all_reduce_avg(p.grad)))
        return out

    def _finish_adamw(self, group: dict, launched: list, comm: _Comm, gathers: list) -> None:
        for item in launched:
            if item is None:
                continue
            p, pending = item
            grad = pending.wait()
            if not self._adamw_sharded(p, comm.world):
                self._adamw_param(group, p, p, grad)
                continue
            rows = p.size(0) // comm.world
            p_slice = p[comm.rank * rows:(comm.rank + 1) * rows]
            self._adamw_param(group, p, p_slice, grad)
            # Gather straight into p from a copy of our slice: an input aliasing the output is only
            # safe on some backends (NCCL's in-place all-gather), not on gloo.
            gathers.append((comm.all_gather(p, p_slice.clone()), lambda gathered: None))

    def _launch_muon(self, group: dict, comm: _Comm) -> _Pending | None:
        grads = self._muon_grads(group)
        if grads is None:
            return None
        chunk = -(-len(grads) // comm.world)
        stacked = grads[0].new_empty((chunk * comm.world, *grads[0].shape))
        torch._foreach_copy_(list(stacked[:len(grads)].unbind(0)), grads)
        stacked[len(grads):].zero_()  # padding rows, so every rank receives a full chunk
        return comm.reduce_scatter_avg(stacked)

    def _finish_muon(self, group: dict, pending: _Pending, comm: _Comm, gathers: list) -> None:
        params = group["params"]
        grads = pending.wait()
        chunk = grads.size(0)
        start = comm.rank * chunk
        owned = params[start:start + chunk]
        updated = torch.zeros_like(grads)
        if owned:  # the reduced chunk is our own buffer, so the update may overwrite it
            updated[:len(owned)] = self._muon_owned(group, owned, grads[:len(owned)])
        full = grads.new_empty((chunk * comm.world, *grads.shape[1:]))

        def write_back(gathered: Tensor) -> None:
            torch._foreach_copy_(params, list(gathered[:len(params)].unbind(0)))

        gathers.append((comm.all_gather(full, updated), write_back))
