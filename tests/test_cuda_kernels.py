"""The CUDA infrastructure shared by every source in csrc/; each kernel family's own CUDA tests are
in its file (tests/test_rms_norm_cuda.py, tests/test_qk_norm_rope_cuda.py,
tests/test_paged_attention_cuda.py), with the helpers and the `emu` fixture they share in
tests/cuda_emu_helpers.py.

1. nvcc compiles every csrc/*.cu for sm_90a and sm_80; ptxas's facts are asserted per kernel
   (no spills, no stack, registers and shared memory within stated bounds, 16-byte accesses), and
   the full host build exports exactly the ABI's launch functions.
2. The launch ABI: csrc/nf_abi.h against its Python mirror (kernels/cuda_abi.py) and the compiler's
   layout, and bindings.cpp handing out the launch functions.
3. The CPU emulator (csrc/cuda_emu.h, one std::thread per CUDA thread) is tested itself: fp16/bf16
   conversions exhaustively, shuffle semantics, exited threads, deadlock and misuse detection.
4. The generic launch path: the C launch functions reject bad arguments, errors surface as
   RuntimeError, build paths are relative and overridable; torch.compile(fullgraph=True) through
   the CUDA ops of every family.
5. Two tests that span both norm families (RMSNorm, QK-norm + rope) in one parametrisation: bad
   arguments raise TypeError / ValueError naming the argument, and empty inputs give empty outputs.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import os
import re
import shutil
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from nanofast.kernels import cuda_abi, cuda_build, cuda_facts
from nanofast.kernels import cuda_args, paged_attention_cuda
from nanofast.kernels import qk_norm_rope_cuda as qk_cuda
from nanofast.kernels import rms_norm_cuda as rn_cuda

from cuda_emu_helpers import CSRC, HAVE_CXX, HAVE_NVCC, SOURCES, emu, needs_cxx  # noqa: F401 (emu: the fixture)

ARCHS = ["sm_90a", "sm_80"]

_SELFTEST_CPP = r'''
#include "cuda_emu.h"

extern "C" void t_f32_to_f16(const float* in, std::uint16_t* out, std::int64_t n) {
    for (std::int64_t i = 0; i < n; ++i) out[i] = __float2half_rn(in[i]).__x;
}
extern "C" void t_f16_to_f32(const std::uint16_t* in, float* out, std::int64_t n) {
    for (std::int64_t i = 0; i < n; ++i) out[i] = __half2float(__half{in[i]});
}
extern "C" void t_f32_to_bf16(const float* in, std::uint16_t* out, std::int64_t n) {
    for (std::int64_t i = 0; i < n; ++i) out[i] = __float2bfloat16_rn(in[i]).__x;
}
extern "C" void t_bf16_to_f32(const std::uint16_t* in, float* out, std::int64_t n) {
    for (std::int64_t i = 0; i < n; ++i) out[i] = __bfloat162float(__nv_bfloat16{in[i]});
}

__global__ void shfl_kernel(const float* v, float* out) {
    const int t = threadIdx.x, n = blockDim.x;
    const float x = v[t];
    out[0 * n + t] = __shfl_xor_sync(0xffffffffu, x, 1);
    out[1 * n + t] = __shfl_xor_sync(0xffffffffu, x, 16);
    out[2 * n + t] = __shfl_down_sync(0xffffffffu, x, 1, 8);
    out[3 * n + t] = __shfl_up_sync(0xffffffffu, x, 2, 16);
    out[4 * n + t] = __shfl_sync(0xffffffffu, x, 3, 8);
    out[5 * n + t] = __shfl_xor_sync(0xffffffffu, x, 8, 8);
    out[6 * n + t] = static_cast<float>(__shfl_down_sync(0xffffffffu, static_cast<double>(x), 5));
}
extern "C" int t_shfl(const float* v, float* out, int n) { return emu::launch(shfl_kernel, dim3(1), dim3(n), v, out); }

// 2-D blocks on a 2-D grid; threads past n leave before the barrier (they must not hold it back);
// shared memory is reused by every block.
__global__ void block_sum_kernel(const float* v, std::int64_t n, float* out) {
    __shared__ float buf[256];
    const int t = threadIdx.x + threadIdx.y * blockDim.x;
    const std::int64_t row = blockIdx.x + static_cast<std::int64_t>(blockIdx.y) * gridDim.x;
    if (t >= n) return;
    buf[t] = v[row * n + t];
    __syncthreads();
    if (t == 0) {
        float s = 0.f;
        for (int i = 0; i < n; ++i) s += buf[i];
        out[row] = s;
    }
}
extern "C" int t_block_sum(const float* v, std::int64_t n, float* out, int gx, int gy, int bx, int by) {
    return emu::launch(block_sum_kernel, dim3(gx, gy), dim3(bx, by), v, n, out);
}

__global__ void deadlock_kernel(float* out) {
    float x = static_cast<float>(threadIdx.x);
    if (threadIdx.x < 16) x = __shfl_xor_sync(0xffffffffu, x, 1);  // half a warp shuffles...
    else __syncthreads();                                           // ...the other half waits here
    out[threadIdx.x] = x;
}
__global__ void partial_mask_kernel(float* out) {
    out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, static_cast<float>(threadIdx.x), 1);
}
__global__ void exited_lane_kernel(float* out) {
    if (threadIdx.x == 3) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);  // lane 2 reads lane 3, which has exited
}
extern "C" int t_deadlock(float* out) { return emu::launch(deadlock_kernel, dim3(1), dim3(32), out); }
extern "C" int t_partial_mask(float* out) { return emu::launch(partial_mask_kernel, dim3(1), dim3(32), out); }
extern "C" int t_exited_lane(float* out) { return emu::launch(exited_lane_kernel, dim3(1), dim3(32), out); }
extern "C" int t_bad_config(float* out) { return emu::launch(partial_mask_kernel, dim3(1), dim3(2048), out); }
extern "C" const char* t_last_error() { return emu::last_error(); }
'''


# ------------------------------------------------------------------------------------------------ builds

def _build_selftest(out_dir: Path) -> Path:
    src = out_dir / "emu_selftest.cpp"
    src.write_text(_SELFTEST_CPP)
    lib = out_dir / "emu_selftest.so"
    cxx = os.environ.get("CXX") or "g++"
    res = subprocess.run([cxx, *cuda_build.EMU_CXXFLAGS, f"-I{CSRC}", str(src), "-o", str(lib)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    return lib


# What torch.utils.cpp_extension passes nvcc for a CUDAExtension (setup.py / the JIT build): the
# kernels must compile, host side included, with torch's half/bf16 operator macros in force.
TORCH_NVCC_FLAGS = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr",
                    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


def _nvcc_object(source: str, out_dir: Path) -> Path:
    """Full nvcc compile (host code, <<<>>> launches, device code for sm_90a) to an object file."""
    obj = out_dir / (Path(source).stem + ".o")
    cmd = [cuda_facts.nvcc_path(), "-c", "-arch=sm_90a", *TORCH_NVCC_FLAGS, f"-I{CSRC}", str(CSRC / source), "-o", str(obj)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-4000:]}"
    return obj


@pytest.fixture(scope="session")
def builds(tmp_path_factory):
    """Everything compiled once per session, two at a time (2 cores): emulation libraries (cached:
    the `emu` fixture loads them), the emulator self-test library and the nvcc facts of every source
    for every arch."""
    tmp = tmp_path_factory.mktemp("cuda_emu_selftest")
    jobs = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        if HAVE_CXX:
            for src in SOURCES:
                jobs[("emu", src)] = pool.submit(cuda_build.emulation_library, src)
            jobs[("selftest",)] = pool.submit(_build_selftest, tmp)
        if HAVE_NVCC:
            for src in SOURCES:
                for arch in ARCHS:
                    jobs[("nvcc", src, arch)] = pool.submit(cuda_facts.nvcc_facts, src, arch)
                jobs[("nvcc_obj", src)] = pool.submit(_nvcc_object, src, tmp)
        done = {}
        for key, fut in jobs.items():
            try:
                done[key] = fut.result()
            except Exception as exc:  # reported by the test that needs it
                done[key] = exc
    return done


def _get(builds, key):
    value = builds.get(key)
    if isinstance(value, Exception):
        raise value
    return value


@pytest.fixture(scope="session")
def selftest(builds):
    if not HAVE_CXX:
        pytest.skip("no C++20 compiler")
    lib = ctypes.CDLL(str(_get(builds, ("selftest",))))
    lib.t_last_error.restype = ctypes.c_char_p
    return lib


# ------------------------------------------------------------------------------------------------ 1. nvcc

REG_BOUND = {"rms_norm_fwd_kernel": 64, "rms_norm_bwd_kernel": 96, "qk_norm_rope_fwd_kernel": 64,
             "qk_norm_rope_bwd_kernel": 128, "column_sum_kernel": 32}
SHARED_BOUND = {"rms_norm_fwd_kernel": 128, "rms_norm_bwd_kernel": 128}  # 32 floats of reduction scratch
INSTANTIATIONS = {"rms_norm.cu": {"rms_norm_fwd_kernel": 18, "rms_norm_bwd_kernel": 18, "column_sum_kernel": 1},
                  "qk_norm_rope.cu": {"qk_norm_rope_fwd_kernel": 12, "qk_norm_rope_bwd_kernel": 12,
                                      "column_sum_kernel": 1}}


@pytest.mark.skipif(not HAVE_NVCC, reason="nvcc not found (install the CUDA toolkit or set NVCC)")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES)
def test_nvcc_facts(builds, source, arch):
    facts = _get(builds, ("nvcc", source, arch))
    assert facts, f"nvcc produced no kernels for {source}"
    counts = {}
    for f in facts:
        counts[f.kernel] = counts.get(f.kernel, 0) + 1
        what = f"{f.kernel}<{f.config}> sm_{f.arch}"
        assert f.spill_store_bytes == 0 and f.spill_load_bytes == 0, f"{what} spills: {f}"
        assert f.local_bytes == 0, f"{what} uses a {f.local_bytes}-byte stack frame (local memory)"
        assert not f.spills
        assert 0 < f.registers <= REG_BOUND.get(f.kernel, 255), f"{what}: {f.registers} registers"
        assert f.shared_bytes <= SHARED_BOUND.get(f.kernel, 0), f"{what}: {f.shared_bytes} B shared"
        if f.instructions:  # SASS available (nvdisasm from the triton wheel)
            assert f.instructions.get("STL", 0) == 0 and f.instructions.get("LDL", 0) == 0, what
            if "norm" in f.kernel:
                assert f.instructions.get("SHFL.BFLY", 0) >= 5, f"{what}: no warp-shuffle reduction"
            targs = [a.strip() for a in f.config.split(",")]
            if f.kernel.startswith("rms_norm") and int(targs[1]) > 1:
                assert f.instructions.get("LDG.E.128", 0) >= 1 and f.instructions.get("STG.E.128", 0) >= 1, \
                    f"{what}: the VEC path must use 16-byte loads and stores: {f.instructions}"
            if f.kernel.startswith("qk_norm_rope") and targs[0] == "float" and targs[1] == "2":
                # two pairs per lane: 8-byte half-split packs, 16-byte interleaved packs
                assert f.instructions.get("LDG.E.64", 0) >= 1 and f.instructions.get("LDG.E.128", 0) >= 1, \
                    f"{what}: {f.instructions}"
    if source in INSTANTIATIONS:
        assert counts == INSTANTIATIONS[source]


@pytest.mark.skipif(not HAVE_NVCC, reason="nvcc not found (install the CUDA toolkit or set NVCC)")
@pytest.mark.parametrize("source", SOURCES)
def test_nvcc_compiles_host_code_and_exports_launchers(builds, source):
    obj = _get(builds, ("nvcc_obj", source))
    if shutil.which("nm") is None:
        pytest.skip("nm not found to list the object's symbols")
    symbols = subprocess.run(["nm", "-g", "--defined-only", str(obj)], capture_output=True, text=True).stdout
    exported = set(re.findall(r"\bT (nf_\w+)$", symbols, flags=re.M))
    expected = {name for name, (src, _) in cuda_abi.ABI.items() if src == source} | {cuda_abi.ERROR_FN[source]}
    assert exported == expected


def test_ptxas_log_parser_sees_spills():
    log = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90a'
ptxas info    : Function properties for _Z3fooPf
    24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 512 bytes smem, 360 bytes cmem[0]
ptxas info    : Function properties for __internal_helper
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_Z3barv' for 'sm_90a'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, 360 bytes cmem[0]
"""
    facts = cuda_facts.parse_ptxas(log)
    assert facts == {
        "_Z3fooPf": {"registers": 255, "spill_store_bytes": 8, "spill_load_bytes": 12, "stack_bytes": 24,
                     "shared_bytes": 512, "barriers": 1},
        "_Z3barv": {"registers": 10, "spill_store_bytes": 0, "spill_load_bytes": 0, "stack_bytes": 0,
                    "shared_bytes": 0, "barriers": 0},
    }


