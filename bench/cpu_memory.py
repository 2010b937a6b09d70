"""The child process of bench/test_bench_cpu_memory.py: CPU training steps with glibc's default
malloc or with train.py's `keep_freed_memory` (process-wide and irreversible, hence a child)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, resource, statistics, sys, time
import torch
from nanofast.common import keep_freed_memory
from nanofast.model import GPT, config_for_depth
from nanofast.optim import MuonAdamW

if sys.argv[1] == "keep":
    assert keep_freed_memory()
depth, T, B, V, steps = (int(a) for a in sys.argv[2:])
torch.manual_seed(0)
model = GPT(config_for_depth(depth, V, T, head_dim=64))
model.init_weights()
optimizer = MuonAdamW(model.param_groups())
x = torch.randint(0, V, (B, T))
times, sys_seconds = [], []
for i in range(steps + 1):  # the first step (allocations, lazy init) is not counted
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime, time.perf_counter()
    model(x, x).backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    if i:
        times.append(time.perf_counter() - t0)
        sys_seconds.append(resource.getrusage(resource.RUSAGE_SELF).ru_stime - r0)
print(json.dumps({"tokens_per_second": B * T / statistics.median(times), "sys_seconds": statistics.median(sys_seconds)}))
"""
MODES = ("default", "keep")
SHAPE = ("4", "512", "8", "32768")  # depth, T, batch, vocab


def child(mode: str, steps: int, shape: tuple[str, ...] = SHAPE) -> dict:
    """One child process's median steady step: {"tokens_per_second", "sys_seconds"}."""
    out = subprocess.run([sys.executable, "-c", CHILD, mode, *shape, str(steps)], cwd=ROOT, capture_output=True,
                         text=True, check=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return json.loads(out.stdout.splitlines()[-1])
