"""The install rules of setup.py, on CPU and without network (docs/install.md).

setup.py is imported under another name than __main__ (which probes nothing and builds nothing):
the decision whether to build the CUDA extension nanofast._C, the parser of `nvcc --version`,
and the extras, which must install from wheels and hold only what the code imports or uses.
"""
from __future__ import annotations

import importlib.util
import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETUP_PY = ROOT / "setup.py"


def _load_setup():
    spec = importlib.util.spec_from_file_location("nanofast_setup_under_test", SETUP_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


S = _load_setup()
VAR = "NANOFAST_CUDA_EXT"
NVCC = "/opt/cuda/bin/nvcc"


def decide(env=None, nvcc=NVCC, nvcc_ver="13.0", torch_cuda="13.0", sources=True, torch_importable=True):
    return S.cuda_ext_decision(env or {}, nvcc, nvcc_ver, torch_cuda, sources, torch_importable)


def warning(env=None, nvcc=NVCC, nvcc_ver="13.0", torch_cuda="13.0", sources=True, torch_importable=True):
    return S.cuda_ext_warning(env or {}, nvcc, nvcc_ver, torch_cuda, sources, torch_importable)


# ---- importing setup.py does nothing --------------------------------------------------------------

def test_importing_setup_py_neither_probes_nor_calls_setup(monkeypatch):
    import setuptools

    def refuse(**kwargs):
        raise AssertionError("setup() called on import")

    monkeypatch.setattr(setuptools, "setup", refuse)
    monkeypatch.setattr(S, "probe", lambda: pytest.fail("probed on import"))
    _load_setup()


# ---- NANOFAST_CUDA_EXT=0 ----------------------------------------------------------------------------

def test_forced_off_skips_even_where_everything_matches():
    build, reason = decide({VAR: "0"})
    assert not build and f"{VAR}=0" in reason
    assert warning({VAR: "0"}) is None


def test_forced_off_skips_without_probing_torch_or_nvcc(monkeypatch):
    monkeypatch.setattr(S, "probe", lambda: pytest.fail("probed although NANOFAST_CUDA_EXT=0"))
    assert S.cuda_extensions({VAR: "0"}) == ([], {})


# ---- NANOFAST_CUDA_EXT=1 ----------------------------------------------------------------------------

def test_forced_on_builds_where_everything_is_there():
    build, reason = decide({VAR: "1"})
    assert build and f"{VAR}=1" in reason


def test_forced_on_builds_despite_a_major_mismatch_and_says_so():
    build, reason = decide({VAR: "1"}, nvcc_ver="12.8", torch_cuda="13.0")
    assert build and "12.8" in reason and "13.0" in reason


@pytest.mark.parametrize("case", [dict(nvcc=None, nvcc_ver=None), dict(torch_cuda=None),
                                  dict(torch_cuda=None, torch_importable=False), dict(sources=False)],
                         ids=["no-nvcc", "cpu-torch", "no-torch", "no-sources"])
def test_forced_on_cannot_conjure_a_toolkit_a_cuda_torch_or_sources(case):
    with pytest.raises(SystemExit, match=f"{VAR}=1"):
        decide({VAR: "1"}, **case)


# ---- any other value ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["yes", "true", "2", "on", " 1", "off"])
def test_other_values_are_refused_naming_the_variable_and_the_allowed_values(value):
    with pytest.raises(SystemExit) as exc:
        decide({VAR: value})
    msg = str(exc.value)
    assert VAR in msg and repr(value) in msg and "0" in msg and "1" in msg and "unset" in msg


def test_empty_value_means_unset():
    assert decide({VAR: ""}) == decide({})


# ---- unset: build where it can and where torch's builder accepts the toolkit ------------------------------

@pytest.mark.parametrize("nvcc_ver,torch_cuda", [("13.0", "13.0"), ("12.8", "12.6"), ("12.4", "12.8")])
def test_unset_builds_when_the_major_versions_match(nvcc_ver, torch_cuda):
    build, reason = decide(nvcc_ver=nvcc_ver, torch_cuda=torch_cuda)
    assert build, reason
    assert warning(nvcc_ver=nvcc_ver, torch_cuda=torch_cuda) is None


@pytest.mark.parametrize("nvcc_ver,torch_cuda", [("12.8", "13.0"), ("13.0", "12.8"), ("11.8", "12.1")])
def test_unset_skips_a_major_mismatch_naming_both_versions_with_one_warning_line(nvcc_ver, torch_cuda):
    build, reason = decide(nvcc_ver=nvcc_ver, torch_cuda=torch_cuda)
    assert not build
    assert nvcc_ver in reason and torch_cuda in reason
    line = warning(nvcc_ver=nvcc_ver, torch_cuda=torch_cuda)
    assert line is not None and "\n" not in line
    assert reason in line and "nanofast.kernels.cuda_build" in line and f"{VAR}=1" in line


def test_unset_skips_without_nvcc_and_warns_where_torch_has_cuda():
    build, reason = decide(nvcc=None, nvcc_ver=None, torch_cuda="12.8")
    assert not build and "nvcc" in reason and "12.8" in reason
    assert warning(nvcc=None, nvcc_ver=None, torch_cuda="12.8") is not None


def test_unset_skips_an_unreadable_nvcc_version_with_a_warning():
    build, reason = decide(nvcc_ver=None)
    assert not build and NVCC in reason
    assert warning(nvcc_ver=None) is not None


@pytest.mark.parametrize("nvcc", [NVCC, None])
def test_unset_skips_quietly_with_a_cpu_torch(nvcc):
    build, reason = decide(nvcc=nvcc, torch_cuda=None)
    assert not build and "CPU" in reason
    assert warning(nvcc=nvcc, torch_cuda=None) is None


def test_unset_skips_quietly_without_sources():
    build, reason = decide(sources=False)
    assert not build and "csrc" in reason
    assert warning(sources=False) is None


def test_unset_without_torch_in_the_build_points_at_build_isolation():
    build, reason = decide(torch_cuda=None, torch_importable=False)
    assert not build and "--no-build-isolation" in reason
    assert warning(torch_cuda=None, torch_importable=False) is not None  # nvcc here: a GPU machine
    assert warning(nvcc=None, nvcc_ver=None, torch_cuda=None, torch_importable=False) is None


# ---- what the install prints -------------------------------------------------------------------------

def _facts(**kw):
    facts = dict(nvcc_path=NVCC, nvcc_cuda_version="12.8", torch_cuda_version="13.0", has_sources=True,
                 torch_importable=True)
    facts.update(kw)
    return facts


def test_a_mismatch_prints_exactly_one_line_and_installs_without_the_extension(monkeypatch, capsys):
    monkeypatch.setattr(S, "probe", lambda: _facts())
    assert S.cuda_extensions({}) == ([], {})
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "12.8" in err and "13.0" in err


def test_a_cpu_machine_prints_nothing(monkeypatch, capsys):
    monkeypatch.setattr(S, "probe", lambda: _facts(torch_cuda_version=None))
    assert S.cuda_extensions({}) == ([], {})
    assert capsys.readouterr() == ("", "")


def test_a_bad_value_fails_the_install_with_the_message(monkeypatch):
    monkeypatch.setattr(S, "probe", lambda: _facts())
    with pytest.raises(SystemExit, match=VAR):
        S.cuda_extensions({VAR: "maybe"})


# ---- nvcc --version -------------------------------------------------------------------------------------

NVCC_13 = """nvcc: NVIDIA (R) Cuda compiler driver
Copyright (c) 2005-2025 NVIDIA Corporation
Built on Wed_Aug_20_01:58:59_PM_PDT_2025
Cuda compilation tools, release 13.0, V13.0.88
Build cuda_13.0.r13.0/compiler.36424714_0
"""
NVCC_12 = """nvcc: NVIDIA (R) Cuda compiler driver
Copyright (c) 2005-2025 NVIDIA Corporation
Built on Fri_Feb_21_20:23:50_PST_2025
Cuda compilation tools, release 12.8, V12.8.93
Build cuda_12.8.r12.8/compiler.35583870_0
"""
NVCC_11 = "Cuda compilation tools, release 11.8, V11.8.89\r\nBuild cuda_11.8.r11.8/compiler.31833905_0\r\n"


@pytest.mark.parametrize("text,version", [(NVCC_13, "13.0"), (NVCC_12, "12.8"), (NVCC_11, "11.8"),
                                          ("", None), (None, None), ("nvcc: command not found", None)])
def test_nvcc_version_parser(text, version):
    assert S.nvcc_cuda_version(text) == version


# ---- the extras -------------------------------------------------------------------------------------------

def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0).lower().replace("_", "-")


