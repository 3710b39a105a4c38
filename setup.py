"""Build and install ntksap_fast.

The package is pure Python plus one compiled extension, ``ntksap_fast._C`` (see csrc/): the
``torch.ops.ntksap_fast`` ops, C++ (OpenMP) always, CUDA when nvcc and a CUDA build of torch are
present. Install with ``pip install --no-build-isolation .`` (``-e .`` for development) so the
extension builds against the torch already in the environment (pyproject.toml names the build
requirements, so this also works offline: ``--no-deps --no-index``). Sources, flags and CUDA
architectures come from ``ntksap_fast/_build/config.py`` (shared with CMakeLists.txt and the
just-in-time build).

The built extension is checked in a separate process before the build counts as done
(``ntksap_fast/_build/loader.py``: ``verify``): its ops must give the right answers and raise ordinary
Python errors on bad arguments. A C++ compiler whose runtime does not match torch's (e.g. a
custom GCC in ``$CXX``) can build a library that crashes right there; if ``$CXX``/``$CC`` name
such a compiler, the extension is built once more with the system compiler.

Without a working C++ compiler (or when the build or its check fails) the package installs
without the compiled ops and uses its PyTorch implementations, saying so here and at first use;
``NTKSAP_FAST_REQUIRE_EXT=1`` makes that an error instead (``make test`` and CI set it).

Environment variables:
  NTKSAP_FAST_NO_CUDA=1       build the C++ (CPU) ops only, even where CUDA could be built.
  TORCH_CUDA_ARCH_LIST        GPU architectures to compile for, e.g. "8.6" or "8.0;9.0+PTX";
                              default: _build_config.DEFAULT_CUDA_ARCH_LIST (less what nvcc lacks).
  CUDA_HOME                   CUDA toolkit; /usr/local/cuda is tried when unset.
  MAX_JOBS                    parallel compile jobs (ninja).
  NTKSAP_FAST_REQUIRE_EXT=1   fail the install when the compiled ops cannot be built.
  NTKSAP_FAST_NO_EXT_BUILD=1  skip the extension entirely (pure Python install; the ops are then
                              built just in time on first use in a source checkout, or PyTorch
                              fallbacks are used).
"""
import importlib.util
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load(name: str, relpath: str):
    """A module of the package on its own, by path (the package is not importable mid-build)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relpath))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


config = _load("_ntksap_fast_build_config", os.path.join("ntksap_fast", "_build", "config.py"))


def _truthy(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no")


def _say(message: str) -> None:
    print(f"ntksap_fast: {message}", file=sys.stderr, flush=True)


def _without_ext(why: str) -> None:
    """Goes on without the compiled ops (saying why), or stops under NTKSAP_FAST_REQUIRE_EXT=1."""
    if _truthy("NTKSAP_FAST_REQUIRE_EXT"):
        raise RuntimeError(
            f"ntksap_fast: the compiled ops cannot be built: {why}. NTKSAP_FAST_REQUIRE_EXT=1 makes "
            "them mandatory; unset it to install with the PyTorch implementations instead."
        )
    _say(
        f"WARNING: installing WITHOUT the compiled ops ({why}); the slower PyTorch implementations "
        "will be used. Install a C++ compiler (and nvcc for the CUDA ops) and reinstall to get them; "
        "NTKSAP_FAST_REQUIRE_EXT=1 makes this an error."
    )


def _find_nvcc():
    """``(nvcc path or None, why none)`` for a CUDA build."""
    if _truthy("NTKSAP_FAST_NO_CUDA"):
        return None, "NTKSAP_FAST_NO_CUDA is set"
    import torch

    if not torch.version.cuda:
        return None, "torch is a build without CUDA"
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = ([os.path.join(home, "bin", "nvcc")] if home else []) + ["/usr/local/cuda/bin/nvcc"]
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path, ""
    return None, f"nvcc not found (looked for {' and '.join(candidates)}; set CUDA_HOME)"


def _missing_compiler():
    """Why no C++ compiler can be run (None when one can)."""
    cxx = os.environ.get("CXX") or "c++"
    if shutil.which(cxx.split()[0]) is None:
        return f"no C++ compiler: {cxx!r} not found{' ($CXX)' if os.environ.get('CXX') else ''}"
    return None


def _extensions():
    if _truthy("NTKSAP_FAST_NO_EXT_BUILD"):
        _say("NTKSAP_FAST_NO_EXT_BUILD is set: not building the compiled ops")
        return [], {}
    missing = _missing_compiler()
    if missing:
        _without_ext(missing)
        return [], {}
    from torch.utils import cpp_extension

    src = config.sources(ROOT)
    common = dict(
        include_dirs=[os.path.join(ROOT, config.INCLUDE_DIR)],
        extra_link_args=list(config.LINK_FLAGS),
    )
    cpp = [*src.cpp, src.module]
    nvcc, why_not = _find_nvcc()
    if nvcc and src.cuda:
        targets, dropped = config.build_targets(nvcc)
        if dropped:
            _say(f"{nvcc} cannot build {', '.join(map(str, dropped))}: left out (those GPUs use PyTorch)")
        _say(f"CUDA targets: {', '.join(map(str, targets))}")
        # cpp_extension reads CUDA_HOME at import; make sure it matches the nvcc found.
        os.environ.setdefault("CUDA_HOME", os.path.dirname(os.path.dirname(nvcc)))
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
        # The -gencode flags are ours, so torch adds none of its own (it reads TORCH_CUDA_ARCH_LIST).
        ext = cpp_extension.CUDAExtension(
            "ntksap_fast._C", cpp + list(src.cuda),
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
            loader = _load("_ntksap_fast_ext", os.path.join("ntksap_fast", "_build", "loader.py"))

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
                lib, why = loader.build_checked(build)
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


def _long_description() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


ext_modules, cmdclass = _extensions()

setup(
    name="ntksap_fast",
    version="0.1.0",
    description="Fast, exact, reproducible NTK-SAP pruning at initialization for PyTorch",
    long_description=_long_description(),
    long_description_content_type="text/markdown",
    author="ntksap_fast contributors",
    license_expression="MIT",
    license_files=["LICENSE"],
    classifiers=[
        "Development Status :: 4 - Beta",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: C++",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Environment :: GPU :: NVIDIA CUDA",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    python_requires=">=3.10",
    # triton_kernels/ is installed as ntksap_fast.kernels: a top-level "triton_kernels" would
    # collide with the distribution of that name that Triton publishes (DESIGN.md section 4).
    packages=find_packages(include=["ntksap_fast", "ntksap_fast.*"]) + ["ntksap_fast.kernels"],
    package_dir={"ntksap_fast.kernels": "triton_kernels"},
    # Lower bounds of torch and torchvision: the releases `make test` installs and CI tests
    # (2.14.1, 0.29.1; older ones are not tested). README "Install" lists every tested version.
    # safetensors: save_masks/load_masks with .safetensors files (the CLI's default format).
    # torchvision: the model zoo of the presets (--preset imagenet) and the examples.
    # torch-pruning: the channel groups (DependencyGraph) of granularity="channel" and the surgery of
    # export_pruned (pure Python; 1.6 is the release tested).
    install_requires=[
        "torch>=2.14",
        "torchvision>=0.29",
        "numpy>=1.24",
        "tqdm>=4.60",
        "safetensors>=0.4",
        "torch-pruning>=1.6",
    ],
    extras_require={
        # triton: the Triton kernels run under its interpreter in CI (no GPU needed).
        # timm, transformers: models from those zoos in the architecture tests.
        "test": [
            "pytest>=7",
            "pytest-benchmark>=4",
            "matplotlib>=3.6",
            "timm>=1.0",
            "transformers>=4.40",
            "triton>=3.0; platform_system == 'Linux'",
        ],
        "plot": ["matplotlib>=3.6"],
        "examples": ["scikit-learn>=1.2", "matplotlib>=3.6"],
    },
    entry_points={"console_scripts": ["ntksap=ntksap_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
