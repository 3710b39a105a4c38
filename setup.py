"""Build and install ntksap_fast: the build of its compiled extension.

The package's metadata (name, version, dependencies, extras, the ``ntksap`` command) is in
pyproject.toml; this file adds what pyproject.toml cannot say: the packages (``triton_kernels/``
installed as ``ntksap_fast.kernels``) and the compiled extension.

The package is pure Python plus one compiled extension, ``ntksap_fast._C`` (see csrc/): the
``torch.ops.ntksap_fast`` ops, C++ (OpenMP) always, CUDA when nvcc and a CUDA build of torch are
present. Install with ``pip install --no-build-isolation .`` (``-e .`` for development) so the
extension builds against the torch already in the environment (pyproject.toml names the build
requirements, so this also works offline: ``--no-deps --no-index``). Sources, flags and CUDA
architectures come from ``ntksap_fast/_build/config.py`` (shared with CMakeLists.txt and the
just-in-time build).

The built extension is checked in a separate process before the build counts as done
(``ntksap_fast/_build/check.py``: ``build_checked``): its ops must give the right answers and raise
ordinary Python errors on bad arguments. A C++ compiler whose runtime does not match torch's (e.g. a
custom GCC in ``$CXX``) can build a library that crashes right there; if ``$CXX``/``$CC`` name
such a compiler, the extension is built once more with the system compiler.

Without a working C++ compiler (or when the build or its check fails) the package installs
without the compiled ops and uses its PyTorch implementations, saying so here and at first use;
``NTKSAP_FAST_REQUIRE_EXT=1`` makes that an error instead (``make test`` and CI set it).

Environment variables:
  NTKSAP_FAST_NO_CUDA=1       build the C++ (CPU) ops only, even where CUDA could be built.
  TORCH_CUDA_ARCH_LIST        GPU architectures to compile for, e.g. "8.6" or "8.0;9.0+PTX";
                              default: _build/config.py DEFAULT_CUDA_ARCH_LIST (less what nvcc lacks).
  CUDA_HOME, CUDA_PATH        CUDA toolkit; /usr/local/cuda is tried when neither has an nvcc.
  MAX_JOBS                    parallel compile jobs (ninja).
  NTKSAP_FAST_REQUIRE_EXT=1   fail the install when the compiled ops cannot be built.
  NTKSAP_FAST_NO_EXT_BUILD=1  skip the extension entirely (pure Python install; the ops are then
                              built just in time on first use in a source checkout, or PyTorch
                              fallbacks are used).
"""

import os
import runpy
import shutil
import sys
from types import SimpleNamespace

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load(filename: str) -> SimpleNamespace:
    """A module of ``ntksap_fast/_build/`` run on its own, by path: the package is not importable in
    the middle of its build (its extension is not built, its dependencies may be missing)."""
    return SimpleNamespace(**runpy.run_path(os.path.join(ROOT, "ntksap_fast", "_build", filename)))


config = _load("config.py")


def _say(message: str) -> None:
    print(f"ntksap_fast: {message}", file=sys.stderr, flush=True)


def _without_ext(why: str) -> None:
    """Goes on without the compiled ops (saying why), or stops under NTKSAP_FAST_REQUIRE_EXT=1."""
    if config.env_flag("NTKSAP_FAST_REQUIRE_EXT"):
        raise RuntimeError(
            f"ntksap_fast: the compiled ops cannot be built: {why}. NTKSAP_FAST_REQUIRE_EXT=1 makes "
            "them mandatory; unset it to install with the PyTorch implementations instead."
        )
    _say(
        f"WARNING: installing WITHOUT the compiled ops ({why}); the slower PyTorch implementations "
        "will be used. Install a C++ compiler (and nvcc for the CUDA ops) and reinstall to get them; "
        "NTKSAP_FAST_REQUIRE_EXT=1 makes this an error."
    )


def _missing_compiler():
    """Why no C++ compiler can be run (None when one can)."""
    cxx = os.environ.get("CXX") or "c++"
    if shutil.which(cxx.split()[0]) is None:
        return f"no C++ compiler: {cxx!r} not found{' ($CXX)' if os.environ.get('CXX') else ''}"
    return None


