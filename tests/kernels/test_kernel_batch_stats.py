"""ntksap_fast.kernels.batch_stats (the clean branch's BatchNorm statistics) against float64.

Tolerances: var rtol 5e-7 (~4 float32 ulps; ~1 ulp measured), mean 2.5e-7 of |mean| + std, against
float64 statistics, also for |mean| >> std; the twin (float64, rounded once) to 1e-7.

The kernel splits the batch into chunks of ``BPC`` samples so that ~1024 programs share the work;
the GPU-run shapes below make the last chunk short: NCHW (41, 130, 3, 3) runs 33 channel tiles x 21
chunks of 2 samples, the last of 1; NCHW (256, 130, 2, 2) 33 x 29 chunks of 9, the last of 4. The
interpreter runs the latter in ~80 s on two cores, so it runs on CUDA devices only; on the CPU the
batch of 256 is covered as BatchNorm1d input (one sample per chunk).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from ntksap_fast.kernels import batch_stats as bst

from _kernels import DEVICES

BN_CASES = [  # (shape, channels_last, loc, spread)
    ((6, 5, 7, 3), False, 5, 2),
    ((6, 5, 7, 3), True, 1000, 1),
    ((5, 70), False, 0, 1),
    ((3, 2, 9), False, -3, 0.01),
    ((2, 1, 1, 1), False, 0, 1),
    ((4, 130, 3, 3), True, 2, 3),  # more channels than one tile
]
GPU_CASES = [  # batches and channel counts of a GPU run (see the docstring)
    ((41, 130, 3, 3), False, 0.5, 1),  # the last chunk short
    ((41, 130, 3, 3), True, 0.5, 1),
    ((256, 512), False, 1, 1),  # BatchNorm1d after a 512-wide Linear
]
CUDA_ONLY = ((256, 130, 2, 2), False, 3, 0.5)  # the last chunk short; ~80 s under the interpreter


def _check_against_float64(x: torch.Tensor) -> None:
    mean, var = bst.clean_stats(x)
    channels = x.shape[1]
    assert mean.shape == var.shape == (channels,) and mean.dtype == var.dtype == torch.float32
    ref_mean, ref_var = bst.clean_stats_reference(x.cpu())
    dims = [0] + list(range(2, x.dim()))
    var64, mean64 = torch.var_mean(x.double().cpu(), dims, correction=1)
    torch.testing.assert_close(ref_var.double(), var64, rtol=1e-7, atol=0)  # the twin: rounded once
    torch.testing.assert_close(ref_mean.double(), mean64, rtol=1e-7, atol=0)
    torch.testing.assert_close(var.cpu().double(), var64, rtol=5e-7, atol=0)  # ~4 float32 ulps
    error = (mean.cpu().double() - mean64).abs() / (mean64.abs() + var64.sqrt())
    assert error.max().item() <= 2.5e-7, f"mean off by {error.max().item():.3g} of |mean| + std"


def _input(shape, channels_last: bool, loc: float, spread: float, seed: int, device: str) -> torch.Tensor:
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * spread + loc).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("device", DEVICES)
def test_clean_stats_match_float64(device):
    for i, (shape, cl, loc, spread) in enumerate(BN_CASES):
        _check_against_float64(_input(shape, cl, loc, spread, 3 + i, device))
    with pytest.raises(TypeError, match="x"):
        bst.clean_stats(torch.zeros(4, 3, device=device, dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape,channels_last,loc,spread",
    GPU_CASES,
    ids=[f"{'x'.join(map(str, c[0]))}{'-cl' if c[1] else ''}" for c in GPU_CASES],
)
@pytest.mark.slow
def test_clean_stats_at_gpu_batch_shapes(device, shape, channels_last, loc, spread):
    _check_against_float64(_input(shape, channels_last, loc, spread, 11, device))


@pytest.mark.cuda  # ~80 s under the interpreter
def test_clean_stats_at_a_256_batch_with_a_short_last_chunk():
    shape, channels_last, loc, spread = CUDA_ONLY
    _check_against_float64(_input(shape, channels_last, loc, spread, 11, "cuda"))
