"""ntksap_fast.kernels.fd_loss (``sum((f_clean - f_pert)**2)`` and its gradient) against its twin.

Tolerances: the loss to 1e-5 relative (summation order); float32 gradients exact; bf16 gradients one
bf16 ulp.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from ntksap_fast.kernels import fd_loss as fdl

from _kernels import BF16_RTOL, DEVICES


@pytest.mark.parametrize("device", DEVICES)
def test_fd_loss_and_gradient(device):
    g = torch.Generator().manual_seed(6)
    for shape, dtype in [
        ((1,), torch.float32),
        ((3,), torch.float32),
        ((6, 1031), torch.float32),
        ((256, 10), torch.float32),  # a 256-input batch's logits
        ((4, 7), torch.bfloat16),
    ]:
        a = torch.randn(shape, generator=g).to(device, dtype)
        b = (a.float() + 0.01 * torch.randn(shape, generator=g).to(device)).to(dtype)
        go = torch.randn((), generator=g).to(device)
        out = []
        for fn in (fdl.fd_loss, fdl.fd_loss_reference):
            fa, fb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
            loss = fn(fa, fb)
            out.append((loss,) + torch.autograd.grad(loss * go, (fa, fb)))
        (loss, ga, gb), (rloss, ra, rb) = out
        assert loss.shape == () and loss.dtype == torch.float32
        torch.testing.assert_close(loss, rloss, rtol=1e-5, atol=0)
        tol = BF16_RTOL if dtype == torch.bfloat16 else 0.0
        torch.testing.assert_close(ga, ra, rtol=tol, atol=tol * ra.abs().max().item())
        torch.testing.assert_close(gb, rb, rtol=tol, atol=tol * rb.abs().max().item())
    with pytest.raises(ValueError, match="f_pert"):
        fdl.fd_loss(torch.zeros(3, device=device), torch.zeros(4, device=device))
