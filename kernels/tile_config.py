"""Named tile configurations: the small, compile-gated configuration spaces of the matmul kernels.

A kernel module lists its space as a tuple of `TileConfig` (e.g. `newton_schulz_triton.NS_UPDATE_CONFIGS`,
`fp8_gemm.FP8_GEMM_CONFIGS`); every entry is compiled for sm_90 by the compile gate (its module's
KERNEL_CONFIGS) and its machine-code facts are in bench/baselines/kernel_facts.json. A launcher's
`config=` argument selects one entry by name (or the entry itself); `None` keeps the launcher's
default, which is what ran before the spaces existed. The spaces are what a GPU run may pick from:
no entry is claimed to be faster than the default until a GPU has measured it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = ["TileConfig", "select_config"]


@dataclass(frozen=True)
class TileConfig:
    """One tile configuration of a matmul kernel.

    BLOCK_M x BLOCK_N is the output tile of one program, BLOCK_K the depth of one K step, in elements
    of the operands the space is written for (a module may document a dtype rule, e.g. Newton-Schulz
    halves BLOCK_K for fp32 operands to keep the bytes per stage). num_warps / num_stages are
    Triton's launch options. GROUP_M: row tiles per group of the grouped (swizzled) program order
    (1 = plain row-major order); kernels without one ignore it. fast_accum_only: the fp8 GEMM may
    only run it with use_fast_accum=True (the split accumulator's second fp32 copy would spill).
    persistent_out_bytes: the widest output element (bytes) whose TMA epilogue buffer still fits
    next to the load stages in the persistent fp8 kernel (0: not for the persistent kernel).
    why: the one-line reason the entry is in the space.
    """
    name: str
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int
    GROUP_M: int = 1
    fast_accum_only: bool = False
    persistent_out_bytes: int = 4
    why: str = ""

    def stage_bytes(self, operand_bytes: int) -> int:
        """Shared memory of one pipeline stage: the (BLOCK_M + BLOCK_N) x BLOCK_K operand tiles."""
        return (self.BLOCK_M + self.BLOCK_N) * self.BLOCK_K * operand_bytes

    def acc_registers(self) -> int:
        """fp32 accumulator registers per thread: BLOCK_M * BLOCK_N over num_warps * 32 threads."""
        return self.BLOCK_M * self.BLOCK_N // (32 * self.num_warps)


def select_config(config: object, space: Sequence[TileConfig], arg: str = "config",
                  where: str = "") -> TileConfig:
    """The entry of `space` that `config` names: a name string or the TileConfig itself.

    Raises ValueError naming `arg` (and `where`, the kernel) for anything else: an unknown name, a
    TileConfig that is not in the space (an un-gated configuration), or another type.
    """
    names = [c.name for c in space]
    if isinstance(config, TileConfig):
        if config in space:
            return config
        raise ValueError(f"{arg}={config.name!r} is not an entry of the {where} configuration space {names} "
                         "(only compile-gated entries run; use meta= for ad-hoc tiles)")
    if isinstance(config, str):
        for c in space:
            if c.name == config:
                return c
    raise ValueError(f"{arg} must be one of {names}{' for ' + where if where else ''} (a name or the TileConfig), "
                     f"got {config!r}")
