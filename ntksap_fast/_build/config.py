"""How the compiled extension ``ntksap_fast._C`` is built, in one place for its three build paths,
and which GPUs a build has code for.

* setup.py loads this file by path (the package is not importable in the middle of a build),
* the just-in-time build in ``loader.py`` imports it,
* CMakeLists.txt runs it (``python ntksap_fast/_build/config.py --cuda-home``, then ``--cmake FILE
  [--nvcc NVCC]``) and includes the CMake file it writes.

It holds the sources (found in ``csrc/``), the compile flags, and the CUDA architectures: by
default SASS for every compute-capability family PyTorch's own build covers plus PTX of the
newest (:data:`DEFAULT_CUDA_ARCH_LIST`), or ``$TORCH_CUDA_ARCH_LIST`` when set. Every CUDA build
passes :func:`targets_define` to nvcc, so the library records what it holds; ``loader.py`` reads
that back (C function ``ntksap_fast_cuda_targets``, csrc/cuda/build_targets.cu) and uses the
CUDA ops only on a device :func:`runs_on` accepts. The nvcc of a CUDA build is found by one rule,
:func:`find_nvcc`, for all three build paths.

Standard library only (CMake may run it with any Python 3).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

# SASS for 7.5 (T4), 8.0 (A100; also runs on 8.6/8.9: A10, L4, RTX 30xx/40xx), 9.0 (H100/H200),
# 10.0 (B200), 12.0 (RTX 50xx), plus PTX of 12.0 that newer GPUs compile when they load it.
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;9.0;10.0;12.0+PTX"

CXX_FLAGS = ("-O3", "-fopenmp")
NVCC_FLAGS = ("-O3",)
# setup.py and the just-in-time build link with these; CMake links torch's own libgomp instead
# (CMakeLists.txt says why).
LINK_FLAGS = ("-fopenmp",)
INCLUDE_DIR = "csrc"
# The Python module stub (needs Python.h): setup.py compiles it, CMake and the just-in-time build
# (which load a plain shared library) do not need it.
MODULE_SOURCE = "csrc/module.cpp"
# The C++ test of the ops, built by CMake only.
TEST_SOURCE = "csrc/test_masked_topk.cpp"
# The macro through which a CUDA build records its targets (csrc/cuda/build_targets.cu), and the C
# function that returns them from the built library.
TARGETS_MACRO = "NTKSAP_FAST_CUDA_TARGETS"
TARGETS_FUNCTION = "ntksap_fast_cuda_targets"
# The CUDA toolkit when neither $CUDA_HOME nor $CUDA_PATH names one.
DEFAULT_CUDA_HOME = "/usr/local/cuda"

_ARCH_RE = re.compile(r"^(\d+)\.(\d)(\+PTX)?$")
_TARGET_RE = re.compile(r"^(sm|compute)_(\d+)(\d)$")


class CudaTarget(NamedTuple):
    """One kind of GPU code in a build: SASS (``sm_XY``, machine code) or PTX (``compute_XY``,
    compiled by the driver for the device when loaded). A tuple: ordered by capability, SASS
    before PTX (no class identity, so copies of this module loaded by path compare equal)."""

    major: int
    minor: int
    ptx: bool

    def __str__(self) -> str:
        return f"{'compute' if self.ptx else 'sm'}_{self.major}{self.minor}"


class Sources(NamedTuple):
    """Source files relative to the project root, as POSIX paths."""

    cpp: tuple[str, ...]  # C++ sources of the ops (not the module stub, not the test)
    cuda: tuple[str, ...]  # CUDA sources of the ops
    module: str  # the Python module stub
    test: str  # the C++ test


def sources(root: str | os.PathLike) -> Sources:
    """The extension's sources under ``root`` (the directory holding ``csrc/``); empty tuples
    when ``csrc/`` is not there (an installed package)."""
    base = Path(root)
    special = {MODULE_SOURCE, TEST_SOURCE}
    cpp = sorted(p.relative_to(base).as_posix() for p in (base / "csrc").glob("*.cpp"))
    cuda = sorted(p.relative_to(base).as_posix() for p in (base / "csrc" / "cuda").glob("*.cu"))
    return Sources(tuple(p for p in cpp if p not in special), tuple(cuda), MODULE_SOURCE, TEST_SOURCE)


def env_flag(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment variable ``name`` is set to anything but ``""``, ``0``, ``false`` or
    ``no`` (any case, surrounding spaces ignored): the rule of every ``NTKSAP_FAST_*`` switch."""
    value = (os.environ if environ is None else environ).get(name, "0")
    return value.strip().lower() not in ("", "0", "false", "no")


