"""A real SIGKILL of a training run, as a preempted or crashed node gives it: shared by the
pipeline's resume tests and the rehearsal; and the process-tree helpers that make sure such a kill
(and the whole test session: conftest.py) leaves nothing running."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of `pid` from /proc, or None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)", which may hold spaces
    except OSError:
        return None
    return fields[0], int(fields[1]), int(fields[19])


def alive(pid: int, start: int | None = None) -> bool:
    """Running, as opposed to gone or a zombie (killed, waiting for its parent to reap it). With
    `start` (its start time, see `processes`), only that very process, not a reuse of its pid."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z" and (start is None or stat[2] == start)


def processes() -> dict[int, tuple[int, int]]:
    """Every live (non-zombie) process on the machine: {pid: (ppid, start time)}."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None and stat[0] != "Z":
            out[int(entry)] = (stat[1], stat[2])
    return out


def descendants(*roots: int) -> dict[int, int]:
    """The live descendants of the `roots` pids by their parent links, whatever session or process
    group they are in (torchrun starts each rank in a session of its own): {pid: start time}."""
    table = processes()
    children: dict[int, list[int]] = {}
    for p, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(p)
    found, todo = {}, list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found[child] = table[child][1]
                todo.append(child)
    return found


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_tree(root: int, also: dict[int, int] | None = None, timeout: float = 10.0) -> dict[int, int]:
    """SIGKILL `root` and every descendant (and the processes in `also`, {pid: start time}), then
    check by pid that none is running any more. Each process is stopped (SIGSTOP) before its
    children are listed, so none can start another unseen, and killed once the whole tree stands
    still; a killed parent's children would otherwise be reparented out of reach. Returns the
    processes killed, {pid: start time}; AssertionError when one still runs after `timeout` s."""
    stopped: dict[int, int] = dict(also or {})
    stat = _stat(root)
    if stat is not None and stat[0] != "Z":
        stopped[root] = stat[2]
    while True:
        for pid, start in stopped.items():
            if alive(pid, start):
                _signal(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 2.0  # the stop lands when each leaves the kernel: a fork completes
        while any((st := _stat(p)) is not None and st[2] == s and st[0] not in "TtZX" for p, s in stopped.items()):
            if time.monotonic() > deadline:
                break
            time.sleep(0.005)
        new = {p: s for p, s in descendants(*stopped).items() if p not in stopped}
        if not new:
            break
        stopped.update(new)
    for pid, start in stopped.items():
        if alive(pid, start):
            _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while (left := [p for p, s in stopped.items() if alive(p, s)]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not left, f"still running after SIGKILL: {left}"
    return stopped


def kill_once_saved(cmd: list[str], cwd: Path, env: dict, checkpoints: Path, step: int, log: Path,
                    world_size: int = 1, timeout: float = 900) -> dict[int, int]:
    """Run `cmd` in its own process group and SIGKILL all of it (torchrun and every rank, which
    torchrun starts in sessions of their own: no chance to clean up) as soon as all `world_size`
    ranks have saved `step` in `checkpoints`; returns the processes killed, {pid: start time},
    each checked to be gone by pid."""
    from nanofast.checkpoint import latest_step

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
            try:
                killed = kill_tree(proc.pid)
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
    return killed
