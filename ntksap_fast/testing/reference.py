"""The oracle: a plain, slow re-implementation of NTK-SAP that shares nothing with the engine
but the counter generator (``ntksap_fast.engine.rng``).

Written from DESIGN.md sections 2-3, not from the engine and not from the paper's code, with the
research code's passes. Everything the engine decides is decided here again, independently:

* **prunable tensors**: the ``weight`` of every Conv1d/2d/3d and Linear module, or the names /
  predicate given, laid out in ``model.named_parameters()`` order: tensor ``k`` owns the flat
  indices ``[offset_k, offset_k + numel_k)`` with ``offset_k`` the sum of the sizes before it;
* **the weight spread**: ``std_k = sqrt(2 / fan_in_k)``, ``fan_in_k = shape[1] * prod(kernel dims)``
  (Kaiming normal, fan-in mode, ReLU gain);
* **the random numbers**, straight from the counters ``(seed, round, draw, stream, element)``:
  ``theta[e] = std_k * n(seed, round, draw, WEIGHTS, e)`` and ``z[e] = n(..., PERTURBATION, e)``
  for the flat index ``e``; the inputs ``x[i] = n(..., INPUTS, i)`` for the row-major index ``i``
  into ``(batch, *input_shape)``. The generator's normals are float32, and so are the sampled
  weights: ``theta = fl32(fl32(std_k) * n)`` (the precision every path of the package samples in);
  everything after that runs in ``dtype``;
* **one round**: deep-copy the model once, eval mode (dropout off); then one draw at a time, each
  with its own batch size: a separate no-grad statistics pass with the clean weights, in which a
  forward pre-hook on every BatchNorm module overwrites its running mean and variance with the
  mean and **unbiased** variance (float64, rounded once to ``dtype``) of the input it sees; then,
  with the hooks removed, the clean forward ``f(x; m * theta)`` and the perturbed forward
  ``f(x; m * (theta + eps * z))`` (both normalised with those statistics as constants), the loss
  ``L = sum((f_clean - f_pert)**2)`` and ``dL/dm`` by autograd with the mask as a leaf tensor per
  layer; ``score = |sum over draws of dL/dm| * (m != 0)``;
* **the prune** (``reference_prune``): after round ``t = 1..T`` keep
  ``n_keep = N - floor((1 - d_t) * N)`` entries (``d_t = d ** (t/T)`` or ``1 - (1 - d) * t/T``;
  per tensor with its own ``N`` for ``scope="layer"``): the highest scores among the entries still
  unpruned, found by a stable descending sort (ties to the lower flat index); round ``t`` is
  scored with round counter ``t - 1`` and the mask after round ``t - 1``.

(The research code gets its statistics from a train-mode pass with momentum 1 instead. Such a pass
normalises each layer with the *biased* variance while it runs, so the statistics of the layers
after the first differ from DESIGN.md's by O(1/n) for n values per channel.)

Tests use it as the oracle (``tests/test_oracle*.py``, ``tests/test_multiround.py``); benchmarks as
the baseline.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from ..engine.rng import Stream, normal

__all__ = ["reference_scores", "reference_prune", "reference_prunable"]

_WEIGHT_OWNERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)

#: Which tensors are prunable: None (every Conv1d/2d/3d and Linear ``weight``), parameter names, a
#: predicate ``(name, module, param) -> bool``, or any object with a ``names`` list (an ``Arena``).
Prunable = None | Iterable[str] | Callable[[str, nn.Module, nn.Parameter], bool]


def reference_prunable(model: nn.Module, prunable: Prunable = None) -> list[tuple[str, torch.Size]]:
    """``[(name, shape)]`` of the prunable tensors in ``model.named_parameters()`` order.

    Raises ``ValueError`` naming ``prunable`` for unknown names or an empty selection.
    """
    owner = {}
    for module_name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            owner[f"{module_name}.{pname}" if module_name else pname] = module
    named = list(model.named_parameters())
    if prunable is None:
        chosen = {n for n, _ in named if isinstance(owner[n], _WEIGHT_OWNERS) and n.rsplit(".", 1)[-1] == "weight"}
    elif callable(prunable):
        chosen = {n for n, p in named if prunable(n, owner[n], p)}
    else:
        chosen = set(getattr(prunable, "names", prunable))
        unknown = chosen - {n for n, _ in named}
        if unknown:
            raise ValueError(f"prunable: no parameter named {sorted(unknown)[:5]} in the model")
    out = [(n, p.shape) for n, p in named if n in chosen]
    if not out:
        raise ValueError("prunable selects no parameter of the model")
    return out


def _std32(shape: torch.Size) -> torch.Tensor:
    """float32 ``sqrt(2 / fan_in)``, ``fan_in = shape[1] * prod(shape[2:])``."""
    fan_in = int(shape[1]) * math.prod(int(s) for s in shape[2:])
    return torch.tensor(math.sqrt(2.0 / fan_in), dtype=torch.float32)


def _flat_mask(mask, layout: list[tuple[str, torch.Size]]) -> torch.Tensor:
    n_total = sum(s.numel() for _, s in layout)
    if mask is None:
        return torch.ones(n_total, dtype=torch.bool)
    if isinstance(mask, Mapping):
        mask = torch.cat([mask[n].reshape(-1).cpu() for n, _ in layout])
    if mask.dtype != torch.bool or mask.shape != (n_total,):
        raise ValueError(f"mask must be a flat bool tensor of {n_total} entries (or a dict of bool tensors)")
    return mask.cpu()


def _set_running_stats(bn: nn.Module, args: tuple) -> None:
    """Forward pre-hook: running stats := the input's per-channel mean and unbiased variance."""
    (x,) = args
    dims = [d for d in range(x.dim()) if d != 1]
    var, mean = torch.var_mean(x.double(), dims, correction=1)
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)


