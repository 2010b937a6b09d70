"""The install rules of setup.py, on CPU and without network (docs/install.md).

setup.py is imported under another name than __main__ (which probes nothing and builds nothing):
the decision whether to build the CUDA extension nanofast._C, the parser of `nvcc --version`,
and the extras, which must install from wheels and hold only what the code imports or uses.
The light install (issue 33): install_requires is what nanofast.kernels imports, the `train` extra
what the driver adds, the wheel carries the CUDA sources and leaves the tree clean, and the
report and smoke commands an installed user runs fail fast and say why. `make wheel-test`
installs that wheel into a fresh venv; these tests hold the rules it relies on.
"""
from __future__ import annotations

import importlib.util
import os
import re
import runpy
import subprocess
import sys
import time
import zipfile
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
    main_torch, main_triton = _make_var("TORCH_VERSION"), _make_var("TRITON_VERSION")
    assert "install --quiet torch==$(TORCH_VERSION)" in makefile
    assert "install --quiet triton==$(TRITON_VERSION)" in makefile
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


# ---- the light install: what each part of the package imports (issue 33) ------------------------------

# Module name -> the distribution that provides it, where the two differ; starlette and anyio come
# with fastapi (its own requirements), which nanofast.serve is written against.
DISTRIBUTION_OF = {"yaml": "pyyaml", "starlette": "fastapi", "anyio": "fastapi"}
# Imported only inside a function, for a feature whose user has the package already or asked for
# it by name: module -> why it is no requirement of the part that imports it.
OPTIONAL_IMPORTS = {
    "transformers": "nanofast.kernels.hf patches a transformers model: whoever calls it has transformers",
    "wandb": "nanofast.wandb_log, for --wandb only: the `wandb` extra",
}
FIRST_PARTY = {"nanofast", "kernels", "bench", "__future__"}


def _third_party_imports(*globs: str, exclude: str | None = None) -> dict[str, dict[str, bool]]:
    """{top-level module: {file: imported at module level}} of the absolute imports in the files."""
    import ast

    found: dict[str, dict[str, bool]] = {}
    for g in globs:
        for path in sorted(ROOT.glob(g)):
            rel = path.relative_to(ROOT).as_posix()
            if exclude and rel.startswith(exclude):
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                           for n in ast.walk(f) if n is not f}
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in FIRST_PARTY:
                        continue
                    at_top = found.setdefault(top, {}).get(rel, False)
                    found[top][rel] = at_top or id(node) not in in_function
    return found


def _names(reqs) -> set[str]:
    return {_name(r) for r in reqs}


def _check_imports(found: dict[str, dict[str, bool]], allowed: set[str], part: str) -> None:
    for module, files in sorted(found.items()):
        if module in OPTIONAL_IMPORTS:
            at_top = sorted(f for f, top in files.items() if top)
            assert not at_top, f"{module} ({OPTIONAL_IMPORTS[module]}) is imported at module level in {at_top}"
            continue
        dist = DISTRIBUTION_OF.get(module, module).lower().replace("_", "-")
        assert dist in allowed, f"{part} imports {module} ({sorted(files)}) but {dist} is not among {sorted(allowed)}"


def test_the_kernels_need_only_what_install_requires_lists():
    found = _third_party_imports("kernels/**/*.py")
    _check_imports(found, _names(S.INSTALL_REQUIRES), "nanofast.kernels")
    # ... and install_requires holds nothing the kernels do not import
    assert _names(S.INSTALL_REQUIRES) == {"torch", "triton", "numpy"} <= set(found)


def test_the_driver_needs_only_install_requires_and_the_train_extra():
    found = _third_party_imports("nanofast/**/*.py", "train.py", exclude="nanofast/kernels/")
    _check_imports(found, _names(S.INSTALL_REQUIRES) | _names(S.EXTRAS["train"]), "the driver (nanofast/, train.py)")
    used = {DISTRIBUTION_OF.get(m, m).lower() for m in found}
    assert _names(S.EXTRAS["train"]) <= used, _names(S.EXTRAS["train"]) - used  # nothing listed for nothing


def test_extras_dev_holds_train_and_train_holds_none_of_the_base():
    train = _names(S.EXTRAS["train"])
    assert train <= _names(S.EXTRAS["dev"])  # `make run` / `make test` install '.[dev]'
    assert not train & _names(S.INSTALL_REQUIRES)
    assert S.EXTRAS["serve"] == S.EXTRAS["train"]  # the chat server is the driver's


def _train_only_modules() -> list[str]:
    """Top-level modules the driver imports that the light install does not have."""
    found = _third_party_imports("nanofast/**/*.py", "train.py", exclude="nanofast/kernels/")
    base = _names(S.INSTALL_REQUIRES)
    return sorted(m for m in found if DISTRIBUTION_OF.get(m, m).lower() not in base) + ["transformers"]


