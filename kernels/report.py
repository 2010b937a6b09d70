"""`python -m nanofast.kernels.report`: the machine-code facts of every kernel, as a markdown table.

Triton kernels are compiled for the configurations an H100 (sm_90) or A100 (sm_80) launches for
nanochat's shapes (each op's declared configurations, nanofast.kernels.registry); CUDA sources in csrc/ are compiled with
nvcc. No GPU is needed: the tables are what the tests' compile gates assert.

The tables go to stdout (and --out), each as soon as it is complete; progress, one line per
configuration compiled, goes to stderr. What a run needs (triton's bundled cuobjdump and nvdisasm;
for the CUDA tables nvcc and the CUDA sources) is checked before anything compiles, so a missing
tool fails at once with a message saying what to install or pass (--no-cuda), not after minutes of
Triton compiles. --only TEXT compiles only the Triton configurations whose kernel name or config
contains TEXT, and the CUDA sources whose file name contains it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

from . import registry
from .compile_gate import MachineFacts, compile_triton, facts_table

CUDA_ARCHES = ("sm_90a", "sm_80")


def _label(cfg: dict) -> str:
    return f"{cfg['fn'].__name__} [{cfg.get('config') or cfg['constexprs']}]"


def _progress(msg: str) -> None:
    print(f"report: {msg}", file=sys.stderr, flush=True)


def triton_facts(arch: int = 90, only: str | None = None, progress=None) -> list[MachineFacts]:
    """Facts of every op's Triton kernel configurations (the registry's), compiled for sm_`arch`;
    `only`: those whose kernel name or config contains it. `progress(done, total, label, seconds)`
    is called after each compile."""
    configs = [c for c in registry.triton_configs(arch) if only is None or only in _label(c)]
    rows = []
    for i, cfg in enumerate(configs, 1):
        t0 = time.perf_counter()
        try:
            rows.append(compile_triton(**cfg, arch=arch))
        except Exception as exc:
            raise RuntimeError(f"compiling {_label(cfg)} for sm_{arch} failed: {type(exc).__name__}: {exc}") from exc
        if progress is not None:
            progress(i, len(configs), _label(cfg), time.perf_counter() - t0)
    return rows


def cuda_facts(arch: str = "sm_90a", only: str | None = None, progress=None) -> list[MachineFacts]:
    """Facts of every CUDA kernel in csrc/, compiled by nvcc for `arch`; `only`: the sources whose
    file name contains it."""
    from .cuda_facts import nvcc_facts

    sources = [s for s in registry.cuda_sources() if only is None or only in s]
    rows = []
    for i, source in enumerate(sources, 1):
        t0 = time.perf_counter()
        try:
            rows.extend(nvcc_facts(source, arch))
        except Exception as exc:
            raise RuntimeError(f"nvcc of csrc/{source} for {arch} failed: {type(exc).__name__}: {exc}") from exc
        if progress is not None:
            progress(i, len(sources), f"csrc/{source}", time.perf_counter() - t0)
    return rows


def preflight(cuda: bool, only: str | None = None, arches: tuple[int, ...] = (90,)) -> list[str]:
    """What stops this run before it starts, one sentence each (empty: nothing)."""
    problems = []
    from .backend import triton_interpreting

    if triton_interpreting():
        problems.append("TRITON_INTERPRET=1 is set: Triton's interpreter cannot compile for a GPU; run the "
                        "report without it")
    try:
        from .compile_gate import cuda_tool

        for tool in ("cuobjdump", "nvdisasm"):
            cuda_tool(tool)
    except (ImportError, FileNotFoundError) as exc:
        problems.append(f"the Triton tables need triton with its NVIDIA backend: {exc}")
    if only is not None:
        n_triton = sum(only in _label(c) for a in arches for c in registry.triton_configs(a))
        n_cuda = sum(only in s for s in registry.cuda_sources()) if cuda else 0
        if n_triton + n_cuda == 0:
            problems.append(f"--only {only!r} matches no Triton configuration and no CUDA source")
        elif n_cuda == 0:
            cuda = False  # nothing of csrc/ selected: its tools are not needed
    if cuda:
        from .cuda_build import csrc_dir
        from .cuda_facts import nvcc_path

        def nvcc() -> str:
            path = nvcc_path()
            if shutil.which(path) is None:
                raise FileNotFoundError(f"{path} (from $NVCC, PATH or CUDA_HOME) is not an executable")
            return path

        for what, find in (("the CUDA sources", csrc_dir), ("nvcc", nvcc)):
            try:
                find()
            except FileNotFoundError as exc:
                problems.append(f"the CUDA tables need {what}: {exc} (or pass --no-cuda for the Triton tables only)")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=[90], help="SM versions for the Triton kernels (90, 80)")
    p.add_argument("--no-cuda", action="store_true", help="skip the nvcc build of csrc/")
    p.add_argument("--only", metavar="TEXT", default=None,
                   help="only the Triton configurations whose kernel name or config contains TEXT, and the CUDA "
                        "sources whose file name contains it")
    p.add_argument("--out", default=None, help="also write the tables to this markdown file")
    args = p.parse_args(argv)
    problems = preflight(not args.no_cuda, args.only, tuple(args.arch))
    if problems:
        for problem in problems:
            _progress(f"cannot run: {problem}")
        return 2
    out = open(args.out, "w") if args.out else None
    emitted = []

    def write(text: str) -> None:
        for stream in (sys.stdout, out):
            if stream is not None:
                stream.write(text)
                stream.flush()

    def emit(title: str, rows: list[MachineFacts]) -> None:
        write(("\n\n" if emitted else "") + f"## {title}\n\n" + facts_table(rows))
        emitted.append(title)

    def progress(kind: str):
        return lambda i, n, label, s: _progress(f"{kind} [{i}/{n}] {label}: {s:.1f} s")

    start = time.perf_counter()
    status = 0
    try:
        try:
            for arch in args.arch:
                rows = triton_facts(arch, args.only, progress(f"triton sm_{arch}"))
                if rows:
                    emit(f"Triton kernels, sm_{arch}", rows)
            if not args.no_cuda:
                for arch in CUDA_ARCHES:
                    rows = cuda_facts(arch, args.only, progress(f"nvcc {arch}"))
                    if rows:
                        emit(f"CUDA kernels (csrc/), {arch}", rows)
        except BrokenPipeError:
            raise
        except Exception as exc:  # a failed compile: say which, keep the tables already printed
            _progress(f"FAILED after {time.perf_counter() - start:.0f} s: {exc}")
            status = 1
        if emitted:
            write("\n")
    except BrokenPipeError:  # stdout closed early (piped into head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        if out is not None:
            out.close()
    if status == 0:
        _progress(f"done: {len(emitted)} tables in {time.perf_counter() - start:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
