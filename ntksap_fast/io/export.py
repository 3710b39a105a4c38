"""``export_pruned``: channel masks -> a physically smaller dense model (the surgery by Torch-Pruning).

**What "removed" means.** A channel mask (``granularity="channel"``) is False in a removed
channel's whole filter and in its consumers' input slices (``ntksap_fast.select.channel_units``).
The masked model (``apply_masks``) still computes the removed channel, e.g. a BatchNorm after a
zero filter outputs its shift ``beta - gamma * mean / sqrt(var + eps)``, not zero, but no layer
reads it any more. Removing the channel from the filter, its normalisation, the residual adds and
the consumers' inputs therefore changes nothing: the exported model computes exactly what the
masked original computes (up to float rounding of the shorter sums), in eval and in train mode.
``export_pruned`` checks this on one random input before it returns.

**Saving and rebuilding.** The masks are the pruning plan: with the same architecture, the same
masks give the same removed channels. So save the masks (``save_masks``, with the metadata that
made them) and the exported model's ``state_dict()``; rebuild with
``export_pruned(make_model(), load_masks(path)).load_state_dict(torch.load(state_path))``. Both
files are plain tensors (``torch.load(weights_only=True)``, safetensors), unlike ``torch.save`` of
a module, which pickles code and needs the same classes at the same import paths and
``weights_only=False`` to load; and unlike Torch-Pruning's pruning history, the masks also say what
made them and load without Torch-Pruning's replay of its own graph.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from ..engine.arena import Arena
from ..options import resolve_input_shape
from ..select.channel_units import channel_units, working_copy
from .masks import _check_masks

__all__ = ["export_pruned"]

#: The exported model's outputs may differ from the masked original's by this many units of
#: float rounding (``torch.finfo(dtype).eps``) of the output's largest magnitude: shorter sums round
#: differently, and the error grows with depth.
_ROUNDING_UNITS = 1e4


def _outputs(model: nn.Module, x: torch.Tensor, output: Callable | None) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return (output(out) if output is not None else out).detach()


def export_pruned(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    input_shape: Sequence[int] | None = None,
    *,
    output: Callable | None = None,
) -> nn.Module:
    """A physically smaller dense copy of ``model`` without the channels ``masks`` remove.

    Args:
        model: the model the masks were made for (not modified; a model carrying
            ``torch.nn.utils.prune`` masks is read as ``weight_orig * weight_mask``).
        masks: channel masks (``granularity="channel"``), ``{name: bool tensor}`` for the prunable
            tensors, as ``ntk_sap_prune`` or ``prune`` return them or ``load_masks`` reads them.
        input_shape: one input's shape for the trace; default ``masks.metadata["input_shape"]``, else
            the model's ``input_shape``.
        output: picks the output tensor from what the model returns (as ``ScorerOptions.output``).
    Returns:
        a new ``nn.Module`` of the same classes with fewer channels, each module in the mode it has
        in ``model``; it computes what the masked ``model`` computes (module docstring).
    Raises:
        ValueError: masks that are not channel masks (weight or N:M granularity, or entries pruned
            outside removed channels: "only channel masks export"), masks that remove every channel of
            a group, names or shapes that do not match, a model Torch-Pruning cannot trace (naming the
            layer), or an export that does not reproduce the masked model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_masks(masks)
    metadata = getattr(masks, "metadata", {}) or {}
    granularity = metadata.get("granularity", "channel")
    if granularity != "channel":
        raise ValueError(
            f"masks: only channel masks export (granularity='channel'); these have "
            f"granularity={granularity!r}, which keeps every layer's shape"
        )
    if input_shape is None and metadata.get("input_shape") is not None:
        input_shape = tuple(metadata["input_shape"])
    input_shape = resolve_input_shape(model, input_shape)
    modes = {name: m.training for name, m in model.named_modules()}
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    work = working_copy(model)
    arena = Arena(work, list(masks))
    flat = arena.flatten(masks, argname="masks", dtype=torch.bool)
    units = channel_units(work, arena, input_shape, output)
    removed = units.sums(flat) == 0
    outside = flat != units.cut_(torch.ones_like(flat), ~removed)
    if outside.any():
        where = next(n for n, v in arena.views(outside).items() if v.any())
        raise ValueError(
            f"masks: only channel masks export; {int(outside.sum())} pruned entries (e.g. in {where!r}) "
            "lie outside removed channels (weight-granularity masks? prune with granularity='channel')"
        )
    per_group = torch.zeros(len(units.roots), dtype=torch.int64).index_add_(0, units.group_of, removed.long())
    emptied = [units.roots[g] for g in torch.nonzero(per_group == units.units_of_group()).flatten().tolist()]
    if emptied:
        raise ValueError(f"masks remove every channel of the groups rooted at {emptied}: the model would be cut")
    param = next(work.parameters())
    probe = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    probe = probe.to(param.device, param.dtype if param.is_floating_point() else torch.float32)
    work.eval()
    with torch.no_grad():
        for s, keep in zip(arena.slots, arena.views(flat).values()):
            work.get_parameter(s.param).mul_(keep.to(param.device))
    expected = _outputs(work, probe, output)
    graph = units.graph
    for g, root in enumerate(units.roots):
        idxs = units.root_index[(units.group_of == g) & removed].tolist()
        if idxs:
            module = work.get_submodule(root)
            graph.get_pruning_group(module, graph.get_pruner_of_module(module).prune_out_channels, idxs).prune()
    got = _outputs(work, probe, output)
    tolerance = _ROUNDING_UNITS * torch.finfo(expected.dtype).eps * float(expected.abs().max())
    if got.shape != expected.shape or not float((got - expected).abs().max()) <= tolerance:
        raise ValueError(
            "export_pruned: the smaller model does not compute what the masked model computes (a layer "
            "Torch-Pruning does not cut exactly?); max difference "
            f"{float((got - expected).abs().max()) if got.shape == expected.shape else 'shape'}"
        )
    for name, m in work.named_modules():
        m.training = modes.get(name, m.training)
    for name, p in work.named_parameters():
        p.requires_grad_(trainable.get(name, trainable.get(f"{name}_orig", True)))
    return work
