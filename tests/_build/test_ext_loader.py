"""The extension loader (ntksap_fast/_build/loader.py): a compiled library is used only after a check in
another process, a library that crashes on its error path is refused (the loader then falls
back to PyTorch with one warning), a build whose check fails is redone with the system
compiler when $CXX/$CC point elsewhere, and importing ntksap_fast registers the ops.

Anything that could crash runs in a subprocess, so the test process cannot die.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from _requires_ext import ext_missing
from ntksap_fast._build import check as _ext_check
from ntksap_fast._build import config as _build_config
from ntksap_fast._build import loader as _ext
from ntksap_fast.select import topk

ROOT = Path(__file__).resolve().parents[2]

# A tiny library with the ops' schemas (SCHEMAS: the top-k ops implemented, the others only
# declared) that dies (SIGSEGV) where it should raise n_keep < 0, as a library built with a
# mismatched C++ toolchain does while formatting the error message.
BROKEN_SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <csignal>
static std::tuple<at::Tensor, at::Tensor> topk(const at::Tensor& s, const at::Tensor& m, int64_t k) {
  if (k < 0) std::raise(SIGSEGV);
  return {m.clone(), at::zeros({2}, at::kLong)};
}
static at::Tensor topk_(const at::Tensor& s, at::Tensor& m, int64_t k) {
  if (k < 0) std::raise(SIGSEGV);
  return at::zeros({2}, at::kLong);
}
TORCH_LIBRARY(ntksap_fast, lib) {
DEFS
}
TORCH_LIBRARY_IMPL(ntksap_fast, CPU, lib) {
  lib.impl("masked_topk", &topk);
  lib.impl("masked_topk_", &topk_);
}
""".replace("DEFS", "\n".join(f'  lib.def("{schema.split("::", 1)[1]}");' for schema in _ext_check.SCHEMAS.values()))


