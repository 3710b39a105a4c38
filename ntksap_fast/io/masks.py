"""Masks: apply them in the ``torch.nn.utils.prune`` convention, save and load self-describing files.

A mask dict maps parameter names (as in ``model.named_parameters()``) to bool tensors of the
parameter's shape, True = kept. :class:`Masks` is such a dict that also carries ``metadata``: what
made the masks (method, density, rounds, seed, ...), written beside them by :func:`save_masks`.

File formats (chosen by the extension when saving, recognised by content when loading):

* ``.safetensors``: one bool tensor per mask; the header's ``__metadata__`` holds
  ``{"format": "ntksap_fast.masks/1", "ntksap_fast": "<metadata as JSON>", "order": "<names as
  a JSON list>"}`` (safetensors does not keep the order of the dict; loading restores it).
* ``.pt`` / ``.pth``: ``torch.save`` of ``{"format": "ntksap_fast.masks/1", "masks": {name: bool
  tensor}, "metadata": "<metadata as JSON>"}``, readable with ``torch.load(weights_only=True)``.
  A plain ``torch.save`` dict ``{name: bool tensor}`` (older files) loads too, with empty metadata.

Metadata values are JSON values (tuples are stored as lists; dtypes, devices and paths as strings).
"""

from __future__ import annotations

import collections
import copy
import hashlib
import json
import os
import pickle
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from ._atomic import atomic_write

__all__ = [
    "Masks",
    "apply_masks",
    "unmasked_copy",
    "save_masks",
    "load_masks",
    "mask_density",
    "check_mask_path",
    "MASK_EXTENSIONS",
]

#: Extensions ``save_masks`` writes: safetensors, or ``torch.save``.
MASK_EXTENSIONS = (".pt", ".pth", ".safetensors")
_FORMAT = "ntksap_fast.masks/1"
_ZIP_MAGIC = b"PK\x03\x04"


