"""Process-level plumbing shared by every stage: devices, dtypes, distributed setup, paths, logging."""
from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def base_dir(path: str | os.PathLike | None = None) -> Path:
    """Where every artefact goes: `path`, else $NANOFAST_BASE_DIR, else ~/.cache/nanofast."""
    chosen = path or os.environ.get("NANOFAST_BASE_DIR") or Path.home() / ".cache" / "nanofast"
    out = Path(chosen).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(f"the base dir {out} is a file, not a directory") from None
    except OSError as e:
        raise OSError(f"cannot create the base dir {out}: {e.strerror}") from None
    return out


def autodetect_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process for the next allocation instead of handing it
    back to the operating system. Returns whether it applied (glibc only; elsewhere a no-op).

    glibc serves every block over its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps
    it on free. A CPU training step's large tensors (activations, the lm_head's tokens x vocab
    logits and their gradient: 512 MiB each at 4,096 tokens x 32,768) are freed and allocated again
    every step, so each step maps them anew and the kernel zero-fills every page on first touch.
    With mmap off (M_MMAP_MAX 0) they come from the heap, and with trimming off the heap keeps
    them, so the next step reuses the same pages. The price: the process holds its peak memory.
    Process-wide and irreversible, so train.py's command line applies it (on CPU), not the
    library: set NANOFAST_KEEP_FREED_MEMORY=0 to leave glibc's defaults.
    """
    path = ctypes.util.find_library("c")
    if path is None or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(path)
    # 1 on success for each; top pad: grow the heap 64 MiB at a time rather than page by page
    return all(libc.mallopt(param, value) == 1 for param, value in
               ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_TOP_PAD, 64 << 20)))


def cpu_process_setup() -> None:
    """What train.py's command line does to its process before a CPU run: `keep_freed_memory`,
    unless NANOFAST_KEEP_FREED_MEMORY=0. A no-op on a machine with a GPU."""
    if autodetect_device() == "cpu" and os.environ.get("NANOFAST_KEEP_FREED_MEMORY", "1") != "0":
        keep_freed_memory()


def default_dtype(device: str) -> torch.dtype:
    """bf16 on Ampere+ GPUs (same exponent range as fp32, no loss scaling needed), fp32 elsewhere."""
    if device == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def init_distributed(device: str, timeout_minutes: float = 30.0) -> Dist:
    """Join the process group torchrun describes in the environment (NCCL on GPU, gloo on CPU),
    with an explicit collective timeout: whatever one rank does between two collectives (writing
    its checkpoint files, an evaluation batch) must fit in it, and NCCL's default is 10 minutes.
    Waits for another rank's own work do not use collectives (see pipeline._join).

    A plain `python train.py` (no RANK in the environment) is a world of one and creates no group.
    """
    if "RANK" not in os.environ:
        if device == "cuda":
            torch.cuda.set_device(0)
        return Dist()
    info = Dist(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    if device == "cuda":
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo",
                                device_id=torch.device("cuda", info.local_rank) if device == "cuda" else None,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return info


def all_sum(values: list[float], device: torch.device | str, world_size: int) -> list[float]:
    """Elementwise sums of `values` over the `world_size` ranks (the default process group), in
    float64 so that counts stay exact; `values` itself when world_size is 1."""
    if world_size == 1:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) by GPU name fragment, most specific first.
_PEAK_BF16 = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12),
    ("B200", 2250e12), ("GH200", 989e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12),
    ("L4", 121e12), ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
]


def peak_flops(device: str) -> float | None:
    """Peak dense bf16 FLOP/s of the current GPU, or None (CPU, or an unknown GPU): MFU is then n/a."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for fragment, flops in _PEAK_BF16:
        if fragment in name:
            return flops
    return None


def system_info() -> dict:
    """Facts for the report: what ran, where."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "cuda": torch.version.cuda,
    }
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                            text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["git_commit"] = None
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