def nvcc_candidates(environ: Mapping[str, str] | None = None) -> list[str]:
    """Where nvcc is looked for, in order: ``$CUDA_HOME/bin/nvcc``, ``$CUDA_PATH/bin/nvcc``,
    ``/usr/local/cuda/bin/nvcc`` (not the nvcc on ``$PATH``, which may be a wrapper outside the
    toolkit that torch's and CMake's configuration then cannot use)."""
    env = os.environ if environ is None else environ
    homes = (env.get("CUDA_HOME"), env.get("CUDA_PATH"), DEFAULT_CUDA_HOME)
    return list(dict.fromkeys(os.path.join(home, "bin", "nvcc") for home in homes if home))


def find_nvcc(environ: Mapping[str, str] | None = None) -> str | None:
    """The first of :func:`nvcc_candidates` that is an executable file, or None. Its toolkit is
    ``dirname(dirname(nvcc))``, which the build passes on as ``CUDA_HOME``."""
    return next((p for p in nvcc_candidates(environ) if os.path.isfile(p) and os.access(p, os.X_OK)), None)


def cuda_compiler(torch_cuda: str | None, environ: Mapping[str, str] | None = None) -> tuple[str | None, str]:
    """``(nvcc, "")`` for a CUDA build against a torch whose ``torch.version.cuda`` is ``torch_cuda``,
    or ``(None, why not)``: ``NTKSAP_FAST_NO_CUDA`` is set, torch has no CUDA, or no nvcc is found
    (:func:`find_nvcc`)."""
    if env_flag("NTKSAP_FAST_NO_CUDA", environ):
        return None, "NTKSAP_FAST_NO_CUDA is set"
    if not torch_cuda:
        return None, "torch is a build without CUDA"
    nvcc = find_nvcc(environ)
    if nvcc is None:
        return None, f"nvcc not found (looked for {' and '.join(nvcc_candidates(environ))}; set CUDA_HOME)"
    return nvcc, ""


def cuda_arch_list(environ: Mapping[str, str] | None = None) -> str:
    """``$TORCH_CUDA_ARCH_LIST`` when set (and not empty), else :data:`DEFAULT_CUDA_ARCH_LIST`."""
    value = (os.environ if environ is None else environ).get("TORCH_CUDA_ARCH_LIST", "").strip()
    return value or DEFAULT_CUDA_ARCH_LIST


def parse_arch_list(text: str) -> tuple[CudaTarget, ...]:
    """Targets of an arch list in ``TORCH_CUDA_ARCH_LIST`` syntax (``"7.5;8.0;9.0+PTX"``, ``;`` or
    spaces between entries): SASS for each entry, PTX too for ``+PTX``. Sorted, no duplicates."""
    if not isinstance(text, str):
        raise TypeError(f"arch list must be a str, got {type(text).__name__}")
    targets: set[CudaTarget] = set()
    for entry in text.replace(";", " ").split():
        match = _ARCH_RE.match(entry)
        if match is None:
            raise ValueError(
                f"TORCH_CUDA_ARCH_LIST entry {entry!r} is not of the form MAJOR.MINOR or "
                f"MAJOR.MINOR+PTX (e.g. '8.6' or '9.0+PTX'; names such as 'Ampere' are not accepted)"
            )
        major, minor = int(match.group(1)), int(match.group(2))
        targets.add(CudaTarget(major, minor, ptx=False))
        if match.group(3):
            targets.add(CudaTarget(major, minor, ptx=True))
    if not targets:
        raise ValueError(f"TORCH_CUDA_ARCH_LIST {text!r} names no architecture")
    return tuple(sorted(targets))