# ------------------------------------------------------------------------------------------------ ABI

_CTYPE_OF = {"int": ctypes.c_int, "int64_t": ctypes.c_int64, "float": ctypes.c_float}


def _header_structs(text: str) -> dict[str, list[tuple[str, type]]]:
    """struct name -> [(field, ctype)] of every `typedef struct X {...} X;` in nf_abi.h (pointers:
    c_void_p, arrays such as `int64_t x_s[2][3]`: (c_int64 * 3) * 2)."""
    text = re.sub(r"//[^\n]*", "", text)
    out = {}
    for m in re.finditer(r"typedef struct (\w+) \{(.*?)\} (\w+);", text, flags=re.S):
        assert m.group(1) == m.group(3), m.group(0)
        fields = []
        for decl in filter(None, (" ".join(d.split()) for d in m.group(2).split(";"))):
            parsed = re.fullmatch(r"(?:const )?(\w+)(\*?) (.+)", decl)
            assert parsed, f"{m.group(1)}: cannot read the declaration {decl!r}"
            for declarator in parsed.group(3).split(","):
                name, dims = re.fullmatch(r"\s*(\w+)((?:\[\d+\])*)\s*", declarator).groups()
                ctype = ctypes.c_void_p if parsed.group(2) else _CTYPE_OF[parsed.group(1)]
                for n in reversed(re.findall(r"\d+", dims)):
                    ctype = ctype * int(n)
                fields.append((name, ctype))
        out[m.group(1)] = fields
    return out


