"""torch.compile(fullgraph=True) over every public kernel entry x every backend that runs on CPU.

The matrix: each entry named in `registry.OPS` (an `Op.checks` key) x each of its op's backends
that executes here ("torch"; "triton" and "triton_persistent" through Triton's interpreter;
"scaled_mm" through torch's CPU kernel; "cuda" through the CPU emulation build, when a C++ compiler
exists). Each case compiles a small call with fullgraph=True (any graph break fails), runs it, and
compares it with the eager call: outputs, in-place effects, and for differentiable entries the
gradients of a loss through the compiled backward. For a kernel backend the captured graph must
hold a `nanofast::` custom op: the kernel ran inside the graph, not beside it.

Compiler backend: "aot_eager", not Inductor. It runs Dynamo and AOTAutograd with the ops' fake and
autograd registrations, which is what the fullgraph claim is about (tracing without graph breaks,
fake shapes, the compiled backward), and keeps the matrix at seconds instead of a C++ build per
case. Inductor itself is exercised by the existing compile tests: test_rms_norm.py and
test_qk_norm_rope.py (Triton), test_fp8_linear.py (both recipes) and test_cuda_kernels.py (the CUDA
ops of the norm families).

An op whose entries another change will cover can be listed in OWNED_ELSEWHERE (none is today);
covering an entry is one line in CASES.

Also here: the custom ops added for compile pass torch.library.opcheck; value checks that the traced
public entries skip still raise from inside the kernel backends' ops; and TRITON_INTERPRET=1 set
after triton was imported gives a clear error (kernels/backend.py), in a subprocess.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch._dynamo.testing

import nanofast.kernels as K
from nanofast.kernels.registry import OPS

import cuda_emu_helpers

HAVE_CXX = cuda_emu_helpers.HAVE_CXX
emu = cuda_emu_helpers.emu  # the fixture the cuda cases request by name (bound, so pyflakes sees it used)

# Ops whose entries another change covers: op name -> why they are not in CASES yet.
OWNED_ELSEWHERE: dict[str, str] = {}
# Backends that cannot execute on CPU at all (none today); everything else in Op.choices runs here.
NOT_ON_CPU: set[str] = set()


def _rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).to(dtype)


# Each case: backend -> (fn, inputs, grad_inputs). fn takes `inputs` and returns a tensor or a
# tuple of tensors (in-place entries return what they wrote); grad_inputs: indices of the inputs
# to differentiate through a loss of every output (empty: the entry has no gradient).

def _rms_norm(be):
    def fn(x, w, r):
        return K.rms_norm(x, w, residual=r, backend=be)
    return fn, (_rand(3, 40), _rand(40, seed=1), _rand(3, 40, seed=2)), (0, 1, 2)


def _qk_norm_rope(be):
    cos, sin = K.rotary_tables(5, 16)

    def fn(q, k, qw, kw):
        return K.qk_norm_rope(q, k, cos, sin, qw, kw, scale=1.2, backend=be)
    return fn, (_rand(2, 5, 3, 16), _rand(2, 5, 1, 16, seed=1), 1 + 0.1 * _rand(16, seed=2),
                1 + 0.1 * _rand(16, seed=3)), (0, 1, 2, 3)


def _qk_norm_rope_inplace(be):
    def fn(qkv, positions, cache):
        qkv = qkv.clone()
        K.qk_norm_rope_inplace(qkv, positions, cache, 2, 1, scale=0.9, backend=be)
        return qkv
    cache = torch.cat(K.rotary_tables(8, 16), dim=1).float()
    return fn, (_rand(4, (2 + 2) * 16), torch.tensor([0, 5, 2, 7]), cache), ()


def _paged_decode_attention(be):
    def fn(q, k_cache, v_cache, block_table, seq_lens):
        return K.paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, window=4, backend=be)
    block_table = torch.tensor([[3, 1], [0, 2]], dtype=torch.int32)
    return fn, (_rand(2, 4, 16), _rand(5, 4, 2, 16, seed=1), _rand(5, 4, 2, 16, seed=2), block_table,
                torch.tensor([7, 3], dtype=torch.int32)), ()


def _paged_kv_write(be):
    def fn(k, v, k_cache, v_cache, slots):
        k_cache, v_cache = k_cache.clone(), v_cache.clone()
        K.paged_kv_write(k, v, k_cache, v_cache, slots, backend=be)
        return k_cache, v_cache
    return fn, (_rand(3, 2, 16), _rand(3, 2, 16, seed=1), torch.zeros(5, 4, 2, 16), torch.zeros(5, 4, 2, 16),
                torch.tensor([0, 9, -1])), ()


def _newton_schulz(be):
    # An optimizer's op: no gradient (the Triton iteration is an op without autograd by design).
    def fn(G):
        return K.newton_schulz(G, backend=be)
    return fn, (_rand(2, 16, 32),), ()


def _nesterov_normalize_(be):
    def fn(grad, buf):
        grad, buf = grad.clone(), buf.clone()
        x0 = K.nesterov_normalize_(grad, buf, 0.9, backend=be)
        return x0, grad, buf
    return fn, (_rand(16, 32), _rand(16, 32, seed=1)), ()


def _fp8_linear(be):
    def fn(x, w, b):
        return K.fp8_linear(x, w, b, backend=be)
    return fn, (_rand(24, 32, dtype=torch.bfloat16), 0.1 * _rand(16, 32, seed=1),
                _rand(16, seed=2, dtype=torch.bfloat16)), (0, 1, 2)


def _fp8_gemm(be):
    def fn(a, b, sa, sb, bias):
        return K.fp8_gemm(a, b, sa, sb, bias=bias, backend=be)
    a = _rand(20, 32).to(torch.float8_e4m3fn)
    b = _rand(16, 32, seed=1).to(torch.float8_e4m3fn)
    # Rowwise scale_a, tensorwise scale_b: both scale kinds in one call.
    return fn, (a, b, 0.5 + _rand(20, 1, seed=2).abs(), torch.tensor(0.25), _rand(16, seed=3, dtype=torch.bfloat16)), ()


def _quantize_fp8(be):
    def fn(x, scale):
        computed = K.quantize_fp8(x, transpose=True, backend=be)
        given = K.quantize_fp8(x, torch.float8_e5m2, scale=scale, backend=be)  # delayed scaling: q_t None
        rowwise = K.quantize_fp8(x, recipe="rowwise", backend=be)
        return (*computed, *given, *rowwise)
    return fn, (_rand(20, 48), torch.tensor(0.01)), ()


def _apply_rotary_pos_emb(be):
    cos, sin = _rand(2, 5, 16, seed=2), _rand(2, 5, 16, seed=3)

    def fn(q, k):  # HF's layout: (B, H, T, D) views of (B, T, H, D) projections
        return K.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin, backend=be)
    return fn, (_rand(2, 5, 3, 16), _rand(2, 5, 1, 16, seed=1)), (0, 1)


def _rotary_embedding(be):
    cos, sin = _rand(9, 16, seed=2), _rand(9, 16, seed=3)  # (L, D) tables indexed by position ids

    def fn(x, ids):
        return K.rotary_embedding(x, cos, sin, ids, unsqueeze_dim=2, backend=be)
    return fn, (_rand(2, 5, 3, 16), torch.tensor([[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]])), (0,)


def _linear_cross_entropy(be):
    def fn(x, w, b, y):
        return K.linear_cross_entropy(x, w, y, b, label_smoothing=0.1, z_loss=1e-3, softcap=20.0, backend=be)
    y = torch.tensor([[3, -100, 7, 0], [29, 5, -100, 1]])
    return fn, (_rand(2, 4, 16), _rand(30, 16, seed=1), _rand(30, seed=2), y), (0, 1, 2)


def _linear_softcap_cross_entropy(be):
    def fn(x, w, y):
        return K.linear_softcap_cross_entropy(x, w, y, 15.0, reduction="none", backend=be)
    return fn, (_rand(5, 16), _rand(30, 16, seed=1), torch.tensor([3, -1, 7, 0, 29])), (0, 1)


CASES = {
    "apply_rotary_pos_emb": _apply_rotary_pos_emb,
    "rotary_embedding": _rotary_embedding,
    "linear_cross_entropy": _linear_cross_entropy,
    "linear_softcap_cross_entropy": _linear_softcap_cross_entropy,
    "rms_norm": _rms_norm,
    "qk_norm_rope": _qk_norm_rope,
    "qk_norm_rope_inplace": _qk_norm_rope_inplace,
    "paged_decode_attention": _paged_decode_attention,
    "paged_kv_write": _paged_kv_write,
    "newton_schulz": _newton_schulz,
    "nesterov_normalize_": _nesterov_normalize_,
    "fp8_linear": _fp8_linear,
    "fp8_gemm": _fp8_gemm,
    "quantize_fp8": _quantize_fp8,
}


_OP_OF = {entry: op for op in OPS.values() for entry in op.checks}


def _matrix() -> list:
    params = []
    for op in OPS.values():
        for entry in op.checks:
            for be in op.choices:
                if be in NOT_ON_CPU:
                    continue
                marks = ()
                if entry not in CASES:
                    marks = pytest.mark.skip(reason=OWNED_ELSEWHERE.get(op.name, "no case"))
                elif be == "cuda" and not HAVE_CXX:
                    marks = pytest.mark.skip(reason="no C++20 compiler for the CUDA emulation build")
                params.append(pytest.param(entry, be, id=f"{entry}-{be}", marks=marks))
    return params


def test_every_entry_has_a_case_or_an_owner():
    """The matrix covers the registry: a new entry without a case fails here, not silently."""
    missing = [(op.name, e) for op in OPS.values() for e in op.checks
               if e not in CASES and op.name not in OWNED_ELSEWHERE]
    assert not missing, f"entries without a compile case: {missing}"
    assert not set(CASES) - {e for op in OPS.values() for e in op.checks}, "CASES names an entry no op declares"


def _outputs(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _assert_same(got, want, what: str) -> None:
    assert (got is None) == (want is None), f"{what}: {got!r} vs {want!r}"
    if want is None:
        return
    assert got.shape == want.shape and got.dtype == want.dtype, \
        f"{what}: {tuple(got.shape)} {got.dtype} vs {tuple(want.shape)} {want.dtype}"
    if want.dtype.itemsize == 1 and want.is_floating_point():  # fp8: the same bits
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), what
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True, msg=what)


def _loss(outs) -> torch.Tensor:
    return sum((o.float() * torch.linspace(0.5, 1.5, o.numel()).view(o.shape)).sum()
               for o in outs if o is not None and o.is_floating_point() and o.requires_grad)


@pytest.mark.parametrize("entry,backend", _matrix())
def test_fullgraph_matches_eager(entry, backend, request):
    if backend == "cuda":
        request.getfixturevalue("emu")  # builds (once, cached) the emulation libraries
    fn, inputs, grad_idx = CASES[entry](backend)

    def leaves():
        return [t.clone().requires_grad_(i in grad_idx) for i, t in enumerate(inputs)]

    eager_in = leaves()
    eager = _outputs(fn(*eager_in))
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    comp_in = leaves()
    compiled = _outputs(torch.compile(fn, backend=counter, fullgraph=True)(*comp_in))
    assert counter.frame_count == 1
    if backend in _OP_OF[entry].kernels:  # nanofast's kernel ran as a custom op of the graph (not beside it)
        targets = [str(n.target) for g in counter.graphs for n in g.graph.nodes if n.op == "call_function"]
        assert any("nanofast" in t for t in targets), f"no nanofast:: op in the graph: {targets}"
    assert len(compiled) == len(eager)
    for i, (c, e) in enumerate(zip(compiled, eager)):
        _assert_same(c, e, f"{entry}[{backend}] output {i}")
    if grad_idx:
        want = torch.autograd.grad(_loss(eager), [eager_in[i] for i in grad_idx])
        got = torch.autograd.grad(_loss(compiled), [comp_in[i] for i in grad_idx])
        for i, g, w in zip(grad_idx, got, want):
            _assert_same(g, w, f"{entry}[{backend}] gradient of input {i}")


# ------------------------------------------------------------------------------------------------
# The custom ops added for torch.compile: registrations held to the kernels
# ------------------------------------------------------------------------------------------------

def _opcheck_args():
    x = _rand(20, 48)
    a = _rand(20, 32).to(torch.float8_e4m3fn)
    b = _rand(16, 32, seed=1).to(torch.float8_e4m3fn)
    q = _rand(2, 4, 16)
    kc, vc = _rand(5, 4, 2, 16, seed=1), _rand(5, 4, 2, 16, seed=2)
    bt, sl = torch.tensor([[3, 1], [0, 2]], dtype=torch.int32), torch.tensor([7, 3], dtype=torch.int32)
    ops = torch.ops.nanofast
    return [
        ("quantize_fp8 computed+T", ops.quantize_fp8.default, (x, torch.float8_e4m3fn, "tensorwise", None, True, "triton")),
        ("quantize_fp8 given", ops.quantize_fp8.default, (x, torch.float8_e5m2, "tensorwise", torch.tensor(0.01), False,
                                                          "triton")),
        ("quantize_fp8 rowwise", ops.quantize_fp8.default, (x, torch.float8_e4m3fn, "rowwise", None, False, "triton")),
        ("fp8_gemm", ops.fp8_gemm.default, (a, b, _rand(20, 1).abs(), torch.tensor(0.5), torch.bfloat16, None, False,
                                            True, False, None, "triton")),
        ("fp8_gemm persistent", ops.fp8_gemm.default, (a, b, torch.tensor(2.0), torch.tensor(0.5), torch.float32, None,
                                                       True, False, False, None, "triton_persistent")),
        ("paged_decode_attention", ops.paged_decode_attention.default, (q, kc, vc, bt, sl, 0.25, None, 2, None, None,
                                                                        "triton")),
        ("paged_kv_write", ops.paged_kv_write.default, (_rand(3, 2, 16), _rand(3, 2, 16, seed=1), kc.clone(),
                                                        vc.clone(), torch.tensor([0, 9, -1]), "triton")),
        ("nesterov_rows_", ops.nesterov_rows_.default, (_rand(16, 32), _rand(16, 32, seed=1), 0.9, "triton")),
        ("scale_rows", ops.scale_rows.default, (_rand(16, 32), _rand(16, 1).abs(), torch.bfloat16, "triton")),
    ]


@pytest.mark.parametrize("name,op,args", [pytest.param(*c, id=c[0]) for c in _opcheck_args()])
def test_compile_ops_pass_opcheck(name, op, args):
    """Schema (declared mutations and no aliasing) and fake implementations (shapes, dtypes,
    strides of the real outputs), as torch.library checks them. test_schema compares the inputs
    before and after with arithmetic torch's CPU build lacks for fp8 ("mul_cpu_reduced_float"), so
    ops with fp8 inputs get the fake-tensor check alone."""
    fp8_in = any(isinstance(a, torch.Tensor) and a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for a in args)
    torch.library.opcheck(op, args, test_utils=("test_faketensor",) if fp8_in else ("test_schema", "test_faketensor"))


# ------------------------------------------------------------------------------------------------
# Value checks under compile: skipped at trace time, run by the kernel backends' ops
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_compiled_kernel_backends_still_check_values(backend, request):
    """The traced entries cannot read tensor values (a data-dependent guard breaks fullgraph), so
    the custom ops check them when they run: bad CPU values still raise ValueError naming them."""
    if backend == "cuda":
        if not HAVE_CXX:
            pytest.skip("no C++20 compiler for the CUDA emulation build")
        request.getfixturevalue("emu")
    fn, (q, kc, vc, bt, _), _ = _paged_decode_attention(backend)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    with pytest.raises(ValueError, match="seq_lens must lie in"):
        compiled(q, kc, vc, bt, torch.tensor([9, 3], dtype=torch.int32))  # capacity 2 pages x 4
    bad_page = bt.clone()
    bad_page[1, 0] = 5
    with pytest.raises(ValueError, match="block_table entries"):
        compiled(q, kc, vc, bad_page, torch.tensor([7, 3], dtype=torch.int32))

    write, (k, v, kc0, vc0, _), _ = _paged_kv_write(backend)
    with pytest.raises(ValueError, match="slot_mapping values must be <"):
        torch.compile(write, backend="aot_eager", fullgraph=True)(k, v, kc0, vc0, torch.tensor([0, 20, 1]))

    inplace, (qkv, _, cache), _ = _qk_norm_rope_inplace(backend)
    with pytest.raises(ValueError, match="positions must lie in"):
        torch.compile(inplace, backend="aot_eager", fullgraph=True)(qkv, torch.tensor([0, 8, 1, 2]), cache)


def test_compiled_paged_decode_takes_a_plan_and_checks_it():
    """plan= (a CPU tensor read on the host) works under fullgraph; its entries are checked by the op."""
    fn, (q, kc, vc, bt, sl), _ = _paged_decode_attention("triton")

    def planned(q, kc, vc, bt, sl, plan):
        return K.paged_decode_attention(q, kc, vc, bt, sl, plan=plan, backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(planned, backend="aot_eager", fullgraph=True)
    plan = torch.tensor([2, 1], dtype=torch.int32)
    torch.testing.assert_close(compiled(q, kc, vc, bt, sl, plan), planned(q, kc, vc, bt, sl, plan),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="plan entries must lie in"):
        compiled(q, kc, vc, bt, sl, torch.tensor([0, 1], dtype=torch.int32))


# ------------------------------------------------------------------------------------------------
# TRITON_INTERPRET set too late
# ------------------------------------------------------------------------------------------------

_LATE = r"""
import os, sys, torch
if sys.argv[1] == "triton-first":
    import triton                      # triton decides here: no interpreter
    os.environ["TRITON_INTERPRET"] = "1"
    import nanofast.kernels as K
