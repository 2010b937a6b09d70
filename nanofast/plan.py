"""How long and how wide a run trains: nanochat's batch-size, horizon, learning-rate and weight-decay
rules (Power Lines), from the model's size and the settings."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nanofast.common import print0
from nanofast.model import GPT, WEIGHT_DECAY, config_for_depth
from nanofast.presets import Settings

# nanochat's reference point for its batch-size and horizon rules: depth 12 trains best at 2^19 tokens/step.
REF_DEPTH = 12
REF_BATCH = 2 ** 19


@dataclass
class Plan:
    num_iterations: int
    total_batch_size: int
    grad_accum: int
    device_batch_size: int  # rows per micro-step per rank (at most the setting's)
    lr_scale: float
    weight_decay: float


def scaling_params(model: GPT) -> int:
    """The parameters nanochat's scaling laws count: transformer matrices + lm_head."""
    counts = model.num_params()
    return counts["transformer_matrices"] + counts["lm_head"]


def plan_training(model: GPT, s: Settings, world_size: int, base_weight_decay: float = WEIGHT_DECAY) -> Plan:
    """nanochat's rules. Horizon: `target_param_data_ratio` x scaling params tokens (unless
    num_iterations is given). Batch: 2^19 at depth 12, growing as D^0.383 (Power Lines), rounded to
    a power of two. LRs scale as sqrt(B/B_ref); weight decay as sqrt(B/B_ref) * D_ref/D."""
    with torch.device("meta"):
        ref = GPT(config_for_depth(REF_DEPTH, model.config.vocab_size, model.config.sequence_len,
                                   s.aspect_ratio, s.head_dim, window_pattern=s.window_pattern))
    ref_tokens = s.target_param_data_ratio * scaling_params(ref)
    target_tokens = s.target_param_data_ratio * scaling_params(model)
    batch = s.total_batch_size
    if batch <= 0:
        batch = 2 ** round(math.log2(REF_BATCH * (target_tokens / ref_tokens) ** 0.383))
    # The batch is what the recipe is tuned for; the rows per rank are only memory. With more ranks
    # than a preset was written for, fewer rows per micro-step keep the batch (the largest count
    # <= device_batch_size that divides it); gradient accumulation covers the rest.
    rows = next((d for d in range(s.device_batch_size, 0, -1) if batch % (d * s.seq_len * world_size) == 0), 0)
    if rows == 0:
        raise ValueError(f"total_batch_size {batch:,} is not a multiple of seq_len x processes = "
                         f"{s.seq_len * world_size:,}: no device batch fills it; change --total-batch-size")
    if rows != s.device_batch_size:
        print0(f"device batch {s.device_batch_size} -> {rows} rows: {world_size} process(es) x {rows} x "
               f"{s.seq_len} tokens divide the {batch:,}-token batch")
    micro = rows * s.seq_len * world_size
    iterations = s.num_iterations if s.num_iterations > 0 else max(1, int(target_tokens // batch))
    return Plan(num_iterations=iterations, total_batch_size=batch, grad_accum=batch // micro, device_batch_size=rows,
                lr_scale=(batch / REF_BATCH) ** 0.5,
                weight_decay=base_weight_decay * (batch / REF_BATCH) ** 0.5 * ref_tokens / target_tokens)
