"""kernels/tile_config.py: the named configuration spaces of the matmul kernels. Selection by name or
entry, clear errors for anything else, and each entry's documented budget arithmetic (shared memory
per CTA, accumulator registers) holding for every space that ships."""
from __future__ import annotations

import pytest

from nanofast.kernels.fp8_gemm import FP8_GEMM_CONFIGS
from nanofast.kernels.newton_schulz_triton import NS_GRAM_CONFIGS, NS_POLY_CONFIGS, NS_UPDATE_CONFIGS
from nanofast.kernels.tile_config import TileConfig, select_config

SMEM_PER_CTA = 227 * 1024  # H100: 228 KB per SM, at most 227 KB for one CTA
SPACES = {"ns_gram": (NS_GRAM_CONFIGS, 2), "ns_poly": (NS_POLY_CONFIGS, 2), "ns_update": (NS_UPDATE_CONFIGS, 2),
          "fp8_gemm": (FP8_GEMM_CONFIGS, 1)}  # (space, operand bytes: bf16 / e4m3)


def test_select_by_name_or_entry():
    first, last = NS_UPDATE_CONFIGS[0], NS_UPDATE_CONFIGS[-1]
    assert select_config(first.name, NS_UPDATE_CONFIGS) is first
    assert select_config(last, NS_UPDATE_CONFIGS) is last


@pytest.mark.parametrize("bad,match", [
    ("no-such-tile", r"config must be one of \["),
    (64, r"config must be one of"),
    (TileConfig("64x64x32-w4-s2", 64, 64, 32, num_warps=4, num_stages=2), "is not an entry of the .* configuration space"),
])
def test_anything_else_is_refused_naming_the_argument(bad, match):
    with pytest.raises(ValueError, match=match):
        select_config(bad, NS_GRAM_CONFIGS, where="ns_gram")


def test_an_entry_of_another_space_is_refused():
    wide = next(c for c in NS_UPDATE_CONFIGS if c not in NS_GRAM_CONFIGS)  # rectangular: update only
    with pytest.raises(ValueError, match="meta="):
        select_config(wide, NS_GRAM_CONFIGS, arg="config", where="ns_gram")


@pytest.mark.parametrize("space", SPACES)
def test_every_entry_fits_a_cta_and_the_register_file(space):
    configs, operand_bytes = SPACES[space]
    names = [c.name for c in configs]
    assert len(names) == len(set(names)) and configs
    for c in configs:
        assert c.stage_bytes(operand_bytes) * c.num_stages <= SMEM_PER_CTA, c.name
        assert c.acc_registers() <= 128, c.name  # fp32 accumulator per thread: half of the 255 at most
        assert c.BLOCK_M % 64 == 0 and c.num_warps % 4 == 0, c.name  # whole m64 warpgroups (wgmma)
        assert c.why, c.name
