"""Guard against oneDNN's strided 1x1 weight-gradient bug on CPU (channels-last inputs).

oneDNN (PyTorch's CPU convolution library) computes the weight gradient of a strided 1x1
convolution by first copying the strided input pixels into a workspace ("reduce to unit stride").
With a channels-last (NHWC) source whose input channels are fewer than the kernel's channel
block (8 with AVX2, 16 with AVX-512), it writes past that workspace: upstream oneDNN issue 6035,
open at the time of writing. Depending on the heap this gives "double free or corruption", a
SIGSEGV, a hang with several threads, or silently wrong weight gradients. Measured on an AVX2 EPYC
with torch 2.14.1 (oneDNN 3.12): every ``Conv2d`` 1x1 stride-2 weight gradient with 2-7 input
channels corrupted memory in fresh processes, not deterministically (detection depends on the
heap); 8 and more channels, 3x3 kernels, stride 1, contiguous (NCHW) inputs, Conv1d and Conv3d
passed. The same convolution with a contiguous input is always computed correctly.

The rule here is wider than the observed bug, because the block size depends on the instruction
set: a CPU convolution (or transposed convolution, whose weight gradient oneDNN computes with the
same primitive) is *guarded* when

* its kernel is 1 in every spatial dim (the reduce-to-unit-stride workspace exists only in the 1x1
  kernels; measured: 3x3 kernels and 1x1 with padding never failed), and
* any stride is > 1 (a stride of (1, 2) failed as well), and
* its weight's channel dim (``weight.shape[1]``: input channels per group for a convolution,
  output channels per group for a transposed one) is not a multiple of ``CHANNEL_BLOCK`` = 16,
  the largest oneDNN block on x86 (AVX-512), and
* its input or weight is not already contiguous in the default (NCHW) layout.

A guarded call runs with contiguous input and weight (oneDNN then takes its blocked-layout path,
which is correct) and its output is returned in the input's memory format, so the layers after it
keep running channels-last. In practice: the strided 1x1 shortcuts of narrow networks; wide layers
(multiples of 16 channels) and stems (7x7, 3x3) are never touched. Stems were left out on purpose:
guarding a ResNet-50 stem (3 channels, 7x7, stride 2) costs 1.75x on that layer's forward and
weight gradient (measured, batch 16, 2 threads), for a kernel without the faulty workspace.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = [
    "CHANNEL_BLOCK",
    "CONV_FUNCTIONS",
    "is_affected",
    "needs_guard",
    "safe_conv_args",
    "guarded_conv",
    "ConvGuard",
]

#: Largest oneDNN channel block on x86 CPUs (AVX-512; AVX2 uses 8). Multiples of it are safe.
CHANNEL_BLOCK = 16

_CONV = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_TRANSPOSED = {F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3}
#: The functional convolutions ``guarded_conv`` handles (what ``nn.Conv*d`` and
#: ``nn.ConvTranspose*d`` call).
CONV_FUNCTIONS = (*_CONV, *_TRANSPOSED)
_LAYOUTS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _strides(stride: int | Sequence[int], spatial: int) -> tuple[int, ...]:
    if isinstance(stride, int):
        return (stride,) * spatial
    values = tuple(int(s) for s in stride)
    return values * spatial if len(values) == 1 else values


def is_affected(weight_shape: Sequence[int], stride: int | Sequence[int]) -> bool:
    """The shape rule alone: a 1x1(x1) kernel, some stride > 1, ``weight_shape[1] % CHANNEL_BLOCK != 0``.

    Args:
        weight_shape: the weight's shape, ``(C_out, C_in / groups, *kernel)`` for a convolution or
            ``(C_in, C_out / groups, *kernel)`` for a transposed one.
        stride: an int or one int per spatial dim.
    """
    if len(weight_shape) < 3:
        raise ValueError(f"weight_shape must be (out, in/groups, *kernel), got {tuple(weight_shape)}")
    spatial = len(weight_shape) - 2
    return (
        all(int(k) == 1 for k in weight_shape[2:])
        and any(s > 1 for s in _strides(stride, spatial))
        and int(weight_shape[1]) % CHANNEL_BLOCK != 0
    )


def _batched(t: torch.Tensor) -> bool:
    return torch._C._functorch.is_batchedtensor(t)


def needs_guard(input: torch.Tensor, weight: torch.Tensor, stride: int | Sequence[int] = 1) -> bool:
    """Whether this convolution must run with contiguous tensors: see the module docstring.

    ``input``: ``(N, C_in, *spatial)`` (or unbatched ``(C_in, *spatial)``); ``weight`` as for
    :func:`is_affected`. False for non-CPU tensors and for tensors already contiguous.
    """
    if input.device.type != "cpu" or weight.dim() < 3 or not is_affected(weight.shape, stride):
        return False
    return not (input.is_contiguous() and weight.is_contiguous())


def safe_conv_args(
    input: torch.Tensor, weight: torch.Tensor, stride: int | Sequence[int] = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input, weight)`` in a layout that avoids the bug: contiguous copies when guarded.

    Returns the arguments themselves when :func:`needs_guard` is False. Both are made contiguous
    because PyTorch runs oneDNN channels-last when either of them is channels-last.
    """
    if not needs_guard(input, weight, stride):
        return input, weight
    return input.contiguous(), weight.contiguous()


def _memory_format(t: torch.Tensor) -> torch.memory_format | None:
    """channels_last(_3d) when ``t`` is laid out so (and not also plain contiguous), else None."""
    layout = _LAYOUTS.get(t.dim())
    if layout is None or _batched(t) or t.is_contiguous():
        return None
    return layout if t.is_contiguous(memory_format=layout) else None


def guarded_conv(func: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
    """Calls ``func`` (one of ``CONV_FUNCTIONS``) with its usual arguments, guarded when needed.

    ``func(input, weight, bias=None, stride=1, ...)`` as in ``torch.nn.functional``. When
    :func:`needs_guard` holds, input and weight are made contiguous for the call and the output is
    returned in the input's channels-last format if it had one. Otherwise ``func`` runs unchanged.
    """
    if func not in _CONV and func not in _TRANSPOSED:
        raise ValueError(f"func must be one of {[f.__name__ for f in CONV_FUNCTIONS]}, got {func!r}")
    names = ("input", "weight", "bias", "stride")
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    input, weight, stride = bound.get("input"), bound.get("weight"), bound.get("stride", 1)
    if (
        not isinstance(input, torch.Tensor)
        or not isinstance(weight, torch.Tensor)
        or not needs_guard(input, weight, stride)
    ):
        return func(*args, **kwargs)
    layout = _memory_format(input)
    safe = dict(zip(("input", "weight"), safe_conv_args(input, weight, stride)))
    args = list(args)
    for position, name in enumerate(("input", "weight")):
        if position < len(args):
            args[position] = safe[name]
        else:
            kwargs[name] = safe[name]
    out = func(*args, **kwargs)
    return out.contiguous(memory_format=layout) if layout is not None and out.dim() == input.dim() else out


class ConvGuard(TorchFunctionMode):
    """A ``TorchFunctionMode`` that sends every functional convolution through :func:`guarded_conv`.

    ``with ConvGuard(): loss = model(x.contiguous(memory_format=torch.channels_last)).sum()``;
    the backward may run outside the block (the guarded calls' saved tensors are contiguous).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONV or func in _TRANSPOSED:
            return guarded_conv(func, *args, **kwargs)
        return func(*args, **kwargs)
