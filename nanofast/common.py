"""Process-level plumbing shared by every stage: devices, dtypes, distributed setup, paths, logging."""
from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import os
import platform
import signal
import subprocess
import sys
import warnings
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
    """cuda when torch can use a GPU, else cpu; NANOFAST_DEVICE=cpu picks cpu regardless.
    train.py goes through `choose_device`, which refuses the silent fallbacks this allows."""
    if os.environ.get("NANOFAST_DEVICE", "").strip().lower() == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


class DeviceError(RuntimeError):
    """The device train.py would run on is not the one the user can have meant: one actionable line."""


def nvidia_gpus_present(root: str | os.PathLike = "/") -> int:
    """How many NVIDIA GPUs this machine has, as the kernel driver lists them, whether or not CUDA
    can use them (it is not asked): the entries of /proc/driver/nvidia/gpus, else the /dev/nvidiaN
    device files (a container may have the files without /proc/driver/nvidia). 0 off Linux.
    root: where / is (tests)."""
    root = Path(root)
    try:
        gpus = list((root / "proc/driver/nvidia/gpus").iterdir())
    except OSError:
        gpus = []
    if gpus:
        return len(gpus)
    try:
        return sum(1 for p in (root / "dev").iterdir() if p.name.startswith("nvidia") and p.name[6:].isdigit())
    except OSError:
        return 0


def visible_gpus(value: str | None, present: int) -> int | None:
    """How many of `present` GPUs CUDA_VISIBLE_DEVICES=`value` leaves visible, as CUDA reads it:
    the comma-separated list ends at its first entry that names no GPU (a negative or out-of-range
    index; "" and "-1" hide them all). None when unset; a UUID (GPU-..., MIG-...) counts as valid."""
    if value is None:
        return None
    seen = []
    for entry in (e.strip() for e in value.split(",")):
        if entry.isdigit() and int(entry) < present and int(entry) not in seen:
            seen.append(int(entry))
        elif entry.startswith(("GPU-", "MIG-")) and entry not in seen:
            seen.append(entry)
        else:
            break
    return len(seen)


def check_device(cuda_available: bool, gpus_present: int, env: dict, world_size: int, asked_cpu: bool,
                 reason: str | None = None, cpu_only_build: bool = False) -> str:
    """The device a training run uses, "cuda" or "cpu", or DeviceError with one actionable line
    when that would be a silent fallback to CPU. Pure: the caller passes what it found
    (`choose_device` does it for train.py).

    cuda_available: torch.cuda.is_available(). gpus_present: NVIDIA GPUs the driver lists
    (`nvidia_gpus_present`; no CUDA needed). env: the environment (NANOFAST_DEVICE,
    CUDA_VISIBLE_DEVICES). world_size: processes of the run (torchrun's WORLD_SIZE, else 1).
    asked_cpu: the user chose a CPU-sized run (train.py: named a preset other than speedrun).
    reason: why CUDA is unavailable, when torch said (its warning), for the message.
    cpu_only_build: this torch has no CUDA at all (torch.version.cuda is None), for the message.

    - NANOFAST_DEVICE=cpu: cpu, always (and it counts as asking for CPU); NANOFAST_DEVICE=cuda:
      cuda, or an error when CUDA is unavailable. Any other value is an error.
    - CUDA available: cuda.
    - GPUs present but CUDA unusable (a driver older than the wheel, a CPU-only wheel, a
      CUDA_VISIBLE_DEVICES that hides every GPU): an error unless CPU was asked for.
    - No GPU at all: cpu for one process (`python train.py`, `make run`); an error for several
      ranks (a multi-GPU launch that would train on gloo) unless CPU was asked for.
    """
    wanted = env.get("NANOFAST_DEVICE", "").strip().lower()
    ask = "set NANOFAST_DEVICE=cpu or name a CPU --preset (smoke, cpu, rehearsal) to train on CPU"
    if wanted not in ("", "cpu", "cuda"):
        raise DeviceError(f"NANOFAST_DEVICE={env['NANOFAST_DEVICE']!r}: expected cpu or cuda (or unset: "
                          "cuda when it works)")
    if wanted == "cpu":
        return "cpu"
    if cuda_available:
        return "cuda"
    why = f" ({reason})" if reason else ""
    if wanted == "cuda":
        raise DeviceError(f"NANOFAST_DEVICE=cuda but CUDA is unavailable{why}: "
                          f"{gpus_present} NVIDIA GPU(s) present")
    if asked_cpu:
        return "cpu"
    if gpus_present:
        shown = visible_gpus(env.get("CUDA_VISIBLE_DEVICES"), gpus_present)
        if shown == 0:
            raise DeviceError(f"{gpus_present} NVIDIA GPU(s) present but CUDA_VISIBLE_DEVICES="
                              f"{env['CUDA_VISIBLE_DEVICES']!r} hides every one (indices 0-{gpus_present - 1} "
                              f"exist): fix or unset it, or {ask}")
        if cpu_only_build:
            raise DeviceError(f"{gpus_present} NVIDIA GPU(s) present but torch {torch.__version__} is a CPU-only "
                              f"build: install a CUDA build of torch, or {ask}")
        raise DeviceError(f"{gpus_present} NVIDIA GPU(s) present but CUDA cannot use them{why}: check nvidia-smi "
                          f"and that the driver supports CUDA {torch.version.cuda} (torch {torch.__version__}), "
                          f"or {ask}")
    if world_size > 1:
        raise DeviceError(f"{world_size} ranks but no GPU: this run would train on CPU (gloo); {ask}")
    return "cpu"


