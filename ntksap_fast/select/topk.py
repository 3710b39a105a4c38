"""Masked global top-k over a flat score vector.

NTK-SAP prunes globally: each round keeps the ``n_keep`` largest scores among the entries that are
still unpruned (``mask == True``) of one flat score vector (the arena). Semantics, identical on
every path:

* exactly ``n_keep`` entries are kept, all among ``mask == True``; pruned entries never come back;
* the largest scores win; ties are broken by the lower flat index; ``-0.0 == 0.0``;
  ``+inf``/``-inf`` are ordinary values;
* a NaN score among the unpruned entries raises ``ValueError`` (NaN at pruned entries is ignored);
* ``n_keep`` outside ``[0, mask.sum()]`` raises ``ValueError``;
* ``scores`` is float16, bfloat16, float32 or float64, ``mask`` is bool, both 1-D of equal length
  and on the same device (``TypeError`` / ``ValueError`` otherwise).

The work is done by the compiled ops (see ``csrc/``; one read of the scores on either device: a
sampled bracket of the threshold, one pass that writes the mask and collects the few entries near
the threshold, an exact cut among those; exact radix select when the bracket misses)::

    ntksap_fast::masked_topk(Tensor scores, Tensor mask, int n_keep) -> (Tensor, Tensor)
    ntksap_fast::masked_topk_(Tensor scores, Tensor(a!) mask, int n_keep) -> Tensor

Both return a status, an int64 CPU tensor ``[count, nan]`` (unpruned entries, 1 if a NaN sits
at one): the ops never raise on the data (a NaN, ``n_keep > count``) but leave the mask unchanged
(in place) or return an all-False mask, and the wrappers here raise the ``ValueError``. They raise
only on arguments, which the wrappers check first. (The in-place op returns only the status, as
torch.compile's functionalization requires of custom ops; :func:`masked_topk_` returns the mask.)
They come from the extension module ``ntksap_fast._C``, registered when ``ntksap_fast`` is imported
if it was built and passed its check (``_ext``); else it is built just in time with ninja on first
use; if that fails too, a pure-PyTorch implementation with the same semantics is used and one
warning says why. Setting the environment variable ``NTKSAP_FAST_NO_EXT=1`` forces the PyTorch
implementation.
"""

from __future__ import annotations

import operator

import torch

from .._build import loader as _ext

__all__ = [
    "masked_topk",
    "masked_topk_",
    "masked_topk_torch",
    "extension_available",
    "extension_error",
]

_SCORE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_OPS = ("ntksap_fast::masked_topk", "ntksap_fast::masked_topk_")


