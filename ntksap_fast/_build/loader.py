"""Loading the compiled extension ``ntksap_fast._C`` (the ops under ``torch.ops.ntksap_fast``).

A compiled library is trusted only after it passed a check in a separate process
(:func:`verify`, in ``check``): every op the package calls has the schema this package expects,
gives the right answers on small cases, reports data errors in its status and raises an ordinary
Python exception on a bad argument. A library built with a C++ toolchain whose runtime does not match
torch's dies right there (seen with a custom GCC in ``$CXX``: SIGSEGV in libstdc++ while
formatting the error message), so the check must run in another process; its verdict is cached
per library file.

* :func:`autoload` (run when ``ntksap_fast`` is imported) imports the built module if present and
  verified, which registers the ops; it never builds.
* :func:`load` does the same, and otherwise builds the extension just in time with ninja
  (``NTKSAP_FAST_NO_JIT=1`` skips that), checked the same way; if the check fails and
  ``$CXX``/``$CC`` name a compiler other than the system's, it builds once more with the system
  compiler (``check.build_checked``, also used by setup.py). If nothing loads, :func:`error` says
  why and the callers use their PyTorch implementations, warning once each
  (:func:`use_compiled`).
* :func:`on_load` runs what must follow a load (the Python modules' fake implementations of the
  ops), whenever the library loads.
* ``NTKSAP_FAST_NO_EXT=1`` forces the PyTorch implementations; ``NTKSAP_FAST_REQUIRE_EXT=1``
  makes them an error instead (:func:`use_compiled` and :func:`cuda_code_for` raise).
* CUDA code is used only on devices the build holds code for (:func:`cuda_code_for`: the
  targets the library recorded, ``config.recorded_targets``, by ``config.runs_on``);
  elsewhere the PyTorch implementation runs, with one warning per device capability.

Always imported as part of the package (setup.py loads only ``config`` and ``check``, by path).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from . import check as _ext_check
from . import config as _build_config

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
    "require_ext",
    "on_load",
    "verify",
    "cache_dir",
    "SCHEMAS",
]

_lock = threading.Lock()
# lib: path of the library whose ops are registered (set once one loaded).
_state: dict = {"tried": False, "ok": False, "error": None, "warned": set(), "auto": None, "lib": None}

_REQUIRE_HINT = "NTKSAP_FAST_REQUIRE_EXT=1 makes this an error"
# Called once the ops are registered (on_load).
_on_load: list[Callable[[], None]] = []


def require_ext() -> bool:
    """Whether the compiled ops are mandatory (``NTKSAP_FAST_REQUIRE_EXT=1``): a build without
    them fails, and so does a call that would fall back to PyTorch."""
    return _build_config.env_flag("NTKSAP_FAST_REQUIRE_EXT")


def on_load(register: Callable[[], None]) -> None:
    """Calls ``register()`` once the compiled ops are registered: now if they are, else right after
    they load (the built module at import, or a just-in-time build later). For what must accompany
    the ops in Python, such as their fake implementations (``torch.library.register_fake``)."""
    _on_load.append(register)
    if _state["lib"] is not None:
        register()


def _loaded(lib: str) -> None:
    """Records that ``lib``'s ops are registered and runs the :func:`on_load` callbacks."""
    _state["lib"] = lib
    for register in _on_load:
        register()


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
    """Builds the extension just in time (CPU ops, plus CUDA when a GPU and an nvcc are present:
    ``config.cuda_compiler``, the rule of setup.py) in a separate process, with the sources and
    flags of ``_build_config``; returns the library path."""
    root_dir = Path(__file__).resolve().parents[2]
    src = _build_config.sources(root_dir)
    if not src.cpp:
        raise RuntimeError(
            "csrc/ sources not found next to the package (the just-in-time build needs a source checkout)"
        )
    nvcc, _ = _build_config.cuda_compiler(torch.version.cuda)
    with_cuda = bool(src.cuda and nvcc and torch.cuda.is_available())
    nvcc_flags = None
    if with_cuda:
        targets, _ = _build_config.build_targets(nvcc)
        nvcc_flags = _build_config.nvcc_flags(targets)
        # torch's cpp_extension compiles with $CUDA_HOME/bin/nvcc: the toolkit of the nvcc found.
        env = {**env, "CUDA_HOME": os.path.dirname(os.path.dirname(nvcc))}
    flags = {
        "cxx": list(_build_config.CXX_FLAGS),
        "link": list(_build_config.LINK_FLAGS),
        "nvcc": nvcc_flags,
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
        capture_output=True,
        text=True,
        env={**os.environ, **env, "NTKSAP_FAST_IN_CHECK": "1"},
    )
    lib = os.path.join(build_dir, "ntksap_fast_C_jit.so")
    if proc.returncode != 0 or not os.path.isfile(lib):
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"exit status {proc.returncode}")
    return lib


def _prebuilt() -> str | None:
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
    _loaded(lib)
    return True


def autoload() -> None:
    """Registers the ops if the built module is present and verified (never builds)."""
    if _state["tried"] or _state["auto"] is not None:
        return
    if _build_config.env_flag("NTKSAP_FAST_NO_EXT") or _build_config.env_flag("NTKSAP_FAST_IN_CHECK"):
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
        if not ok and _build_config.env_flag("NTKSAP_FAST_IN_CHECK"):
            errors.append("not loaded inside a check or build process")
        elif not ok and _build_config.env_flag("NTKSAP_FAST_NO_JIT"):
            errors.append("just-in-time build disabled by NTKSAP_FAST_NO_JIT")
        elif not ok:
            try:
                lib, why = _ext_check.build_checked(_jit_build)
                if lib is None:
                    errors.append(f"just-in-time build refused: {why}")
                else:
                    torch.ops.load_library(lib)
                    _loaded(lib)
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
    """Whether op ``"ntksap_fast::<name>"`` has a kernel for ``dispatch_key`` (``"CPU"``/``"CUDA"``)."""
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
    if _build_config.env_flag("NTKSAP_FAST_NO_EXT"):
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


def cuda_targets() -> tuple:
    """The GPU code the loaded ops hold (``_build_config.CudaTarget`` tuple), as their build
    recorded it; empty when no library is loaded or it was built without CUDA."""
    lib = _state.get("lib")
    if not lib:
        return ()
    cached = _state.get("targets")  # (library, its targets): read once per library
    if cached is None or cached[0] != lib:
        cached = _state["targets"] = (lib, _build_config.parse_targets(_build_config.recorded_targets(lib)))
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
        f'reinstall from source with nvcc: TORCH_CUDA_ARCH_LIST="{major}.{minor}" pip install '
        f"--no-build-isolation --no-deps --force-reinstall <ntksap_fast source directory or sdist>; "
    )
    if require_ext():
        raise RuntimeError(message + "NTKSAP_FAST_REQUIRE_EXT=1 is set, so this is an error")
    key = ("cuda", capability)
    if key not in _state["warned"]:
        _state["warned"].add(key)
        warnings.warn(message + _REQUIRE_HINT, RuntimeWarning, stacklevel=3)
    return False
