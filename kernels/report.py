"""`python -m nanofast.kernels.report`: the machine-code facts of every kernel, as a markdown table.

Triton kernels are compiled for the configurations an H100 (sm_90) or A100 (sm_80) launches for
nanochat's shapes (each kernel module's KERNEL_CONFIGS); CUDA sources in csrc/ are compiled with
nvcc. No GPU is needed: the tables are what the tests' compile gates assert.
"""
from __future__ import annotations

import argparse
import sys

from .compile_gate import MachineFacts, compile_triton, facts_table


def triton_facts(arch: int = 90) -> list[MachineFacts]:
    """Facts of every Triton kernel configuration in KERNEL_CONFIGS, compiled for sm_`arch`."""
    # Imported by name: the package re-exports functions called rms_norm / qk_norm_rope.
    from . import newton_schulz_triton as ns
    from .fp8_gemm import KERNEL_CONFIGS as FP8_GEMM_CONFIGS
    from .fp8_quant import KERNEL_CONFIGS as FP8_QUANT_CONFIGS
    from .linear_cross_entropy import KERNEL_CONFIGS as LCE_CONFIGS
    from .paged_attention import KERNEL_CONFIGS as PAGED_CONFIGS
    from .qk_norm_rope import KERNEL_CONFIGS as QK_CONFIGS
    from .rms_norm import KERNEL_CONFIGS as RMS_CONFIGS

    ns_configs = ns.KERNEL_CONFIGS_SM80 if arch < 90 else ns.KERNEL_CONFIGS  # its tiles depend on the target
    return [compile_triton(**cfg, arch=arch) for cfg in (*RMS_CONFIGS, *QK_CONFIGS, *ns_configs, *ns.PROLOGUE_CONFIGS,
                                                      *PAGED_CONFIGS, *FP8_QUANT_CONFIGS, *FP8_GEMM_CONFIGS,
                                                      *LCE_CONFIGS)]


def cuda_facts(arch: str = "sm_90a") -> list[MachineFacts]:
    """Facts of every CUDA kernel in csrc/, compiled by nvcc for `arch`."""
    from .cuda_facts import nvcc_facts

    return [f for source in ("rms_norm.cu", "qk_norm_rope.cu", "paged_attention.cu") for f in nvcc_facts(source, arch)]


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
