"""2:4 masks to PyTorch's semi-structured sparse tensors (CUDA only): a model whose ``Linear`` layers
run on NVIDIA's sparse tensor cores.

``torch.sparse.to_sparse_semi_structured`` stores a 2-D CUDA weight that keeps at most 2 of every 4
consecutive entries of a row (the ``"2:4"`` masks of ``ntksap_fast.select.nm``: groups along the
input dimension) compressed, and ``F.linear`` with it runs a sparse matmul. It takes float16 and
bfloat16 weights (cuSPARSELt; float32 with the CUTLASS backend) whose two dimensions are multiples of
a small block (16 to 64, by dtype and backend); a layer it refuses stays dense. Whether 2:4 is faster
depends on the GPU and the shapes (pytorch/pytorch#153825: it can be slower on Hopper): measure.

Not run by the test suite, which has no GPU: only its checks and its refusal on a CPU are tested.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from ..select.nm import is_nm
from .masks import _check_against_model, _check_masks, unmasked_copy

__all__ = ["to_semi_structured"]

_log = logging.getLogger("ntksap_fast")


def _check_cuda(model: nn.Module) -> None:
    devices = sorted({p.device.type for p in model.parameters()})
    if devices != ["cuda"]:
        raise ValueError(
            f"model must be on a CUDA device: PyTorch's semi-structured sparse tensors are CUDA only; "
            f"its parameters are on {devices or 'no device (it has none)'}"
        )


def _convert(weight: torch.Tensor) -> torch.Tensor:
    return torch.sparse.to_sparse_semi_structured(weight)


def to_semi_structured(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """A copy of ``model`` whose 2:4-masked ``Linear`` weights are semi-structured sparse tensors.

    Args:
        model: on a CUDA device; float16 or bfloat16 weights are what cuSPARSELt takes. It is not
            modified. Masks it carries (``apply_masks``, ``torch.nn.utils.prune``) are applied.
        masks: ``{parameter name: bool tensor}`` (True = kept), e.g. from ``ntk_sap_prune(...,
            granularity="2:4")``; None: only the masks the model carries.
    Returns:
        the copy, every mask applied (pruned entries are zeros), with ``Linear`` weights whose mask
        keeps at most 2 of every 4 consecutive inputs converted by
        ``torch.sparse.to_sparse_semi_structured`` (frozen parameters: for inference). The other
        layers stay dense; which were converted and why the others were not is logged at INFO on
        ``logging.getLogger("ntksap_fast")``.
    Raises:
        ValueError: the model is not on a CUDA device (semi-structured sparse tensors are CUDA
            only); a mask names no parameter of the model or has another shape; no ``Linear`` weight
            could be converted (the message says why for each).
        TypeError: ``model`` is not an ``nn.Module``; ``masks`` is not a dict of bool tensors.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if masks is not None:
        _check_masks(masks)
        _check_against_model(masks, model, "masks")
    _check_cuda(model)
    out = unmasked_copy(model)
    named = dict(out.named_parameters())
    with torch.no_grad():
        for name, mask in (masks or {}).items():
            named[name].mul_(mask.to(named[name].device))
    converted, dense = [], {}
    for module_name, module in out.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        name = f"{module_name}.weight" if module_name else "weight"
        weight = module.weight.detach()
        if weight.shape[1] % 4:
            dense[name] = f"input dimension {weight.shape[1]} is not a multiple of 4"
            continue
        if not is_nm(weight != 0, 2, 4):
            dense[name] = "more than 2 nonzeros in some 4 consecutive inputs (not 2:4 sparse)"
            continue
        try:
            sparse = _convert(weight.contiguous())
        except RuntimeError as err:
            dense[name] = f"torch.sparse.to_sparse_semi_structured refused it: {err}"
            continue
        module.weight = nn.Parameter(sparse, requires_grad=False)
        converted.append(name)
    if not converted:
        raise ValueError(
            f"no Linear weight of the model could be converted to a semi-structured sparse tensor: "
            f"{dense or 'the model has no Linear layer'}"
        )
    _log.info("semi-structured 2:4 weights: %s; dense: %s", converted, dense)
    return out
