"""Compile Triton kernels for Hopper without a GPU and read back their machine-code facts.

`triton.compile` targets any GPU ahead of time; the cubin it returns is inspected with the
`cuobjdump` / `nvdisasm` the triton wheel bundles: registers, shared memory, local memory (any
LOCAL > 0 is a register spill) and SASS instruction counts (`LDG.E.128` proves vectorised
128-bit loads, `HGMMA` Hopper tensor cores, `STL`/`LDL` spills). Tests assert these facts for the
exact signatures and block sizes an H100 runs; `python -m nanofast.kernels.report` prints them.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

# LDGSTS: cp.async (Ampere+), how Triton's software-pipelined tile loads appear in SASS.
# UTMALDG / UTMASTG: Hopper TMA bulk tensor copies (a whole tile per instruction, one thread).
# HGMMA / QGMMA: Hopper warpgroup MMAs on fp16/bf16 and on fp8 operands.
KEY_INSTRUCTIONS = ("LDG.E.128", "STG.E.128", "LDG.E.64", "LDG.E", "LDGSTS.E.BYPASS.128", "UTMALDG", "UTMASTG",
                    "HGMMA", "QGMMA", "HMMA", "STL", "LDL", "SHFL.BFLY", "BAR.SYNC")


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
    # cuobjdump books a Triton kernel's spill slots as STACK, with LOCAL still 0: both count.
    stack_bytes: int = 0
    # Triton only, read off the TTIR: atomic ops (a deterministic reduction has none), stores, and
    # 64-bit multiplies (row * stride in int64: offsets past 2^31 elements stay correct).
    ttir: dict[str, int] = field(default_factory=dict)

    @property
    def spills(self) -> bool:
        return self.local_bytes > 0 or self.stack_bytes > 0 or self.instructions.get("STL", 0) > 0


def cuda_tool(name: str) -> str:
    """Path of a CUDA binary tool (cuobjdump, nvdisasm) bundled with triton's NVIDIA backend."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found in the triton wheel ({path}): install triton>=3.6 with its NVIDIA backend")
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
        usage = subprocess.run([cuda_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([cuda_tool("nvdisasm"), path], capture_output=True, text=True, check=True).stdout
    numbers = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    return MachineFacts(kernel=kernel, config=config, arch=arch, registers=numbers.get("REG", 0),
                        shared_bytes=numbers.get("SHARED", 0), local_bytes=numbers.get("LOCAL", 0),
                        instructions=count_instructions(sass), stack_bytes=numbers.get("STACK", 0))


# Scalar kernel arguments, typed by name. Sizes, counts and strides are i32: Triton's launcher
# specialises an int argument below 2**31 to i32, which every shape the gates compile is.
FP32_SCALARS = frozenset({"eps", "scale", "sm_scale", "mu", "coef_a", "coef_b", "coef_c"})
I32_SIZES = frozenset({"M", "N", "K", "D", "P", "T", "HQ", "HK", "capacity", "window", "max_pos", "num_pages",
                       "num_slots", "num_splits"})


def gate_signature(fn, constexprs: Mapping[str, object], dtype: str,
                   types: Mapping[str, str] | None = None) -> dict[str, str]:
    """The `compile_triton` signature of the @triton.jit `fn`, read off its own arguments in order.

    Each argument is "constexpr" when `constexprs` gives it a value (a pointer passed as None is one
    too); else `types[name]` verbatim; else "fp32" in FP32_SCALARS, "i32" in I32_SIZES or named
    stride_*; else a pointer to `dtype` ("bf16" -> "*bf16"). `types` holds only what those rules get
    wrong: pointers to another dtype, TMA descriptors, a pointer named like a size.
    """
    types = types or {}
    unknown = (set(constexprs) | set(types)) - set(fn.arg_names)
    if unknown:
        raise ValueError(f"{fn.__name__} has no arguments {sorted(unknown)}")
    sig = {}
    # The Python function's own parameters: a compiled kernel's and an interpreted one's alike (the
    # interpreter's wrapper has no `params`). Triton's rule: constexpr when annotated as one.
    for name, param in inspect.signature(fn.fn).parameters.items():
        if name in constexprs:
            sig[name] = "constexpr"
        elif "constexpr" in str(param.annotation):
            raise ValueError(f"{fn.__name__}: constexpr argument {name} needs a value in constexprs")
        elif name in types:
            sig[name] = types[name]
        elif name in FP32_SCALARS:
            sig[name] = "fp32"
        elif name in I32_SIZES or name.startswith("stride_"):
            sig[name] = "i32"
        else:
            sig[name] = f"*{dtype}"
    return sig


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
    # 3.9 warns its FP-fusion default changes in 3.10: pin it here, where the gate compiles, so that
    # importing this module (every kernel module does, for gate_signature) changes no environment.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    names = list(signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    label = config or ", ".join(f"{k}={v}" for k, v in constexprs.items()) + f", warps={num_warps}"
    facts = cubin_facts(compiled.asm["cubin"], fn.__name__, label, arch)
    facts.shared_bytes = max(facts.shared_bytes, compiled.metadata.shared)
    ttir = compiled.asm["ttir"]
    facts.ttir = {"atomics": ttir.count("atomic"), "stores": ttir.count("tt.store"),
                  "i64_muls": len(re.findall(r"arith\.muli [^\n]*: (?:tensor<[0-9x]+xi64>|i64) ", ttir))}
    return facts


def configs_facts(module: str, jobs: list[tuple[int, int]], attr: str = "KERNEL_CONFIGS") -> dict[tuple[int, int], dict]:
    """Facts of `module.<attr>[index]` (default KERNEL_CONFIGS) compiled for sm_`arch`, per (index, arch) job.

    Returns {(index, arch): facts as a flat dict (MachineFacts fields plus the TTIR counts)}. In a
    process that interprets Triton the compilation runs in a child process without the interpreter.
    """
    from .backend import triton_interpreting

    if triton_interpreting():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run([sys.executable, "-m", "nanofast.kernels.compile_gate", module, json.dumps(jobs), attr],
                              capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {module}.{attr} failed:\n{proc.stderr[-4000:]}")
        rows = json.loads(proc.stdout.strip().splitlines()[-1])
    else:
        configs = getattr(importlib.import_module(module), attr)
        rows = []
        for index, arch in jobs:
            facts = compile_triton(**configs[index], arch=arch)
            rows.append(dict(dataclasses.asdict(facts), **facts.ttir, index=index))
    return {(row["index"], row["arch"]): row for row in rows}


def facts_table(rows: list[MachineFacts]) -> str:
    """A markdown table of facts: kernel, config, arch, registers, shared, local (spills), instructions."""
    out = ["| kernel | config | arch | registers | shared (B) | local (B) | key instructions |",
           "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        ins = ", ".join(f"{k} x{v}" for k, v in sorted(r.instructions.items()))
        out.append(f"| {r.kernel} | {r.config} | sm_{r.arch} | {r.registers} | {r.shared_bytes} | {r.local_bytes} | {ins} |")
    return "\n".join(out)


if __name__ == "__main__":  # the child process of configs_facts: python -m ... MODULE JOBS_JSON ATTR
    print(json.dumps([f for f in configs_facts(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]).values()]))
