"""Checks of the public arguments, shared by every entry point so errors read the same."""
from __future__ import annotations

import math
import numbers
import os
import sys
from typing import Sequence

import torch
from torch import nn

__all__ = ["check_int", "check_float", "check_epsilon", "check_seed", "check_density", "resolve_input_shape",
           "batch_sizes", "resolve_device", "cpu_has_bfloat16", "user_stacklevel"]


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``; ``TypeError``/``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_float(name: str, value) -> float:
    """``value`` as a float; ``TypeError`` naming ``name`` unless it is a real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_epsilon(value) -> float:
    epsilon = check_float("epsilon", value)
    if not math.isfinite(epsilon) or epsilon <= 0:
        raise ValueError(f"epsilon must be a finite number > 0, got {value}")
    return epsilon


def check_seed(value) -> int:
    seed = check_int("seed", value, minimum=0)
    if seed >= 2**64:
        raise ValueError(f"seed must be < 2**64, got {value}")
    return seed


def check_density(value, name: str = "density") -> float:
    density = check_float(name, value)
    if not (0.0 < density <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return density


def resolve_input_shape(model: nn.Module, input_shape) -> tuple[int, ...]:
    """``input_shape`` as a tuple of ints, or the model's own ``input_shape`` attribute if None."""
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
        if input_shape is None:
            raise ValueError(
                f"input_shape is needed: {type(model).__name__} does not say what input it takes; pass one "
                "sample's shape without the batch dimension, e.g. input_shape=(3, 224, 224)"
            )
    if isinstance(input_shape, torch.Size):
        input_shape = tuple(input_shape)
    if not isinstance(input_shape, (tuple, list)) or not input_shape:
        raise TypeError(f"input_shape must be a non-empty tuple of ints, got {input_shape!r}")
    for s in input_shape:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1:
            raise ValueError(f"input_shape must hold positive ints, got {tuple(input_shape)!r}")
    return tuple(int(s) for s in input_shape)


def batch_sizes(draws: int, batch_size: int | Sequence[int]) -> list[int]:
    """Inputs per draw, one entry per draw, from an int or a list of ``draws`` ints."""
    if isinstance(batch_size, (list, tuple)):
        sizes = [check_int("batch_size", b) for b in batch_size]
        if len(sizes) != draws:
            raise ValueError(f"batch_size has {len(sizes)} entries but draws is {draws}; give one size per draw")
        return sizes
    return [check_int("batch_size", batch_size)] * draws


def resolve_device(model: nn.Module, device) -> torch.device:
    """``device`` as a ``torch.device``; the model's (first parameter's) device when None."""
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must name a torch device, got {device!r}") from err


def cpu_has_bfloat16() -> bool:
    """Whether oneDNN runs bfloat16 convolutions natively on this CPU (AVX-512 BF16 or AMX).

    True when PyTorch cannot tell (the probe is private API).
    """
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return True if probe is None else bool(probe())
    except RuntimeError:
        return True


def user_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` called by the caller of this function that points
    at the first frame outside the package (the user's line, whichever entry point they used)."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level
