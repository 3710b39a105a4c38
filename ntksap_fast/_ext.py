"""Loading the compiled extension ``ntksap_fast._C`` (the ops under ``torch.ops.ntksap_fast``).

A compiled library is trusted only after it passed a check in a separate process
(:func:`verify`): its ops have the schemas this package expects, give the right answers on
small cases, report data errors in their status and raise an ordinary Python exception on a bad
argument. A library built with a C++ toolchain whose runtime does not match torch's dies right
there (seen with a custom GCC in ``$CXX``: SIGSEGV in libstdc++ while formatting the error
message), so the check must run in another process. The verdict is cached per library file
(path, size, mtime, torch version, check version) under :func:`cache_dir`, so each new build is
checked once.

* :func:`autoload` (run when ``ntksap_fast`` is imported) imports the built module if present and
  verified, which registers the ops; it never builds.
* :func:`load` does the same, and otherwise builds the extension just in time with ninja
  (``NTKSAP_FAST_NO_JIT=1`` skips that), checked the same way; if the check fails and
  ``$CXX``/``$CC`` name a compiler other than the system's, it builds once more with the system
  compiler (:func:`build_checked`, also used by setup.py). If nothing loads, :func:`error` says
  why and the callers use their PyTorch implementations, warning once each
  (:func:`use_compiled`).
* ``NTKSAP_FAST_NO_EXT=1`` forces the PyTorch implementations.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

__all__ = [
    "autoload",
    "load",
    "error",
    "has_kernel",
    "has_op",
    "use_compiled",
    "verify",
    "build_checked",
    "system_compilers",
    "cache_dir",
    "SCHEMAS",
]

# The op schemas this version of the package calls (a library built from other sources is
# refused by the check).
SCHEMAS = {
    "masked_topk": "ntksap_fast::masked_topk(Tensor scores, Tensor mask, int n_keep) -> (Tensor, Tensor)",
    "masked_topk_": "ntksap_fast::masked_topk_(Tensor scores, Tensor(a!) mask, int n_keep) -> Tensor",
}

_OK_LINE = "ntksap_fast compiled ops: ok"

# Run as `python -c _CHECK_SCRIPT <library> <schemas json>` in a fresh process.
_CHECK_SCRIPT = r"""
import json, sys
import torch

lib, schemas = sys.argv[1], json.loads(sys.argv[2])
torch.ops.load_library(lib)
ops = torch.ops.ntksap_fast
for name, want in schemas.items():
    got = str(getattr(ops, name).default._schema)
    if got != want:
        raise SystemExit(f"op {name} has schema {got!r}, expected {want!r} (built from other sources)")

def fail(what):
    raise SystemExit(f"wrong result: {what}")

devices = ["cpu"]
if torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key("ntksap_fast::masked_topk", "CUDA"):
    devices.append("cuda")
T, F = True, False
for dev in devices:
    s = torch.tensor([0.5, -1.0, 3.0, 2.0, float("nan"), 1.0], device=dev)
    m = torch.tensor([T, T, T, T, F, T], device=dev)
    # The error path: a C++ exception with a formatted message must come out as a Python one.
    try:
        ops.masked_topk(s, m, -1)
    except ValueError as e:
        if "n_keep" not in str(e):
            fail(f"message {e}")
    else:
        fail("n_keep = -1 accepted")
    try:
        ops.masked_topk(s.int(), m, 1)
    except TypeError:
        pass
    else:
        fail("int scores accepted")
    out, st = ops.masked_topk(s, m, 2)
    if out.tolist() != [F, F, T, T, F, F] or st.tolist() != [5, 0]:
        fail(f"{dev}: {out.tolist()} {st.tolist()}")
    m2 = m.clone()
    m2[4] = True  # NaN at an unpruned entry: status, mask unchanged
    st = ops.masked_topk_(s, m2, 1)
    if st.tolist() != [6, 1] or not bool(m2.all()):
        fail(f"{dev}: NaN case {st.tolist()} {m2.tolist()}")
    out, st = ops.masked_topk(s, m, 6)  # n_keep > count: status
    if st.tolist() != [5, 0]:
        fail(f"{dev}: n_keep > count gave {st.tolist()}")
    g = torch.Generator().manual_seed(0)
    big = torch.randn(300_000, generator=g)
    bm = torch.rand(300_000, generator=g) < 0.6
    k = int(bm.sum()) // 3
    idx = bm.nonzero().squeeze(1)
    want = torch.zeros_like(bm)
    want[idx[torch.sort(big[idx], descending=True, stable=True).indices[:k]]] = True
    got = bm.to(dev).clone()
    st = ops.masked_topk_(big.to(dev), got, k)
    if not torch.equal(got.cpu(), want) or st.tolist() != [int(bm.sum()), 0]:
        fail(f"{dev}: random case")
