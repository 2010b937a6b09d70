"""The device peaks every GPU benchmark reports against: nanofast.common's one table (GPU_PEAKS), so
MFU, the benchmarks, the guard and the performance page all agree."""
from __future__ import annotations

import torch

from nanofast import common


def peak_bandwidth_gbps() -> float | None:
    """DRAM bandwidth in GB/s of the current GPU (nanofast.common.peak_bandwidth_gbps: the driver's
    memory clock and bus width, else the table by name); None on CPU or an unknown device."""
    return common.peak_bandwidth_gbps("cuda" if torch.cuda.is_available() else "cpu")


def bandwidth_info(benchmark, nbytes: int, calls_per_round: int = 1) -> dict:
    """Time per call, achieved GB/s and % of the device's peak from a finished pytest-benchmark
    (empty under --benchmark-disable, where nothing was timed)."""
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return {}
    seconds = stats.stats.median / calls_per_round
    gbps = nbytes / seconds / 1e9
    peak = peak_bandwidth_gbps()
    return dict(us_per_call=round(seconds * 1e6, 2), GBps=round(gbps, 1), peak_GBps=peak,
                bandwidth_percent=None if peak is None else round(100 * gbps / peak, 1))
