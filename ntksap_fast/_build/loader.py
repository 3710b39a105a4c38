"""Loading the compiled extension ``ntksap_fast._C`` (the ops under ``torch.ops.ntksap_fast``).

A compiled library is trusted only after it passed a check in a separate process
(:func:`verify`, in ``check``): its ops have the schemas this package expects, give the
right answers on small cases, report data errors in their status and raise an ordinary Python
exception on a bad argument. A library built with a C++ toolchain whose runtime does not match
torch's dies right there (seen with a custom GCC in ``$CXX``: SIGSEGV in libstdc++ while
formatting the error message), so the check must run in another process; its verdict is cached
per library file.

* :func:`autoload` (run when ``ntksap_fast`` is imported) imports the built module if present and
  verified, which registers the ops; it never builds.
* :func:`load` does the same, and otherwise builds the extension just in time with ninja
  (``NTKSAP_FAST_NO_JIT=1`` skips that), checked the same way; if the check fails and
  ``$CXX``/``$CC`` name a compiler other than the system's, it builds once more with the system
  compiler (:func:`build_checked`, also used by setup.py). If nothing loads, :func:`error` says
  why and the callers use their PyTorch implementations, warning once each
  (:func:`use_compiled`).
* ``NTKSAP_FAST_NO_EXT=1`` forces the PyTorch implementations; ``NTKSAP_FAST_REQUIRE_EXT=1``
  makes them an error instead (:func:`use_compiled` and :func:`cuda_code_for` raise).
* CUDA code is used only on devices the build holds code for (:func:`cuda_code_for`: the
  targets the library recorded, :func:`recorded_targets`, by ``_build_config.runs_on``);
  elsewhere the PyTorch implementation runs, with one warning per device capability.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch


def _sibling(name: str):
    """The package's module ``name``; by path when this file was loaded by path (setup.py, in the
    middle of a build, when the package is not importable)."""
    if __package__:
        return importlib.import_module(f"{__package__}.{name}")
    spec = importlib.util.spec_from_file_location(
        f"_ntksap_fast{name}", os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_build_config = _sibling("config")
_ext_check = _sibling("check")
SCHEMAS, verify, cache_dir = _ext_check.SCHEMAS, _ext_check.verify, _ext_check.cache_dir

__all__ = [
    "autoload",
    "load",
    "error",
    "has_kernel",
    "has_op",
    "use_compiled",
    "cuda_targets",
    "cuda_code_for",
    "recorded_targets",
    "require_ext",
    "verify",
    "build_checked",
    "system_compilers",
    "cache_dir",
    "SCHEMAS",
]

_lock = threading.Lock()
# lib: path of the library whose ops are registered (set once one loaded).
_state: dict = {"tried": False, "ok": False, "error": None, "warned": set(), "auto": None, "lib": None}

_REQUIRE_HINT = "NTKSAP_FAST_REQUIRE_EXT=1 makes this an error"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no")


def require_ext() -> bool:
    """Whether the compiled ops are mandatory (``NTKSAP_FAST_REQUIRE_EXT=1``): a build without
    them fails, and so does a call that would fall back to PyTorch."""
    return _flag("NTKSAP_FAST_REQUIRE_EXT")


def system_compilers() -> Optional[tuple[str, str]]:
    """``(cc, cxx)`` of the system C/C++ compiler when ``$CC``/``$CXX`` name another one, else
    None (nothing overridden, or no other compiler found)."""
    chosen = [os.environ.get(v) for v in ("CXX", "CC")]
    if not any(chosen):
        return None
    current = {os.path.realpath(shutil.which(c) or c) for c in chosen if c}
    pairs = [("/usr/bin/cc", "/usr/bin/c++"), ("/usr/bin/gcc", "/usr/bin/g++"),
             (shutil.which("cc"), shutil.which("c++")), (shutil.which("gcc"), shutil.which("g++"))]
    for cc, cxx in pairs:
        if cc and cxx and os.access(cc, os.X_OK) and os.access(cxx, os.X_OK):
            if os.path.realpath(cxx) not in current and os.path.realpath(cc) not in current:
                return cc, cxx
    return None


def build_checked(build: Callable[[dict], str]) -> tuple[Optional[str], str]:
    """Builds with ``build(env)`` (env: compiler variables to set, ``{}`` first; returns the
    library path) and verifies the result. If the check fails and ``$CC``/``$CXX`` name a
    compiler other than the system's, builds once more with ``{"CC": cc, "CXX": cxx}`` of the
    system compiler. Returns ``(library, "")`` or ``(None, why)``."""
    compiler = os.environ.get("CXX") or "c++"
    lib = build({})
    ok, why = verify(lib)
    if ok:
        return lib, ""
    why = f"built with {compiler}, {why}"
    alt = system_compilers()
    if alt is None:
        return None, why
    cc, cxx = alt
    lib = build({"CC": cc, "CXX": cxx})
    ok, why2 = verify(lib)
    if ok:
        return lib, ""
    return None, f"{why}; rebuilt with {cxx}, {why2}"


# Run as `python -c _JIT_SCRIPT <build dir> <flags json> <sources...>`: builds (and loads, in
# that process only) the extension; the library is <build dir>/ntksap_fast_C_jit.so.
_JIT_SCRIPT = r"""
import json, sys
from torch.utils import cpp_extension
build_dir, flags, sources = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
cpp_extension.load(
    name="ntksap_fast_C_jit", sources=sources, build_directory=build_dir,
    extra_cflags=flags["cxx"], extra_ldflags=flags["link"], extra_cuda_cflags=flags["nvcc"],
    extra_include_paths=[flags["include"]], with_cuda=flags["nvcc"] is not None,
    is_python_module=False, verbose=False)
