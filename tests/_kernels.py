"""Shared by the Triton kernel tests (``tests/kernels/test_kernel_<module>.py``, ``tests/kernels/test_kernels.py``).

Without a CUDA device the kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (conftest sets it
before triton is imported); with one, the same cases run compiled on CUDA tensors and the CPU cases
skip.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1 (not set: a CUDA device is present)"
        ),
    ),
    pytest.param("cuda", marks=pytest.mark.cuda),
]
#: One bfloat16 ulp, relative.
BF16_RTOL = 2.0**-7


def normal_close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Normals from the kernels against the twin's: ``|a - b| <= NORMAL_TOL * max(1, |b|)``."""
    from ntksap_fast.kernels.philox import NORMAL_TOL

    a, b = a.cpu(), b.cpu()
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    bound = NORMAL_TOL * b.abs().clamp(min=1.0)
    assert bool(((a - b).abs() <= bound).all()), f"max error {(a - b).abs().max().item():.3g}"


def weights_close(a: torch.Tensor, b: torch.Tensor, std: torch.Tensor) -> None:
    """Sampled values ``std * n (+ eps * z)``: the normals' error scaled by std."""
    from ntksap_fast.kernels.philox import NORMAL_TOL

    a, b, std = a.cpu(), b.cpu(), std.cpu()
    assert a.dtype == b.dtype == torch.float32
    bound = 4 * NORMAL_TOL * (std + b.abs())
    assert bool(((a - b).abs() <= bound).all()), f"max error {(a - b).abs().max().item():.3g}"
