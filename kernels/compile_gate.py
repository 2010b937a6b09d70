"""Compile Triton kernels for Hopper without a GPU and read back their machine-code facts.

`triton.compile` targets any GPU ahead of time; the cubin it returns is inspected with the
`cuobjdump` / `nvdisasm` the triton wheel bundles: registers, shared memory, local memory (any
LOCAL > 0 is a register spill) and SASS instruction counts (`LDG.E.128` proves vectorised
128-bit loads, `HGMMA` Hopper tensor cores, `STL`/`LDL` spills). Tests assert these facts for the
exact signatures and block sizes an H100 runs; `python -m nanofast.kernels.report` prints them.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # 3.9 warns its default changes in 3.10: pin it

KEY_INSTRUCTIONS = ("LDG.E.128", "STG.E.128", "LDG.E.64", "LDG.E", "HGMMA", "HMMA", "STL", "LDL", "SHFL.BFLY", "BAR.SYNC")


@dataclass
class MachineFacts:
    """What one compiled kernel uses on the target: the numbers the gates assert."""
    kernel: str
    config: str
    arch: int
    registers: int
    shared_bytes: int
    local_bytes: int  # > 0 means registers spilled to local memory
    instructions: dict[str, int] = field(default_factory=dict)

    @property
    def spills(self) -> bool:
        return self.local_bytes > 0 or self.instructions.get("STL", 0) > 0


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found in the triton wheel ({path}): install triton>=3.4 with its NVIDIA backend")
    return path


def count_instructions(sass: str) -> dict[str, int]:
    """Counts of the key SASS opcodes (prefix match on the opcode, e.g. HGMMA.64x128x16.F32)."""
    opcodes = re.findall(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass, flags=re.M)
    counts = Counter()
    for op in opcodes:
        for key in KEY_INSTRUCTIONS:
            if op == key or op.startswith(key + "."):
                counts[key] += 1
                break
    return dict(counts)


def cubin_facts(cubin: bytes, kernel: str, config: str, arch: int) -> MachineFacts:
    """Registers / shared / local bytes (cuobjdump) and key instruction counts (nvdisasm) of a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), path], capture_output=True, text=True, check=True).stdout
    numbers = {k: int(v) for k, v in re.findall(r"\b(REG|SHARED|LOCAL):(\d+)", usage)}
    return MachineFacts(kernel=kernel, config=config, arch=arch, registers=numbers.get("REG", 0),
                        shared_bytes=numbers.get("SHARED", 0), local_bytes=numbers.get("LOCAL", 0),
                        instructions=count_instructions(sass))


def compile_triton(fn, signature: dict[str, str], constexprs: dict[str, object], *, num_warps: int = 4,
                   num_stages: int = 3, aligned: tuple[str, ...] = (), arch: int = 90, config: str = "") -> MachineFacts:
    """Compile the @triton.jit `fn` for sm_`arch` and return its facts.

    signature: argument name -> Triton type ("*fp16", "i32", "fp32", "constexpr"); constexprs: values
    of the constexpr arguments; aligned: arguments to mark divisible by 16 (pointers 16-byte aligned,
    sizes/strides multiples of 16), as Triton's launcher specialises real calls whose arguments are,
    which is what enables 128-bit vector loads.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .backend import triton_interpreting

    if triton_interpreting():
        # Under TRITON_INTERPRET=1 triton.language's own @jit helpers (tl.sum, tl.cdiv) are
        # interpreter functions the compiler cannot inline: compile in a process without it.
        raise RuntimeError("compile_triton needs a process without TRITON_INTERPRET=1 "
                           "(run `python -m nanofast.kernels.report`, or compile in a subprocess)")
    names = list(signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    label = config or ", ".join(f"{k}={v}" for k, v in constexprs.items()) + f", warps={num_warps}"
    facts = cubin_facts(compiled.asm["cubin"], fn.__name__, label, arch)
    facts.shared_bytes = max(facts.shared_bytes, compiled.metadata.shared)
    return facts


def facts_table(rows: list[MachineFacts]) -> str:
    """A markdown table of facts: kernel, config, arch, registers, shared, local (spills), instructions."""
    out = ["| kernel | config | arch | registers | shared (B) | local (B) | key instructions |",
           "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        ins = ", ".join(f"{k} x{v}" for k, v in sorted(r.instructions.items()))
        out.append(f"| {r.kernel} | {r.config} | sm_{r.arch} | {r.registers} | {r.shared_bytes} | {r.local_bytes} | {ins} |")
    return "\n".join(out)
