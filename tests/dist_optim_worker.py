"""A toy problem for MuonAdamW, and a torchrun worker that trains it on 2 gloo ranks.

Run by tests/test_optim.py as
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_optim_worker.py OUT_DIR
Each rank takes its half of a fixed global batch (the loss is a mean, so averaging the ranks'
gradients gives the full-batch gradient), runs STEPS optimizer steps once with the probed
collectives and once with every fallback forced, and writes results under OUT_DIR.
The test imports this file too, so the 1-process comparison run uses the same problem.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import Tensor

STEPS = 4
NUM_ITERATIONS = 8  # schedule horizon, so the lr warmup and Muon momentum schedule both move
BATCH = 16
VOCAB, CLASSES = 64, 33


def make_params(dtype: torch.dtype = torch.float32) -> dict[str, list[Tensor]]:
    """Params covering every path: Muon groups of 3 wide (padding on 2 ranks), 2 square and 1 tall
    (rank 1 owns none) matrices; a large AdamW param whose dim 0 splits over 2 ranks (emb), a large
    one whose dim 0 does not (head, all-reduced), and small 1-d ones."""
    g = torch.Generator().manual_seed(1234)

    def rand(*shape: int, scale: float) -> Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    return {
        "emb": [rand(VOCAB, 32, scale=1.0)],
        "head": [rand(CLASSES, 48, scale=0.2)],
        "scalars": [rand(32, scale=0.1).detach().add_(1.0).requires_grad_(), rand(1, scale=0.1)],
        "wide": [rand(16, 32, scale=0.2) for _ in range(3)],
        "square": [rand(16, 16, scale=0.25) for _ in range(2)],
        "tall": [rand(48, 16, scale=0.25)],
    }


def param_groups(P: dict[str, list[Tensor]]) -> list[dict]:
    return [
        dict(kind="adamw", params=P["emb"], lr=0.05, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.01),
        dict(kind="adamw", params=P["head"], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0),
        dict(kind="adamw", params=P["scalars"], lr=0.02, betas=(0.9, 0.99), eps=1e-10, weight_decay=0.0),
        dict(kind="muon", params=P["wide"], lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.5),
        dict(kind="muon", params=P["square"], lr=0.03, momentum=0.9, ns_steps=5, beta2=0.9, weight_decay=0.5),
        dict(kind="muon", params=P["tall"], lr=0.02, momentum=0.95, ns_steps=5, beta2=0.8, weight_decay=0.5),
    ]


def make_batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(99)
    return torch.randint(0, VOCAB, (BATCH,), generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)


def loss_fn(P: dict[str, list[Tensor]], idx: Tensor, target: Tensor) -> Tensor:
    gain, scale = P["scalars"]
    h = P["emb"][0][idx] * gain                             # (B, 32)
    z = sum(torch.tanh(h @ W.mT) for W in P["wide"])        # (B, 16)
    for S in P["square"]:
        z = z + torch.tanh(z @ S.mT)                        # (B, 16)
    t = torch.tanh(z @ P["tall"][0].mT)                     # (B, 48)
    logits = (t @ P["head"][0].mT) * scale                  # (B, CLASSES)
    return F.cross_entropy(logits, target)


def train(P: dict[str, list[Tensor]], optimizer, idx: Tensor, target: Tensor,
          start: int = 0, steps: int = STEPS) -> None:
    """Run `steps` scheduled optimizer steps from step `start` on the batch (idx, target)."""
    from nanofast.optim import apply_schedules

    all_params = [p for ps in P.values() for p in ps]
    for step in range(start, start + steps):
        for p in all_params:
            p.grad = None
        loss_fn(P, idx, target).backward()
        apply_schedules(optimizer, step, NUM_ITERATIONS, warmup_steps=2)
        optimizer.step()


def main(out_dir: str) -> None:
    import torch.distributed as dist

    from nanofast.optim import CollectiveSupport, MuonAdamW, probe_collectives

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    idx, target = make_batch()
    per_rank = BATCH // world
    local = slice(rank * per_rank, (rank + 1) * per_rank)
    support = probe_collectives("cpu")
    configs = {"probed": None, "fallback": CollectiveSupport(avg=False, reduce_scatter=False,
                                                            gather_into_tensor=False)}
    for name, collectives in configs.items():
        P = make_params()
        opt = MuonAdamW(param_groups(P), collectives=collectives)
        train(P, opt, idx[local], target[local])
        state_shapes = {f"{key}.{i}.{k}": list(v.shape) for key, ps in P.items() for i, p in enumerate(ps)
                        for k, v in opt.state[p].items() if isinstance(v, Tensor)}
        with open(os.path.join(out_dir, f"{name}_state_rank{rank}.json"), "w") as f:
            json.dump(state_shapes, f)
        if rank == 0:
            torch.save({k: [p.detach() for p in ps] for k, ps in P.items()}, os.path.join(out_dir, f"{name}.pt"))
    if rank == 0:
        with open(os.path.join(out_dir, "support.json"), "w") as f:
            json.dump(dict(avg=support.avg, reduce_scatter=support.reduce_scatter,
                           gather_into_tensor=support.gather_into_tensor), f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
    # Skip interpreter teardown: with torch 2.13 + gloo about 1 run in 20 aborts there ("terminate
    # called without an active exception", no Python frame) after every result is written and the
    # process group is destroyed. The results above are what the test checks.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
