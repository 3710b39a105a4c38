"""The build configuration (ntksap_fast/_build/config.py): the CUDA arch list and the rule for which
devices a build has code for, one home for the sources and flags of the three build paths
(setup.py, the just-in-time build, CMake), and an sdist that carries every file the sources
include. No compiler or GPU needed: the builds are observed, not run."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import setuptools
import torch

import ntksap_fast
from ntksap_fast._build import config
from ntksap_fast._build import loader as _ext

ROOT = Path(__file__).resolve().parents[2]
T = config.CudaTarget


def test_default_arch_list_is_sass_per_family_plus_newest_ptx():
    targets = config.parse_arch_list(config.DEFAULT_CUDA_ARCH_LIST)
    assert [str(t) for t in targets] == ["sm_75", "sm_80", "sm_90", "sm_100", "sm_120", "compute_120"]


def test_default_targets_cover_every_arch_of_torchs_own_build():
    """Every GPU torch itself has kernels for gets code from the default build, and the PTX is
    at least as new as the newest of them."""
    archs = [a for a in torch.cuda.get_arch_list() if a.startswith("sm_")]
    if not archs:
        pytest.skip(f"torch {torch.__version__} is a build without CUDA (no arch list to cover)")
    targets = config.parse_arch_list(config.DEFAULT_CUDA_ARCH_LIST)
    caps = [(int(a[3:-1]), int(a[-1])) for a in archs]
    assert [c for c in caps if not config.runs_on(targets, c)] == []
    assert max((t.major, t.minor) for t in targets if t.ptx) >= max(caps)


def test_parse_arch_list():
    assert config.parse_arch_list(" 9.0+PTX 8.6;8.6 ") == (T(8, 6, False), T(9, 0, False), T(9, 0, True))
    for bad in ("Ampere", "8", "8.6+ptx", "sm_86", "9.0a"):
        with pytest.raises(ValueError, match="MAJOR.MINOR"):
            config.parse_arch_list(bad)
    with pytest.raises(ValueError, match="names no architecture"):
        config.parse_arch_list(" ; ")
    with pytest.raises(TypeError, match="arch list"):
        config.parse_arch_list(8.6)


def test_arch_list_from_the_environment_overrides_the_default():
    assert config.cuda_arch_list({}) == config.DEFAULT_CUDA_ARCH_LIST
    assert config.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": " "}) == config.DEFAULT_CUDA_ARCH_LIST
    assert config.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": "8.6"}) == "8.6"


@pytest.mark.parametrize(
    "capability, runs",
    [
        ((7, 5), True),  # T4: sm_75
        ((8, 0), True),  # A100
        ((8, 6), True),  # A10 / RTX 30xx: sm_80 SASS runs on 8.6
        ((8, 9), True),  # L4 / RTX 40xx
        ((9, 0), True),
        ((10, 0), True),
        ((10, 3), True),  # sm_100 SASS, same major
        ((12, 0), True),
        ((12, 1), True),
        ((13, 0), True),  # a newer GPU compiles the compute_120 PTX
        ((7, 0), False),  # V100: older than everything built
        ((11, 0), False),  # Thor: no SASS of major 11, and the PTX (12.0) is newer than it
    ],
)
def test_runs_on_default_targets(capability, runs):
    targets = config.parse_arch_list(config.DEFAULT_CUDA_ARCH_LIST)
    assert config.runs_on(targets, capability) is runs


def test_runs_on_rule():
    """SASS: same major, lower or equal minor. PTX: lower or equal capability. Nothing: never."""
    assert config.runs_on([T(8, 6, False)], (8, 9))
    assert not config.runs_on([T(8, 6, False)], (8, 0))  # SASS never runs on an older minor
    assert not config.runs_on([T(8, 0, False)], (9, 0))  # nor on another major
    assert config.runs_on([T(8, 0, True)], (9, 0)) and config.runs_on([T(8, 0, True)], (8, 0))
    assert not config.runs_on([T(9, 0, True)], (8, 9))
    assert not config.runs_on([], (9, 0))


def test_recorded_targets_round_trip():
    targets = config.parse_arch_list("7.5;9.0;12.0+PTX")
    name, value = config.targets_define(targets).split("=")
    assert name == config.TARGETS_MACRO and value == "sm_75/sm_90/sm_120/compute_120"
    assert "," not in value  # nvcc would split a -D value at commas
    assert config.parse_targets(value) == targets
    assert config.parse_targets("") == ()
    with pytest.raises(ValueError, match="sm_XY or compute_XY"):
        config.parse_targets("sm_90a")
    assert config.parse_arch_list(config.arch_list_of(targets)) == targets


def test_fit_to_compiler_drops_what_nvcc_lacks_and_keeps_a_ptx():
    wanted = config.parse_arch_list(config.DEFAULT_CUDA_ARCH_LIST)
    cuda12_0 = frozenset({"sm_75", "sm_80", "sm_90", "compute_75", "compute_80", "compute_90"})
    kept, dropped = config.fit_to_compiler(wanted, cuda12_0)
    assert [str(t) for t in kept] == ["sm_75", "sm_80", "sm_90", "compute_90"]
    assert [str(t) for t in dropped] == ["sm_100", "sm_120", "compute_120"]
    assert config.fit_to_compiler(wanted, None) == (wanted, ())


def test_build_targets_fit_only_the_default_list():
    """A list the user gave is built as given (nvcc says what it cannot build); the default list
    is fitted to the nvcc, or kept whole when nvcc cannot say what it builds."""
    nowhere = "/nonexistent/nvcc"
    assert config.build_targets(nowhere, {"TORCH_CUDA_ARCH_LIST": "8.6"}) == ((T(8, 6, False),), ())
    assert config.build_targets(nowhere, {}) == (config.parse_arch_list(config.DEFAULT_CUDA_ARCH_LIST), ())


def test_nvcc_here_builds_the_whole_default_list():
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not os.access(nvcc, os.X_OK):
        pytest.skip("no nvcc on this machine")
    wanted = config.parse_arch_list(config.DEFAULT_CUDA_ARCH_LIST)
    assert config.fit_to_compiler(wanted, config.nvcc_codes(nvcc)) == (wanted, ())


def test_gencode_flags_equal_torchs_for_the_same_list(monkeypatch):
    """setup.py and the JIT pass our -gencode flags; CMake takes torch's for arch_list_of(...):
    both are the same set."""
    from torch.utils import cpp_extension

    targets = config.parse_arch_list(config.DEFAULT_CUDA_ARCH_LIST)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", config.arch_list_of(targets))
    assert sorted(config.gencode_flags(targets)) == sorted(cpp_extension._get_cuda_arch_flags())
    # and torch adds none of its own when ours are there
    assert cpp_extension._get_cuda_arch_flags(config.nvcc_flags(targets)) == []


def test_env_flag():
    for value, on in (
        ("1", True),
        ("yes", True),
        (" TRUE ", True),
        ("0", False),
        ("", False),
        ("false", False),
        (" No", False),
    ):
        assert config.env_flag("X", {"X": value}) is on, value
    assert config.env_flag("X", {}) is False


def _fake_nvcc(home: Path) -> str:
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\nexit 1\n")
    nvcc.chmod(0o755)
    return str(nvcc)


def test_find_nvcc_one_rule(tmp_path, monkeypatch):
    """$CUDA_HOME, then $CUDA_PATH, then /usr/local/cuda: the first with an executable bin/nvcc (never
    the nvcc on $PATH)."""
    monkeypatch.setattr(config, "DEFAULT_CUDA_HOME", str(tmp_path / "default"))
    home, path = tmp_path / "home", tmp_path / "path"
    on_path = Path(_fake_nvcc(tmp_path / "on_path")).parent
    env = {"CUDA_HOME": str(home), "CUDA_PATH": str(path), "PATH": str(on_path)}
    assert config.nvcc_candidates(env) == [str(d / "bin" / "nvcc") for d in (home, path, tmp_path / "default")]
    assert config.find_nvcc(env) is None
    default = _fake_nvcc(tmp_path / "default")
    assert config.find_nvcc(env) == default == config.find_nvcc({})
    on_cuda_path = _fake_nvcc(path)
    assert config.find_nvcc(env) == on_cuda_path
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "nvcc").write_text("not executable")
    assert config.find_nvcc(env) == str(path / "bin" / "nvcc")
    (home / "bin" / "nvcc").chmod(0o755)
    assert config.find_nvcc(env) == str(home / "bin" / "nvcc")


def test_cuda_compiler_says_why_not(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "DEFAULT_CUDA_HOME", str(tmp_path / "none"))
    nvcc = _fake_nvcc(tmp_path / "cuda")
    assert config.cuda_compiler("13.0", {"CUDA_HOME": str(tmp_path / "cuda")}) == (nvcc, "")
    assert config.cuda_compiler("13.0", {"CUDA_HOME": str(tmp_path / "cuda"), "NTKSAP_FAST_NO_CUDA": "1"}) == (
        None,
        "NTKSAP_FAST_NO_CUDA is set",
    )
    assert config.cuda_compiler(None, {"CUDA_HOME": str(tmp_path / "cuda")}) == (None, "torch is a build without CUDA")
    none, why = config.cuda_compiler("13.0", {})
    assert none is None and why == f"nvcc not found (looked for {tmp_path / 'none' / 'bin' / 'nvcc'}; set CUDA_HOME)"


def test_sources_cover_every_compiled_file():
    src = config.sources(ROOT)
    on_disk = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cpp", ".cu")}
    assert set(src.cpp) | set(src.cuda) | {src.module, src.test} == on_disk
    assert src.module not in src.cpp and src.test not in src.cpp
    assert config.sources(ROOT / "nowhere").cpp == ()


# ------------------------------------------------------------------------------------------
# The three build paths read the same sources and flags
# ------------------------------------------------------------------------------------------
def _setup_extensions(monkeypatch, capsys, **env) -> tuple[dict, str]:
    """Runs setup.py with setuptools.setup replaced: the keyword arguments it got and stderr."""
    from torch.utils import cpp_extension

    captured: dict = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME)  # setup.py sets it
    for name in ("NTKSAP_FAST_NO_CUDA", "NTKSAP_FAST_NO_EXT_BUILD", "NTKSAP_FAST_REQUIRE_EXT", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    return captured, capsys.readouterr().err


def test_setup_py_builds_the_configured_sources_and_flags(monkeypatch, capsys):
    nvcc = "/usr/local/cuda/bin/nvcc"
    if not (torch.version.cuda and os.access(nvcc, os.X_OK)):
        pytest.skip("needs nvcc and a CUDA build of torch (setup.py builds C++ only otherwise)")
    kw, _ = _setup_extensions(monkeypatch, capsys, CUDA_HOME="/usr/local/cuda")
    (ext,) = kw["ext_modules"]
    src = config.sources(ROOT)
    targets = config.parse_arch_list(config.DEFAULT_CUDA_ARCH_LIST)
    assert sorted(ext.sources) == sorted([*src.cpp, src.module, *src.cuda])
    assert ext.extra_compile_args == {"cxx": list(config.CXX_FLAGS), "nvcc": config.nvcc_flags(targets)}
    assert ext.extra_link_args == list(config.LINK_FLAGS)
    kw, _ = _setup_extensions(monkeypatch, capsys, CUDA_HOME="/usr/local/cuda", TORCH_CUDA_ARCH_LIST="8.6")
    assert kw["ext_modules"][0].extra_compile_args["nvcc"] == config.nvcc_flags([T(8, 6, False)])


def test_setup_py_without_a_compiler_installs_without_the_ops(monkeypatch, capsys):
    kw, err = _setup_extensions(monkeypatch, capsys, CXX="/nonexistent/c++", CC="/nonexistent/cc")
    assert kw["ext_modules"] == []
    assert err.count("WITHOUT the compiled ops") == 1
    assert "/nonexistent/c++" in err and "NTKSAP_FAST_REQUIRE_EXT=1" in err
    with pytest.raises(RuntimeError, match="cannot be built: no C\\+\\+ compiler"):
        _setup_extensions(monkeypatch, capsys, CXX="/nonexistent/c++", NTKSAP_FAST_REQUIRE_EXT="1")


def test_jit_build_uses_the_configured_sources_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("NTKSAP_FAST_CACHE_DIR", str(tmp_path))
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        raise RuntimeError("observed")

    monkeypatch.setattr(_ext.subprocess, "run", fake_run)
    monkeypatch.setattr(_ext.torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="observed"):
        _ext._jit_build({})

    (cmd,) = calls
    flags, files = json.loads(cmd[4]), cmd[5:]
    src = config.sources(ROOT)
    assert files == [str(ROOT / p) for p in src.cpp]
    assert flags == {
        "cxx": list(config.CXX_FLAGS),
        "link": list(config.LINK_FLAGS),
        "nvcc": None,
        "include": str(ROOT / config.INCLUDE_DIR),
    }


def test_jit_build_with_a_gpu_takes_the_nvcc_of_the_one_rule(monkeypatch, tmp_path):
    """With a GPU (faked) the just-in-time build compiles the CUDA sources with config.find_nvcc's
    nvcc, whose toolkit it hands to torch's cpp_extension as CUDA_HOME."""
    if not torch.version.cuda:
        pytest.skip(f"torch {torch.__version__} is a build without CUDA (the JIT builds C++ only)")
    monkeypatch.setenv("NTKSAP_FAST_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(config, "DEFAULT_CUDA_HOME", str(tmp_path / "none"))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.delenv("NTKSAP_FAST_NO_CUDA", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "toolkit"))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    _fake_nvcc(tmp_path / "toolkit")
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append((cmd, kwargs["env"]))
        raise RuntimeError("observed")

    monkeypatch.setattr(_ext.subprocess, "run", fake_run)
    monkeypatch.setattr(_ext.torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="observed"):
        _ext._jit_build({})
    ((cmd, env),) = calls
    src = config.sources(ROOT)
    assert cmd[5:] == [str(ROOT / p) for p in (*src.cpp, *src.cuda)]
    assert json.loads(cmd[4])["nvcc"] == config.nvcc_flags([T(8, 6, False)])
    assert env["CUDA_HOME"] == str(tmp_path / "toolkit")


def test_cmake_reads_the_configuration(tmp_path):
    """CMakeLists.txt lists no source or flag of its own, and the file it includes holds the
    configured ones (with nvcc: the targets and the record)."""
    text = (ROOT / "CMakeLists.txt").read_text()
    code = "\n".join(line.split("#")[0] for line in text.splitlines())
    assert not re.search(r"csrc/\w+\.(cpp|cu)|-O3|-gencode|\b90\b|/usr/local/cuda|CUDA_HOME|CUDA_PATH", code)
    home = subprocess.run(
        [sys.executable, str(ROOT / "ntksap_fast" / "_build" / "config.py"), "--cuda-home"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    nvcc = config.find_nvcc()
    assert home == (os.path.dirname(os.path.dirname(nvcc)) if nvcc else "")
    out = tmp_path / "config.cmake"
    cmd = [sys.executable, str(ROOT / "ntksap_fast" / "_build" / "config.py"), "--cmake", str(out)]
    nvcc = "/usr/local/cuda/bin/nvcc"
    with_nvcc = os.access(nvcc, os.X_OK)
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA_ARCH_LIST"}
    subprocess.run(cmd + (["--nvcc", nvcc] if with_nvcc else []), check=True, env=env)
    values = dict(re.findall(r'set\((\w+) "([^"]*)"\)', out.read_text()))
    src = config.sources(ROOT)
    assert values["NTKSAP_FAST_CPP_SOURCES"].split(";") == [str(ROOT / p) for p in src.cpp]
    assert values["NTKSAP_FAST_CUDA_SOURCES"].split(";") == [str(ROOT / p) for p in src.cuda]
    assert values["NTKSAP_FAST_CXX_FLAGS"].split(";") == list(config.CXX_FLAGS)
    if with_nvcc:
        targets = config.parse_arch_list(config.DEFAULT_CUDA_ARCH_LIST)
        assert values["NTKSAP_FAST_NVCC_BASE_FLAGS"].split(";") == config.nvcc_base_flags(targets)
        assert config.parse_arch_list(values["NTKSAP_FAST_TORCH_CUDA_ARCH_LIST"]) == targets


# ------------------------------------------------------------------------------------------
# The sdist carries everything the build needs
# ------------------------------------------------------------------------------------------
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def test_sdist_carries_every_source_and_what_it_includes(tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(
        ROOT,
        tree,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "build",
            "dist",
            "cmake-build",
            "*.egg-info",
            "__pycache__",
            "*.so",
            ".pytest_cache",
            ".benchmarks",
            "results",
        ),
    )
    env = dict(os.environ, NTKSAP_FAST_NO_EXT_BUILD="1")
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path / "dist")],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sdist,) = (tmp_path / "dist").glob("ntksap_fast-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    src = config.sources(ROOT)
    needed = {
        *src.cpp,
        *src.cuda,
        src.module,
        src.test,
        "LICENSE",
        "README.md",
        "setup.py",
        "pyproject.toml",
        "CMakeLists.txt",
        "ntksap_fast/_build/config.py",
        "ntksap_fast/_build/loader.py",
        "ntksap_fast/_build/check.py",
        "ntksap_fast/py.typed",
    }
    needed |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "triton_kernels").glob("*.py")}
    for path in [*src.cpp, *src.cuda, src.module, src.test]:
        todo = [ROOT / path]
        while todo:
            file = todo.pop()
            for inc in _INCLUDE.findall(file.read_text()):
                hits = [d / inc for d in (file.parent, ROOT / config.INCLUDE_DIR) if (d / inc).is_file()]
                assert hits, f"{file.name} includes {inc}, which is not in the tree"
                rel = hits[0].resolve().relative_to(ROOT).as_posix()
                if rel not in needed:
                    needed.add(rel)
                    todo.append(hits[0].resolve())
    assert sorted(needed - names) == []
    assert not [n for n in names if n.endswith(".so")]


