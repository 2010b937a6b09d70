"""Checkpoints in nanochat's directory format, plus everything an exact resume needs.

A checkpoint directory holds, per saved step: `model_{step:06d}.pt` (the model state dict),
`meta_{step:06d}.json` (with `model_config`, and for nanofast runs the loop and data-loader state)
and `optim_{step:06d}_rank{r}.pt` (each rank's optimizer state and RNG state).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from nanofast import ops
from nanofast.model import GPT, GPTConfig

_MODEL_FILE = re.compile(r"^model_(\d{6})\.pt$")
_STEP_FILE = re.compile(r"^(?:model|meta|optim)_(\d{6})(?:_rank\d+)?\.(?:pt|json)$")  # every file of a step
_CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or not a nanochat/nanofast GPT checkpoint."""


def latest_step(directory: str | Path, world_size: int | None = None) -> int | None:
    """The highest step with a model file in `directory`, or None when there is none.

    world_size: count only steps a resume can use: model, meta and the optimizer shard of every
    rank 0..world_size-1 written. Ranks save one after another, so a run killed mid-save leaves
    rank 0's files of a step without the others'; that step is skipped, not half-loaded.
    """
    steps = _complete_steps(Path(directory), world_size)
    return max(steps) if steps else None


def _complete_steps(directory: Path, world_size: int | None) -> list[int]:
    """Steps with a model file (and, given world_size, meta and every rank's optimizer shard)."""
    if not directory.is_dir():
        return []
    steps = [int(m.group(1)) for f in directory.iterdir() if (m := _MODEL_FILE.match(f.name))]
    if world_size is not None:
        steps = [s for s in steps if (directory / f"meta_{s:06d}.json").is_file()
                 and all((directory / f"optim_{s:06d}_rank{r}.pt").is_file() for r in range(world_size))]
    return sorted(steps)


def prune(directory: str | Path, keep: int, world_size: int) -> list[int]:
    """Delete every step older than the `keep` newest steps that all `world_size` ranks completed;
    return the deleted steps. Newer steps (another rank may still be writing one) are never
    touched, so rank 0 may prune right after its own save without waiting for the others."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    directory = Path(directory)
    complete = _complete_steps(directory, world_size)
    if len(complete) <= keep:
        return []
    cutoff = complete[-keep]
    old: dict[int, list[Path]] = {}
    for f in directory.iterdir():
        if (m := _STEP_FILE.match(f.name)) and int(m.group(1)) < cutoff:
            old.setdefault(int(m.group(1)), []).append(f)
    for files in old.values():
        for f in files:
            f.unlink(missing_ok=True)
    return sorted(old)


def save_checkpoint(directory: str | Path, step: int, model: GPT, optimizer: torch.optim.Optimizer | None,
                    meta: dict, rank: int = 0, rank_state: dict | None = None) -> None:
    """Write step `step`: the model and metadata from rank 0; from every rank its optimizer shard,
    RNG state and `rank_state` (per-rank extras such as the data loader's position).

    Files are written under a temporary name and renamed, so a crash never leaves a half file that
    `latest_step` would pick up.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        meta = dict(meta, step=step, model_config=model.config.to_dict())
        _atomic_save(directory / f"model_{step:06d}.pt", lambda p: torch.save(model.state_dict(), p))
        _atomic_save(directory / f"meta_{step:06d}.json", lambda p: p.write_text(json.dumps(meta, indent=2)))
    if optimizer is not None:
        shard = {"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None, **(rank_state or {})}
        _atomic_save(directory / f"optim_{step:06d}_rank{rank}.pt", lambda p: torch.save(shard, p))


def _atomic_save(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def read_meta(directory: str | Path, step: int) -> dict:
    path = Path(directory) / f"meta_{step:06d}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint metadata {path} is missing: the checkpoint is incomplete") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint metadata {path} is corrupt ({e.msg}): delete the step or re-save it") from None


def config_from_meta(meta: dict, where: str) -> GPTConfig:
    cfg = meta.get("model_config")
    if not isinstance(cfg, dict) or any(k not in cfg for k in _CONFIG_KEYS):
        raise CheckpointError(f"{where} has no GPT model_config with {', '.join(_CONFIG_KEYS)}: not a nanochat/nanofast checkpoint")
    # Checkpoints from before sliding windows attended over the full context.
    return GPTConfig(**{k: cfg[k] for k in _CONFIG_KEYS}, window_pattern=cfg.get("window_pattern", "L"))


def load_state_dict_file(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} does not exist") from None
    except Exception as e:  # torch raises many types for truncated/garbled files
        raise CheckpointError(f"checkpoint file {path} is corrupt or unreadable ({type(e).__name__}): re-download or re-save it") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint file {path} does not hold a state dict")
    # torch.compile'd models save their keys under `_orig_mod.`.
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}


def build_model(config: GPTConfig, state: dict, device: str | torch.device = "cpu",
                compute_dtype: torch.dtype = torch.float32, where: str = "checkpoint") -> GPT:
    """A GPT of `config` holding `state` (fp32 masters; embeddings recast for bf16 compute)."""
    with torch.device("meta"):
        model = GPT(config, compute_dtype=compute_dtype)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        detail = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
        raise CheckpointError(f"{where} does not match nanofast's GPT ({detail}): not a nanochat/nanofast GPT checkpoint of this shape")
    for key, tensor in state.items():
        want = model.state_dict()[key].shape
        if tuple(tensor.shape) != tuple(want):
            raise CheckpointError(f"{where}: {key} has shape {tuple(tensor.shape)}, the model_config implies {tuple(want)}")
    model.to_empty(device=device)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    # Rotary tables are not in checkpoints (and are garbage after to_empty): recompute them.
    model.cos, model.sin = ops.rotary_tables(model.cos.size(0), config.head_dim, device=device)
    model.cast_embeddings()
    return model


def resolve(path: str | Path) -> tuple[Path, int]:
    """A checkpoint directory (its latest step) or a `model_XXXXXX.pt` file -> (directory, step)."""
    path = Path(path)
    if path.is_file():
        m = _MODEL_FILE.match(path.name)
        if not m:
            raise CheckpointError(f"{path} is not named model_XXXXXX.pt: pass the checkpoint directory or its model file")
        return path.parent, int(m.group(1))
    step = latest_step(path)
    if step is None:
        raise CheckpointError(f"no checkpoint (model_XXXXXX.pt) in {path}: train first or check the path")
    return path, step


def load_nanochat(path: str | Path, device: str | torch.device = "cpu",
                  compute_dtype: torch.dtype = torch.float32) -> GPT:
    """Load a nanochat (or nanofast) checkpoint into nanofast's GPT.

    path: a checkpoint directory (its latest step is taken) or a `model_XXXXXX.pt` file beside its
    `meta_XXXXXX.json`. Returns the model in eval mode; it computes the same logits as nanochat.
    """
    directory, step = resolve(path)
    meta = read_meta(directory, step)
    config = config_from_meta(meta, f"{directory}/meta_{step:06d}.json")
    state = load_state_dict_file(directory / f"model_{step:06d}.pt")
    return build_model(config, state, device, compute_dtype, where=f"{directory}/model_{step:06d}.pt").eval()


def load_optimizer_shard(directory: str | Path, step: int, rank: int = 0) -> dict:
    path = Path(directory) / f"optim_{step:06d}_rank{rank}.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"optimizer state {path} is missing: cannot resume step {step} exactly") from None
    except Exception as e:
        raise CheckpointError(f"optimizer state {path} is corrupt ({type(e).__name__})") from None