def _batch_sizes(draws: int, batch_size: int | Sequence[int]) -> list[int]:
    if isinstance(batch_size, numbers.Integral):
        return [int(batch_size)] * draws
    sizes = [int(b) for b in batch_size]
    if len(sizes) != draws:
        raise ValueError(f"batch_size has {len(sizes)} entries but draws is {draws}")
    return sizes


def reference_scores(
    model: nn.Module,
    prunable: Prunable,
    mask: torch.Tensor | Mapping[str, torch.Tensor] | None,
    input_shape: Sequence[int],
    *,
    draws: int,
    batch_size: int | Sequence[int],
    epsilon: float,
    seed: int,
    round: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    signed: bool = False,
) -> torch.Tensor:
    """One scoring round: flat float32 scores ``|G| * (mask != 0)`` (CPU), layout as the module docstring.

    Args:
        model: any ``nn.Module`` (a deep copy is used; the model is not touched).
        prunable: which tensors (see ``Prunable``); an ``Arena`` gives its names, nothing else.
        mask: flat bool tensor over the prunable entries (True = unpruned), a dict of bool tensors
            keyed by name, or None (dense).
        input_shape: one input's shape without the batch dim.
        draws: number of draws; batch_size: inputs per draw, an int or one per draw.
        epsilon, seed, round: perturbation size and the counters.
        dtype: precision of every pass after sampling (float64 for the oracle).
        device: where the passes run; the random numbers are generated on the CPU and moved.
        signed: return ``G * (mask != 0)`` in ``dtype`` instead (the channel score sums ``G`` first).
    """
    device = torch.device(device)
    layout = reference_prunable(model, prunable)
    flat_mask = _flat_mask(mask, layout)
    sizes = _batch_sizes(draws, batch_size)
    offsets = [0]
    for _, shape in layout:
        offsets.append(offsets[-1] + shape.numel())

    net = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    bns = [m for m in net.modules() if isinstance(m, _BN_TYPES)]
    if any(bn.running_mean is None for bn in bns):
        raise ValueError("the reference needs BatchNorm layers with running statistics (track_running_stats=True)")
    leaves = {
        name: flat_mask[offsets[k] : offsets[k + 1]].view(shape).to(device, dtype).requires_grad_(True)
        for k, (name, shape) in enumerate(layout)
    }
    grad = {name: torch.zeros(shape, dtype=dtype, device=device) for name, shape in layout}
    for draw in range(draws):
        theta, z = {}, {}
        for k, (name, shape) in enumerate(layout):
            n_w = normal(seed, round, draw, Stream.WEIGHTS, shape.numel(), offset=offsets[k])
            n_z = normal(seed, round, draw, Stream.PERTURBATION, shape.numel(), offset=offsets[k])
            theta[name] = (n_w * _std32(shape)).view(shape).to(device, dtype)
            z[name] = n_z.view(shape).to(device, dtype)
        x = normal(seed, round, draw, Stream.INPUTS, sizes[draw] * math.prod(input_shape))
        x = x.view(sizes[draw], *input_shape).to(device, dtype)

        hooks = [bn.register_forward_pre_hook(_set_running_stats) for bn in bns]
        try:
            with torch.no_grad():
                functional_call(net, {n: leaves[n].detach() * theta[n] for n in leaves}, (x,))
        finally:
            for h in hooks:
                h.remove()

        f_clean = functional_call(net, {n: leaves[n] * theta[n] for n in leaves}, (x,))
        f_pert = functional_call(net, {n: leaves[n] * (theta[n] + epsilon * z[n]) for n in leaves}, (x,))
        loss = (f_clean - f_pert).pow(2).sum()
        for name, g in zip(leaves, torch.autograd.grad(loss, list(leaves.values()))):
            grad[name] += g
    flat_grad = torch.cat([grad[n].reshape(-1).cpu() for n, _ in layout])
    if signed:
        return flat_grad * flat_mask.to(flat_grad.dtype)
    return (flat_grad.abs() * flat_mask).to(torch.float32)


