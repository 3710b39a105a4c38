"""Finite-difference loss ``L_g = sum((f_clean - f_pert)**2)`` per draw, with its gradient, in one pass.

``f_clean``, ``f_pert``: ``(groups * B, ...)`` float32/bf16/fp16 outputs of the two branches of
``groups`` draws stacked along dim 0. The forward reads both once, writes per-program partial sums
of the loss and the float32 gradient ``2 * (f_c - f_p)`` (saved for the backward); the backward
scales it by the incoming gradient of each draw's loss and writes ``dL/df_c`` and ``dL/df_p = -dL/df_c``
in one pass. The gradients equal autograd's of the twin bit for bit in float32 (``2*(a-b)*go`` with
the same rounding); the loss is a float32 sum in a different order (~1e-6 relative).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["FDLoss", "fd_loss", "fd_loss_reference"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK = 1024


@triton.jit
def _fd_loss_fwd_kernel(fc_ptr, fp_ptr, d2_ptr, part_ptr, M, P, BLOCK: tl.constexpr):
    """Program (i, g): elements ``i*BLOCK ..`` of group g (rows of ``M`` elements)."""
    i = tl.program_id(0)
    g = tl.program_id(1)
    offs = g.to(tl.int64) * M + i * BLOCK + tl.arange(0, BLOCK)
    ok = i * BLOCK + tl.arange(0, BLOCK) < M
    fc = tl.load(fc_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    fp = tl.load(fp_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    d = fc - fp
    tl.store(d2_ptr + offs, 2.0 * d, mask=ok)
    tl.store(part_ptr + g * P + i, tl.sum(d * d, axis=0))


@triton.jit
def _fd_loss_bwd_kernel(d2_ptr, go_ptr, gc_ptr, gp_ptr, M, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    g = tl.program_id(1)
    offs = g.to(tl.int64) * M + i * BLOCK + tl.arange(0, BLOCK)
    ok = i * BLOCK + tl.arange(0, BLOCK) < M
    go = tl.load(go_ptr + g).to(tl.float32)
    grad = tl.load(d2_ptr + offs, mask=ok, other=0.0) * go
    tl.store(gc_ptr + offs, grad.to(gc_ptr.dtype.element_ty), mask=ok)
    tl.store(gp_ptr + offs, (-grad).to(gp_ptr.dtype.element_ty), mask=ok)


class FDLoss(torch.autograd.Function):
    """``(f_clean, f_pert, groups) -> loss`` float32 ``(groups,)``; see the module docstring."""

    @staticmethod
    def forward(ctx, f_clean: torch.Tensor, f_pert: torch.Tensor, groups: int) -> torch.Tensor:
        for name, f in (("f_clean", f_clean), ("f_pert", f_pert)):
            if f.dtype not in _DTYPES:
                raise TypeError(f"{name} must be float32, bfloat16 or float16, got {f.dtype}")
        if f_clean.shape != f_pert.shape:
            raise ValueError(f"f_pert has shape {tuple(f_pert.shape)}, f_clean {tuple(f_clean.shape)}")
        if f_clean.dim() == 0 or groups < 1 or f_clean.shape[0] % groups:
            raise ValueError(f"groups={groups} must divide the batch dim of shape {tuple(f_clean.shape)}")
        fc, fp = f_clean.contiguous(), f_pert.contiguous()
        m = fc.numel() // groups
        p = max(1, triton.cdiv(m, _BLOCK))
        d2 = torch.empty(fc.shape, dtype=torch.float32, device=fc.device)
        partials = torch.zeros(groups, p, dtype=torch.float32, device=fc.device)
        if m:
            _fd_loss_fwd_kernel[(p, groups)](fc, fp, d2, partials, m, p, BLOCK=_BLOCK)
        ctx.save_for_backward(d2)
        ctx.meta = (groups, m, p, f_clean.dtype, f_pert.dtype)
        return partials.sum(1)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (d2,) = ctx.saved_tensors
        groups, m, p, dtype_c, dtype_p = ctx.meta
        gc = torch.empty(d2.shape, dtype=dtype_c, device=d2.device)
        gp = torch.empty(d2.shape, dtype=dtype_p, device=d2.device)
        if m:
            go = grad_loss.to(torch.float32).contiguous()
            _fd_loss_bwd_kernel[(p, groups)](d2, go, gc, gp, m, BLOCK=_BLOCK)
        return gc, gp, None


def fd_loss(f_clean: torch.Tensor, f_pert: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``sum((f_clean - f_pert)**2)`` of each of ``groups`` draws: float32 ``(groups,)``, differentiable."""
    return FDLoss.apply(f_clean, f_pert, groups)


def fd_loss_reference(f_clean: torch.Tensor, f_pert: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """PyTorch twin of ``fd_loss`` (the engine's ``(out_clean - out_pert).square().sum()``)."""
    d = f_clean.float() - f_pert.float()
    return d.square().reshape(groups, -1).sum(1)
