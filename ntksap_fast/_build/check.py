"""The check a compiled library of ``ntksap_fast`` ops must pass before it is used (see ``loader``),
and the build that retries with the system compiler when it fails (:func:`build_checked`).

:func:`verify` runs :func:`check_library` in a separate process (a library built with a C++
toolchain whose runtime does not match torch's can crash in it): every op the package calls has the
schema in :data:`SCHEMAS`, gives the right answers on small cases (the top-k against a sort, the
Philox normals against known answers of the PyTorch twin ``ntksap_fast.engine.rng``), reports data
errors in its status and raises an ordinary Python exception on a bad argument; the CUDA ops too
where the library holds code for the visible GPU. The verdict is cached per library file (path,
size, mtime, torch version, the text of this file) under :func:`cache_dir`, so each new build is
checked once.

Standard library and torch only, no package-relative imports: setup.py loads this file by path in
the middle of a build, and the check process runs it by path (``runpy``).
"""

from __future__ import annotations

import hashlib
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["SCHEMAS", "verify", "cache_dir", "check_library", "build_checked", "system_compilers"]

# The rule for which GPUs a build covers, read by the check process (by path: see the docstring).
_BUILD_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.py")

# The schema of every op this version of the package calls (tests/_build/test_check.py derives
# that list from the code): a library built from other sources is refused.
SCHEMAS = {
    "masked_topk": "ntksap_fast::masked_topk(Tensor scores, Tensor mask, int n_keep) -> (Tensor, Tensor)",
    "masked_topk_": "ntksap_fast::masked_topk_(Tensor scores, Tensor(a!) mask, int n_keep) -> Tensor",
    "philox_normal": (
        "ntksap_fast::philox_normal(int key0, int key1, int round, int tag, int offset, int numel) -> Tensor"
    ),
    "philox_normal_at": "ntksap_fast::philox_normal_at(int key0, int key1, int round, int tag, Tensor index) -> Tensor",
}

# Known answers of the PyTorch twin (ntksap_fast.engine.rng with NTKSAP_FAST_NO_EXT=1) for seed
# 5 * 2**32 + 123 (key 123, 5), round 3, draw 7: the perturbation stream (tag 29) at elements 5..10,
# and the weight stream (tag 28) at elements 0, 3, 2**33 + 5 and 10**12 (a block past 2**32).
# tests/_build/test_check.py recomputes them with the twin.
PHILOX_KEY = (123, 5)
PHILOX_ROUND = 3
PHILOX_NORMAL = {
    "tag": 29,
    "offset": 5,
    "values": [
        0.5749935507774353,
        0.18704970180988312,
        -0.2869913876056671,
        -0.41106733679771423,
        -1.7302281856536865,
        -0.2845374047756195,
    ],
}
PHILOX_NORMAL_AT = {
    "tag": 28,
    "index": [0, 3, 2**33 + 5, 10**12],
    "values": [-1.6734609603881836, -0.28790026903152466, -1.0987155437469482, -1.4075688123703003],
}
# Same 32-bit words; log, sqrt, cos and sin of libm (the compiled op) and of SLEEF (the twin) differ
# by a few float32 ulps of normals up to ~6 in magnitude.
PHILOX_ATOL = 2e-6

_OK_LINE = "ntksap_fast compiled ops: ok"

# The check process: this file run by path, then check_library(<library>).
_RUN_CHECK = "import runpy, sys; runpy.run_path(sys.argv[1])['check_library'](sys.argv[2])"

with open(__file__, "rb") as _source:
    _CHECK_VERSION = hashlib.sha256(_source.read()).hexdigest()[:16]


def _fail(what: str) -> None:
    raise SystemExit(f"wrong result: {what}")


def _must_raise(error: type[Exception], call: Callable[[], object], what: str, word: str = "") -> None:
    """``call()`` (an op given a bad argument) must raise the Python ``error`` naming ``word``: a C++
    exception with a formatted message must come out as a Python one."""
    try:
        call()
    except error as e:
        if word not in str(e):
            _fail(f"{what}: message {e}")
    else:
        _fail(f"{what} accepted")


def _check_topk(ops, dev: str) -> None:
    """The top-k ops on ``dev``: an argument error, the status of the data errors, small and random cases."""
    T, F = True, False
    s = torch.tensor([0.5, -1.0, 3.0, 2.0, float("nan"), 1.0], device=dev)
    m = torch.tensor([T, T, T, T, F, T], device=dev)
    _must_raise(ValueError, lambda: ops.masked_topk(s, m, -1), "masked_topk: n_keep = -1", "n_keep")
    _must_raise(TypeError, lambda: ops.masked_topk(s.int(), m, 1), "masked_topk: int scores")
    out, st = ops.masked_topk(s, m, 2)
    if out.tolist() != [F, F, T, T, F, F] or st.tolist() != [5, 0]:
        _fail(f"{dev}: {out.tolist()} {st.tolist()}")
    m2 = m.clone()
    m2[4] = True  # NaN at an unpruned entry: status, mask unchanged
    st = ops.masked_topk_(s, m2, 1)
    if st.tolist() != [6, 1] or not bool(m2.all()):
        _fail(f"{dev}: NaN case {st.tolist()} {m2.tolist()}")
    out, st = ops.masked_topk(s, m, 6)  # n_keep > count: status
    if st.tolist() != [5, 0]:
        _fail(f"{dev}: n_keep > count gave {st.tolist()}")
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
        _fail(f"{dev}: random case")