class Masks(dict):
    """``{parameter name: bool tensor}`` (True = kept) with a ``metadata`` dict of what made it.

    Behaves as a plain dict in every other way (``dict(masks)`` drops the metadata; ``copy`` and
    ``copy.deepcopy`` keep it; pickling, hence ``torch.save(masks)``, stores a plain
    ``OrderedDict`` that ``torch.load`` reads with ``weights_only=True``). The metadata the
    library writes is defined where the masks are made, ``ntksap_fast.select.loop.run``: ``method``,
    the loop's options that change the masks (``PruneOptions.metadata``), the method's own settings
    (``Scoring.metadata``), the structured selector's for channel or N:M granularity, and ``rounds``
    when statistics were taken; :func:`save_masks` adds ``fingerprint`` (a hash of the masks' names
    and shapes, ``"sha256:"`` and 16 hex digits of ``"name:AxB;..."`` sorted by name) and
    ``package_version``. Callers may add their own keys.
    """

    def __init__(self, *args: Any, metadata: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.metadata: dict[str, Any] = dict(metadata or {})

    def copy(self) -> Masks:
        return Masks(self, metadata=self.metadata)

    def __copy__(self) -> Masks:
        return self.copy()

    def __deepcopy__(self, memo: dict) -> Masks:
        return Masks(copy.deepcopy(dict(self), memo), metadata=copy.deepcopy(self.metadata, memo))

    def __reduce_ex__(self, protocol: int):
        """Pickled (``torch.save``, multiprocessing) as an ``OrderedDict`` of the masks, without the
        metadata: so ``torch.load(path)`` (``weights_only=True``, the default) reads a
        ``torch.save(masks, path)`` file in any process; ``save_masks`` keeps the metadata."""
        return (collections.OrderedDict, (list(self.items()),))

    def __repr__(self) -> str:
        return f"Masks({dict.__repr__(self)}, metadata={self.metadata!r})"


def _check_masks(masks, argname: str = "masks") -> None:
    if not isinstance(masks, Mapping):
        raise TypeError(f"{argname} must be a dict of bool tensors keyed by parameter name, got {type(masks).__name__}")
    for name, m in masks.items():
        if not isinstance(name, str):
            raise TypeError(f"{argname} keys must be parameter names (str), got {type(name).__name__}")
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            got = m.dtype if isinstance(m, torch.Tensor) else type(m).__name__
            raise TypeError(f"{argname}[{name!r}] must be a bool tensor, got {got}")


def _resolve(model: nn.Module, name: str) -> torch.Tensor | None:
    """The tensor ``module.attr`` for ``name = "module.attr"`` (also after ``apply_masks``), or None."""
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    tensor = getattr(module, attr, None)
    return tensor if isinstance(tensor, torch.Tensor) else None


def _fingerprint(pairs: Iterable[tuple[str, tuple[int, ...]]]) -> str:
    text = ";".join(f"{n}:{'x'.join(map(str, s))}" for n, s in sorted(pairs))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


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
    _check_against_model(masks, model, "masks")
    targets = []
    for name, m in masks.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        targets.append((module, attr, m.to(getattr(module, attr).device)))
    for module, attr, m in targets:
        prune.custom_from_mask(module, attr, m)
    return model


def unmasked_copy(model: nn.Module) -> nn.Module:
    """A deep copy with every ``torch.nn.utils.prune`` mask made permanent (``weight = weight_orig *
    weight_mask``, a parameter again); ``model`` untouched. (``copy.deepcopy`` alone refuses such a
    model: its computed ``weight`` attributes are not leaves, so the copy gets them detached.)"""
    computed = {}
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                tensor = getattr(module, hook._tensor_name)
                computed[id(tensor)] = tensor.detach().clone()
    out = copy.deepcopy(model, memo=computed)
    for module in out.modules():
        for hook in [h for h in module._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]:
            prune.remove(module, hook._tensor_name)
    return out


def _check_against_model(masks: Mapping[str, torch.Tensor], model: nn.Module, argname: str) -> None:
    """ValueError naming the first mask whose parameter is missing or has another shape."""
    for name, m in masks.items():
        tensor = _resolve(model, name)
        if tensor is None:
            raise ValueError(f"{argname}: the model has no parameter named {name!r}")
        if m.shape != tensor.shape:
            raise ValueError(
                f"{argname}[{name!r}] has shape {tuple(m.shape)}, the model's parameter has {tuple(tensor.shape)}"
            )


def check_mask_path(path: str | os.PathLike) -> str:
    """The format ``save_masks`` would write to ``path`` (``"safetensors"`` or ``"torch"``).

    Raises ``ValueError`` for any extension other than ``MASK_EXTENSIONS`` (case-insensitive).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    suffix = Path(path).suffix.lower()
    if suffix not in MASK_EXTENSIONS:
        raise ValueError(
            f"path {os.fspath(path)!r}: unknown mask file extension {suffix or '(none)'!r}; "
            f"use one of {', '.join(MASK_EXTENSIONS)}"
        )
    return "safetensors" if suffix == ".safetensors" else "torch"


def _jsonable(value: Any, key: str) -> Any:
    """``value`` as a JSON value; tuples become lists, dtypes/devices/paths strings."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (torch.dtype, torch.device, os.PathLike)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, key) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, key) for k, v in value.items()}
    raise TypeError(
        f"metadata[{key!r}]: {type(value).__name__} is not storable; use str, int, float, bool, "
        "None, or lists/dicts of them"
    )


def _package_version() -> str:
    from .. import __version__

    return __version__


def save_masks(
    masks: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, Any] | None = None
) -> None:
    """Writes ``masks`` and their metadata to ``path`` (``.safetensors``, or ``.pt``/``.pth``).

    The metadata written is ``masks.metadata`` (for a :class:`Masks`) updated with ``metadata``,
    plus ``fingerprint`` (of the masks' names and shapes) and ``package_version`` when absent.
    The file is written to a temporary name, flushed to disk and renamed (``io._atomic``), so an
    interrupted save leaves the old file (if any) and no half-written one; it gets the permissions
    ``open()`` would give (0644 under umask 022). Raises ``ValueError`` for another extension.
    """
    kind = check_mask_path(path)
    _check_masks(masks)
    if metadata is not None and not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    merged = {**getattr(masks, "metadata", {}), **(metadata or {})}
    for key in merged:
        if not isinstance(key, str):
            raise TypeError(f"metadata keys must be str, got {type(key).__name__}")
    merged.setdefault("fingerprint", _fingerprint((n, tuple(m.shape)) for n, m in masks.items()))
    merged.setdefault("package_version", _package_version())
    text = json.dumps({k: _jsonable(v, k) for k, v in merged.items()})
    tensors = {n: m.detach().cpu().contiguous() for n, m in masks.items()}
    with atomic_write(path) as f:
        if kind == "safetensors":
            from safetensors.torch import save

            header = {"format": _FORMAT, "ntksap_fast": text, "order": json.dumps(list(tensors))}
            f.write(save(tensors, metadata=header))
        else:
            torch.save({"format": _FORMAT, "masks": tensors, "metadata": text}, f)


