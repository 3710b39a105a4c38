"""Triton kernels of ntksap_fast, imported as ``ntksap_fast.kernels``.

The folder is ``triton_kernels/`` in the repository (docs/DESIGN.md section 4); setup.py installs it
under ``ntksap_fast.kernels`` so that it never shadows the ``triton_kernels`` distribution Triton
publishes. One module per fused op, each with its PyTorch twin:

* ``philox``         Philox-4x32-10 words and Box-Muller normals (twin: ``ntksap_fast.engine.rng``)
* ``sample_draw``    clean/perturbed weights of many draws, all tensors, one launch
* ``batch_stats``    the clean branch's BatchNorm statistics in one pass (float64 combine)
* ``fd_loss``        ``sum((f_clean - f_pert)**2)`` and its gradient
* ``mask_grad``      ``G += sum_d theta*(g_c + g_p) + eps*z*g_p`` with theta/z regenerated
* ``ops``            the statistics and the reduction as PyTorch operators (``torch.library.triton_op``),
                     which ``torch.compile`` traces into

Kernels read seed, round and draw ids from device tensors and take sizes as runtime arguments, so
each compiles once per dtype/layout and a CUDA graph of a draw replays with new counters.

Importing this package needs nothing; importing a module needs ``triton``. Kernels run on CUDA
tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (set before triton is imported).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["philox", "sample_draw", "batch_stats", "fd_loss", "mask_grad", "ops"]

_MODULES = ("philox", "sample_draw", "batch_stats", "fd_loss", "mask_grad", "ops")


def __getattr__(name: str) -> ModuleType:
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