def test_python_abi_mirrors_the_header():
    """cuda_abi's Structures against csrc/nf_abi.h (field names, C types, order), every prototype of
    the header in cuda_abi.ABI / ERROR_FN and the other way round, each defined in the .cu file the
    ABI names, and bindings.cpp exporting each from that one header."""
    header = (CSRC / "nf_abi.h").read_text()
    structs = _header_structs(header)
    protos = dict(re.findall(r"^int (nf_\w+)\(const (\w+)\* args, void\* stream\);$", header, flags=re.M))
    errors = re.findall(r"^const char\* (nf_\w+_error_string)\(int code\);$", header, flags=re.M)
    assert set(protos) == set(cuda_abi.ABI), "launch functions of nf_abi.h differ from cuda_abi.ABI"
    assert sorted(errors) == sorted(cuda_abi.ERROR_FN.values())
    assert set(structs) == set(protos.values())
    for name, (source, args_type) in cuda_abi.ABI.items():
        assert protos[name] == f"{name}_args", f"{name} takes {protos[name]}: the struct is named for its function"
        mirror = [(f, t) for f, t in args_type._fields_]
        assert mirror == structs[protos[name]], f"cuda_abi.{args_type.__name__} differs from {protos[name]}"
        definition = re.search(rf"\bint {name}\(const {protos[name]}\* args, void\* stream\) \{{",
                               (CSRC / source).read_text())
        assert definition, f"{name} is not defined in {source} with its nf_abi.h prototype"
    bindings = (CSRC / "bindings.cpp").read_text()
    assert '#include "nf_abi.h"' in bindings
    assert not re.search(r"^\s*(int|const char\*) nf_\w+\(", bindings, flags=re.M), "bindings.cpp declares its own"
    for name in [*cuda_abi.ABI, *cuda_abi.ERROR_FN.values()]:
        assert f"NF_SYMBOL(d, {name});" in bindings, f"bindings.cpp does not export {name}"
    for source in SOURCES:
        assert '#include "nf_abi.h"' in (CSRC / source).read_text(), source