def _check_philox(ops) -> None:
    """The Philox normals (CPU): the known answers, one element at a time as in a range, argument errors."""
    key0, key1 = PHILOX_KEY
    case = PHILOX_NORMAL
    got = ops.philox_normal(key0, key1, PHILOX_ROUND, case["tag"], case["offset"], len(case["values"]))
    if got.dtype != torch.float32 or not torch.allclose(got, torch.tensor(case["values"]), rtol=0, atol=PHILOX_ATOL):
        _fail(f"philox_normal: {got.tolist()}, expected {case['values']}")
    case = PHILOX_NORMAL_AT
    got = ops.philox_normal_at(key0, key1, PHILOX_ROUND, case["tag"], torch.tensor(case["index"]))
    if got.dtype != torch.float32 or not torch.allclose(got, torch.tensor(case["values"]), rtol=0, atol=PHILOX_ATOL):
        _fail(f"philox_normal_at: {got.tolist()}, expected {case['values']}")
    dense = ops.philox_normal(key0, key1, PHILOX_ROUND, 1, 0, 12).view(3, 4)
    if not torch.equal(ops.philox_normal_at(key0, key1, PHILOX_ROUND, 1, torch.arange(12).view(3, 4)), dense):
        _fail("philox_normal_at differs from philox_normal at the same elements")
    _must_raise(
        ValueError, lambda: ops.philox_normal(-1, key1, PHILOX_ROUND, 1, 0, 4), "philox_normal: key0 = -1", "key0"
    )
    index32 = torch.arange(4, dtype=torch.int32)
    _must_raise(
        TypeError,
        lambda: ops.philox_normal_at(key0, key1, PHILOX_ROUND, 1, index32),
        "philox_normal_at: an int32 index",
    )


def check_library(lib: str) -> None:
    """Loads ``lib`` into this process and checks it (see the module docstring); prints the ok line,
    or exits with the reason. Run only in a process of its own (:func:`verify`)."""
    config = runpy.run_path(_BUILD_CONFIG)
    torch.ops.load_library(lib)
    ops = torch.ops.ntksap_fast
    for name, want in SCHEMAS.items():
        try:
            got = str(getattr(ops, name).default._schema)
        except (AttributeError, RuntimeError):
            raise SystemExit(f"op {name} is missing (built from other sources)") from None
        if got != want:
            raise SystemExit(f"op {name} has schema {got!r}, expected {want!r} (built from other sources)")
        # The package registers a fake implementation of every op, which torch refuses for an op
        # with a CompositeImplicitAutograd kernel (a catch-all m.def(schema, fn)).
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"ntksap_fast::{name}", "CompositeImplicitAutograd"):
            raise SystemExit(f"op {name} has a CompositeImplicitAutograd kernel (built from other sources)")
    # The CUDA ops are checked on the current device only where the library holds code for it (an
    # install must not fail because the visible GPU is not among the built targets).
    devices = ["cpu"]
    if torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key("ntksap_fast::masked_topk", "CUDA"):
        recorded = config["parse_targets"](config["recorded_targets"](lib))
        if config["runs_on"](recorded, torch.cuda.get_device_capability()):
            devices.append("cuda")
    for dev in devices:
        _check_topk(ops, dev)
    _check_philox(ops)
    print(_OK_LINE)


def cache_dir() -> Path | None:
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


def _verdict_file(lib: str) -> Path | None:
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
            [sys.executable, "-c", _RUN_CHECK, os.path.abspath(__file__), os.path.abspath(lib)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=tempfile.gettempdir(),
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


def system_compilers() -> tuple[str, str] | None:
    """``(cc, cxx)`` of the system C/C++ compiler when ``$CC``/``$CXX`` name another one, else
    None (nothing overridden, or no other compiler found)."""
    chosen = [os.environ.get(v) for v in ("CXX", "CC")]
    if not any(chosen):
        return None
    current = {os.path.realpath(shutil.which(c) or c) for c in chosen if c}
    pairs = [
        ("/usr/bin/cc", "/usr/bin/c++"),
        ("/usr/bin/gcc", "/usr/bin/g++"),
        (shutil.which("cc"), shutil.which("c++")),
        (shutil.which("gcc"), shutil.which("g++")),
    ]
    for cc, cxx in pairs:
        if cc and cxx and os.access(cc, os.X_OK) and os.access(cxx, os.X_OK):
            if os.path.realpath(cxx) not in current and os.path.realpath(cc) not in current:
                return cc, cxx
    return None


def build_checked(build: Callable[[dict], str]) -> tuple[str | None, str]:
    """Builds with ``build(env)`` (env: compiler variables to set, ``{}`` first; returns the
    library path) and verifies the result. If the check fails and ``$CC``/``$CXX`` name a
    compiler other than the system's, builds once more with ``{"CC": cc, "CXX": cxx}`` of the
    system compiler. Returns ``(library, "")`` or ``(None, why)``. Used by setup.py and the
    just-in-time build (``loader``)."""
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
