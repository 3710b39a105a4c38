"""Checkpoints of an iterative prune: the mask and the round counter, written atomically.

File layout: ``MAGIC`` (8 bytes), the SHA-256 of the payload (32 bytes), then the payload (a
``torch.save`` of ``{"settings": dict, "round": int, "mask": bool tensor}``). A write goes to a
temporary file in the same folder, is flushed to disk, then renamed over the target, so a crash
leaves either the old or the new checkpoint, never half of one. A truncated or altered file fails
the checksum and is refused.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError"]

MAGIC = b"NTKSAPC1"
_DIGEST = 32


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: corrupted, truncated, or from other settings."""


def save_checkpoint(path: str | os.PathLike, settings: dict[str, Any], round: int, mask: torch.Tensor) -> None:
    """Atomically writes ``round`` (rounds finished) and the flat bool ``mask`` with ``settings``."""
    buffer = io.BytesIO()
    torch.save({"settings": settings, "round": int(round), "mask": mask.detach().cpu()}, buffer)
    payload = buffer.getvalue()
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + hashlib.sha256(payload).digest() + payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