def _register_fakes() -> None:
    """Fake (meta) implementations so the ops trace under torch.compile / FakeTensor."""

    @torch.library.register_fake("ntksap_fast::masked_topk")
    def _masked_topk_fake(scores: torch.Tensor, mask: torch.Tensor, n_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch._check(scores.dim() == 1 and mask.dim() == 1, lambda: "scores and mask must be 1-D")
        torch._check(scores.shape[0] == mask.shape[0], lambda: "scores and mask differ in length")
        out = torch.empty_like(mask, memory_format=torch.contiguous_format)
        return out, torch.empty(2, dtype=torch.int64, device="cpu")

    @torch.library.register_fake("ntksap_fast::masked_topk_")
    def _masked_topk_inplace_fake(scores: torch.Tensor, mask: torch.Tensor, n_keep: int) -> torch.Tensor:
        torch._check(scores.dim() == 1 and mask.dim() == 1, lambda: "scores and mask must be 1-D")
        torch._check(scores.shape[0] == mask.shape[0], lambda: "scores and mask differ in length")
        return torch.empty(2, dtype=torch.int64, device="cpu")


def extension_available() -> bool:
    """Whether the compiled ops ``torch.ops.ntksap_fast.masked_topk(_)`` are loaded.

    Tries to import (or build just in time) the extension on first call. Independent of
    ``NTKSAP_FAST_NO_EXT``, which only affects which path :func:`masked_topk` takes.
    """
    return _ext.load() and all(_ext.has_kernel(op, "CPU") for op in _OPS)


def extension_error() -> str | None:
    """Why the compiled extension is unavailable, or ``None`` when it is loaded."""
    return None if extension_available() else _ext.error() or "masked_topk ops not registered"


def _use_extension(device: torch.device) -> bool:
    """Whether the compiled op runs for tensors on ``device``: CPU when the ops loaded; CUDA when
    they also hold code for that device (else one warning per device capability, ``_ext``)."""
    key = "CUDA" if device.type == "cuda" else "CPU" if device.type == "cpu" else None
    if not _ext.use_compiled("the top-k") or not extension_available() or key is None:
        return False
    if key == "CUDA" and not _ext.cuda_code_for(device, "top-k"):
        return False
    return all(_ext.has_kernel(op, key) for op in _OPS)


# --------------------------------------------------------------------------------------------
# Argument checks (shared by every path, so errors read the same)
# --------------------------------------------------------------------------------------------
def _check_args(scores: torch.Tensor, mask: torch.Tensor, n_keep: int) -> int:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if scores.dtype not in _SCORE_DTYPES:
        raise TypeError(f"scores must be float16, bfloat16, float32 or float64, got {scores.dtype}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if isinstance(n_keep, bool) or isinstance(n_keep, torch.Tensor) and n_keep.dim() != 0:
        raise TypeError(f"n_keep must be an int, got {type(n_keep).__name__}")
    try:
        n_keep = operator.index(n_keep)
    except TypeError:
        raise TypeError(f"n_keep must be an int, got {type(n_keep).__name__}") from None
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D, got shape {tuple(scores.shape)}")
    if mask.dim() != 1:
        raise ValueError(f"mask must be 1-D, got shape {tuple(mask.shape)}")
    if scores.shape[0] != mask.shape[0]:
        raise ValueError(f"scores and mask must have the same length, got {scores.shape[0]} and {mask.shape[0]}")
    if scores.device != mask.device:
        raise ValueError(f"scores and mask must be on the same device, got {scores.device} and {mask.device}")
    if not 0 <= n_keep <= mask.shape[0]:
        raise ValueError(f"n_keep must be in [0, number of unpruned entries], got {n_keep}")
    return n_keep


def _raise_for_status(status: torch.Tensor, n_keep: int) -> None:
    """The ``ValueError`` for what the op reported in its status ``[count, nan]``, if any."""
    count, nan = status.tolist()
    if nan:
        raise ValueError("scores contains NaN at an unpruned entry (mask == True)")
    if n_keep > count:
        raise ValueError(f"n_keep must be in [0, number of unpruned entries = {count}], got {n_keep}")


# --------------------------------------------------------------------------------------------
# Pure-PyTorch implementation
# --------------------------------------------------------------------------------------------
def masked_topk_torch(scores: torch.Tensor, mask: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Pure-PyTorch masked top-k (same semantics as :func:`masked_topk`); returns a new mask.

    Gathers the unpruned scores, sorts them descending with a stable sort (so ties keep the
    lower index first) and scatters ``True`` at the first ``n_keep``. Slower and uses
    ``O(mask.sum())`` extra memory; used when the compiled extension is unavailable.
    """
    n_keep = _check_args(scores, mask, n_keep)
    idx = mask.nonzero().squeeze(1)
    count = idx.numel()
    if n_keep > count:
        raise ValueError(f"n_keep must be in [0, number of unpruned entries = {count}], got {n_keep}")
    sel = scores[idx]
    if count and bool(torch.isnan(sel).any()):
        first = int(idx[torch.isnan(sel)][0])
        raise ValueError(f"scores contains NaN at an unpruned entry (flat index {first})")
    out = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)
    if n_keep == 0:
        return out
    if n_keep == count:
        out[idx] = True
        return out
    # Adding +0.0 maps -0.0 to +0.0 so both compare (and radix-sort) as equal on every device.
    sel = sel + 0.0
    order = torch.sort(sel, descending=True, stable=True).indices[:n_keep]
    out[idx[order]] = True
    return out


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def masked_topk(scores: torch.Tensor, mask: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Keep the ``n_keep`` largest scores among the unpruned entries; return a new bool mask.

    Args:
        scores: 1-D float16/bfloat16/float32/float64 tensor of scores (any strides).
        mask: 1-D bool tensor, same length and device; ``True`` marks unpruned entries.
        n_keep: number of entries to keep, in ``[0, mask.sum()]``.

    Returns:
        A new contiguous 1-D bool tensor with exactly ``n_keep`` ``True`` entries, all among
        ``mask``: the largest scores, ties broken by the lower index (``-0.0 == 0.0``).

    Raises:
        TypeError: wrong dtype of ``scores`` / ``mask`` or non-integer ``n_keep``.
        ValueError: wrong shapes or devices, ``n_keep`` out of range, or a NaN score at an
            unpruned entry.
    """
    n_keep = _check_args(scores, mask, n_keep)
    if _use_extension(scores.device):
        out, status = torch.ops.ntksap_fast.masked_topk(scores, mask, n_keep)
        _raise_for_status(status, n_keep)
        return out
    return masked_topk_torch(scores, mask, n_keep)


def masked_topk_(scores: torch.Tensor, mask: torch.Tensor, n_keep: int) -> torch.Tensor:
    """In-place :func:`masked_topk`: overwrite ``mask`` with the new mask and return it.

    Same arguments, semantics and errors as :func:`masked_topk`. ``mask`` may be non-contiguous
    (it is written through its strides). On error ``mask`` is left unchanged.
    """
    n_keep = _check_args(scores, mask, n_keep)
    if _use_extension(scores.device):
        _raise_for_status(torch.ops.ntksap_fast.masked_topk_(scores, mask, n_keep), n_keep)
        return mask
    mask.copy_(masked_topk_torch(scores, mask, n_keep))
    return mask


# Importing ntksap_fast registers the compiled ops when the built module is there and passed its
# check (no build here). The C++ library names this module as the home of its fake
# implementations (``m.set_python_module``): they are registered whenever the ops are (on_load).
_ext.on_load(_register_fakes)
_ext.autoload()
