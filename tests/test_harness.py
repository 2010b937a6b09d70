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


def test_compile_gate_refuses_to_run_under_the_interpreter():
    from nanofast.kernels.compile_gate import compile_triton

    with pytest.raises(RuntimeError, match="without TRITON_INTERPRET"):
        compile_triton(None, {}, {})


def test_gate_signature_reads_the_kernel_arguments():
    """Every argument typed in the kernel's order: constexprs (a None pointer included), overrides,
    fp32 and i32 scalars by name, and the rest pointers to the default dtype."""
    import triton
    import triton.language as tl

    from nanofast.kernels.compile_gate import gate_signature

    @triton.jit
    def kernel(X, K, W, SCALE, stride_x, N, eps, BLOCK: tl.constexpr):
        pass

    sig = gate_signature(kernel, {"W": None, "BLOCK": 64}, "bf16", {"SCALE": "*fp32"})
    assert sig == {"X": "*bf16", "K": "i32", "W": "constexpr", "SCALE": "*fp32", "stride_x": "i32", "N": "i32",
                   "eps": "fp32", "BLOCK": "constexpr"}
    assert list(sig) == kernel.arg_names
    assert gate_signature(kernel, {"BLOCK": 64}, "fp16", {"K": "*fp16"})["K"] == "*fp16"
    with pytest.raises(ValueError, match="constexpr argument BLOCK needs a value"):
        gate_signature(kernel, {}, "bf16")
    with pytest.raises(ValueError, match=r"has no arguments \['Y'\]"):
        gate_signature(kernel, {"BLOCK": 64}, "bf16", {"Y": "*fp32"})


def test_report_command_prints_the_facts_of_every_kernel(tmp_path):
    """`python -m nanofast.kernels.report`, in a process without the interpreter, as a user runs it."""
    import os
    import subprocess
    import sys

    from nanofast.kernels.registry import triton_configs

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "facts.md"
    proc = subprocess.run([sys.executable, "-m", "nanofast.kernels.report", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text == proc.stdout
    rows = [line for line in text.splitlines() if line.startswith("| _")]
    assert len([r for r in rows if "sm_90 |" in r]) == len(triton_configs(90))  # every op's configurations
    assert any(r.startswith("| _lce_row_kernel") for r in rows)
    assert any(r.startswith("| _ns_gram_kernel") and "HGMMA" in r for r in rows)
    assert any(r.startswith("| _fp8_gemm") for r in rows)
    assert "## CUDA kernels (csrc/), sm_90a" in text and "## CUDA kernels (csrc/), sm_80" in text
