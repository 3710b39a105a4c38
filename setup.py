"""Build and install ntksap_fast.

The package is pure Python plus one compiled extension, ``ntksap_fast._C`` (see csrc/): the
``torch.ops.ntksap_fast`` ops, C++ (OpenMP) always, CUDA when nvcc and a CUDA build of torch are
present. Install with ``pip install --no-build-isolation -e .`` so the extension builds against
the torch already in the environment.

Environment variables:
  NTKSAP_FAST_NO_CUDA=1       build the C++ (CPU) ops only, even where CUDA could be built.
  TORCH_CUDA_ARCH_LIST        GPU architectures to compile for; default "9.0" (H100/H200).
  CUDA_HOME                   CUDA toolkit; /usr/local/cuda is tried when unset.
  MAX_JOBS                    parallel compile jobs (ninja).
  NTKSAP_FAST_NO_EXT_BUILD=1  skip the extension entirely (pure Python install; the ops are then
                              built just in time on first use, or PyTorch fallbacks are used).
"""
import glob
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
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=use_ninja)}
    return [ext], cmdclass


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
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "safetensors", "torchvision", "matplotlib"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["ntksap=ntksap_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
