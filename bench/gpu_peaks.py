"""The device peaks every GPU benchmark reports against (one place, so all agree)."""
from __future__ import annotations

import torch

# Peak DRAM bandwidth (GB/s) by device name fragment, most specific first: the fallback when the
# driver does not report the memory clock and bus width.
_PEAK_GBPS = [("H100 PCIe", 2000), ("H100 NVL", 3900), ("H100", 3350), ("H200", 4800), ("H800", 3350),
              ("B200", 8000), ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100", 1555), ("L40S", 864),
              ("L4", 300), ("RTX 4090", 1008), ("RTX 3090", 936)]


def peak_bandwidth_gbps() -> float | None:
    """DRAM bandwidth in GB/s: 2 (double data rate) x memory clock x bus width, or the table by
    name; None on CPU or an unknown device."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9
    return next((gbps for key, gbps in _PEAK_GBPS if key in props.name), None)


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
