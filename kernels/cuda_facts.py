"""Machine-code facts of the csrc/ kernels from nvcc and ptxas (test and benchmark tooling).

`nvcc_facts` compiles a csrc file with `nvcc -cubin -Xptxas -v` for a target (sm_90a, sm_80) and
parses registers, spill stores/loads, stack and shared memory per kernel, so tests can hold every
kernel to "no spills, bounded registers" without a GPU.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .compile_gate import MachineFacts, count_instructions
from .cuda_build import csrc_dir, csrc_headers, sources_digest

__all__ = ["NvccFacts", "nvcc_facts", "nvcc_path", "parse_ptxas"]


@dataclass
class NvccFacts(MachineFacts):
    """MachineFacts of one kernel as ptxas reports it (`-Xptxas -v`), plus the spill byte counts.

    local_bytes is the stack frame per thread (local memory); instructions come from nvdisasm when
    the triton wheel's copy is available, else stay empty.
    """
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    barriers: int = 0

    @property
    def spills(self) -> bool:
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0 or super().spills


def nvcc_path() -> str:
    """The nvcc executable: $NVCC, else nvcc on PATH, else $CUDA_HOME/bin/nvcc (or $CUDA_PATH)."""
    env = os.environ.get("NVCC")
    if env:
        return env
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    raise FileNotFoundError("nvcc not found: put the CUDA toolkit on PATH or set NVCC / CUDA_HOME")


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return list(names)
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    lines = out.stdout.splitlines()
    return lines if out.returncode == 0 and len(lines) == len(names) else list(names)


def _split_name(demangled: str) -> tuple[str, str]:
    """('rms_norm_fwd_kernel', 'float, 4, 2') from 'void (anonymous namespace)::rms_norm_fwd_kernel<float, 4, 2>(...)'."""
    s = demangled.replace("(anonymous namespace)::", "")
    s = re.sub(r"^void\s+", "", s)
    m = re.match(r"([\w:]+)(?:<(.*?)>)?\(", s)
    if not m:
        return demangled, ""
    return m.group(1).split("::")[-1], m.group(2) or ""


def parse_ptxas(log: str) -> dict[str, dict]:
    """Per entry function (mangled name): registers, spill bytes, stack, shared memory and barriers."""
    facts: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = m.group(1)
            facts[current] = {"registers": 0, "spill_store_bytes": 0, "spill_load_bytes": 0, "stack_bytes": 0,
                              "shared_bytes": 0, "barriers": 0}
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = m.group(1) if m.group(1) in facts else None
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            facts[current].update(stack_bytes=int(m.group(1)), spill_store_bytes=int(m.group(2)),
                                  spill_load_bytes=int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            facts[current]["registers"] = int(m.group(1))
            b = re.search(r"used (\d+) barriers", line)
            s = re.search(r"(\d+) bytes smem", line)
            facts[current]["barriers"] = int(b.group(1)) if b else 0
            facts[current]["shared_bytes"] = int(s.group(1)) if s else 0
    return facts


def _sass_by_function(cubin: Path) -> dict[str, str]:
    try:
        from .compile_gate import cuda_tool

        nvdisasm = cuda_tool("nvdisasm")
    except (ImportError, FileNotFoundError):
        return {}
    res = subprocess.run([nvdisasm, str(cubin)], capture_output=True, text=True)
    if res.returncode != 0:
        return {}
    parts = re.split(r"^\.text\.(\S+):\s*$", res.stdout, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


_facts_cache: dict[tuple, list] = {}


def nvcc_facts(source_name: str, arch: str | int = "sm_90a") -> list[NvccFacts]:
    """Compile csrc/`source_name` with `nvcc -arch=<arch> -cubin -O3 -Xptxas -v`; facts per kernel.

    arch: "sm_90a", "sm_80", or 90 / 80 (90 means sm_90a: the Hopper target the kernels ship for).
    One NvccFacts per kernel instantiation: kernel (base name), config (template arguments),
    arch (e.g. 90), registers, shared_bytes (static, as ptxas counts it), local_bytes (stack frame),
    spill_store_bytes, spill_load_bytes, barriers, instructions (SASS counts, when nvdisasm exists).
    Cached per (source contents, arch) for the life of the process.
    """
    if isinstance(arch, int):
        arch = "sm_90a" if arch == 90 else f"sm_{arch}"
    if not re.fullmatch(r"sm_\d+a?", str(arch)):
        raise ValueError(f"arch must look like 'sm_90a' / 'sm_80' or be an int such as 90, got {arch!r}")
    src_dir = csrc_dir()
    src = src_dir / source_name
    if not src.is_file():
        raise FileNotFoundError(f"no CUDA source {src}")
    key = (sources_digest([src, *csrc_headers(src_dir)], []), arch)
    if key in _facts_cache:
        return _facts_cache[key]
    nvcc = nvcc_path()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / (src.stem + ".cubin")
        cmd = [nvcc, f"-arch={arch}", "-cubin", "-O3", "-std=c++17", "-Xptxas", "-v", f"-I{src_dir}", "-o", str(cubin),
               str(src)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"nvcc failed for {source_name} ({arch}):\n{' '.join(cmd)}\n{res.stderr[-6000:]}")
        parsed = parse_ptxas(res.stdout + "\n" + res.stderr)
        sass = _sass_by_function(cubin)
    mangled = list(parsed)
    arch_num = int(re.sub(r"\D", "", arch))
    out = []
    for name, dm in zip(mangled, _demangle(mangled)):
        base, config = _split_name(dm)
        f = parsed[name]
        out.append(NvccFacts(kernel=base, config=config, arch=arch_num, registers=f["registers"],
                             shared_bytes=f["shared_bytes"], local_bytes=f["stack_bytes"],
                             instructions=count_instructions(sass[name]) if name in sass else {},
                             spill_store_bytes=f["spill_store_bytes"], spill_load_bytes=f["spill_load_bytes"],
                             barriers=f["barriers"]))
    _facts_cache[key] = out
    return out