def parse_targets(recorded: str) -> tuple[CudaTarget, ...]:
    """Targets from what a build recorded (:func:`targets_define`: ``"sm_75/sm_80/compute_120"``)."""
    targets = []
    for name in filter(None, recorded.split("/")):
        match = _TARGET_RE.match(name)
        if match is None:
            raise ValueError(f"recorded CUDA target {name!r} is not sm_XY or compute_XY")
        targets.append(CudaTarget(int(match.group(2)), int(match.group(3)), match.group(1) == "compute"))
    return tuple(sorted(set(targets)))


def recorded_targets(lib: str) -> str:
    """What the compiled library ``lib`` recorded about its GPU code (:data:`TARGETS_FUNCTION`, e.g.
    ``"sm_90/compute_90"``; :func:`parse_targets` reads it); ``""`` for a build without CUDA. Opens
    the library (so registers its ops): only for a library that is loaded or being checked."""
    try:
        record = getattr(ctypes.CDLL(lib), TARGETS_FUNCTION)
    except (AttributeError, OSError):  # no such symbol; a library that cannot be opened
        return ""
    record.restype = ctypes.c_char_p
    return record().decode()


def runs_on(targets: Iterable[CudaTarget], capability: tuple[int, int]) -> bool:
    """Whether a build holding ``targets`` has code for a device of compute ``capability``
    ``(major, minor)``: SASS of the same major and a lower or equal minor, or PTX of a
    capability lower or equal to the device's."""
    major, minor = capability
    return any(
        (t.major, t.minor) <= (major, minor) if t.ptx else t.major == major and t.minor <= minor for t in targets
    )


