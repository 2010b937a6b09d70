"""Optional Weights & Biases logging (`--wandb PROJECT`): every training step's loss and throughput,
every evaluation during training, and each stage's report numbers, as the report records them.

Off by default. wandb is imported only when a project is given, so nothing else needs the package
(`pip install wandb`, or the `wandb` extra); `WANDB_MODE=offline` logs to the run directory without
an account. Only rank 0 logs: the numbers are the reduced, all-rank ones the report holds.
"""
from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any


class WandbLog:
    """One wandb run per nanofast run directory. Its id is kept in `<run dir>/wandb_id`, so a run
    killed and started again continues the same wandb run (wandb's resume="allow") instead of
    opening a second one. Each stage counts its own steps from 0 (pretraining's 5,568, then SFT's
    from 0 again), so each stage gets its own x axis, `<stage>/step`, rather than wandb's global
    step, which must only grow."""

    def __init__(self, project: str, run_dir: Path, name: str, config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise ValueError(f"--wandb {project}: the wandb package is not installed "
                             f"(pip install wandb, or nanofast's 'wandb' extra)") from None
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        try:
            self.run = wandb.init(project=project, name=name, id=run_id, resume="allow", dir=run_dir, config=config)
        except Exception as e:  # not logged in, no network in online mode, a bad project name
            raise ValueError(f"--wandb {project}: wandb.init failed: {str(e).splitlines()[0]} "
                             f"(WANDB_MODE=offline logs without an account)") from None
        self._stages: set[str] = set()

    def log(self, stage: str, metrics: dict[str, Any]) -> None:
        """One point of `stage`'s curves; `metrics` carries the stage's own `step`."""
        if stage not in self._stages:
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self._stages.add(stage)
        self.run.log({f"{stage}/{k}": v for k, v in metrics.items() if _is_number(v)})

    def summary(self, stage: str, section: dict[str, Any]) -> None:
        """A finished stage's report section, as run summary values `<stage>/<key>[/<key>...]`: its
        numbers, nested dicts flattened; lists (the curves, already logged point by point) and the
        settings (the run's config) left out."""
        for key, value in _flatten({k: v for k, v in section.items() if k != "settings"}):
            self.run.summary[f"{stage}/{key}"] = value

    def finish(self) -> None:
        self.run.finish()


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}/")
        elif _is_number(v):
            yield f"{prefix}{k}", v