def _code_text(*globs: str) -> str:
    return "\n".join(p.read_text(encoding="utf-8") for g in globs for p in sorted(ROOT.glob(g)))


# Packages whose only distribution for a new torch is a source build that runs for a long time.
SOURCE_BUILDS = {"flash-attn", "transformer-engine", "apex", "mamba-ssm", "causal-conv1d"}


def test_setup_passes_the_extras_to_setuptools(monkeypatch):
    import setuptools

    seen = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
    monkeypatch.setenv(VAR, "0")  # decide nothing from this machine, build nothing
    runpy.run_path(str(SETUP_PY), run_name="__main__")
    assert seen["extras_require"] == S.EXTRAS
    assert seen["install_requires"] == S.INSTALL_REQUIRES
    assert seen["ext_modules"] == [] and seen["cmdclass"] == {}
    assert seen["package_dir"]["nanofast.kernels"] == "kernels"


def test_no_extra_but_fa2_compiles_for_long():
    for extra, reqs in S.EXTRAS.items():
        if extra != "fa2":
            assert not {_name(r) for r in reqs} & SOURCE_BUILDS, (extra, reqs)
    assert [_name(r) for r in S.EXTRAS["fa2"]] == ["flash-attn"]


def test_gpu_extra_is_the_hub_client_and_ninja():
    assert sorted(_name(r) for r in S.EXTRAS["gpu"]) == ["kernels", "ninja"]


