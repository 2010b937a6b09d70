"""A real SIGKILL of a training run, as a preempted or crashed node gives it: shared by the
pipeline's resume tests and the rehearsal."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from nanofast.checkpoint import latest_step


def kill_once_saved(cmd: list[str], cwd: Path, env: dict, checkpoints: Path, step: int, log: Path,
                    world_size: int = 1, timeout: float = 900) -> None:
    """Run `cmd` in its own process group and SIGKILL the whole group (torchrun and every rank: no
    chance to clean up) as soon as all `world_size` ranks have saved `step` in `checkpoints`."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while latest_step(checkpoints, world_size=world_size) != step:
                assert proc.poll() is None, (f"the run ended (rc {proc.returncode}) before saving step {step}:\n"
                                             + log.read_text()[-3000:])
                assert time.monotonic() < deadline, f"step {step} not saved after {timeout} s"
                time.sleep(0.02)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
