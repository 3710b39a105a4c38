import os

import pytest
import torch

# Two threads, as on CI; tests compare numbers, never timings.
torch.set_num_threads(min(2, torch.get_num_threads()))

# GPU agreement tests compare against float32/float64 references: TF32 convolutions and matmuls
# round inputs to 10 mantissa bits (measured on an H100: ResNet-20 scores 7.3% relative L2 from the
# CPU with TF32, 0.25% without), so every test runs with TF32 off. No effect on CPU.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter. triton.jit reads
# this when a kernel is decorated, so it is set here, before any test module imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` (pyproject.toml registers the markers) skip where there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked cuda)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)