def test_importing_nanofast_and_every_kernels_module_needs_none_of_the_train_extra():
    """In a process where every train-only module (and transformers) fails to import, nanofast,
    every module of nanofast.kernels and a kernel call still work, and none of them got loaded."""
    blocked = _train_only_modules()
    assert {"tiktoken", "pyarrow", "matplotlib", "yaml", "fastapi", "wandb"} <= set(blocked)
    code = f"""
import importlib, importlib.abc, importlib.util, pkgutil, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # found (torch probes some of these with find_spec), but importing one fails as if absent
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return importlib.util.spec_from_loader(name, self)
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        raise ModuleNotFoundError(f"{{module.__name__}} is blocked: not part of the light install",
                                  name=module.__name__)
sys.meta_path.insert(0, Block())
import nanofast, nanofast.kernels as K
for m in pkgutil.iter_modules(K.__path__):
    importlib.import_module("nanofast.kernels." + m.name)
import torch
x = torch.randn(3, 8)
torch.testing.assert_close(K.rms_norm(x), K.rms_norm_reference(x))
loaded = sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED)
assert not loaded, loaded
print(nanofast.__version__)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT / "tests",
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == S.read_version()


# ---- version, license, long description ------------------------------------------------------------

def test_the_version_is_written_once_and_read_without_importing_torch(monkeypatch):
    import nanofast

    assert nanofast.__version__ == S.read_version()
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+|rc\d+)?", nanofast.__version__)
    hits = [p.relative_to(ROOT).as_posix() for g in ("setup.py", "nanofast/**/*.py", "kernels/**/*.py")
            for p in ROOT.glob(g) if re.search(r"""(version\s*=|__version__\s*=)\s*["']\d""", p.read_text())]
    assert hits == ["nanofast/__init__.py"], hits
    # the changelog has an entry for it (the release part of a .devN version: its Unreleased entry)
    release = re.match(r"\d+\.\d+\.\d+", nanofast.__version__).group(0)
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert re.search(rf"^## .*\b{re.escape(release)}\b", changelog, re.M)


def test_setup_passes_version_license_readme_and_the_package_data(monkeypatch):
    import setuptools

    seen = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
    monkeypatch.setenv(VAR, "0")
    runpy.run_path(str(SETUP_PY), run_name="__main__")
    assert seen["version"] == S.read_version()
    assert seen["license"] == "MIT" and seen["license_files"] == ["LICENSE"]
    assert "MIT License" in (ROOT / "LICENSE").read_text() and "the nanofast authors" in (ROOT / "LICENSE").read_text()
    assert seen["long_description"] == (ROOT / "README.md").read_text(encoding="utf-8")
    assert seen["long_description_content_type"] == "text/markdown"
    for package, folder in seen["package_dir"].items():
        assert package in seen["packages"] and (ROOT / folder).is_dir(), package
    assert seen["package_dir"]["nanofast.kernels.csrc"] == "csrc"
    # every file of csrc/ is package data (a new kind of file would otherwise be left out silently)
    import fnmatch

    patterns = seen["package_data"]["nanofast.kernels.csrc"]
    left_out = [p.name for p in (ROOT / "csrc").iterdir() if not any(fnmatch.fnmatch(p.name, pat) for pat in patterns)]
    assert not left_out, left_out
    # the build goes to a temporary directory, never into the source tree
    opts = seen["options"]
    assert not Path(opts["build"]["build_base"]).resolve().is_relative_to(ROOT)
    assert not Path(opts["egg_info"]["egg_base"]).resolve().is_relative_to(ROOT)


# ---- the CUDA sources in a checkout and in an install -----------------------------------------------------

def test_the_cuda_sources_are_found_installed_and_in_a_checkout(tmp_path, monkeypatch):
    from nanofast.kernels import cuda_build

    monkeypatch.delenv("NANOFAST_CSRC", raising=False)
    installed = tmp_path / "site" / "nanofast" / "kernels"
    (installed / "csrc").mkdir(parents=True)
    (installed / "csrc" / cuda_build.CSRC_MARKER).write_text("")
    (tmp_path / "site" / "nanofast" / "csrc").mkdir()  # an unrelated folder of that name: not picked
    assert cuda_build.csrc_dir(installed) == installed / "csrc"
    checkout = tmp_path / "repo"
    (checkout / "kernels").mkdir(parents=True)
    (checkout / "csrc").mkdir()
    (checkout / "csrc" / cuda_build.CSRC_MARKER).write_text("")
    assert cuda_build.csrc_dir(checkout / "kernels") == checkout / "csrc"
    with pytest.raises(FileNotFoundError, match="NANOFAST_CSRC") as exc:
        cuda_build.csrc_dir(tmp_path / "site" / "nanofast")
    assert cuda_build.CSRC_MARKER in str(exc.value)
    monkeypatch.setenv("NANOFAST_CSRC", str(checkout / "csrc"))
    assert cuda_build.csrc_dir(installed) == checkout / "csrc"
    # this checkout: the sources beside kernels/
    monkeypatch.delenv("NANOFAST_CSRC")
    assert cuda_build.csrc_dir() == ROOT / "csrc"


# ---- the wheel ----------------------------------------------------------------------------------------------

def _build_artifacts() -> set[str]:
    return {p.relative_to(ROOT).as_posix() for g in ("build", "*.egg-info", "*/*.egg-info") for p in ROOT.glob(g)}


