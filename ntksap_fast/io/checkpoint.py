"""Checkpoints of an iterative prune: the mask and the round counter, written atomically.

File layout: ``MAGIC`` (8 bytes), the SHA-256 of the payload (32 bytes), then the payload (a
``torch.save`` of ``{"settings": dict, "round": int, "mask": bool tensor}``). A write goes to a
temporary file in the same folder, is flushed to disk, then renamed over the target, so a crash
leaves either the old or the new checkpoint, never half of one. A truncated or altered file fails
the checksum and is refused.

The settings a checkpoint is written with name everything the masks depend on; a resume with any
other value is refused. Besides the arguments, the masks depend on the model's non-prunable
tensors (biases, normalisation parameters, buffers), which the prune reads but never resamples:
``model_digest`` fingerprints them, so a model with other biases does not resume silently.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._atomic import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "model_digest"]

MAGIC = b"NTKSAPC1"
_DIGEST = 32


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: corrupted, truncated, or from other settings."""


def model_digest(model: nn.Module, prunable: Iterable[str]) -> str:
    """SHA-256 (64 hex digits) of the tensors of ``model`` that NTK-SAP reads but does not resample.

    Covers every parameter whose name is not in ``prunable`` and every floating-point buffer
    (``model.named_parameters()`` then ``model.named_buffers()`` order): for each, its name,
    shape, dtype and the bytes of its values (copied to the CPU, contiguous, native byte order).
    Integer buffers (BatchNorm's ``num_batches_tracked``) are left out: NTK-SAP never reads them.
    The prunable tensors are left out too: their values are resampled from the counters.

    The digest does not depend on the device the model lives on, on memory layout (strides) or on
    ``requires_grad``; it changes with any value, a shape, a dtype (a model cast to float64 has
    another digest even where the values are equal) or a name.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``prunable`` is a single string.
        ValueError: a name in ``prunable`` is not a parameter of ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(prunable, str):
        raise TypeError("prunable must be an iterable of parameter names, not a single string")
    skip = set(prunable)
    params = list(model.named_parameters())
    unknown = skip - {n for n, _ in params}
    if unknown:
        raise ValueError(f"prunable: no parameter named {sorted(unknown)[:5]} in the model")
    tensors = [(n, p) for n, p in params if n not in skip]
    tensors += [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    h = hashlib.sha256()
    for name, t in tensors:
        value = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}\0{tuple(t.shape)}\0{t.dtype}\0{value.numel()}\0".encode())
        h.update(value.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, settings: dict[str, Any], round: int, mask: torch.Tensor) -> None:
    """Atomically writes ``round`` (rounds finished) and the flat bool ``mask`` with ``settings`` (the
    permissions ``open()`` would give, ``io._atomic``)."""
    buffer = io.BytesIO()
    torch.save({"settings": settings, "round": int(round), "mask": mask.detach().cpu()}, buffer)
    payload = buffer.getvalue()
    with atomic_write(path) as f:
        f.write(MAGIC + hashlib.sha256(payload).digest() + payload)


def load_checkpoint(path: str | os.PathLike, settings: dict[str, Any]) -> tuple[int, torch.Tensor]:
    """``(rounds finished, flat bool mask)`` from ``path``.

    Raises ``CheckpointError`` when the file is corrupted or truncated, or when its settings differ
    from ``settings`` (naming the differing keys), so two runs are never mixed.
    """
    data = Path(path).read_bytes()
    if len(data) < len(MAGIC) + _DIGEST or not data.startswith(MAGIC):
        raise CheckpointError(f"checkpoint {str(path)!r} is not an ntksap_fast checkpoint (or is truncated)")
    digest, payload = data[len(MAGIC) : len(MAGIC) + _DIGEST], data[len(MAGIC) + _DIGEST :]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupted or truncated (checksum mismatch)")
    state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    saved = state["settings"]
    differing = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    if differing:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {settings.get(k)!r}" for k in differing[:5])
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written with other settings ({details}); "
            "use the same arguments to resume, or another checkpoint path"
        )
    return int(state["round"]), state["mask"]