else:
    import nanofast.kernels as K       # imports triton: no interpreter
    os.environ["TRITON_INTERPRET"] = "1"
from triton import knobs
from nanofast.kernels.backend import triton_interpreting
assert knobs.runtime.interpret and not triton_interpreting(), "the knob follows the variable; the import did not"
assert K.rms_norm(torch.ones(2, 8)).shape == (2, 8)  # the torch backend is unaffected
try:
    K.rms_norm(torch.ones(2, 8), backend="triton")
except RuntimeError as e:
    print("ERROR:", e)
else:
    print("NO ERROR")
"""


def test_triton_interpret_set_after_import_names_the_fix():
    """Both orders of the trap (triton imported first; nanofast.kernels, which imports triton, first)
    give resolve_backend's RuntimeError instead of Triton's '0 active drivers' or 'Cannot call
    @triton.jit'd outside of the scope of a kernel' from deep inside a launch."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {order: subprocess.Popen([sys.executable, "-c", _LATE, order], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
             for order in ("triton-first", "kernels-first")}
    for order, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{order}: {err[-3000:]}"
        assert "ERROR: backend='triton' on CPU tensors: TRITON_INTERPRET=1 is set now" in out, (order, out, err[-2000:])
        assert "before the first import of triton (or of nanofast.kernels" in out, (order, out)