def _read_safetensors(path: str, where: str) -> tuple[dict, str | None]:
    """``(tensors, metadata JSON or None)`` of a safetensors file; ValueError if it does not read."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata()
            tensors = {n: f.get_tensor(n) for n in f.keys()}
    except Exception as err:  # SafetensorError and friends: truncated or corrupt data
        raise ValueError(f"{where} is a truncated or corrupt safetensors file ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        return tensors, None
    try:  # safetensors stores tensors sorted its own way; the masks' order is kept beside them
        order = json.loads(meta.get("order", "[]"))
        tensors = {n: tensors[n] for n in order} if sorted(order) == sorted(tensors) else tensors
    except (ValueError, TypeError):
        raise ValueError(f"{where} has an unreadable tensor order in its metadata") from None
    return tensors, meta.get("ntksap_fast")


def _read(path: str) -> tuple[Mapping, str | None]:
    """``(tensors, metadata JSON or None)`` from a mask file; ValueError saying what is wrong."""
    where = f"mask file {path!r}"
    with open(path, "rb") as f:
        start = f.read(9)
    if not start:
        raise ValueError(f"{where} is empty")
    if start[8:9] == b"{":  # safetensors: an 8-byte header size, then the JSON header
        return _read_safetensors(path, where)
    if start[:4] != _ZIP_MAGIC and start[:1] != b"\x80":
        raise ValueError(f"{where} is neither a safetensors file nor a torch.save file (it starts with {start[:8]!r})")
    try:
        with warnings.catch_warnings():  # random bytes make the unpickler warn about a "protocol"
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "global" in str(err).lower():  # the weights-only unpickler refused a class or function
            raise ValueError(
                f"{where} holds objects other than tensors and plain Python values; it was not "
                "written by save_masks and is not loaded (unpickling arbitrary objects is "
                "unsafe)"
            ) from None
        raise ValueError(f"{where} is a truncated or corrupt torch.save file (unreadable pickle data)") from None
    except Exception as err:  # RuntimeError from the zip reader, EOFError, ...: truncated or corrupt
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{where} is a truncated or corrupt torch.save file ({reason})") from None
    if isinstance(content, dict) and content.get("format") == _FORMAT:
        return content.get("masks"), content.get("metadata")
    return content, None


def load_masks(
    path: str | os.PathLike, model: nn.Module | None = None, *, with_metadata: bool = False
) -> Masks | tuple[Masks, dict[str, Any]]:
    """Reads masks written by ``save_masks`` (or a ``torch.save`` dict of bool tensors).

    Args:
        path: the file; its format is recognised by content, whatever the extension.
        model: when given, every mask must name a parameter of ``model`` (as ``module.attr``, so
            also after ``apply_masks``) with the mask's shape; the first that does not raises
            ``ValueError`` naming it.
        with_metadata: return ``(masks, metadata)`` instead of ``masks``.
    Returns:
        A :class:`Masks` of CPU bool tensors with ``metadata`` (empty for files without any).
    Raises:
        ValueError: naming ``path`` when it is not a file, is empty, truncated or corrupt, is not
            a mask file, or does not fit ``model``.
        TypeError: naming ``path`` when it reads but holds something other than bool tensors
            keyed by name.
    """
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    if not Path(path).is_file():
        raise ValueError(f"path {os.fspath(path)!r} is not a file")
    name = os.fspath(path)
    tensors, meta_text = _read(name)
    try:
        _check_masks(tensors, argname="masks")
    except TypeError as err:
        raise TypeError(f"mask file {name!r} does not hold masks: {err}") from None
    try:
        metadata = json.loads(meta_text) if meta_text else {}
    except ValueError:
        raise ValueError(f"mask file {name!r} has unreadable metadata (not JSON)") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"mask file {name!r} has unreadable metadata (not a JSON object)")
    masks = Masks(tensors, metadata=metadata)
    if model is not None:
        try:
            _check_against_model(masks, model, "masks")
        except ValueError as err:
            raise ValueError(f"mask file {name!r} does not fit the model: {err}") from None
    return (masks, dict(metadata)) if with_metadata else masks


def mask_density(masks: Mapping[str, torch.Tensor]) -> float:
    """Kept fraction over all masks."""
    _check_masks(masks)
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / total if total else 1.0