def test_the_wheel_holds_the_package_data_and_building_it_leaves_the_tree_alone(tmp_path):
    """`pip wheel .` as a user runs it: the CUDA sources, the chat page, the dispatch tables, the
    license and the readme are in the wheel; no build/ or egg-info is left in the source tree."""
    before = _build_artifacts()
    env = dict(os.environ, **{VAR: "0"})
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _build_artifacts() == before, "the build wrote into the source tree"
    (wheel,) = tmp_path.glob("nanofast-*.whl")
    assert wheel.name.startswith(f"nanofast-{S.read_version()}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    csrc = {f"nanofast/kernels/csrc/{p.name}" for p in (ROOT / "csrc").iterdir()}
    tables = {f"nanofast/{p.relative_to(ROOT / 'nanofast').as_posix()}"
              for p in (ROOT / "nanofast" / "dispatch_tables").glob("*.json")}
    assert csrc | tables | {"nanofast/static/index.html", "nanofast/kernels/smoke.py"} <= names
    dist_info = f"nanofast-{S.read_version()}.dist-info"
    assert f"{dist_info}/licenses/LICENSE" in names
    meta = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "Description-Content-Type: text/markdown" in meta and "Provides-Extra: train" in meta
    requires = [line.split(": ", 1)[1] for line in meta.splitlines() if line.startswith("Requires-Dist: ")]
    assert {_name(r) for r in requires if "extra ==" not in r} == {"torch", "triton", "numpy"}
    assert not any(n.startswith(("kernels/", "csrc/", "tests/", "bench/")) for n in names)


def test_make_test_runs_the_wheel_test_with_the_main_venvs_pins():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    test_recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, re.M).group(1).splitlines()
    assert any("wheel-test" in line for line in test_recipe[:-1])
    recipe = re.search(r"^wheel-test:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    for pin in ("torch==$(TORCH_VERSION)", "triton==$(TRITON_VERSION)"):
        assert pin in recipe and f"install --quiet {pin}" in makefile.split("wheel-test:")[0], pin
    assert "mktemp -d" in recipe and "nanofast.kernels.smoke" in recipe and "TRITON_INTERPRET=1" in recipe


# ---- python -m nanofast.kernels.report and .smoke in an install ---------------------------------------------

def _report(*args: str, **env_changes) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_changes)
    return subprocess.run([sys.executable, "-m", "nanofast.kernels.report", *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=ROOT / "tests")


def test_the_report_refuses_at_once_what_would_fail_after_minutes_of_compiling(tmp_path):
    """It used to compile every Triton configuration (4 minutes) before looking for nvcc and the
    CUDA sources, with the tables held back until the end: a missing one died with nothing printed."""
    t0 = time.perf_counter()
    proc = _report(NANOFAST_CSRC=str(tmp_path / "missing"))
    assert time.perf_counter() - t0 < 60
    assert proc.returncode == 2 and proc.stdout == ""
    assert "CUDA sources" in proc.stderr and "--no-cuda" in proc.stderr and "[1/" not in proc.stderr
    proc = _report(NVCC=str(tmp_path / "no-nvcc"))
    assert proc.returncode == 2 and "nvcc" in proc.stderr and "--no-cuda" in proc.stderr
    proc = _report("--only", "no such kernel")
    assert proc.returncode == 2 and "matches no" in proc.stderr


def test_the_report_prints_progress_per_config_and_one_selected_table(tmp_path):
    out = tmp_path / "facts.md"
    proc = _report("--no-cuda", "--only", "fwd D=768 bf16 BLOCK", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| _")]
    assert len(rows) == 1 and rows[0].startswith("| _rms_norm_fwd_kernel | fwd D=768 bf16")
    assert "triton sm_90 [1/1] _rms_norm_fwd_kernel" in proc.stderr and "done" in proc.stderr
    assert out.read_text() == proc.stdout


def test_the_smoke_has_a_case_for_every_public_entry():
    from nanofast.kernels import registry, smoke

    assert set(smoke.CASES) == {e for op in registry.OPS.values() for e in op.checks}


def test_the_smoke_passes_and_fails_on_a_wrong_reference(monkeypatch):
    import io

    from nanofast.kernels import registry, smoke

    out = io.StringIO()
    assert smoke.run(["newton_schulz"], out=out) == 0, out.getvalue()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and all(": ok (" in line for line in lines), lines  # 2 entries x torch, triton
    op = registry.op("newton_schulz")
    ref = op.references["newton_schulz"]
    monkeypatch.setitem(op.references, "newton_schulz", lambda G, **kw: ref(G, **kw) * 1.01)
    out = io.StringIO()
    assert smoke.run(["newton_schulz"], out=out) == 2  # torch and triton both differ from it now
    assert out.getvalue().count("FAIL") == 2


def test_the_smoke_skips_what_this_machine_cannot_run_and_says_why(monkeypatch):
    from nanofast.kernels import smoke

    monkeypatch.setenv("CXX", "no-such-compiler")
    assert "no-such-compiler" in smoke.skip_reason("cuda")
    assert smoke.skip_reason("torch") is None and smoke.skip_reason("scaled_mm") is None
