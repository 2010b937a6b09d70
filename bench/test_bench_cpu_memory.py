"""CPU training step with glibc's default malloc against train.py's `keep_freed_memory` route.

The setting is process-wide and cannot be undone, so each measurement is a child process; the two
alternate (A B A B) so that a machine's drift hits both alike. Issue 17's configuration: depth 4,
T 512, batch 8 (4,096 tokens per step), vocab 32768, fp32, eager, the default CPU route. Reports
the median steady step's tokens/s and the kernel (sys) CPU seconds per step of each, and their
ratio; it asserts nothing about speed (not a timed test).
"""
import pytest

from bench.cpu_memory import MODES, child


@pytest.mark.expensive
def test_cpu_train_step_keep_freed_memory(benchmark):
    results = {mode: [] for mode in MODES}

    def alternate():
        for _ in range(2):
            for mode in MODES:
                results[mode].append(child(mode, steps=3))

    benchmark.group = "cpu train step d4 T512 B8 V32768: glibc default vs keep_freed_memory"
    benchmark.pedantic(alternate, rounds=1, iterations=1)
    best = {m: max(r["tokens_per_second"] for r in results[m]) for m in MODES}
    benchmark.extra_info.update(
        tokens_per_second=best, ratio=best["keep"] / best["default"],
        sys_seconds_per_step={m: min(r["sys_seconds"] for r in results[m]) for m in MODES})
    assert all(v > 0 for v in best.values())
