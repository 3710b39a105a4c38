"""The empirical NTK of a model, dense or masked, and its eigenvalues (the NTK sanity picture).

The empirical NTK of a batch ``X`` of ``B`` inputs is ``J J^T`` with ``J`` the Jacobian of the
flattened outputs ``f(X)`` (``B * O`` entries, rows ordered sample-major: row ``a * O + i`` is
output ``i`` of sample ``a``; outputs are *flattened*, not summed) with respect to the prunable
weights at the model's *current* values. For a pruned model the pruned weights are set to zero and
their Jacobian columns dropped (they are no longer trainable). The model runs with dropout off and
BatchNorm normalising with the batch's own statistics, on a copy. ``J`` is built row by row, so
these are for small models: ``max_jacobian_entries`` bounds ``B * O * P``.
``ntksap_fast.analysis.report.plot_ntk_spectrum`` draws two spectra.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import prune

from ..engine.arena import Arena, ParamSelector
from ..options import resolve_input_shape

__all__ = ["check_ntk_size", "empirical_ntk", "ntk_eigenvalues"]


def _limit_error(what: str, entries: int, limit: int) -> ValueError:
    return ValueError(
        f"the Jacobian has {what} = {entries} entries, above max_jacobian_entries={limit}; "
        "use a smaller batch or model, or raise the limit"
    )


def _copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also of a model carrying ``torch.nn.utils.prune`` masks: their
    computed ``weight`` attributes are not graph leaves, which deepcopy refuses; the copy gets them
    detached (its pre-hooks recompute them) and ``model``'s own are put back."""
    computed = [
        (m, hook._tensor_name)
        for m in model.modules()
        for hook in m._forward_pre_hooks.values()
        if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name in m.__dict__
    ]
    saved = [(m, name, m.__dict__[name]) for m, name in computed]
    try:
        for m, name, value in saved:
            m.__dict__[name] = value.detach()
        return copy.deepcopy(model)
    finally:
        for m, name, value in saved:
            m.__dict__[name] = value


def check_ntk_size(
    model: nn.Module,
    *,
    input_shape: Sequence[int] | None = None,
    batch_size: int = 8,
    params: ParamSelector | None = None,
    max_jacobian_entries: int = 10**8,
) -> int:
    """Raises the ``ValueError`` that ``ntk_eigenvalues`` would raise for its size limit, cheaply.

    Checks ``batch_size * P`` first (``P`` prunable weights, no forward), then
    ``batch_size * O * P`` with ``O`` from a no-grad forward of one zero input on a copy in eval
    mode (``model`` is not touched). Returns the number of Jacobian entries ``batch_size * O * P``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    limit = int(max_jacobian_entries)
    arena = Arena(model, params)
    if batch_size * arena.numel > limit:
        raise _limit_error("at least batch * params", batch_size * arena.numel, limit)
    shape = resolve_input_shape(model, input_shape)
    work = _copy(model).eval()
    first = next(work.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    with torch.no_grad():
        outputs = work(torch.zeros(1, *shape, device=device, dtype=dtype)).numel()
    entries = batch_size * outputs * arena.numel
    if entries > limit:
        raise _limit_error("batch * outputs * params", entries, limit)
    return entries


def empirical_ntk(
    model: nn.Module,
    inputs: torch.Tensor,
    masks: Mapping[str, torch.Tensor] | None = None,
    *,
    params: ParamSelector | None = None,
    max_jacobian_entries: int = 10**8,
) -> torch.Tensor:
    """Empirical NTK ``J J^T`` over the prunable weights: float64 ``(B * O, B * O)``.

    ``inputs``: ``(B, *input_shape)``; ``O`` outputs per sample (flattened). ``masks`` zeroes
    pruned weights and drops their Jacobian columns. Raises ``ValueError`` when
    ``B * O * P`` (``P`` prunable weights) exceeds ``max_jacobian_entries``. ``model`` is not modified.
    """
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 1:
        raise TypeError(f"inputs must be a tensor of shape (B, *input_shape), got {type(inputs).__name__}")
    arena = Arena(model, params)
    limit = int(max_jacobian_entries)
    if inputs.shape[0] * arena.numel > limit:
        raise _limit_error("at least batch * params", inputs.shape[0] * arena.numel, limit)
    work = _copy(model).eval()
    for m in work.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    weights = list(arena.values(work).values())  # weight_orig where the model carries masks
    for p in work.parameters():
        p.requires_grad_(False)
    keep = arena.start_mask(work)
    if masks is not None:
        keep &= arena.flatten(masks, argname="masks", dtype=torch.bool)
    with torch.no_grad():
        for w, k in zip(weights, arena.views(keep).values()):
            w.mul_(k.to(w.device, w.dtype))
    keep_cols = keep.to(weights[0].device, weights[0].dtype)
    for w in weights:
        w.requires_grad_(True)
    out = work(inputs.to(weights[0].device, weights[0].dtype)).reshape(-1)
    if out.numel() * arena.numel > limit:
        raise _limit_error("batch * outputs * params", out.numel() * arena.numel, limit)
    jac = torch.empty(out.numel(), arena.numel, dtype=out.dtype, device=out.device)
    for r in range(out.numel()):
        grads = torch.autograd.grad(
            out[r], weights, retain_graph=r + 1 < out.numel(), allow_unused=True, materialize_grads=True
        )
        jac[r] = torch.cat([g.reshape(-1) for g in grads]) * keep_cols
    jac = jac.double()
    return jac @ jac.T


def ntk_eigenvalues(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    batch_size: int = 8,
    seed: int = 0,
    params: ParamSelector | None = None,
    max_jacobian_entries: int = 10**8,
) -> torch.Tensor:
    """Eigenvalues (float64 ``(B * O,)``, descending) of the empirical NTK on ``batch_size``
    standard-normal inputs drawn with ``seed`` (same seed, same inputs: dense and pruned compare).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    shape = resolve_input_shape(model, input_shape)
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch_size, *shape, generator=gen)
    ntk = empirical_ntk(model, inputs, masks, params=params, max_jacobian_entries=max_jacobian_entries)
    return torch.linalg.eigvalsh(ntk).flip(0)