def _schedule(density: float, iterations: int, schedule: str) -> list[float]:
    if schedule == "exponential":
        return [density ** (t / iterations) for t in range(1, iterations + 1)]
    if schedule == "linear":
        return [1.0 - (1.0 - density) * t / iterations for t in range(1, iterations + 1)]
    raise ValueError(f"schedule must be 'exponential' or 'linear', got {schedule!r}")


def _keep_top(scores: torch.Tensor, mask: torch.Tensor, n_keep: int) -> torch.Tensor:
    """New flat mask: the ``n_keep`` highest scores among ``mask``, ties to the lower index."""
    if n_keep > int(mask.sum()):
        raise ValueError(f"cannot keep {n_keep} of {int(mask.sum())} unpruned entries")
    key = scores.double().masked_fill(~mask, -math.inf)
    order = torch.sort(key, descending=True, stable=True).indices
    out = torch.zeros_like(mask)
    out[order[:n_keep]] = True
    return out


def reference_prune(
    model: nn.Module,
    density: float,
    input_shape: Sequence[int],
    *,
    iterations: int,
    schedule: str = "exponential",
    scope: str = "global",
    draws: int,
    batch_size: int | Sequence[int],
    epsilon: float,
    seed: int,
    params: Prunable = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    on_round: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Iterative NTK-SAP by the module docstring's loop: ``{name: bool mask of the parameter's shape}`` (CPU).

    Args:
        scope: ``"global"`` (one keep count over all prunable entries) or ``"layer"`` (each
            tensor keeps ``numel - floor((1 - d_t) * numel)`` of its own entries).
        params: which tensors are prunable (``Prunable``); other arguments as ``reference_scores``.
        on_round: called as ``on_round(t, masks)`` after round ``t = 1..T`` with the masks so far.
    """
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    layout = reference_prunable(model, params)
    sizes = [shape.numel() for _, shape in layout]
    mask = torch.ones(sum(sizes), dtype=torch.bool)
    for t, d_t in enumerate(_schedule(density, iterations, schedule), start=1):
        scores = reference_scores(
            model,
            params,
            mask,
            input_shape,
            draws=draws,
            batch_size=batch_size,
            epsilon=epsilon,
            seed=seed,
            round=t - 1,
            dtype=dtype,
            device=device,
        )
        if scope == "global":
            mask = _keep_top(scores, mask, len(mask) - math.floor((1.0 - d_t) * len(mask)))
        else:
            parts = zip(scores.split(sizes), mask.split(sizes))
            mask = torch.cat([_keep_top(s, m, m.numel() - math.floor((1.0 - d_t) * m.numel())) for s, m in parts])
        if on_round is not None:
            on_round(t, {name: m.view(shape).clone() for (name, shape), m in zip(layout, mask.split(sizes))})
    return {name: m.view(shape) for (name, shape), m in zip(layout, mask.split(sizes))}
