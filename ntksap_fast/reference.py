"""The oracle: a plain, readable re-implementation of the research code's procedure.

Written from DESIGN.md section 2, not from the paper's code, and kept deliberately simple and
slow, with the research code's passes:

1. deep-copy the model once per scoring round;
2. for each draw, one at a time: a separate no-grad BatchNorm statistics pass over the clean
   weights, in which a forward pre-hook on every BatchNorm module overwrites its running mean and
   running variance with the mean and unbiased variance of the input it sees (so each layer's
   statistics are those of the clean eval-mode input to that layer, DESIGN.md's semantics); then,
   in eval mode with the hooks removed, the clean and the perturbed forward with the mask as a
   leaf tensor, ``L = sum((f_clean - f_pert)**2)``, and a backward into the mask;
3. ``score = |sum over draws of dL/dm| * (m != 0)``.

(The research code gets its statistics from a train-mode pass with momentum 1 instead. Such a pass
normalises each layer with the *biased* variance while it runs, so the statistics of the layers
after the first differ from DESIGN.md's by O(1/n) for n values per channel.)

It takes its random numbers from the same counters as the engine (``ntksap_fast.draws``) so the
two can be compared draw for draw. Tests use it as the oracle; benchmarks as the baseline.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call

from .arena import Arena
from .draws import DrawKey, sample_inputs, sample_weights
from .rng import Stream

__all__ = ["reference_scores"]

_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def _set_running_stats(bn: nn.Module, args: tuple) -> None:
    (x,) = args
    dims = [d for d in range(x.dim()) if d != 1]
    var, mean = torch.var_mean(x.double(), dims, correction=1)
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)


def reference_scores(
    model: nn.Module,
    arena: Arena,
    mask: torch.Tensor,
    input_shape: tuple[int, ...],
    *,
    draws: int,
    batch_size: int,
    epsilon: float,
    seed: int,
    round: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """One scoring round: flat float32 scores ``|G| * (mask != 0)`` over ``arena``.

    Args:
        mask: flat bool tensor of length ``arena.numel`` (True = unpruned).
        dtype: precision of every pass (float64 gives the oracle the engine's float32 is held to).
        device: where the passes run (the copy of the model, the weights, the inputs, the result).
            The random numbers are still drawn on the CPU (``ntksap_fast.draws``) and moved there,
            so every device sees the same numbers.
    """
    device = torch.device(device)
    net = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    bns = [m for m in net.modules() if isinstance(m, _BN_TYPES)]
    if any(bn.running_mean is None for bn in bns):
        raise ValueError("the reference needs BatchNorm layers with running statistics (track_running_stats=True)")
    std = arena.std_vector()
    mask = mask.to(device)
    # One mask leaf per layer, as the research code keeps them.
    masks = {n: v.detach().clone().requires_grad_(True) for n, v in arena.views(mask.to(dtype)).items()}
    grad = torch.zeros(arena.numel, dtype=dtype, device=device)
    for draw in range(draws):
        key = DrawKey(seed, round, draw)
        theta = sample_weights(arena, key, Stream.WEIGHTS, std).to(device=device, dtype=dtype)
        z = sample_weights(arena, key, Stream.PERTURBATION, None).to(device=device, dtype=dtype)
        x = sample_inputs(key, input_shape, range(batch_size)).to(device=device, dtype=dtype)

        # Statistics pass: running stats = this draw's clean batch statistics, layer by layer.
        hooks = [bn.register_forward_pre_hook(_set_running_stats) for bn in bns]
        try:
            with torch.no_grad():
                functional_call(net, arena.views(mask.to(dtype) * theta), (x,))
        finally:
            for h in hooks:
                h.remove()

        thetas = arena.views(theta)
        perturbed = arena.views(theta + epsilon * z)
        out_clean = functional_call(net, {n: masks[n] * thetas[n] for n in masks}, (x,))
        out_pert = functional_call(net, {n: masks[n] * perturbed[n] for n in masks}, (x,))
        loss = (out_clean - out_pert).pow(2).sum()
        grads = torch.autograd.grad(loss, list(masks.values()))
        grad += torch.cat([g.reshape(-1) for g in grads])
    return (grad.abs() * (mask != 0)).to(torch.float32)
