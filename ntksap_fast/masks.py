"""Masks: apply them in the ``torch.nn.utils.prune`` convention, save and load them.

A mask dict maps parameter names (as in ``model.named_parameters()``) to bool tensors of the
parameter's shape, True = kept.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
from torch import nn
from torch.nn.utils import prune

__all__ = ["apply_masks", "save_masks", "load_masks", "mask_density"]


def _check_masks(masks, argname: str = "masks") -> None:
    if not isinstance(masks, Mapping):
        raise TypeError(f"{argname} must be a dict of bool tensors keyed by parameter name, got {type(masks).__name__}")
    for name, m in masks.items():
        if not isinstance(name, str):
            raise TypeError(f"{argname} keys must be parameter names (str), got {type(name).__name__}")
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            got = m.dtype if isinstance(m, torch.Tensor) else type(m).__name__
            raise TypeError(f"{argname}[{name!r}] must be a bool tensor, got {got}")


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Prunes ``model`` in place with ``torch.nn.utils.prune.custom_from_mask``.

    Each masked parameter ``<module>.<name>`` becomes ``<name>_orig`` (a parameter) times the buffer
    ``<name>_mask``, so training keeps pruned entries at zero; ``prune.remove`` makes it permanent.
    Masks already applied combine with the new ones (logical and), as in ``torch.nn.utils.prune``.
    All names and shapes are checked before anything changes. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_masks(masks)
    modules = dict(model.named_modules())
    targets = []
    for name, m in masks.items():
        module_name, _, attr = name.rpartition(".")
        module = modules.get(module_name)
        param = getattr(module, attr, None) if module is not None else None
        if not isinstance(param, torch.Tensor):
            raise ValueError(f"masks: the model has no parameter named {name!r}")
        if m.shape != param.shape:
            raise ValueError(f"masks[{name!r}] has shape {tuple(m.shape)}, parameter has {tuple(param.shape)}")
        targets.append((module, attr, m.to(param.device)))
    for module, attr, m in targets:
        prune.custom_from_mask(module, attr, m)
    return model


def save_masks(masks: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Writes masks to ``path``: safetensors if it ends in ``.safetensors``, else ``torch.save``."""
    _check_masks(masks)
    tensors = {n: m.detach().cpu().contiguous() for n, m in masks.items()}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)


def load_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads masks written by ``save_masks`` (or any ``torch.save`` dict of bool tensors)."""
    if not Path(path).is_file():
        raise ValueError(f"path {str(path)!r} is not a file")
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        masks = load_file(str(path))
    else:
        masks = torch.load(path, map_location="cpu", weights_only=True)
    _check_masks(masks, argname=f"the masks in {str(path)!r}")
    return dict(masks)


def mask_density(masks: Mapping[str, torch.Tensor]) -> float:
    """Kept fraction over all masks."""
    _check_masks(masks)
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / total if total else 1.0
