"""Build and install ntksap_fast.

The package is pure Python plus one compiled extension, ``ntksap_fast._C`` (see csrc/): the
``torch.ops.ntksap_fast`` ops, C++ (OpenMP) always, CUDA when nvcc and a CUDA build of torch are
present. Install with ``pip install --no-build-isolation -e .`` so the extension builds against
the torch already in the environment (pyproject.toml names the build requirements, so this also
works offline: ``--no-deps --no-index``).

The built extension is checked in a separate process before the build counts as done
(``ntksap_fast/_ext.py``: ``verify``): its ops must give the right answers and raise ordinary
Python errors on bad arguments. A C++ compiler whose runtime does not match torch's (e.g. a
custom GCC in ``$CXX``) can build a library that crashes right there; if ``$CXX``/``$CC`` name
such a compiler, the extension is built once more with the system compiler, and if no build
passes, the install stops with a message saying what to set.

Environment variables:
  NTKSAP_FAST_NO_CUDA=1       build the C++ (CPU) ops only, even where CUDA could be built.
  TORCH_CUDA_ARCH_LIST        GPU architectures to compile for; default "9.0" (H100/H200).
  CUDA_HOME                   CUDA toolkit; /usr/local/cuda is tried when unset.
  MAX_JOBS                    parallel compile jobs (ninja).
  NTKSAP_FAST_NO_EXT_BUILD=1  skip the extension entirely (pure Python install; the ops are then
                              built just in time on first use, or PyTorch fallbacks are used).
"""
import glob
import importlib.util
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _truthy(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no")


def _find_nvcc():
    """Path of nvcc when a CUDA build is possible, else None."""
    if _truthy("NTKSAP_FAST_NO_CUDA"):
        return None
    import torch

    if not torch.version.cuda:
        return None
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = []
    if home:
        candidates.append(os.path.join(home, "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def _extensions():
    if _truthy("NTKSAP_FAST_NO_EXT_BUILD"):
        return [], {}
    from torch.utils import cpp_extension

    cpp = sorted(
        os.path.relpath(p, ROOT)
        for p in glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))
        if not os.path.basename(p).startswith("test_")
    )
    cu = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    cxx_flags = ["-O3", "-fopenmp"]
    link_flags = ["-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    nvcc = _find_nvcc()
    if nvcc and cu:
        # cpp_extension reads CUDA_HOME at import; make sure it matches the nvcc found.
        os.environ.setdefault("CUDA_HOME", os.path.dirname(os.path.dirname(nvcc)))
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
        ext = cpp_extension.CUDAExtension(
            "ntksap_fast._C",
            cpp + cu,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=link_flags,
        )
    else:
        ext = cpp_extension.CppExtension(
            "ntksap_fast._C",
            cpp,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    use_ninja = shutil.which("ninja") is not None
    cmdclass = {"build_ext": _checked_build_ext(cpp_extension.BuildExtension).with_options(use_ninja=use_ninja)}
    return [ext], cmdclass


def _loader():
    """ntksap_fast/_ext.py on its own (the package is not importable in the middle of a build)."""
    spec = importlib.util.spec_from_file_location("_ntksap_fast_ext", os.path.join(ROOT, "ntksap_fast", "_ext.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _checked_build_ext(base):
    class CheckedBuildExt(base):
        """build_ext that checks each built extension in a separate process and, when the check
        fails and $CXX/$CC name a non-system compiler, builds it again with the system one."""

        def build_extension(self, ext):
            loader = _loader()

            def build(env: dict) -> str:
                if env:
                    print(f"ntksap_fast: rebuilding {ext.name} with {env['CXX']} / {env['CC']}")
                    self._use_compiler(env["CC"], env["CXX"])
                    self.force = True
                super(CheckedBuildExt, self).build_extension(ext)
                return os.path.abspath(self.get_ext_fullpath(ext.name))

            print(f"ntksap_fast: building {ext.name} (C++{' and CUDA' if any(p.endswith('.cu') for p in ext.sources) else ''}, a few minutes)")
            lib, why = loader.build_checked(build)
            if lib is None:
                raise RuntimeError(
                    f"ntksap_fast: the compiled extension fails its check: {why}.\n"
                    "The C++ compiler must match the C++ runtime torch runs with (a custom GCC in "
                    "$CXX/$CC can build a library that crashes whenever an op raises an error). "
                    "Build with the compiler torch was built with or the system one, e.g. "
                    "CXX=/usr/bin/g++ CC=/usr/bin/gcc, or install without the compiled ops "
                    "(PyTorch fallbacks) with NTKSAP_FAST_NO_EXT_BUILD=1."
                )
            print(f"ntksap_fast: {ext.name} built and checked ({lib})")

        def copy_extensions_to_source(self) -> None:
            # Replace the module file rather than overwrite it: a process that has the old one
            # loaded keeps its copy (a shared library rewritten in place crashes its users).
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:
                inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
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

setup(
    name="ntksap_fast",
    version="0.1.0",
    description="Fast, exact, reproducible NTK-SAP pruning at initialization for PyTorch",
    python_requires=">=3.10",
    # triton_kernels/ is installed as ntksap_fast.kernels: a top-level "triton_kernels" would
    # collide with the distribution of that name that Triton publishes (DESIGN.md section 4).
    packages=find_packages(include=["ntksap_fast", "ntksap_fast.*"]) + ["ntksap_fast.kernels"],
    package_dir={"ntksap_fast.kernels": "triton_kernels"},
    # safetensors: save_masks/load_masks with .safetensors files (the CLI's default format).
    install_requires=["torch>=2.4", "numpy", "tqdm", "safetensors"],
    extras_require={
        # triton: the Triton kernels run under its interpreter in CI (no GPU needed).
        "test": ["pytest", "pytest-benchmark", "torchvision", "matplotlib", "triton; platform_system == 'Linux'"],
        "plot": ["matplotlib"],
        "examples": ["scikit-learn", "matplotlib"],
    },
    entry_points={"console_scripts": ["ntksap=ntksap_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