@needs_cxx
def test_python_abi_layout_matches_the_compiler(tmp_path):
    """The C++ compiler's offsets and sizes of every nf_abi.h struct equal ctypes' (alignment and
    padding included), asserted at compile time."""
    lines = ['#include <cstddef>', '#include "nf_abi.h"']
    for name, (_, args_type) in cuda_abi.ABI.items():
        c_name = f"{name}_args"
        lines.append(f"static_assert(sizeof({c_name}) == {ctypes.sizeof(args_type)}, \"{c_name} size\");")
        for field, _ in args_type._fields_:
            offset = getattr(args_type, field).offset
            lines.append(f"static_assert(offsetof({c_name}, {field}) == {offset}, \"{c_name}.{field}\");")
    src = tmp_path / "abi_layout.cpp"
    src.write_text("\n".join(lines) + "\n")
    cxx = os.environ.get("CXX") or "g++"
    res = subprocess.run([cxx, "-std=c++20", "-fsyntax-only", f"-I{CSRC}", str(src)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]


@needs_cxx
def test_bindings_module_exports_the_launch_functions(emu, tmp_path):
    """bindings.cpp built against the emulation libraries: symbols() must hand out the addresses of
    the very launch functions, callable through ctypes exactly as the CUDA path calls them."""
    import pybind11

    py_inc = sysconfig.get_paths()["include"]
    if not (Path(py_inc) / "Python.h").exists():
        pytest.skip(f"Python.h not found under {py_inc}")
    libs = {src: cuda_build.emulation_library(src) for src in SOURCES}
    out = tmp_path / f"nf_bindings_test{sysconfig.get_config_var('EXT_SUFFIX')}"
    cxx = os.environ.get("CXX") or "g++"
    cmd = [cxx, "-std=c++20", "-O0", "-fPIC", "-shared", "-DTORCH_EXTENSION_NAME=nf_bindings_test",
           f"-I{pybind11.get_include()}", f"-I{py_inc}", str(CSRC / "bindings.cpp"),
           *[lib._name for lib in libs.values()], "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    import importlib.util

    spec = importlib.util.spec_from_file_location("nf_bindings_test", out)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    syms = mod.symbols()
    for name, (src, _) in cuda_abi.ABI.items():
        assert syms[name] == ctypes.cast(getattr(libs[src], name), ctypes.c_void_p).value
    args_type = cuda_abi.RmsNormFwdArgs
    fn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(args_type), ctypes.c_void_p)(syms["nf_rms_norm_fwd"])
    x = torch.randn(3, 40)
    y, rstd = torch.empty_like(x), torch.empty(3)
    args = args_type(dtype=0, N=3, D=40, x=x.data_ptr(), x_stride=40, y=y.data_ptr(), y_stride=40,
                     rstd=rstd.data_ptr(), eps=1e-6)  # fields left out are zero / null
    assert fn(ctypes.byref(args), None) == 0
    ref, ref_rstd, _ = rn_cuda.rms_norm_fwd_cuda(x, None, None, 1e-6)
    assert torch.equal(y, ref) and torch.equal(rstd, ref_rstd)


# ------------------------------------------------------------------------------------------------ emulator

def _as_u16(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16).to(torch.int32) & 0xFFFF


def _conversion_probe() -> torch.Tensor:
    """fp32 values that stress round-to-nearest-even into fp16 and bf16: every fp16 value, every
    midpoint between neighbours (ties), one fp32 ulp either side, bf16 ties, the subnormal and
    overflow boundaries, specials, and random values over the whole exponent range."""
    all16 = (torch.arange(65536, dtype=torch.int32) - 32768).to(torch.int16)
    h = all16.view(torch.float16).float()
    h = h[torch.isfinite(h)].unique()
    mids = (h[:-1].double() + h[1:].double()) / 2
    mids = mids.float()
    bf = all16.view(torch.bfloat16).float()
    bf = bf[torch.isfinite(bf)].unique()
    bmids = ((bf[:-1].double() + bf[1:].double()) / 2).float()
    around = torch.cat([mids, bmids])
    up = torch.nextafter(around, torch.full_like(around, float("inf")))
    down = torch.nextafter(around, torch.full_like(around, float("-inf")))
    g = torch.Generator().manual_seed(0)
    rand = (torch.randn(20000, generator=g) * torch.exp2(torch.randint(-140, 128, (20000,), generator=g).float()))
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 65504.0, 65519.99, 65520.0, 65536.0, 1e-8,
                             5.96e-8, 2.98e-8, 2.9802322e-08, 6.1035156e-05, 6.1e-05, 3.4028235e38, 1e-45, -1e-45])
    return torch.cat([h, bf, around, up, down, rand, specials, -rand])


