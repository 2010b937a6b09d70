"""The machine-code facts of every kernel, as the table the guard compares against.

    python -m bench.kernel_facts            # print the current facts as JSON
    python -m bench.kernel_facts --write    # refresh bench/baselines/kernel_facts.json

Every Triton configuration the kernel modules list (their KERNEL_CONFIGS / PROLOGUE_CONFIGS, the
same set `python -m nanofast.kernels.report` prints) is compiled for sm_90, and every CUDA kernel in
csrc/ by nvcc for sm_90a (skipped, and said so, when nvcc is absent). Per configuration: registers,
shared bytes, local and stack bytes (a Triton kernel's register spills land in its STACK frame, which
cuobjdump reports apart from LOCAL), spill bytes (CUDA, from ptxas) and the key SASS
instruction counts (compile_gate's list: the tensor-core MMAs of both precisions, HGMMA for
fp16/bf16 and QGMMA for fp8, cp.async and TMA tile copies, 128-bit loads and stores). No GPU is needed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

# As compile_gate pins it: triton 3.9 warns that its FP-fusion default changes in 3.10 (FFMA in SASS).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

ROOT = Path(__file__).resolve().parents[1]
TABLE = Path(__file__).resolve().parent / "baselines" / "kernel_facts.json"
ARCH = 90
# (module, attribute) of every Triton config list: what nanofast.kernels.report compiles for sm_90.


def fact_key(row: dict) -> str:
    """The table key of one compiled configuration: kernel, its config label, target."""
    return f"{row['kernel']} [{row['config']}] sm_{row['arch']}"


def _sass_facts(cubin: bytes) -> tuple[dict[str, int], dict[str, int]]:
    """(REG/STACK/SHARED/LOCAL, key instruction counts) of one cubin, read by compile_gate."""
    from nanofast.kernels.compile_gate import cubin_facts

    f = cubin_facts(cubin, "", "", ARCH)
    numbers = {"REG": f.registers, "STACK": f.stack_bytes, "SHARED": f.shared_bytes, "LOCAL": f.local_bytes}
    return numbers, dict(f.instructions)


def triton_config_facts(cfg: dict, arch: int = ARCH) -> dict:
    """Compile one `compile_gate.compile_triton`-style config dict for sm_`arch`; its facts row.

    Must run in a process without TRITON_INTERPRET=1 (the interpreter's helpers cannot be compiled).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(cfg["signature"])
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in cfg.get("aligned", ())}
    src = ASTSource(fn=cfg["fn"], signature=cfg["signature"], constexprs=cfg["constexprs"], attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 3)})
    numbers, counts = _sass_facts(compiled.asm["cubin"])
    config = cfg.get("config") or ", ".join(f"{k}={v}" for k, v in cfg["constexprs"].items())
    return {"source": "triton", "kernel": cfg["fn"].__name__, "config": config, "arch": arch,
            "registers": numbers.get("REG", 0), "shared_bytes": max(numbers.get("SHARED", 0), compiled.metadata.shared),
            "local_bytes": numbers.get("LOCAL", 0), "stack_bytes": numbers.get("STACK", 0), "spill_bytes": 0, "instructions": dict(sorted(counts.items()))}


def cuda_facts(arch: str = "sm_90a") -> list[dict]:
    """Facts rows of every CUDA kernel in csrc/ (nvcc; raises FileNotFoundError without nvcc)."""
    from nanofast.kernels.cuda_facts import nvcc_facts

    rows = []
    from nanofast.kernels.registry import cuda_sources

    for source in cuda_sources():
        for f in nvcc_facts(source, arch):
            rows.append({"source": "cuda", "kernel": f.kernel, "config": f.config, "arch": f.arch,
                         "registers": f.registers, "shared_bytes": f.shared_bytes, "local_bytes": f.local_bytes,
                         "stack_bytes": f.local_bytes, "spill_bytes": f.spill_store_bytes + f.spill_load_bytes,
                         "instructions": dict(sorted(f.instructions.items()))})
    return rows


def _collect_here(cuda: bool) -> dict:
    from nanofast.kernels.registry import triton_configs

    rows = [triton_config_facts(cfg) for cfg in triton_configs(90)]
    notes = []
    if cuda:
        try:
            rows += cuda_facts()
        except FileNotFoundError as e:  # no CUDA toolkit: the Triton kernels are still checked
            notes.append(f"CUDA kernels not compiled: {e}")
    kernels: dict[str, dict] = {}
    for row in rows:
        key, n = fact_key(row), 2
        while key in kernels:  # two configs with one label: keep both, numbered in order
            key, n = f"{fact_key(row)} #{n}", n + 1
        kernels[key] = row
    return {"kernels": kernels, "notes": notes}


def collect(cuda: bool = True) -> dict:
    """The current facts: {"kernels": {key: row}, "notes": [...], "versions": {...}}.

    In a process that interprets Triton (the tests set TRITON_INTERPRET=1) the compilation runs in
    a child process without the interpreter, as compile_gate.configs_facts does.
    """
    from nanofast.kernels.backend import triton_interpreting

    if triton_interpreting():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        args = [sys.executable, "-m", "bench.kernel_facts"] + ([] if cuda else ["--no-cuda"])
        proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"collecting kernel facts failed:\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout)
    out = _collect_here(cuda)
    out["versions"] = tool_versions()
    return out


def tool_versions() -> dict:
    """The compiler versions the facts depend on (a different triton / nvcc may change them)."""
    import triton

    versions = {"triton": triton.__version__}
    try:
        from nanofast.kernels.cuda_facts import nvcc_path

        text = subprocess.run([nvcc_path(), "--version"], capture_output=True, text=True, timeout=60).stdout
        found = re.search(r"release (\d+\.\d+)", text)
        versions["nvcc"] = found.group(1) if found else None
    except (FileNotFoundError, OSError, subprocess.TimeoutExpired):
        versions["nvcc"] = None
    return versions


def load_table(path: Path = TABLE) -> dict:
    """The committed table ({"kernels": {...}, ...})."""
    return json.loads(Path(path).read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help=f"write the table to {TABLE.relative_to(ROOT)}")
    p.add_argument("--no-cuda", action="store_true", help="skip the nvcc build of csrc/")
    args = p.parse_args(argv)
    facts = collect(cuda=not args.no_cuda)
    text = json.dumps({"generated_by": "python -m bench.kernel_facts --write", **facts}, indent=1) + "\n"
    if args.write:
        TABLE.parent.mkdir(parents=True, exist_ok=True)
        TABLE.write_text(text)
        print(f"wrote {len(facts['kernels'])} kernel configs to {TABLE.relative_to(ROOT)}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