print(%r)
""" % _OK_LINE

_CHECK_VERSION = hashlib.sha256((_CHECK_SCRIPT + json.dumps(SCHEMAS)).encode()).hexdigest()[:16]

_lock = threading.Lock()
_state: dict = {"tried": False, "ok": False, "error": None, "warned": set(), "auto": None}


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def cache_dir() -> Optional[Path]:
    """Where verdicts and just-in-time builds go: ``$NTKSAP_FAST_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/ntksap_fast``, else ``~/.cache/ntksap_fast``; None if not writable."""
    base = os.environ.get("NTKSAP_FAST_CACHE_DIR")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "ntksap_fast")
    try:
        os.makedirs(base, exist_ok=True)
    except OSError:
        return None
    return Path(base) if os.access(base, os.W_OK) else None


def _verdict_file(lib: str) -> Optional[Path]:
    root = cache_dir()
    if root is None:
        return None
    st = os.stat(lib)
    key = f"{os.path.realpath(lib)}|{st.st_size}|{st.st_mtime_ns}|{torch.__version__}|{_CHECK_VERSION}"
    return root / "verdicts" / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")


def _run_check(lib: str, timeout: float) -> tuple[bool, str]:
    env = dict(os.environ, NTKSAP_FAST_IN_CHECK="1")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHECK_SCRIPT, os.path.abspath(lib), json.dumps(SCHEMAS)],
            capture_output=True, text=True, timeout=timeout, env=env, cwd=tempfile.gettempdir(),
        )
    except subprocess.TimeoutExpired:
        return False, f"its check did not finish within {timeout:.0f} s"
    if proc.returncode == 0 and proc.stdout.strip().endswith(_OK_LINE):
        return True, ""
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        return False, f"it crashed ({name}) in its check, at an op that must raise a Python error"
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return False, f"its check failed: {lines[-1] if lines else f'exit status {proc.returncode}'}"


def verify(lib: str, use_cache: bool = True, timeout: float = 600.0) -> tuple[bool, str]:
    """Checks the compiled library ``lib`` in a separate process; ``(True, "")`` or
    ``(False, why)``. Definite verdicts are cached per file (see the module docstring)."""
    path = _verdict_file(lib) if use_cache else None
    if path is not None and path.is_file():
        try:
            v = json.loads(path.read_text())
            return bool(v["ok"]), str(v["why"])
        except (OSError, ValueError, KeyError):
            pass
    ok, why = _run_check(lib, timeout)
    if path is not None and "did not finish" not in why:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"ok": ok, "why": why, "lib": os.path.realpath(lib)}))
            os.replace(tmp, path)
        except OSError:
            pass
    return ok, why


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


def _sources() -> tuple[list[str], list[str]]:
    """C++ and CUDA source files of the extension (empty lists when not shipped)."""
    root = Path(__file__).resolve().parent.parent / "csrc"
    cpp = sorted(str(p) for p in root.glob("*.cpp") if not p.name.startswith("test_"))
    cu = sorted(str(p) for p in (root / "cuda").glob("*.cu")) if (root / "cuda").is_dir() else []
    return cpp, cu


# Run as `python -c _JIT_SCRIPT <build dir> <with cuda 0/1> <sources...>`: builds (and loads, in
# that process only) the extension; the library is <build dir>/ntksap_fast_C_jit.so.
_JIT_SCRIPT = r"""
import os, sys
from torch.utils import cpp_extension
build_dir, with_cuda, sources = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]
cpp_extension.load(
    name="ntksap_fast_C_jit", sources=sources, build_directory=build_dir,
    extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
    extra_cuda_cflags=["-O3"] if with_cuda else None,
    extra_include_paths=[os.path.dirname(sources[0])], with_cuda=with_cuda,
    is_python_module=False, verbose=False)
"""


def _jit_build(env: dict) -> str:
    """Builds the extension just in time (CPU ops, plus CUDA when a GPU and nvcc are present) in
    a separate process; returns the library path."""
    from torch.utils import cpp_extension

    cpp, cu = _sources()
    if not cpp:
        raise RuntimeError("csrc/ sources not found next to the package")
    with_cuda = bool(cu and torch.cuda.is_available() and torch.version.cuda and cpp_extension.CUDA_HOME)
    compiler = env.get("CXX") or os.environ.get("CXX") or "c++"
    tag = hashlib.sha256(f"{torch.__version__}|{compiler}|{with_cuda}|{cpp[0]}".encode()).hexdigest()[:16]
    root = cache_dir()
    build_dir = str(root / "jit" / tag) if root is not None else tempfile.mkdtemp(prefix="ntksap_fast_jit_")
    os.makedirs(build_dir, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-c", _JIT_SCRIPT, build_dir, "1" if with_cuda else "0", *cpp, *(cu if with_cuda else [])],
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