@needs_cxx
def test_emulated_fp16_bf16_conversions_match_torch(selftest):
    bits = (torch.arange(65536, dtype=torch.int32) - 32768).to(torch.int16)
    for to_f32, dtype in ((selftest.t_f16_to_f32, torch.float16), (selftest.t_bf16_to_f32, torch.bfloat16)):
        out = torch.empty(65536)
        to_f32(ctypes.c_void_p(bits.data_ptr()), ctypes.c_void_p(out.data_ptr()), ctypes.c_int64(65536))
        ref = bits.view(dtype).float()
        nan = torch.isnan(ref)
        assert torch.equal(torch.isnan(out), nan)
        assert torch.equal(out[~nan].view(torch.int32), ref[~nan].view(torch.int32)), f"{dtype} -> fp32"
    x = _conversion_probe().contiguous()
    for from_f32, dtype in ((selftest.t_f32_to_f16, torch.float16), (selftest.t_f32_to_bf16, torch.bfloat16)):
        out = torch.empty(x.numel(), dtype=torch.int16)
        from_f32(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(out.data_ptr()), ctypes.c_int64(x.numel()))
        ref = x.to(dtype)
        got = out.view(dtype)
        same = torch.equal(_as_u16(got), _as_u16(ref))
        if not same:
            bad = (_as_u16(got) != _as_u16(ref)).nonzero()[:5].flatten()
            pytest.fail(f"fp32 -> {dtype}: {[(x[i].item(), got[i].item(), ref[i].item()) for i in bad]}")
    nan_in = torch.tensor([float("nan")])
    for from_f32, dtype in ((selftest.t_f32_to_f16, torch.float16), (selftest.t_f32_to_bf16, torch.bfloat16)):
        out = torch.empty(1, dtype=torch.int16)
        from_f32(ctypes.c_void_p(nan_in.data_ptr()), ctypes.c_void_p(out.data_ptr()), ctypes.c_int64(1))
        assert torch.isnan(out.view(dtype).float()).all()


