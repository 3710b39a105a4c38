"""Loading the compiled extension ``ntksap_fast._C`` (the ops under ``torch.ops.ntksap_fast``).

``load()`` imports it once; if it was not built at install time it is built just in time with
ninja from ``csrc/`` (``NTKSAP_FAST_NO_JIT=1`` skips that); if that fails too, ``error()`` says
why and the callers use their PyTorch implementations, warning once each
(``use_compiled``). ``NTKSAP_FAST_NO_EXT=1`` forces the PyTorch implementations.
"""
from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["load", "error", "has_kernel", "has_op", "use_compiled"]

_lock = threading.Lock()
_state: dict = {"tried": False, "ok": False, "error": None, "warned": set()}


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _sources() -> tuple[list[str], list[str]]:
    """C++ and CUDA source files of the extension (empty lists when not shipped)."""
    root = Path(__file__).resolve().parent.parent / "csrc"
    cpp = sorted(str(p) for p in root.glob("*.cpp") if not p.name.startswith("test_"))
    cu = sorted(str(p) for p in (root / "cuda").glob("*.cu")) if (root / "cuda").is_dir() else []
    return cpp, cu


def _jit_build() -> None:
    """Build the extension just in time with ninja (CPU only unless a CUDA device is present)."""
    from torch.utils import cpp_extension

    cpp, cu = _sources()
    if not cpp:
        raise RuntimeError("csrc/ sources not found next to the package")
    sources = list(cpp)
    kwargs: dict = {}
    if cu and torch.cuda.is_available() and torch.version.cuda and cpp_extension.CUDA_HOME:
        sources += cu
        kwargs["extra_cuda_cflags"] = ["-O3"]
    cpp_extension.load(
        name="ntksap_fast_C_jit",
        sources=sources,
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(Path(cpp[0]).parent)],
        is_python_module=False,
        verbose=False,
        **kwargs,
    )


def load() -> bool:
    """Imports (or builds) the extension once; whether it loaded."""
    if _state["tried"]:
        return _state["ok"]
    with _lock:
        if _state["tried"]:
            return _state["ok"]
        errors = []
        try:
            import ntksap_fast._C  # noqa: F401  (registers the ops on import)
            ok = True
        except Exception as exc:  # ImportError, or an ABI mismatch surfacing as OSError
            errors.append(f"import ntksap_fast._C failed ({type(exc).__name__}: {exc})")
            ok = False
            if _flag("NTKSAP_FAST_NO_JIT"):
                errors.append("just-in-time build disabled by NTKSAP_FAST_NO_JIT")
            else:
                try:
                    _jit_build()
                    ok = True
                except Exception as jexc:
                    msg = str(jexc).strip().splitlines()
                    errors.append(f"just-in-time build failed ({type(jexc).__name__}: {msg[-1] if msg else ''})")
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
    """Whether to use the compiled ops; False with one warning per ``what`` if they did not load."""
    if _flag("NTKSAP_FAST_NO_EXT"):
        return False
    if load():
        return True
    if what not in _state["warned"]:
        _state["warned"].add(what)
        warnings.warn(
            f"ntksap_fast: compiled extension unavailable, using the slower PyTorch {what}: {_state['error']}",
            RuntimeWarning,
            stacklevel=3,
        )
    return False