def test_nothing_lists_transformer_engine_which_no_code_imports():
    assert "transformer_engine" not in _code_text("nanofast/**/*.py", "kernels/**/*.py", "train.py")
    assert not any(_name(r) == "transformer-engine" for reqs in S.EXTRAS.values() for r in reqs)


def test_fa2_is_imported_by_the_attention_code():
    # `import flash_attn`, or an optional import by name ("flash_attn"), not flash_attn_interface (FA3).
    code = _code_text("nanofast/**/*.py", "kernels/**/*.py")
    assert re.search(r"^\s*import flash_attn\s*(#.*)?$|\(\s*[\"']flash_attn[\"']\s*\)", code, re.M)


def test_ninja_is_used_by_the_jit_build_of_csrc():
    # torch.utils.cpp_extension.load builds with ninja and refuses to run without it.
    assert "cpp_extension.load(" in _code_text("kernels/cuda_build.py")


def test_the_hub_client_kernels_is_used_to_load_fa3():
    # The `kernels` entry of the gpu extra exists for the prebuilt FA3 (get_kernel at run time).
    code = _code_text("nanofast/**/*.py", "kernels/**/*.py")
    assert "get_kernel(" in code, "the gpu extra installs `kernels` but no nanofast code calls get_kernel("


def test_pyproject_holds_only_the_build_system():
    tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.skip("needs tomllib")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert set(data) == {"build-system"}
    assert data["build-system"]["build-backend"] == "setuptools.build_meta"
    assert any(r.replace(" ", "").startswith("setuptools>=") for r in data["build-system"]["requires"])


# ---- the tested range of torch and triton (issue 31) ------------------------------------------------------

def _make_var(name: str) -> str:
    """A `NAME := value` of the Makefile, its backslash-continued lines joined."""
    text = (ROOT / "Makefile").read_text(encoding="utf-8").replace("\\\n", " ")
    return re.search(rf"^{name} := (.*)$", text, re.M).group(1).strip()


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def test_requirements_floor_torch_and_triton_at_the_tested_versions():
    # torch 2.11 + triton 3.6: the GPU machines' pair; triton 3.6 is what the compat leg runs.
    assert (S.MIN_TORCH, S.MIN_TRITON) == ("2.11", "3.6")
    assert f"torch>={S.MIN_TORCH}" in S.INSTALL_REQUIRES
    # triton publishes Linux wheels only: required there (CPU machines included), never elsewhere
    assert f"triton>={S.MIN_TRITON}; platform_system == 'Linux'" in S.INSTALL_REQUIRES
    assert f"triton>={S.MIN_TRITON}" in S.EXTRAS["dev"]
    # ... and no other floor or pin of either anywhere
    named = {r for reqs in (S.INSTALL_REQUIRES, *S.EXTRAS.values()) for r in reqs if _name(r) in ("torch", "triton")}
    assert named == {f"torch>={S.MIN_TORCH}", f"triton>={S.MIN_TRITON}; platform_system == 'Linux'",
                     f"triton>={S.MIN_TRITON}"}


def test_the_compat_leg_runs_the_lowest_triton_allowed_and_make_test_runs_it():
    leg = _make_var("COMPAT_TRITON")
    assert _version(leg)[:2] == _version(S.MIN_TRITON), (leg, S.MIN_TRITON)
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    main_torch = re.search(r"pip install --quiet torch==([\d.]+)", makefile).group(1)
    main_triton = re.search(r"pip install --quiet triton==([\d.]+)", makefile).group(1)
    assert _version(main_torch) >= _version(S.MIN_TORCH) and _version(main_triton) > _version(leg)
    test_recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "compat" in test_recipe.splitlines()[-1]  # after the main tests and the guard
    assert ".venv-compat/" in (ROOT / ".gitignore").read_text(encoding="utf-8").split()


def test_the_compat_leg_covers_every_triton_kernel_and_the_model():
    tests = _make_var("COMPAT_TESTS").replace("'", "").split()
    files = {t.split("::")[0] for t in tests}
    assert all((ROOT / f).is_file() for f in files), files
    jit_modules = sorted(p.stem for p in (ROOT / "kernels").glob("*.py")
                         if re.search(r"^\s*@triton\.jit", p.read_text(encoding="utf-8"), re.M))
    assert len(jit_modules) >= 7, jit_modules
    assert {f"tests/test_{m}.py" for m in jit_modules} <= files, jit_modules
    assert {"tests/test_model.py", "tests/test_ops.py"} <= files