@needs_cxx
def test_emulated_warp_shuffles(selftest):
    n = 64  # two warps: shuffles must stay inside each warp
    v = torch.arange(n, dtype=torch.float32) * 3 + 1
    out = torch.full((7, n), float("nan"))
    assert selftest.t_shfl(ctypes.c_void_p(v.data_ptr()), ctypes.c_void_p(out.data_ptr()), n) == 0
    vl = v.tolist()

    def lane_base(t):
        return t - t % 32, t % 32

    exp = [[0.0] * n for _ in range(7)]
    for t in range(n):
        base, lane = lane_base(t)
        exp[0][t] = vl[base + (lane ^ 1)]
        exp[1][t] = vl[base + (lane ^ 16)]
        exp[2][t] = vl[t + 1] if lane % 8 < 7 else vl[t]  # down 1 within 8-lane segments
        exp[3][t] = vl[t - 2] if lane % 16 >= 2 else vl[t]  # up 2 within 16-lane segments
        exp[4][t] = vl[base + (lane // 8) * 8 + 3]  # lane 3 of each 8-lane segment
        exp[5][t] = vl[t]  # xor 8 leaves an 8-lane segment: own value
        exp[6][t] = vl[t + 5] if lane + 5 < 32 else vl[t]  # 64-bit payload
    assert out.tolist() == exp


@needs_cxx
@pytest.mark.parametrize("grid,block,n", [((3, 2), (32, 2), 50), ((1, 1), (64, 1), 64), ((4, 1), (96, 1), 33)])
def test_emulated_blocks_exit_barrier_and_shared(selftest, grid, block, n):
    rows = grid[0] * grid[1]
    v = torch.randn(rows, n)
    out = torch.full((rows,), float("nan"))
    rc = selftest.t_block_sum(ctypes.c_void_p(v.data_ptr()), ctypes.c_int64(n), ctypes.c_void_p(out.data_ptr()),
                              grid[0], grid[1], block[0], block[1])
    assert rc == 0, selftest.t_last_error()
    ref = torch.tensor([sum(r) for r in v.tolist()], dtype=torch.float32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_cxx
def test_emulator_reports_deadlock_and_misuse(selftest, monkeypatch):
    monkeypatch.setenv("NANOFAST_EMU_TIMEOUT_S", "0.5")  # read at each launch
    out = torch.zeros(2048)
    p = ctypes.c_void_p(out.data_ptr())
    t0 = time.perf_counter()
    assert selftest.t_deadlock(p) != 0
    assert time.perf_counter() - t0 < 30
    assert b"deadlock" in selftest.t_last_error()
    assert selftest.t_partial_mask(p) != 0 and b"mask must include every lane" in selftest.t_last_error()
    assert selftest.t_exited_lane(p) != 0 and b"exited" in selftest.t_last_error()
    assert selftest.t_bad_config(p) != 0 and b"invalid launch configuration" in selftest.t_last_error()
    v = torch.ones(64)  # and the emulator still works afterwards
    o = torch.zeros(1)
    assert selftest.t_block_sum(ctypes.c_void_p(v.data_ptr()), ctypes.c_int64(64), ctypes.c_void_p(o.data_ptr()),
                                1, 1, 64, 1) == 0
    assert o.item() == 64


# ------------------------------------------------------------------------------------------------ empty inputs (both norm families)

def test_empty_inputs(emu):
    y, rstd, h = rn_cuda.rms_norm_fwd_cuda(torch.empty(0, 8), torch.ones(8), torch.empty(0, 8), 1e-6)
    assert y.shape == (0, 8) and rstd.shape == (0,) and h.shape == (0, 8)
    dx, dw = rn_cuda.rms_norm_bwd_cuda(torch.empty(0, 8), torch.empty(0, 8), torch.empty(0), torch.ones(8), None)
    assert dx.shape == (0, 8) and torch.equal(dw, torch.zeros(8))
    q, k = torch.empty(2, 0, 3, 4), torch.empty(2, 0, 1, 4)
    cs = torch.empty(0, 2)
    qo, ko, qr, kr = qk_cuda.qk_norm_rope_fwd_cuda(q, k, cs, cs, None, None, 1.0, 1e-6, False)
    assert qo.shape == q.shape and kr.shape == (2, 0, 1)
    qk_cuda.qk_norm_rope_inplace_cuda(torch.empty(0, 16), torch.empty(0, dtype=torch.int64), torch.ones(3, 4), 2, 1,
                                 None, None, 1.0, 1e-6, False)


# ------------------------------------------------------------------------------------------------ 3. errors

def _err_cases():
    x = torch.randn(4, 8)
    w = torch.ones(8)
    rstd = torch.ones(4)
    q, k = torch.randn(1, 2, 2, 8), torch.randn(1, 2, 1, 8)
    cs = torch.randn(3, 4)
    qr, kr = torch.ones(1, 2, 2), torch.ones(1, 2, 1)
    qkv = torch.randn(3, 32)
    pos = torch.tensor([0, 1, 2])
    cache = torch.randn(4, 8)
    fwd, bwd = rn_cuda.rms_norm_fwd_cuda, rn_cuda.rms_norm_bwd_cuda
    qf, qb, qi = qk_cuda.qk_norm_rope_fwd_cuda, qk_cuda.qk_norm_rope_bwd_cuda, qk_cuda.qk_norm_rope_inplace_cuda
    return [
        (lambda: fwd(x.numpy(), w, None, 1e-6), TypeError, "x must be a torch.Tensor"),
        (lambda: fwd(x[None], w, None, 1e-6), ValueError, "x must have 2 dims"),
        (lambda: fwd(x.long(), w, None, 1e-6), TypeError, "x must be float32"),
        (lambda: fwd(x.double(), w, None, 1e-6), TypeError, "x must be float32"),
        (lambda: fwd(torch.randn(8, 4).t(), None, None, 1e-6), ValueError, "x must have a contiguous last"),
        (lambda: fwd(torch.empty(4, 0), None, None, 1e-6), ValueError, "non-empty last dimension"),
        (lambda: fwd(x, torch.ones(7), None, 1e-6), ValueError, "weight must have shape (8,)"),
        (lambda: fwd(x, w, x.half(), 1e-6), TypeError, "residual must have the dtype of x"),
        (lambda: fwd(x, w, x[:3], 1e-6), ValueError, "residual must have shape"),
        (lambda: fwd(x, w, None, -1.0), ValueError, "eps must be a finite non-negative"),
        (lambda: fwd(x, w, None, "1e-6"), TypeError, "eps must be a float"),
        (lambda: fwd(x.to("meta"), None, None, 1e-6), ValueError, "x must be on a CPU or CUDA device"),
        # one block per row: 2**31 rows (an expanded view, nothing allocated) exceed the grid
        (lambda: fwd(torch.ones(1, 1).expand(2**31, 1), None, None, 1e-6), ValueError, "allows at most 2**31 - 1"),
        (lambda: bwd(x, x, rstd.half(), w, None), TypeError, "rstd must be float32"),
        (lambda: bwd(x, x, torch.ones(3), w, None), ValueError, "rstd must have shape (4,)"),
        (lambda: bwd(x[:, :4], x, rstd, w, None), ValueError, "dy must have shape"),
        (lambda: bwd(x.half(), x, rstd, w, None), TypeError, "dy must have the dtype of h"),
        (lambda: bwd(x, x, rstd, w, x.bfloat16()), TypeError, "dh must have the dtype of h"),
        (lambda: bwd(x, x, rstd, "w", None), TypeError, "weight must be a torch.Tensor"),
        (lambda: qf(q[..., :7], k[..., :7], cs, cs, None, None, 1.0, 1e-6, False), ValueError, "must be even"),
        (lambda: qf(q, k[:, :1], cs, cs, None, None, 1.0, 1e-6, False), ValueError, "k must have shape"),
        (lambda: qf(q, k.half(), cs, cs, None, None, 1.0, 1e-6, False), TypeError, "k must have the dtype of q"),
        (lambda: qf(q, k, cs[:1], cs[:1], None, None, 1.0, 1e-6, False), ValueError, "cos must have shape"),
        (lambda: qf(q, k, cs, cs[:, :3], None, None, 1.0, 1e-6, False), ValueError, "sin must have shape"),
        (lambda: qf(q, k, cs, cs.half(), None, None, 1.0, 1e-6, False), TypeError, "sin must have the dtype of cos"),
        (lambda: qf(q, k, cs, cs, torch.ones(4), None, 1.0, 1e-6, False), ValueError, "q_weight must have shape"),
        (lambda: qf(q, k, cs, cs, None, None, float("nan"), 1e-6, False), ValueError, "scale must be a finite"),
        (lambda: qf(q, k, cs, cs, None, None, 1.0, 1e-6, 1), TypeError, "interleaved must be a bool"),
        (lambda: qf(q, k, cs, cs, None, None, 1.0, None, False), TypeError, "eps must be a float"),
        (lambda: qf(q.transpose(2, 3), k, cs, cs, None, None, 1.0, 1e-6, False), ValueError, "q must have"),
        (lambda: qb(q, k, q, k, cs, cs, None, None, qr.half(), kr, 1.0, False), TypeError, "q_rstd must be float32"),
        (lambda: qb(q, k, q, k, cs, cs, None, None, qr, qr, 1.0, False), ValueError, "k_rstd must have shape"),
        (lambda: qb(q[:, :1], k, q, k, cs, cs, None, None, qr, kr, 1.0, False), ValueError, "dq_out must have shape"),
        (lambda: qb(q, k.bfloat16(), q, k, cs, cs, None, None, qr, kr, 1.0, False), TypeError, "dk_out must have"),
        (lambda: qi(qkv, pos.float(), cache, 2, 1, None, None, 1.0, 1e-6, False), TypeError, "positions must be int64"),
        (lambda: qi(qkv, pos[:2], cache, 2, 1, None, None, 1.0, 1e-6, False), ValueError, "positions must have shape"),
        (lambda: qi(qkv, pos + 2, cache, 2, 1, None, None, 1.0, 1e-6, False), ValueError, "positions must lie in"),
        (lambda: qi(qkv, pos - 1, cache, 2, 1, None, None, 1.0, 1e-6, False), ValueError, "positions must lie in"),
        (lambda: qi(qkv, pos, cache, 3, 1, None, None, 1.0, 1e-6, False), ValueError, "qkv width 32"),
        (lambda: qi(qkv, pos, cache[:, :6], 2, 1, None, None, 1.0, 1e-6, False), ValueError, "cos_sin_cache must"),
        (lambda: qi(qkv, pos, cache, -1, 1, None, None, 1.0, 1e-6, False), ValueError, "num_q_heads must be >= 0"),
        (lambda: qi(qkv, pos, cache, 2.0, 1, None, None, 1.0, 1e-6, False), TypeError, "num_q_heads must be an int"),
        (lambda: qi(qkv, pos, cache, 0, 0, None, None, 1.0, 1e-6, False), ValueError, "num_q_heads + num_kv_heads"),
        (lambda: qi(torch.randn(3, 24)[:, :16].as_strided((3, 16), (8, 1)), pos, torch.randn(4, 4), 2, 1, None, None,
                    1.0, 1e-6, False), ValueError, "qkv rows must not overlap"),
        (lambda: qi(qkv, pos, cache, 2, 1, None, torch.ones(4), 1.0, 1e-6, False), ValueError, "k_weight must have"),
        (lambda: qi(qkv.half(), pos, cache, 2, 1, None, None, 1.0, -1e-6, False), ValueError, "eps must be"),
    ]


@pytest.mark.parametrize("idx", range(len(_err_cases())))
def test_argument_errors(idx):
    call, exc, msg = _err_cases()[idx]
    with pytest.raises(exc, match=re.escape(msg)):
        call()


def test_launch_function_rejects_bad_arguments(emu):
    """The C launch functions validate what Python might get wrong, and errors surface as RuntimeError."""
    lib = cuda_build.emulation_library("rms_norm.cu")
    x = torch.randn(2, 8)
    y, rstd = torch.empty_like(x), torch.empty(2)

    def args(**changes):
        fields = dict(dtype=0, N=2, D=8, x=x.data_ptr(), x_stride=8, y=y.data_ptr(), y_stride=8, rstd=rstd.data_ptr(),
                      eps=1e-6)
        return cuda_abi.RmsNormFwdArgs(**{**fields, **changes})

    rc = lib.nf_rms_norm_fwd(ctypes.byref(args(N=0)), None)
    assert rc == -1 and b"invalid argument" in lib.nf_rms_norm_error_string(rc)
    assert lib.nf_rms_norm_fwd(None, None) == -1  # no argument struct
    with pytest.raises(RuntimeError, match="nf_rms_norm_fwd failed .*invalid argument"):
        cuda_build.launch("nf_rms_norm_fwd", x.device, args(dtype=7))
    with pytest.raises(RuntimeError, match="invalid argument"):  # residual without an h output
        cuda_build.launch("nf_rms_norm_fwd", x.device, args(residual=x.data_ptr(), residual_stride=8))


def test_paths_are_relative_and_overridable(monkeypatch, tmp_path):
    assert cuda_build.csrc_dir() == Path(cuda_build.__file__).resolve().parent.parent / "csrc"
    monkeypatch.setenv("NANOFAST_CACHE", str(tmp_path / "c"))
    assert cuda_build.cache_dir("cuda_emu") == tmp_path / "c" / "cuda_emu" and (tmp_path / "c" / "cuda_emu").is_dir()
    monkeypatch.setenv("NANOFAST_CSRC", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="NANOFAST_CSRC"):
        cuda_build.csrc_dir()
    modules = (cuda_abi, cuda_build, cuda_facts, cuda_args, rn_cuda, qk_cuda, paged_attention_cuda)
    src = ("".join(Path(m.__file__).read_text() for m in modules) +
           "".join(p.read_text() for p in CSRC.iterdir() if p.is_file()))
    checkout = str(Path(cuda_build.__file__).resolve().parents[1])  # this checkout's own location
    assert checkout not in src and str(Path.home()) not in src


# ------------------------------------------------------------------------------------------------ vs the Triton engineers' modules

def test_torch_compile_fullgraph_through_the_cuda_backend_ops():
    """The CUDA backend goes through the same custom ops as Triton: torch.compile(fullgraph=True)
    traces them and the compiled forward+backward equals eager (here: the emulation build)."""
    from nanofast.kernels import qk_norm_rope, rms_norm
    from nanofast.kernels import rotary_tables

    torch.manual_seed(0)
    x = torch.randn(3, 40, requires_grad=True)
    w = torch.randn(40, requires_grad=True)
    q, k = torch.randn(2, 5, 3, 16, requires_grad=True), torch.randn(2, 5, 1, 16, requires_grad=True)
    cos, sin = rotary_tables(5, 16)

    def loss(x, w, q, k):
        qo, ko = qk_norm_rope(q, k, cos, sin, scale=1.2, backend="cuda")
        return (rms_norm(x, w, backend="cuda") ** 2).sum() + (qo * qo.detach()).sum() + ko.sum()

    inputs = (x, w, q, k)
    eager = torch.autograd.grad(loss(*inputs), inputs)
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(*inputs), inputs)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
