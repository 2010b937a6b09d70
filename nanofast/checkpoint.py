"""Checkpoints in nanochat's directory format, plus everything an exact resume needs.

A checkpoint directory holds, per saved step: `model_{step:06d}.pt` (the model state dict),
`meta_{step:06d}.json` (with `model_config`, and for nanofast runs the loop and data-loader state)
and `optim_{step:06d}_rank{r}.pt` (each rank's optimizer state and RNG state).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import sys
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
    """The highest complete step in `directory`, or None when there is none.

    Complete: the model file and its meta file, which is written last as the commit marker (a run
    killed between the two leaves a step without meta, skipped here rather than half-loaded).
    world_size: count only steps a resume can use, which also need the optimizer shard of every
    rank 0..world_size-1 (ranks save one after another, so a kill can leave some shards missing).
    """
    steps = _complete_steps(Path(directory), world_size)
    return max(steps) if steps else None


def incomplete_steps(directory: str | Path, world_size: int | None = None) -> dict[int, str]:
    """{step: why it is not complete} for each step newer than `latest_step` that left files."""
    directory = Path(directory)
    newest = latest_step(directory, world_size)
    steps = sorted({int(m.group(1)) for f in directory.iterdir() if (m := _STEP_FILE.match(f.name))}
                   if directory.is_dir() else set())
    why = {}
    for step in (s for s in steps if newest is None or s > newest):
        missing = [f"{kind}_{step:06d}.{ext}" for kind, ext in (("model", "pt"), ("meta", "json"))
                   if not (directory / f"{kind}_{step:06d}.{ext}").is_file()]
        ranks = [r for r in range(world_size or 0) if not (directory / f"optim_{step:06d}_rank{r}.pt").is_file()]
        if ranks:
            missing.append(f"the optimizer shard of rank(s) {ranks}")
        why[step] = f"{' and '.join(missing)} missing (killed while saving?)"
    return why


def _complete_steps(directory: Path, world_size: int | None) -> list[int]:
    """Steps with model and meta files (and, given world_size, every rank's optimizer shard)."""
    if not directory.is_dir():
        return []
    steps = [int(m.group(1)) for f in directory.iterdir() if (m := _MODEL_FILE.match(f.name))]
    steps = [s for s in steps if (directory / f"meta_{s:06d}.json").is_file()]
    if world_size is not None:
        steps = [s for s in steps if all((directory / f"optim_{s:06d}_rank{r}.pt").is_file() for r in range(world_size))]
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

    Each file is written under a temporary name, fsynced and renamed, so a crash never leaves a
    half file under a real name; rank 0 writes the meta file last: it is the step's commit marker
    (`latest_step`), so a kill between the model and the meta leaves the step ignored, not broken.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        _atomic_save(directory / f"model_{step:06d}.pt", lambda f: torch.save(model.state_dict(), f))
    if optimizer is not None:
        shard = {"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None, **(rank_state or {})}
        _atomic_save(directory / f"optim_{step:06d}_rank{rank}.pt", lambda f: torch.save(shard, f))
    if rank == 0:
        meta = dict(meta, step=step, model_config=model.config.to_dict())
        _atomic_save(directory / f"meta_{step:06d}.json", lambda f: f.write(json.dumps(meta, indent=2).encode()))


def _atomic_save(path: Path, write) -> None:
    """`write(file)` into `path` atomically and durably: a temporary name, fsync, rename, and an
    fsync of the directory (without which the rename itself may not survive a power cut)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def _torch_load(path: Path):
    """torch.load with weights_only=True, as for every checkpoint file: tensors, numbers, strings
    and containers of them, which is all nanofast and nanochat save. A pickle that would construct
    any other object or call a function (a crafted file) is refused before any of it runs.
    FileNotFoundError passes through; every other failure is a one-line CheckpointError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        if m := re.search(r"unsupported GLOBAL (\S+)", str(e)):
            raise CheckpointError(f"{path} would construct {m.group(1)} when loaded: refused, a checkpoint "
                                  f"holds only tensors and plain data (weights_only)") from None
        raise CheckpointError(f"checkpoint file {path} is corrupt or unreadable (UnpicklingError): re-download or re-save it") from None
    except Exception as e:  # torch raises many types for truncated/garbled files
        raise CheckpointError(f"checkpoint file {path} is corrupt or unreadable ({type(e).__name__}): re-download or re-save it") from None


def load_state_dict_file(path: Path) -> dict:
    try:
        state = _torch_load(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} does not exist") from None
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
    skipped = incomplete_steps(path) if path.is_dir() else {}
    if step is None:
        detail = "".join(f"; step {s}: {why}" for s, why in skipped.items())
        raise CheckpointError(f"no complete checkpoint (model_XXXXXX.pt with its meta_XXXXXX.json) in {path}"
                              f"{detail}: train first or check the path")
    for s, why in skipped.items():
        print(f"{path}: skipped step {s}, {why}; loading step {step}", file=sys.stderr)
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
    """Rank `rank`'s optimizer state, RNG state and extras of step `step` (see `_torch_load`)."""
    path = Path(directory) / f"optim_{step:06d}_rank{rank}.pt"
    try:
        return _torch_load(path)
    except FileNotFoundError:
        raise CheckpointError(f"optimizer state {path} is missing: cannot resume step {step} exactly") from None
