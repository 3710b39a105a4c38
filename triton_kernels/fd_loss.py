"""Finite-difference loss ``L = sum((f_clean - f_pert)**2)`` with its gradient, in one pass each way.

``f_clean``, ``f_pert``: the two branches' outputs, same shape, float32/bf16/fp16. The forward reads
both once, writes per-program partial sums of the loss and the float32 gradient ``2 * (f_c - f_p)``
(saved for the backward); the backward scales it by the incoming gradient and writes ``dL/df_c``
and ``dL/df_p = -dL/df_c`` in one pass. The gradients equal autograd's of the twin bit for bit in
float32 (``2*(a-b)*go`` with the same rounding); the loss is a float32 sum in a different order
(~1e-6 relative). Sizes are runtime arguments: one compiled kernel per input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["FDLoss", "fd_loss", "fd_loss_reference"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK = 1024


@triton.jit(do_not_specialize=["M"])
def _fd_loss_fwd_kernel(fc_ptr, fp_ptr, grad2_ptr, part_ptr, M, BLOCK: tl.constexpr):
    """Program i: elements ``i*BLOCK ..``; stores ``2*(f_c - f_p)`` and its partial sum of squares."""
    i = tl.program_id(0)
    offs = i.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M
    fc = tl.load(fc_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    fp = tl.load(fp_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    d = fc - fp
    tl.store(grad2_ptr + offs, 2.0 * d, mask=ok)
    tl.store(part_ptr + i, tl.sum(d * d, axis=0))


@triton.jit(do_not_specialize=["M"])
def _fd_loss_bwd_kernel(grad2_ptr, go_ptr, gc_ptr, gp_ptr, M, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M
    go = tl.load(go_ptr).to(tl.float32)
    grad = tl.load(grad2_ptr + offs, mask=ok, other=0.0) * go
    tl.store(gc_ptr + offs, grad.to(gc_ptr.dtype.element_ty), mask=ok)
    tl.store(gp_ptr + offs, (-grad).to(gp_ptr.dtype.element_ty), mask=ok)


class FDLoss(torch.autograd.Function):
    """``(f_clean, f_pert) -> loss``, a float32 scalar; see the module docstring."""

    @staticmethod
    def forward(ctx, f_clean: torch.Tensor, f_pert: torch.Tensor) -> torch.Tensor:
        for name, f in (("f_clean", f_clean), ("f_pert", f_pert)):
            if f.dtype not in _DTYPES:
                raise TypeError(f"{name} must be float32, bfloat16 or float16, got {f.dtype}")
        if f_clean.shape != f_pert.shape:
            raise ValueError(f"f_pert has shape {tuple(f_pert.shape)}, f_clean {tuple(f_clean.shape)}")
        fc, fp = f_clean.contiguous(), f_pert.contiguous()
        m = fc.numel()
        p = max(1, triton.cdiv(m, _BLOCK))
        grad2 = torch.empty(fc.shape, dtype=torch.float32, device=fc.device)
        partials = torch.zeros(p, dtype=torch.float32, device=fc.device)
        if m:
            _fd_loss_fwd_kernel[(p,)](fc, fp, grad2, partials, m, BLOCK=_BLOCK)
        ctx.save_for_backward(grad2)
        ctx.meta = (m, p, f_clean.dtype, f_pert.dtype)
        return partials.sum()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad2,) = ctx.saved_tensors
        m, p, dtype_c, dtype_p = ctx.meta
        gc = torch.empty(grad2.shape, dtype=dtype_c, device=grad2.device)
        gp = torch.empty(grad2.shape, dtype=dtype_p, device=grad2.device)
        if m:
            go = grad_loss.to(torch.float32).reshape(1).contiguous()
            _fd_loss_bwd_kernel[(p,)](grad2, go, gc, gp, m, BLOCK=_BLOCK)
        return gc, gp


def fd_loss(f_clean: torch.Tensor, f_pert: torch.Tensor) -> torch.Tensor:
    """``sum((f_clean - f_pert)**2)``: a float32 scalar, differentiable."""
    return FDLoss.apply(f_clean, f_pert)


def fd_loss_reference(f_clean: torch.Tensor, f_pert: torch.Tensor) -> torch.Tensor:
    """PyTorch twin of ``fd_loss`` (the engine's ``(out_clean - out_pert).square().sum()``)."""
    return (f_clean.float() - f_pert.float()).square().sum()
