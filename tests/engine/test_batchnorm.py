"""The BatchNorm mode's arithmetic: ``normalize`` against aten's eval-mode ``F.batch_norm``.

On CPU tensors float32/float64 take the multiply-add path, bfloat16 the ``F.batch_norm`` path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ntksap_fast.engine.batchnorm import normalize


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,channels_last",
    [((6, 5), False), ((4, 5, 7), False), ((3, 5, 6, 4), True), ((3, 5, 6, 4), False), ((2, 5, 3, 4, 2), True)],
)
@pytest.mark.parametrize("affine", [True, False])
def test_normalize_equals_eval_batch_norm_forward_and_backward(dtype, shape, channels_last, affine):
    g = torch.Generator().manual_seed(0)
    x = (3 + 2 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    c = shape[1]
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    mean = torch.randn(c, generator=g, dtype=param_dtype)
    var = torch.rand(c, generator=g, dtype=param_dtype) + 0.1
    weight = torch.randn(c, generator=g, dtype=param_dtype) if affine else None
    bias = torch.randn(c, generator=g, dtype=param_dtype) if affine else None
    grad_out = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)

    outs, grads, dtypes = [], [], []
    for fn in (normalize, lambda *a: F.batch_norm(a[0], a[1], a[2], a[3], a[4], False, 0.0, a[5])):
        leaf = x.detach().requires_grad_(True)
        y = fn(leaf, mean, var, weight, bias, 1e-5)
        (gx,) = torch.autograd.grad(y, leaf, grad_out)
        dtypes.append(y.dtype)
        if channels_last:  # the layers after it keep running channels-last
            assert y.is_contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        outs.append(y.double())
        grads.append(gx.double())
    # Same formula, different rounding order: a few ulps of the output's scale.
    ulp = {torch.float32: 2.0**-23, torch.float64: 2.0**-52, torch.bfloat16: 2.0**-7}[dtype]
    for a, b in (outs, grads):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 8 * ulp * b.abs().max()
    assert dtypes[0] == dtypes[1] == dtype
