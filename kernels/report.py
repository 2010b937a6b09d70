"""`python -m nanofast.kernels.report`: the machine-code facts of every kernel, as a markdown table.

Triton kernels are compiled for the configurations an H100 (sm_90) or A100 (sm_80) launches for
nanochat's shapes (each op's declared configurations, nanofast.kernels.registry); CUDA sources in csrc/ are compiled with
nvcc. No GPU is needed: the tables are what the tests' compile gates assert.
"""
from __future__ import annotations

import argparse
import sys

from . import registry
from .compile_gate import MachineFacts, compile_triton, facts_table


def triton_facts(arch: int = 90) -> list[MachineFacts]:
    """Facts of every op's Triton kernel configurations (the registry's), compiled for sm_`arch`."""
    return [compile_triton(**cfg, arch=arch) for cfg in registry.triton_configs(arch)]


def cuda_facts(arch: str = "sm_90a") -> list[MachineFacts]:
    """Facts of every CUDA kernel in csrc/, compiled by nvcc for `arch`."""
    from .cuda_facts import nvcc_facts

    return [f for source in registry.cuda_sources() for f in nvcc_facts(source, arch)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=[90], help="SM versions for the Triton kernels (90, 80)")
    p.add_argument("--no-cuda", action="store_true", help="skip the nvcc build of csrc/")
    p.add_argument("--out", default=None, help="also write the tables to this markdown file")
    args = p.parse_args(argv)
    sections = []
    for arch in args.arch:
        sections.append(f"## Triton kernels, sm_{arch}\n\n" + facts_table(triton_facts(arch)))
    if not args.no_cuda:
        for arch in ("sm_90a", "sm_80"):
            sections.append(f"## CUDA kernels (csrc/), {arch}\n\n" + facts_table(cuda_facts(arch)))
    text = "\n\n".join(sections) + "\n"
    sys.stdout.write(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
