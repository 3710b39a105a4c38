"""Which score entries sit near a ReLU kink, found with the oracle (the kink rule of the Triton tests).

Two float32 computations of the same scores (the PyTorch and the Triton path) differ by float32
rounding, amplified ~1/eps by the estimator's double finite difference: ~5e-6 of the largest
score at eps = 0.01 (README). One thing breaks that bound: a ReLU input that lies within rounding
of 0 can land on different sides of the kink in the two paths. Its value is ~0 either way, but the
gradient through it is passed in one path and blocked in the other, which moves the scores of the
entries whose gradient flows through it by O(1) of their size (measured on a 20-16-5 MLP with one
BatchNorm output placed at 0: the 20 entries of the weight row producing that unit moved by up to
0.14 of the largest score when the two paths disagreed on its sign; every other entry stayed
within 5e-6).

**The kink rule.** Run the float64 oracle on the same draws and record every ReLU input ``a`` (each
call: statistics pass, clean and perturbed branch, every draw). An element is *at a kink* when
``|a| < KINK_DELTA * rms(a)`` (rms over that call's input tensor). ``KINK_DELTA = 1e-4`` is 20 times
the largest difference between the two float32 paths' ReLU inputs we measured (5.0e-6 rms on
ResNet-8, 8.4e-7 on the small nets), so outside that band both paths put the element on the same
side as float64. An entry is *near a kink* when its float64 score moves by more than
``KINK_SCORE_TOL = 1e-6`` of the largest score once the gradient gate of every element at a kink
is flipped (the oracle rerun with those ReLUs passing the gradient they blocked and blocking the
one they passed; forward values unchanged). Every other entry is *away from kinks*. Models here
have no max-pool (a max-pool pair within rounding of a tie would need the same treatment).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ntksap_fast.testing.reference import reference_scores

KINK_DELTA = 1e-4
KINK_SCORE_TOL = 1e-6

_RELU = {F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}


class _ReluGates(TorchFunctionMode):
    """Records ReLU inputs (``flips=None``) or flips the gradient gate of listed elements.

    ``flips``: per ReLU call (in call order) a bool tensor of the input's shape, or None.
    Recording keeps, per call, the input (``inputs``, float64 copies) and the elements at a kink
    (``at_kink``: a bool tensor, or None where there are none).
    """

    def __init__(self, flips: list[torch.Tensor | None] | None = None) -> None:
        super().__init__()
        self.flips = flips
        self.inputs: list[torch.Tensor] = []
        self.at_kink: list[torch.Tensor | None] = []
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _RELU:
            return func(*args, **kwargs)
        a = args[0]
        call, self.calls = self.calls, self.calls + 1
        if self.flips is None:
            value = a.detach().double().clone()
            self.inputs.append(value)
            near = value.abs() < KINK_DELTA * value.pow(2).mean().sqrt()
            self.at_kink.append(near if near.any() else None)
            return func(*args, **kwargs)
        flip = self.flips[call]
        if flip is None:
            return func(*args, **kwargs)
        out = torch.relu(a)  # the oracle's models use the returned value, in-place ReLU or not
        gate = (a.detach() > 0).to(a.dtype)
        flipped = torch.where(flip, 1 - gate, gate)
        return out + (flipped - gate) * (a - a.detach())  # same values, flipped gradient gate


def kink_entries(model: nn.Module, input_shape, masks=None, **oracle_kwargs) -> tuple[torch.Tensor, int]:
    """``(near_kink, n_at_kink)``: flat bool tensor over the prunable entries (the oracle's layout)
    marking entries near a kink, and the number of ReLU input elements at a kink.

    ``oracle_kwargs``: ``draws``, ``batch_size``, ``epsilon``, ``seed``, ``round`` (and optionally
    ``prunable``) as in ``reference_scores``; computed in float64.
    """
    prunable = oracle_kwargs.pop("prunable", None)
    kw = dict(oracle_kwargs, dtype=torch.float64)
    with _ReluGates() as record:
        base = reference_scores(model, prunable, masks, input_shape, **kw)
    n_at_kink = sum(int(k.sum()) for k in record.at_kink if k is not None)
    if n_at_kink == 0:
        return torch.zeros_like(base, dtype=torch.bool), 0
    with _ReluGates(record.at_kink):
        flipped = reference_scores(model, prunable, masks, input_shape, **kw)
    near = (flipped.double() - base.double()).abs() > KINK_SCORE_TOL * base.abs().max().item()
    return near, n_at_kink
