"""The check a compiled library of ``ntksap_fast`` ops must pass before it is used (see ``loader``).

:func:`verify` runs it in a separate process (a library built with a C++ toolchain whose runtime
does not match torch's can crash in it): the ops have the schemas this package expects, give the
right answers on small cases, report data errors in their status and raise an ordinary Python
exception on a bad argument; the CUDA ops too where the library holds code for the visible GPU.
The verdict is cached per library file (path, size, mtime, torch version, check version) under
:func:`cache_dir`, so each new build is checked once.

Standard library and torch only, no package-relative imports: setup.py loads ``loader`` (and so
this file) by path in the middle of a build.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

__all__ = ["SCHEMAS", "verify", "cache_dir"]

# Passed to the check process, which reads the rule for which GPUs a build covers from it.
_BUILD_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.py")

# The op schemas this version of the package calls (a library built from other sources is
# refused by the check).
SCHEMAS = {
    "masked_topk": "ntksap_fast::masked_topk(Tensor scores, Tensor mask, int n_keep) -> (Tensor, Tensor)",
    "masked_topk_": "ntksap_fast::masked_topk_(Tensor scores, Tensor(a!) mask, int n_keep) -> Tensor",
}

_OK_LINE = "ntksap_fast compiled ops: ok"

# Run as `python -c _CHECK_SCRIPT <library> <schemas json> <_build_config.py>` in a fresh process.
# The CUDA ops are checked on the current device only where the library holds code for it (an
# install must not fail because the visible GPU is not among the built targets).
_CHECK_SCRIPT = r"""
import ctypes, importlib.util, json, sys
import torch

lib, schemas = sys.argv[1], json.loads(sys.argv[2])
spec = importlib.util.spec_from_file_location("_ntksap_fast_build_config", sys.argv[3])
config = importlib.util.module_from_spec(spec)
spec.loader.exec_module(config)
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
    try:
        record = ctypes.CDLL(lib).ntksap_fast_cuda_targets
        record.restype = ctypes.c_char_p
        recorded = record().decode()
    except (AttributeError, OSError):
        recorded = ""
    if config.runs_on(config.parse_targets(recorded), torch.cuda.get_device_capability()):
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
            [sys.executable, "-c", _CHECK_SCRIPT, os.path.abspath(lib), json.dumps(SCHEMAS), _BUILD_CONFIG],
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
