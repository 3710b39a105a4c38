"""The extension loader (ntksap_fast/_ext.py): a compiled library is used only after a check in
another process, a library that crashes on its error path is refused (the loader then falls
back to PyTorch with one warning), a build whose check fails is redone with the system
compiler when $CXX/$CC point elsewhere, and importing ntksap_fast registers the ops.

Anything that could crash runs in a subprocess, so the test process cannot die.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from _requires_ext import ext_missing
from ntksap_fast import _ext, topk

ROOT = Path(__file__).resolve().parent.parent

# A tiny library with the ops' schemas that dies (SIGSEGV) where it should raise n_keep < 0,
# as a library built with a mismatched C++ toolchain does while formatting the error message.
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
  lib.def("masked_topk(Tensor scores, Tensor mask, int n_keep) -> (Tensor, Tensor)");
  lib.def("masked_topk_(Tensor scores, Tensor(a!) mask, int n_keep) -> Tensor");
}
TORCH_LIBRARY_IMPL(ntksap_fast, CPU, lib) {
  lib.impl("masked_topk", &topk);
  lib.impl("masked_topk_", &topk_);
}
"""


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


def test_the_compiled_ops_are_there():
    """CI must not pass with the compiled ops missing or refused (their tests would fall back)."""
    if not topk.extension_available():
        ext_missing(f"the compiled ops are missing or refused: {topk.extension_error()}")
    assert _ext.verify(built_module()) == (True, "")


def test_verify_accepts_the_built_module(cache):
    assert _ext.verify(built_module()) == (True, "")
    assert len(list((cache / "verdicts").iterdir())) == 1


def test_verify_refuses_a_module_that_crashes_on_its_error_path(broken_lib, cache):
    ok, why = _ext.verify(broken_lib)
    assert not ok
    assert "crashed (SIGSEGV)" in why


def test_verdicts_are_cached_per_file(broken_lib, cache, monkeypatch):
    first = _ext.verify(broken_lib)

    def no_subprocess(*a, **k):
        raise AssertionError("the cached verdict was not used")

    monkeypatch.setattr(_ext.subprocess, "run", no_subprocess)
    assert _ext.verify(broken_lib) == first
    os.utime(broken_lib)  # a rebuilt file (new mtime) is checked again
    with pytest.raises(AssertionError, match="cached verdict"):
        _ext.verify(broken_lib)


def test_loader_refuses_a_crashing_module_and_falls_back(broken_lib, tmp_path):
    """In a fresh process: the loader is pointed at the crashing library as "the built module";
    it must not load it, say why, and fall back to PyTorch with one warning."""
    script = textwrap.dedent(
        f"""
        import importlib.util, warnings, torch
        spec = importlib.util.spec_from_file_location("ext_under_test", {str(ROOT / "ntksap_fast" / "_ext.py")!r})
        ext = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ext)
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
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "fallback ok" in proc.stdout, proc.stderr[-3000:]


def test_build_checked_rebuilds_with_the_system_compiler(broken_lib, cache, tmp_path, monkeypatch):
    """A build whose library crashes is redone with the system compiler when $CXX/$CC name
    another one; without an override there is nothing to retry and the reason is returned."""
    good = built_module()
    fake = tmp_path / "custom-g++"
    fake.write_text("#!/bin/sh\nexec g++ \"$@\"\n")
    fake.chmod(0o755)
    builds = []

    def build(env: dict) -> str:  # the custom compiler "makes" the crashing library
        builds.append(env)
        return good if env.get("CXX") else broken_lib

    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setenv("CC", str(fake))
    alt = _ext.system_compilers()
    assert alt is not None and str(fake) not in alt
    assert _ext.build_checked(build) == (good, "")
    assert builds == [{}, {"CC": alt[0], "CXX": alt[1]}]

    monkeypatch.delenv("CXX")
    monkeypatch.delenv("CC")
    assert _ext.system_compilers() is None
    builds.clear()
    lib, why = _ext.build_checked(build)
    assert lib is None and "SIGSEGV" in why and builds == [{}]


def test_import_registers_the_ops(tmp_path):
    """`import ntksap_fast` alone registers torch.ops.ntksap_fast.* (no top-k call needed)."""
    built_module()
    script = (
        "import torch, ntksap_fast\n"
        "assert torch._C._dispatch_has_kernel_for_dispatch_key('ntksap_fast::masked_topk', 'CPU')\n"
        "out, status = torch.ops.ntksap_fast.masked_topk(torch.tensor([1.0, 3.0, 2.0]), torch.ones(3, dtype=torch.bool), 1)\n"
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
