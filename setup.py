"""Build and install ntksap_fast.

The package is pure Python plus one compiled extension, ``ntksap_fast._C`` (see csrc/).
Install with ``pip install --no-build-isolation -e .`` so the extension builds against the
torch already in the environment.
"""
from setuptools import find_packages, setup

setup(
    name="ntksap_fast",
    version="0.1.0",
    description="Fast, exact, reproducible NTK-SAP pruning at initialization for PyTorch",
    python_requires=">=3.10",
    packages=find_packages(include=["ntksap_fast", "ntksap_fast.*"]),
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "safetensors", "torchvision"],
    },
)
