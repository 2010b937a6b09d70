"""train.py's CPU route keeps freed memory in the process (nanofast.common.keep_freed_memory):
checked through glibc's own accounting, in child processes (the setting is process-wide)."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import ctypes, ctypes.util, sys
import torch
from nanofast.common import keep_freed_memory

class MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
x = torch.ones(32 << 20)  # 128 MiB, far over glibc's largest mmap threshold (32 MiB)
mapped = libc.mallinfo2().hblkhd  # bytes in mmap'd blocks
del x
free_in_heap = libc.mallinfo2().fordblks  # freed bytes the process kept
print(applied, mapped >> 20, free_in_heap >> 20)
"""


def child(mode: str) -> tuple[str, int, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], cwd=ROOT, capture_output=True, text=True, check=True)
    applied, mapped, kept = out.stdout.split()
    return applied, int(mapped), int(kept)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_memory_stays_in_the_process_for_the_next_step():
    applied, mapped, kept = child("default")
    assert applied == "False" and mapped >= 128 and kept < 128  # glibc's default: mapped on allocation, unmapped on free
    applied, mapped, kept = child("keep")
    assert applied == "True" and mapped < 128 and kept >= 128  # from the heap, and kept there


def test_train_py_applies_it_on_cpu_unless_told_not_to():
    """The command line applies it (the smoke preset's tokenizer stage runs either way; the
    in-process tests of train.main run without it)."""
    code = ("import runpy, sys, nanofast.common as c\n"
            "c.keep_freed_memory = lambda: print('KEEP') or True\n"
            "sys.argv = ['train.py', '--stage', 'nope']\n"
            "runpy.run_path('train.py', run_name='__main__')\n")
    for value, expected in (("1", True), ("0", False)):
        env = dict(os.environ, NANOFAST_KEEP_FREED_MEMORY=value)
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
        assert out.returncode == 2 and "unknown stage" in out.stderr  # argparse's usage error
        assert ("KEEP" in out.stdout) == expected, value


def test_the_benchmarks_children_run_both_ways():
    """bench/test_bench_cpu_memory.py's measurement, at toy size (its timing is `make bench`'s)."""
    from bench.cpu_memory import child

    for mode in ("default", "keep"):
        result = child(mode, steps=1, shape=("1", "32", "2", "256"))
        assert result["tokens_per_second"] > 0 and result["sys_seconds"] >= 0