# ------------------------------------------------------------------------------------------
# Metadata and tooling
# ------------------------------------------------------------------------------------------
def _pyproject() -> dict:
    tomllib = pytest.importorskip(
        "tomllib",
        reason="reading pyproject.toml needs tomllib (standard library from Python 3.11; 3.10 has none)",
    )
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_version_is_written_once():
    """pyproject.toml holds the version; the installed metadata and ntksap_fast.__version__ (so
    `ntksap --version` and the masks' package_version) read it back. (After a change of version,
    `make install` reinstalls: the Makefile's install depends on pyproject.toml.)"""
    declared = _pyproject()["project"]["version"]
    assert importlib.metadata.version("ntksap_fast") == declared == ntksap_fast.__version__
    written = re.compile(r"""\bversion\s*=\s*["']\d|__version__\s*=\s*["']""")
    sources = [ROOT / "setup.py", *(ROOT / "ntksap_fast").rglob("*.py")]
    assert [p.name for p in sources if written.search(p.read_text())] == []


def test_the_ruff_of_make_lint_is_the_ruff_of_pre_commit():
    (pinned,) = [r for r in _pyproject()["project"]["optional-dependencies"]["test"] if r.startswith("ruff")]
    hooks = (ROOT / ".pre-commit-config.yaml").read_text()
    assert re.findall(r'"(ruff[^"]*)"', hooks) == [pinned, pinned]