@pytest.fixture(scope="module")
def broken_lib(tmp_path_factory) -> str:
    """Path of the tiny crashing library, built (and loaded) in a subprocess only."""
    d = tmp_path_factory.mktemp("broken_ext")
    (d / "broken.cpp").write_text(BROKEN_SOURCE)
    script = (
        "from torch.utils import cpp_extension\n"
        f"cpp_extension.load(name='broken', sources=[{str(d / 'broken.cpp')!r}], "
        f"build_directory={str(d)!r}, is_python_module=False)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return str(d / "broken.so")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("NTKSAP_FAST_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def built_module() -> str:
    lib = _ext._prebuilt()
    if lib is None:
        ext_missing("ntksap_fast._C is not built")
    return lib


@pytest.mark.ext
def test_the_compiled_ops_are_there():
    """CI must not pass with the compiled ops missing or refused (their tests would fall back)."""
    if not topk.extension_available():
        ext_missing(f"the compiled ops are missing or refused: {topk.extension_error()}")
    assert _ext.verify(built_module()) == (True, "")


@pytest.mark.ext
def test_verify_accepts_the_built_module(cache):
    assert _ext.verify(built_module()) == (True, "")
    assert len(list((cache / "verdicts").iterdir())) == 1


@pytest.mark.slow
def test_verify_refuses_a_module_that_crashes_on_its_error_path(broken_lib, cache):
    ok, why = _ext.verify(broken_lib)
    assert not ok
    assert "crashed (SIGSEGV)" in why


@pytest.mark.slow
def test_verdicts_are_cached_per_file(broken_lib, cache, monkeypatch):
    first = _ext.verify(broken_lib)

    def no_subprocess(*a, **k):
        raise AssertionError("the cached verdict was not used")

    monkeypatch.setattr(_ext.subprocess, "run", no_subprocess)
    assert _ext.verify(broken_lib) == first
    os.utime(broken_lib)  # a rebuilt file (new mtime) is checked again
    with pytest.raises(AssertionError, match="cached verdict"):
        _ext.verify(broken_lib)


@pytest.mark.slow
def test_loader_refuses_a_crashing_module_and_falls_back(broken_lib, tmp_path):
    """In a fresh process: the loader is pointed at the crashing library as "the built module";
    it must not load it, say why, and fall back to PyTorch with one warning."""
    script = textwrap.dedent(
        f"""
        import os, warnings, torch
        os.environ["NTKSAP_FAST_NO_EXT"] = "1"  # the import of the package loads nothing
        from ntksap_fast._build import loader as ext
        del os.environ["NTKSAP_FAST_NO_EXT"]
        assert ext._state["auto"] is None and ext._state["lib"] is None
        ext._prebuilt = lambda: {broken_lib!r}
        ext.autoload()
        assert not ext.load()
        assert "refused" in ext.error() and "SIGSEGV" in ext.error(), ext.error()
        assert not ext.has_op("masked_topk"), "the refused library was loaded"
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            assert not ext.use_compiled("the top-k") and not ext.use_compiled("the top-k")
        assert len(rec) == 1 and "SIGSEGV" in str(rec[0].message)
        print("fallback ok")
        """
    )
    env = dict(os.environ, NTKSAP_FAST_CACHE_DIR=str(tmp_path), NTKSAP_FAST_NO_JIT="1")
    env.pop("NTKSAP_FAST_NO_EXT", None)
    env.pop("NTKSAP_FAST_REQUIRE_EXT", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "fallback ok" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.ext
def test_build_checked_rebuilds_with_the_system_compiler(broken_lib, cache, tmp_path, monkeypatch):
    """A build whose library crashes is redone with the system compiler when $CXX/$CC name
    another one; without an override there is nothing to retry and the reason is returned."""
    good = built_module()
    fake = tmp_path / "custom-g++"
    fake.write_text('#!/bin/sh\nexec g++ "$@"\n')
    fake.chmod(0o755)
    builds = []

    def build(env: dict) -> str:  # the custom compiler "makes" the crashing library
        builds.append(env)
        return good if env.get("CXX") else broken_lib

    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setenv("CC", str(fake))
    alt = _ext_check.system_compilers()
    assert alt is not None and str(fake) not in alt
    assert _ext_check.build_checked(build) == (good, "")
    assert builds == [{}, {"CC": alt[0], "CXX": alt[1]}]

    monkeypatch.delenv("CXX")
    monkeypatch.delenv("CC")
    assert _ext_check.system_compilers() is None
    builds.clear()
    lib, why = _ext_check.build_checked(build)
    assert lib is None and "SIGSEGV" in why and builds == [{}]


@pytest.mark.ext
def test_import_registers_the_ops(tmp_path):
    """`import ntksap_fast` alone registers torch.ops.ntksap_fast.* (no top-k call needed)."""
    built_module()
    script = (
        "import torch, ntksap_fast\n"
        "assert torch._C._dispatch_has_kernel_for_dispatch_key('ntksap_fast::masked_topk', 'CPU')\n"
        "out, status = torch.ops.ntksap_fast.masked_topk(torch.tensor([1.0, 3.0, 2.0]), torch.ones(3).bool(), 1)\n"
        "assert out.tolist() == [False, True, False] and status.tolist() == [3, 0]\n"
        "print('registered')\n"
    )
    env = dict(os.environ, NTKSAP_FAST_NO_JIT="1")
    env.pop("NTKSAP_FAST_NO_EXT", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0 and "registered" in proc.stdout, proc.stderr[-3000:]


def test_no_ext_env_skips_loading(tmp_path):
    env = dict(os.environ, NTKSAP_FAST_NO_EXT="1")
    script = "import torch, ntksap_fast\nprint(hasattr(torch.ops.ntksap_fast, 'masked_topk'))\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr[-3000:]


def test_require_ext_makes_the_fallback_an_error(monkeypatch):
    monkeypatch.delenv("NTKSAP_FAST_NO_EXT", raising=False)
    state = {"tried": True, "ok": False, "error": "no compiler", "warned": set(), "auto": None, "lib": None}
    monkeypatch.setattr(_ext, "_state", state)
    monkeypatch.setenv("NTKSAP_FAST_REQUIRE_EXT", "1")
    with pytest.raises(RuntimeError, match="no compiler.*NTKSAP_FAST_REQUIRE_EXT=1 is set"):
        _ext.use_compiled("the top-k")
    monkeypatch.setenv("NTKSAP_FAST_REQUIRE_EXT", "0")
    with pytest.warns(RuntimeWarning, match="no compiler.*NTKSAP_FAST_REQUIRE_EXT=1 makes this an error"):
        assert not _ext.use_compiled("the top-k")


# ------------------------------------------------------------------------------------------
# Which CUDA devices the compiled ops run on (faked capabilities: no GPU needed)
# ------------------------------------------------------------------------------------------
@pytest.fixture
def fake_gpu(monkeypatch):
    """Sets the built targets and the device's capability: ``fake_gpu(targets, (major, minor))``."""
    monkeypatch.delenv("NTKSAP_FAST_REQUIRE_EXT", raising=False)
    monkeypatch.setitem(_ext._state, "warned", set())

    def fake(targets: str, capability: tuple[int, int]) -> None:
        monkeypatch.setattr(_ext, "cuda_targets", lambda: _build_config.parse_arch_list(targets) if targets else ())
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)

    return fake


def _decide(device: str = "cuda:0") -> tuple[bool, list[str]]:
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        runs = _ext.cuda_code_for(torch.device(device), "top-k")
    return runs, [str(w.message) for w in rec]


@pytest.mark.parametrize("capability", [(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0), (12, 1), (13, 0)])
def test_default_build_runs_on_every_current_gpu(fake_gpu, capability):
    fake_gpu(_build_config.DEFAULT_CUDA_ARCH_LIST, capability)
    assert _decide() == (True, [])


def test_uncovered_device_falls_back_with_one_warning_per_capability(fake_gpu):
    fake_gpu("9.0", (8, 6))  # an H100-only build on an A10
    runs, msgs = _decide()
    assert not runs and len(msgs) == 1
    assert "compute capability 8.6" in msgs[0] and "built for sm_90" in msgs[0]
    assert 'TORCH_CUDA_ARCH_LIST="8.6"' in msgs[0] and "NTKSAP_FAST_REQUIRE_EXT=1" in msgs[0]
    assert _decide("cuda:1") == (False, [])  # same capability: said once
    fake_gpu("9.0", (7, 5))
    runs, msgs = _decide()
    assert not runs and len(msgs) == 1 and "7.5" in msgs[0]
    fake_gpu("9.0", (9, 0))
    assert _decide() == (True, [])


def test_ptx_runs_on_newer_devices_only(fake_gpu):
    fake_gpu("8.0+PTX", (9, 0))
    assert _decide() == (True, [])
    fake_gpu("8.0+PTX", (7, 5))
    assert not _decide()[0]


def test_build_without_cuda_says_so(fake_gpu):
    fake_gpu("", (9, 0))
    runs, msgs = _decide()
    assert not runs and len(msgs) == 1 and "a build without CUDA" in msgs[0]


def test_uncovered_device_is_an_error_under_require_ext(fake_gpu, monkeypatch):
    fake_gpu("9.0", (8, 6))
    monkeypatch.setenv("NTKSAP_FAST_REQUIRE_EXT", "1")
    with pytest.raises(RuntimeError, match="compute capability 8.6"):
        _decide()


def _cuobjdump():
    """Path of a cuobjdump (the CUDA toolkit's, or the one in triton's wheel), or None."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    triton = importlib.util.find_spec("triton")
    candidates = [os.path.join(home, "bin", "cuobjdump")]
    if triton is not None and triton.submodule_search_locations:
        candidates.append(os.path.join(triton.submodule_search_locations[0], "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


@pytest.mark.ext
def test_built_module_records_the_code_it_holds():
    """What the module says it holds (ntksap_fast_cuda_targets) is what cuobjdump finds in it:
    every SASS and PTX target, no more and no less. A build without CUDA records nothing."""
    lib = built_module()
    if not topk.extension_available():
        ext_missing(f"the compiled ops are missing or refused: {topk.extension_error()}")
    assert os.path.samefile(_ext._state["lib"], lib)
    recorded = {str(t) for t in _ext.cuda_targets()}
    if not _ext.has_kernel("ntksap_fast::masked_topk", "CUDA"):
        assert recorded == set()
        return
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump here (CUDA toolkit or triton) to read the module with")
    listed = set()
    for option, pattern in (("--list-elf", r"\.sm_(\d+)\."), ("--list-ptx", r"\.sm_(\d+)\.ptx")):
        out = subprocess.run([tool, option, lib], capture_output=True, text=True, check=True).stdout
        kind = "sm" if option == "--list-elf" else "compute"
        listed |= {f"{kind}_{num}" for num in re.findall(pattern, out)}
    assert recorded == listed


@pytest.mark.slow
@pytest.mark.ext
def test_check_skips_a_gpu_the_build_does_not_cover(tmp_path, monkeypatch):
    """The build's check runs the CUDA ops only on a visible GPU the library holds code for, so an
    install never fails because of the GPU at hand. Faked in the check process (sitecustomize):
    a CUDA device of capability 7.0 (older than every default target) is skipped; one of 9.0 is
    checked, which on this machine without a GPU must fail (so the skip above was the decision)."""
    lib = built_module()
    if not _ext.has_kernel("ntksap_fast::masked_topk", "CUDA"):
        pytest.skip("the built module has no CUDA ops (a build without CUDA): nothing to skip")
    if torch.cuda.is_available():
        pytest.skip("a real GPU is visible: the faked one would not be the only one")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    fake = (
        "import torch\ntorch.cuda.is_available = lambda: True\n"
        "torch.cuda.get_device_capability = lambda device=None: {cap}\n"
    )
    (tmp_path / "sitecustomize.py").write_text(fake.format(cap=(7, 0)))
    assert _ext_check._run_check(lib, timeout=600) == (True, "")
    (tmp_path / "sitecustomize.py").write_text(fake.format(cap=(9, 0)))
    ok, why = _ext_check._run_check(lib, timeout=600)
    assert not ok and "check failed" in why, why