def choose_device(asked_cpu: bool) -> str:
    """`check_device` on this machine and environment: what train.py runs on."""
    with warnings.catch_warnings(record=True) as caught:  # torch says why CUDA is unusable in a warning
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    reason = next((" ".join(str(w.message).split()) for w in caught if "CUDA" in str(w.message)), None)
    return check_device(available, nvidia_gpus_present(), os.environ, int(os.environ.get("WORLD_SIZE", "1")),
                        asked_cpu, reason, cpu_only_build=torch.version.cuda is None)


PR_SET_PDEATHSIG = 1  # linux/prctl.h
_launcher: int | None = None  # the parent this rank started under (torchrun's agent), once recorded


def die_with_parent(parent: int | None = None) -> str | None:
    """Have the kernel SIGKILL this process when its parent dies (Linux's parent-death signal), so
    that a torchrun rank does not outlive a launcher that was killed: torchrun starts each rank in
    a session of its own, where the launcher's process group and terminal do not reach it, and
    without this a rank waits out its collectives or `pipeline._join` (hours) holding its GPU.
    parent: the parent's pid as read at startup (train.py reads it before its imports, which take
    seconds), default now. Records it for `launcher_gone`. Returns None when set, else why it is a
    no-op (not Linux, no libc). If the parent died before the signal was set (it is no longer this
    process's parent), this process SIGKILLs itself at once: the signal would never come.
    The kernel sends the signal when the parent *thread* that started this process ends; torchrun's
    agent starts its ranks from its main thread.
    """
    global _launcher
    parent = os.getppid() if parent is None else parent
    _launcher = parent
    if platform.system() != "Linux":
        return f"no parent-death signal on {platform.system()}"
    path = ctypes.util.find_library("c")
    if path is None:
        return "no C library found"
    libc = ctypes.CDLL(path, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}"
    if os.getppid() != parent:  # the parent died before the signal was set: it will never come
        print(f"error: the launcher (pid {parent}) died before this process started", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return None


def launcher_gone() -> str | None:
    """None while the launcher `die_with_parent` recorded is still this process's parent; else
    what happened (this process was reparented: its launcher died). None when none was recorded."""
    if _launcher is None or os.getppid() == _launcher:
        return None
    return f"its launcher (pid {_launcher}) is gone"


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


@dataclass(frozen=True)
class GpuPeak:
    """Spec peaks of one GPU model (dense, no sparsity)."""
    bf16_flops: float  # tensor-core bf16 FLOP/s
    gbps: float | None  # DRAM bandwidth, GB/s (None: not listed; the driver's clock and bus width give it)
    fp8_flops: float | None = None  # tensor-core fp8 FLOP/s (None: no fp8 tensor cores, or not listed)


# The one GPU peak table: MFU (peak_flops), the benchmarks' and the guard's fractions of peak
# (peak_bandwidth_gbps, bench/gpu_peaks.py) and the performance page's roofline all read it. Keys are
# fragments of torch.cuda.get_device_name(), most specific first: the first one in the name wins.
GPU_PEAKS: list[tuple[str, GpuPeak]] = [
    ("H100 PCIe", GpuPeak(756e12, 2000, 1513e12)),
    ("H100 NVL", GpuPeak(835e12, 3900, 1671e12)),
    ("H100", GpuPeak(989e12, 3350, 1979e12)),
    ("GH200 480GB", GpuPeak(989e12, 4000, 1979e12)),  # 96 GB HBM3
    ("GH200", GpuPeak(989e12, None, 1979e12)),  # the HBM3e versions: bandwidth from the driver
    ("H200", GpuPeak(989e12, 4800, 1979e12)),
    ("H800", GpuPeak(989e12, 3350, 1979e12)),
    ("B200", GpuPeak(2250e12, 8000, 4500e12)),
    ("A100-SXM4-80GB", GpuPeak(312e12, 2039)),
    ("A100 80GB PCIe", GpuPeak(312e12, 1935)),
    ("A100", GpuPeak(312e12, 1555)),
    ("A800", GpuPeak(312e12, None)),
    ("L40S", GpuPeak(362e12, 864)),
    ("L4", GpuPeak(121e12, 300)),
    ("A10", GpuPeak(125e12, None)),
    ("RTX 4090", GpuPeak(165e12, 1008)),
    ("RTX 3090", GpuPeak(71e12, 936)),
]


def gpu_peak(name: str) -> GpuPeak | None:
    """The table's peaks for a device name (e.g. "NVIDIA H100 80GB HBM3"), or None for an unlisted one."""
    return next((peak for fragment, peak in GPU_PEAKS if fragment in name), None)


def peak_flops(device: str, precision: str = "bf16") -> float | None:
    """Peak dense FLOP/s of the current GPU's tensor cores in `precision` ("bf16" or "fp8"), or None
    (CPU, an unknown GPU, or no fp8 tensor cores): MFU is then n/a."""
    if precision not in ("bf16", "fp8"):
        raise ValueError(f"precision must be 'bf16' or 'fp8', got {precision!r}")
    if device != "cuda":
        return None
    peak = gpu_peak(torch.cuda.get_device_name())
    return None if peak is None else peak.bf16_flops if precision == "bf16" else peak.fp8_flops


def peak_bandwidth_gbps(device: str) -> float | None:
    """Peak DRAM bandwidth of the current GPU in GB/s: 2 (double data rate) x memory clock x bus
    width as the driver reports them, else the table by name; None on CPU or an unknown GPU."""
    if device != "cuda":
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9
    peak = gpu_peak(props.name)
    return None if peak is None else peak.gbps


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