"""


def _jit_build(env: dict) -> str:
    """Builds the extension just in time (CPU ops, plus CUDA when a GPU and nvcc are present) in
    a separate process, with the sources and flags of ``_build_config``; returns the library
    path."""
    root_dir = Path(__file__).resolve().parents[2]
    src = _build_config.sources(root_dir)
    if not src.cpp:
        raise RuntimeError("csrc/ sources not found next to the package (the just-in-time build needs a source checkout)")
    from torch.utils import cpp_extension  # (imported only now: it warns where CUDA is missing)
    with_cuda = bool(src.cuda and torch.cuda.is_available() and torch.version.cuda and cpp_extension.CUDA_HOME)
    nvcc_flags = None
    if with_cuda:
        nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
        targets, _ = _build_config.build_targets(nvcc)
        nvcc_flags = _build_config.nvcc_flags(targets)
    flags = {
        "cxx": list(_build_config.CXX_FLAGS), "link": list(_build_config.LINK_FLAGS), "nvcc": nvcc_flags,
        "include": str(root_dir / _build_config.INCLUDE_DIR),
    }
    files = [str(root_dir / p) for p in (*src.cpp, *(src.cuda if with_cuda else ()))]
    compiler = env.get("CXX") or os.environ.get("CXX") or "c++"
    key = f"{torch.__version__}|{compiler}|{json.dumps(flags, sort_keys=True)}|{files[0]}"
    tag = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = cache_dir()
    build_dir = str(root / "jit" / tag) if root is not None else tempfile.mkdtemp(prefix="ntksap_fast_jit_")
    os.makedirs(build_dir, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-c", _JIT_SCRIPT, build_dir, json.dumps(flags), *files],
        capture_output=True, text=True, env={**os.environ, **env, "NTKSAP_FAST_IN_CHECK": "1"},
    )
    lib = os.path.join(build_dir, "ntksap_fast_C_jit.so")
    if proc.returncode != 0 or not os.path.isfile(lib):
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"exit status {proc.returncode}")
    return lib


def _prebuilt() -> Optional[str]:
    """Path of the built module ``ntksap_fast._C``, or None."""
    try:
        spec = importlib.util.find_spec("ntksap_fast._C")
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin and os.path.isfile(spec.origin) else None


def _load_prebuilt(errors: list[str]) -> bool:
    """Imports ``ntksap_fast._C`` if present and verified; appends why not to ``errors``."""
    lib = _prebuilt()
    if lib is None:
        errors.append("ntksap_fast._C is not built")
        return False
    ok, why = verify(lib)
    if not ok:
        errors.append(f"ntksap_fast._C ({lib}) refused: {why}")
        return False
    try:
        importlib.import_module("ntksap_fast._C")  # registers the ops on import
    except Exception as exc:  # ImportError, or an ABI mismatch surfacing as OSError
        errors.append(f"import ntksap_fast._C failed ({type(exc).__name__}: {exc})")
        return False
    _state["lib"] = lib
    return True


def autoload() -> None:
    """Registers the ops if the built module is present and verified (never builds)."""
    if _state["tried"] or _state["auto"] is not None or _flag("NTKSAP_FAST_NO_EXT") or _flag("NTKSAP_FAST_IN_CHECK"):
        return
    with _lock:
        errors: list[str] = []
        if _load_prebuilt(errors):
            _state.update(tried=True, ok=True, error=None)
        _state["auto"] = errors


def load() -> bool:
    """Imports (or builds) the extension once; whether it loaded."""
    if _state["tried"]:
        return _state["ok"]
    with _lock:
        if _state["tried"]:
            return _state["ok"]
        # (autoload already tried the built module when it left its errors)
        errors: list[str] = list(_state["auto"] or [])
        ok = _state["auto"] is None and _load_prebuilt(errors)
        if not ok and _flag("NTKSAP_FAST_IN_CHECK"):
            errors.append("not loaded inside a check or build process")
        elif not ok and _flag("NTKSAP_FAST_NO_JIT"):
            errors.append("just-in-time build disabled by NTKSAP_FAST_NO_JIT")
        elif not ok:
            try:
                lib, why = build_checked(_jit_build)
                if lib is None:
                    errors.append(f"just-in-time build refused: {why}")
                else:
                    torch.ops.load_library(lib)
                    _state["lib"] = lib
                    ok = True
            except Exception as exc:
                errors.append(f"just-in-time build failed ({type(exc).__name__}: {exc})")
        _state.update(tried=True, ok=ok, error=None if ok else "; ".join(errors))
        return ok


def error() -> str | None:
    """Why the extension did not load, or None."""
    load()
    return _state["error"]


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether op ``"ntksap_fast::name"`` has a kernel for ``dispatch_key`` (``"CPU"``/``"CUDA"``)."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key)
    except RuntimeError:
        return False


def has_op(name: str) -> bool:
    """Whether ``torch.ops.ntksap_fast.<name>`` is registered."""
    try:
        getattr(torch.ops.ntksap_fast, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def use_compiled(what: str) -> bool:
    """Whether to use the compiled ops for ``what`` (e.g. "the top-k"); False if they did not
    load, with one warning per process (``RuntimeError`` under ``NTKSAP_FAST_REQUIRE_EXT=1``)."""
    if _flag("NTKSAP_FAST_NO_EXT"):
        return False
    if load():
        return True
    message = (
        f"ntksap_fast: compiled extension unavailable ({_state['error']}), using the slower PyTorch "
        f"implementations (first for {what}). Reinstall with a working C++ compiler (and nvcc for "
        "the CUDA ops) to build it; "
    )
    if require_ext():
        raise RuntimeError(message + "NTKSAP_FAST_REQUIRE_EXT=1 is set, so this is an error")
    if "unavailable" not in _state["warned"]:
        _state["warned"].add("unavailable")
        warnings.warn(message + _REQUIRE_HINT, RuntimeWarning, stacklevel=3)
    return False


def recorded_targets(lib: str) -> str:
    """What the library ``lib`` recorded about its GPU code (C function
    ``ntksap_fast_cuda_targets``, csrc/cuda/build_targets.cu), e.g. ``"sm_90/compute_90"``;
    ``""`` for a build without CUDA."""
    try:
        record = ctypes.CDLL(lib).ntksap_fast_cuda_targets
    except (AttributeError, OSError):  # no such symbol; a library that cannot be opened
        return ""
    record.restype = ctypes.c_char_p
    return record().decode()


def cuda_targets() -> tuple:
    """The GPU code the loaded ops hold (``_build_config.CudaTarget`` tuple), as their build
    recorded it; empty when no library is loaded or it was built without CUDA."""
    lib = _state.get("lib")
    if not lib:
        return ()
    cached = _state.get("targets")  # (library, its targets): read once per library
    if cached is None or cached[0] != lib:
        cached = _state["targets"] = (lib, _build_config.parse_targets(recorded_targets(lib)))
    return cached[1]


def cuda_code_for(device: torch.device, what: str) -> bool:
    """Whether the compiled CUDA ops hold code for ``device`` (SASS of its major and a lower or
    equal minor, or PTX no newer than it). If not: False, with one warning per device
    capability naming it and how to rebuild (``RuntimeError`` under ``NTKSAP_FAST_REQUIRE_EXT=1``)."""
    capability = tuple(torch.cuda.get_device_capability(device))
    targets = cuda_targets()
    if _build_config.runs_on(targets, capability):
        return True
    major, minor = capability
    built = ", ".join(map(str, targets)) or "no GPU code (a build without CUDA)"
    message = (
        f"ntksap_fast: the compiled ops hold no code for CUDA device {device} (compute capability "
        f"{major}.{minor}; built for {built}), using the slower PyTorch {what}. To build them for it, "
        f"reinstall from source with nvcc: TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\" pip install "
        f"--no-build-isolation --no-deps --force-reinstall <ntksap_fast source directory or sdist>; "
    )
    if require_ext():
        raise RuntimeError(message + "NTKSAP_FAST_REQUIRE_EXT=1 is set, so this is an error")
    key = ("cuda", capability)
    if key not in _state["warned"]:
        _state["warned"].add(key)
        warnings.warn(message + _REQUIRE_HINT, RuntimeWarning, stacklevel=3)
    return False