def nvcc_codes(nvcc: str) -> frozenset[str] | None:
    """The codes ``nvcc --list-gpu-code`` and ``--list-gpu-arch`` name (``sm_75``, ``compute_75``,
    ...), or None when nvcc cannot say (too old, or it fails)."""
    codes: set[str] = set()
    for option in ("--list-gpu-code", "--list-gpu-arch"):
        try:
            proc = subprocess.run([nvcc, option], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if proc.returncode != 0:
            return None
        codes.update(proc.stdout.split())
    return frozenset(codes)


def fit_to_compiler(
    targets: Sequence[CudaTarget], codes: frozenset[str] | None
) -> tuple[tuple[CudaTarget, ...], tuple[CudaTarget, ...]]:
    """``(kept, dropped)``: the targets the compiler can produce (all of them when ``codes`` is
    None). When a dropped PTX leaves no PTX, PTX of the newest kept SASS is added, so newer GPUs
    still get code they can compile."""
    if codes is None:
        return tuple(targets), ()
    kept = [t for t in targets if str(t) in codes]
    dropped = tuple(t for t in targets if str(t) not in codes)
    if any(t.ptx for t in dropped) and not any(t.ptx for t in kept) and kept:
        newest = max(kept)
        ptx = CudaTarget(newest.major, newest.minor, ptx=True)
        if str(ptx) in codes:
            kept.append(ptx)
    return tuple(sorted(set(kept))), dropped


def build_targets(
    nvcc: str, environ: Mapping[str, str] | None = None
) -> tuple[tuple[CudaTarget, ...], tuple[CudaTarget, ...]]:
    """``(targets, dropped)`` of a CUDA build with ``nvcc``: ``$TORCH_CUDA_ARCH_LIST`` as given
    (nvcc reports what it cannot build), or the default list fitted to ``nvcc``
    (:func:`fit_to_compiler`)."""
    env = os.environ if environ is None else environ
    wanted = parse_arch_list(cuda_arch_list(env))
    if env.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return wanted, ()
    return fit_to_compiler(wanted, nvcc_codes(nvcc))


def gencode_flags(targets: Iterable[CudaTarget]) -> list[str]:
    """nvcc flags that produce exactly ``targets``."""
    return [f"-gencode=arch=compute_{t.major}{t.minor},code={t}" for t in sorted(set(targets))]


def targets_define(targets: Iterable[CudaTarget]) -> str:
    """``NAME=VALUE`` of the macro that records ``targets`` in the library (``/``-separated:
    nvcc splits ``-D`` values at commas)."""
    return f"{TARGETS_MACRO}={'/'.join(str(t) for t in sorted(set(targets)))}"


def nvcc_base_flags(targets: Iterable[CudaTarget]) -> list[str]:
    """The nvcc flags of a build for ``targets`` other than the -gencode ones: optimisation and
    the record of the targets (CMake gets -gencode from torch's config instead)."""
    return [*NVCC_FLAGS, f"-D{targets_define(targets)}"]


def nvcc_flags(targets: Iterable[CudaTarget]) -> list[str]:
    """Every nvcc flag of a build for ``targets``: :func:`nvcc_base_flags` and -gencode."""
    targets = tuple(targets)
    return [*nvcc_base_flags(targets), *gencode_flags(targets)]


def arch_list_of(targets: Iterable[CudaTarget]) -> str:
    """``targets`` in ``TORCH_CUDA_ARCH_LIST`` syntax (for torch's CMake configuration)."""
    targets = set(targets)
    sass = sorted({(t.major, t.minor) for t in targets})
    return ";".join(
        f"{major}.{minor}{'+PTX' if CudaTarget(major, minor, True) in targets else ''}" for major, minor in sass
    )


def _cmake_list(items: Iterable[str]) -> str:
    return '"' + ";".join(str(i).replace("\\", "/").replace('"', '\\"') for i in items) + '"'


def cmake_script(root: str | os.PathLike, nvcc: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The CMake file CMakeLists.txt includes: sources (absolute paths), flags and, with
    ``nvcc``, the CUDA targets fitted to that compiler."""
    base = Path(root).resolve()
    src = sources(base)
    lines = [
        "# Written by ntksap_fast/_build/config.py; do not edit.",
        f"set(NTKSAP_FAST_CPP_SOURCES {_cmake_list(base / p for p in src.cpp)})",
        f"set(NTKSAP_FAST_CUDA_SOURCES {_cmake_list(base / p for p in src.cuda)})",
        f"set(NTKSAP_FAST_TEST_SOURCE {_cmake_list([base / src.test])})",
        f"set(NTKSAP_FAST_INCLUDE_DIR {_cmake_list([base / INCLUDE_DIR])})",
        f"set(NTKSAP_FAST_CXX_FLAGS {_cmake_list(CXX_FLAGS)})",
    ]
    if nvcc:
        targets, dropped = build_targets(nvcc, environ)
        if not targets:
            raise SystemExit(f"{nvcc} can build none of the CUDA targets {cuda_arch_list(environ)!r}")
        if dropped:
            lines.append(f'message(STATUS "ntksap_fast: {nvcc} cannot build {", ".join(map(str, dropped))}; left out")')
        lines += [
            f"set(NTKSAP_FAST_NVCC_BASE_FLAGS {_cmake_list(nvcc_base_flags(targets))})",
            f"set(NTKSAP_FAST_TORCH_CUDA_ARCH_LIST {_cmake_list([arch_list_of(targets)])})",
        ]
    return "\n".join(lines) + "\n"


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cmake", help="write the CMake file here")
    parser.add_argument("--nvcc", help="the nvcc of a CUDA build (fits the targets to it)")
    parser.add_argument(
        "--cuda-home",
        action="store_true",
        help="print the CUDA toolkit of find_nvcc (nothing when there is none) and exit",
    )
    args = parser.parse_args(argv)
    if args.cuda_home:
        nvcc = find_nvcc()
        print(os.path.dirname(os.path.dirname(nvcc)) if nvcc else "")
        return
    if not args.cmake:
        parser.error("--cmake FILE or --cuda-home is required")
    text = cmake_script(Path(__file__).resolve().parents[2], args.nvcc)
    out = Path(args.cmake)
    if not out.is_file() or out.read_text() != text:  # unchanged: CMake need not rebuild
        out.write_text(text)


if __name__ == "__main__":
    _main()