def _extensions():
    if config.env_flag("NTKSAP_FAST_NO_EXT_BUILD"):
        _say("NTKSAP_FAST_NO_EXT_BUILD is set: not building the compiled ops")
        return [], {}
    missing = _missing_compiler()
    if missing:
        _without_ext(missing)
        return [], {}
    import torch
    from torch.utils import cpp_extension

    src = config.sources(ROOT)
    common = dict(
        include_dirs=[os.path.join(ROOT, config.INCLUDE_DIR)],
        extra_link_args=list(config.LINK_FLAGS),
    )
    cpp = [*src.cpp, src.module]
    nvcc, why_not = config.cuda_compiler(torch.version.cuda)
    if nvcc and src.cuda:
        targets, dropped = config.build_targets(nvcc)
        if dropped:
            _say(f"{nvcc} cannot build {', '.join(map(str, dropped))}: left out (those GPUs use PyTorch)")
        _say(f"CUDA targets: {', '.join(map(str, targets))}")
        # cpp_extension reads CUDA_HOME at import; make it the toolkit of the nvcc found (a $CUDA_HOME
        # without an nvcc is passed over by config.find_nvcc).
        os.environ["CUDA_HOME"] = cpp_extension.CUDA_HOME = os.path.dirname(os.path.dirname(nvcc))
        # The -gencode flags are ours, so torch adds none of its own (it reads TORCH_CUDA_ARCH_LIST).
        ext = cpp_extension.CUDAExtension(
            "ntksap_fast._C",
            cpp + list(src.cuda),
            extra_compile_args={"cxx": list(config.CXX_FLAGS), "nvcc": config.nvcc_flags(targets)},
            **common,
        )
    else:
        if src.cuda:
            _say(f"building the C++ ops only: {why_not}")
        ext = cpp_extension.CppExtension(
            "ntksap_fast._C", cpp, extra_compile_args={"cxx": list(config.CXX_FLAGS)}, **common
        )
    use_ninja = shutil.which("ninja") is not None
    cmdclass = {"build_ext": _checked_build_ext(cpp_extension.BuildExtension).with_options(use_ninja=use_ninja)}
    return [ext], cmdclass


def _checked_build_ext(base):
    class CheckedBuildExt(base):
        """build_ext that checks each built extension in a separate process and, when the check
        fails and $CXX/$CC name a non-system compiler, builds it again with the system one. An
        extension that cannot be built is left out (see _without_ext)."""

        def build_extension(self, ext):
            check = _load("check.py")

            def build(env: dict) -> str:
                if env:
                    _say(f"rebuilding {ext.name} with {env['CXX']} / {env['CC']}")
                    self._use_compiler(env["CC"], env["CXX"])
                    self.force = True
                super(CheckedBuildExt, self).build_extension(ext)
                return os.path.abspath(self.get_ext_fullpath(ext.name))

            with_cuda = any(p.endswith(".cu") for p in ext.sources)
            _say(f"building {ext.name} (C++{' and CUDA' if with_cuda else ''}, a few minutes)")
            try:
                lib, why = check.build_checked(build)
            except Exception as exc:  # a compiler that fails, a missing header, ...
                lib, why = None, f"the build failed ({type(exc).__name__}: {exc})"
            if lib is None:
                _without_ext(
                    f"{why}. If the C++ compiler's runtime does not match torch's (a custom GCC in "
                    "$CXX/$CC can build a library that crashes whenever an op raises an error), build "
                    "with the system compiler, e.g. CXX=/usr/bin/g++ CC=/usr/bin/gcc"
                )
                path = self.get_ext_fullpath(ext.name)
                if os.path.exists(path):  # a library that failed its check is not shipped
                    os.remove(path)
                return
            _say(f"{ext.name} built and checked ({lib})")

        def copy_extensions_to_source(self) -> None:
            # Replace the module file rather than overwrite it: a process that has the old one
            # loaded keeps its copy (a shared library rewritten in place crashes its users).
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:
                inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
                if not os.path.exists(regular_file):  # left out (see build_extension)
                    continue
                tmp = f"{inplace_file}.{os.getpid()}.tmp"
                shutil.copy2(regular_file, tmp)
                os.replace(tmp, inplace_file)

        def _use_compiler(self, cc: str, cxx: str) -> None:
            # torch's ninja build reads $CXX (and passes $CC to nvcc as -ccbin); distutils links
            # with the executables it configured from the environment at start-up.
            os.environ["CC"], os.environ["CXX"] = cc, cxx
            for key in self.compiler.executables:
                cmd = getattr(self.compiler, key, None)
                if key in ("archiver", "ranlib") or not cmd:
                    continue
                self.compiler.set_executable(key, [cxx if "cxx" in key else cc] + list(cmd[1:]))

    return CheckedBuildExt


ext_modules, cmdclass = _extensions()

# Everything else is in pyproject.toml ([project]).
setup(
    # triton_kernels/ is installed as ntksap_fast.kernels: a top-level "triton_kernels" would
    # collide with the distribution of that name that Triton publishes (DESIGN.md section 4).
    # (pyproject.toml can list packages or find them, not both: the subpackages are found here.)
    packages=find_packages(include=["ntksap_fast", "ntksap_fast.*"]) + ["ntksap_fast.kernels"],
    package_dir={"ntksap_fast.kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
