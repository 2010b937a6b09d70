"""Evaluation that every training stage shares: bits per byte on held-out batches."""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                 token_bytes: torch.Tensor) -> float:
    """Bits per byte: summed next-token loss (nats) over the UTF-8 bytes the targets stand for.

    Unlike mean loss, bpb does not depend on the tokenizer's vocabulary. batches: (inputs, targets),
    both (B, T) int64; targets -1 are ignored and special tokens (0 bytes) are excluded.
    token_bytes: (vocab,) int, the byte length of each token id. Summed across ranks when distributed.
    """
    device = token_bytes.device
    nats = torch.zeros((), dtype=torch.float64, device=device)
    nbytes = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in batches:
        loss = model(x, y, loss_reduction="none").view(-1)
        y = y.view(-1)
        counted = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0)
        nats += (loss.double() * (counted > 0)).sum()
        nbytes += counted.sum()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(nats)
        dist.all_reduce(nbytes)
    if nbytes.item() == 0:
        raise ValueError("evaluate_bpb saw no target bytes: the validation batches are empty")
    return nats.item() / (math.log(2) * nbytes.item())
