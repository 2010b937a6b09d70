"""The kernel proof harness itself: backend selection and the SASS facts parser."""
import pytest
import torch

from nanofast.kernels.backend import resolve_backend, triton_interpreting
from nanofast.kernels.compile_gate import MachineFacts, count_instructions, facts_table

SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/              @!P0 LDG.E.U16 R8, desc[UR4][R6.64] ;
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0040*/                   STL [R1], R3 ;
        /*0050*/                   SHFL.BFLY PT, R9, R8, 0x1, 0x1f ;
        /*0060*/                   STG.E.128 desc[UR4][R10.64], R4 ;
"""


def test_count_instructions_matches_opcode_prefixes_and_predicates():
    counts = count_instructions(SASS)
    assert counts == {"LDG.E.128": 1, "LDG.E": 1, "HGMMA": 1, "STL": 1, "SHFL.BFLY": 1, "STG.E.128": 1}


def test_facts_spills_and_table():
    clean = MachineFacts("k", "BLOCK=128", 90, 32, 0, 0, {"LDG.E.128": 2})
    spilled = MachineFacts("k", "BLOCK=4096", 90, 255, 0, 64, {"STL": 3})
    assert not clean.spills and spilled.spills
    table = facts_table([clean, spilled])
    assert "| k | BLOCK=128 | sm_90 | 32 | 0 | 0 | LDG.E.128 x2 |" in table


def test_backend_resolution():
    x = torch.zeros(2)
    assert resolve_backend(None, x) == "torch"
    assert triton_interpreting()  # conftest sets TRITON_INTERPRET=1 before triton is imported
    assert resolve_backend("triton", x) == "triton"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cudnn", x)
