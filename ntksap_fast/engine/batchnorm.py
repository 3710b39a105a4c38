"""BatchNorm with the clean branch's statistics, as a ``TorchFunctionMode``.

The engine runs the user's model unchanged; this mode intercepts every ``F.batch_norm`` call
(``nn.BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` call it) and normalises with per-draw statistics
instead of the module's running buffers, which are never read or written:

* ``record``: compute the call's mean and **unbiased** variance over every dim but the channel dim
  (no gradient; ``batch_stats`` or the statistics function given, e.g. the Triton
  ``clean_stats``), keep them, normalise with them (the clean branch);
* ``replay``: normalise with the statistics kept for the same call, in call order (the perturbed
  branch, and both branches of a micro-batched draw, whose statistics come from a no-grad
  ``record`` forward of the whole draw). ``check_replayed()`` after the forward refuses a model
  that made fewer calls than were recorded.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["CleanStatsBatchNorm", "batch_stats", "normalize"]

#: ``x (B, C, *spatial) -> (mean, unbiased var)``, each ``(C,)``, computed without gradient.
StatsFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased variance, computed in float64 and rounded once.

    The scores are a double finite difference and very sensitive to these statistics, so they are
    computed exactly (float64) and rounded to float32 (float64 for float64 inputs).
    """
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        # Inside vmap over draws, and in a compiled draw (engine.compiled): the functional op. Inductor
        # fuses the float64 cast into its one-pass reduction; AOTAutograd traces the in-place
        # statistics below wrongly (torch 2.14: scores off by 3 orders of magnitude).
        if torch._C._functorch.is_batchedtensor(x) or torch.compiler.is_compiling():
            dims = [d for d in range(x.dim()) if d != 1]
            var, mean = torch.var_mean(x.double(), dims, correction=1)
        else:
            # Running buffers with momentum 1 receive the batch mean and *unbiased* variance; this
            # native kernel is several times faster than torch.var_mean on CPU.
            mean = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            var = torch.ones(x.shape[1], dtype=torch.float64, device=x.device)
            torch.batch_norm_update_stats(x.double(), mean, var, 1.0)
    return mean.to(out_dtype), var.to(out_dtype)


def normalize(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """``F.batch_norm`` in eval mode with the given statistics: ``(x - mean) / sqrt(var + eps) * w + b``.

    ``x``: ``(B, C, *spatial)``; the rest ``(C,)``. On the CPU, float32/float64 inputs run it as one
    per-channel multiply-add ``x * scale + shift`` (aten's eval-mode kernel folds the same two
    vectors), whose backward is one multiply; aten's eval-mode backward is a slower kernel: a
    ResNet-20 CIFAR-10 round is 10% faster (2.57 -> 2.30 s, 2 cores). Elsewhere ``F.batch_norm``:
    bfloat16/float16 compute in float32 inside it (a bfloat16 ``scale`` would round it), and on
    GPUs the multiply-add's four extra per-channel kernels per call have not been measured against
    cuDNN's BatchNorm yet.
    """
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
    scale = torch.rsqrt(var.to(x.dtype) + eps)
    if weight is not None:
        scale = scale * weight.to(x.dtype)
    shift = -mean.to(x.dtype) * scale
    if bias is not None:
        shift = shift + bias.to(x.dtype)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.view(shape), x, scale.view(shape))


_DIFFER = (
    "the model's BatchNorm calls differ between passes of one draw; "
    "NTK-SAP needs a forward that does the same computation every call"
)


class CleanStatsBatchNorm(TorchFunctionMode):
    """Intercepts ``F.batch_norm``; see the module docstring for the two modes.

    Args:
        stats: list of ``(mean, var)`` per BatchNorm call, shared between the branches of a draw.
        mode: ``"record"`` or ``"replay"``.
        stats_fn: the statistics of ``record`` mode (default ``batch_stats``).
    """

    def __init__(
        self, stats: list[tuple[torch.Tensor, torch.Tensor]], mode: str, stats_fn: StatsFn = batch_stats
    ) -> None:
        super().__init__()
        if mode not in ("record", "replay"):
            raise ValueError(f"mode must be record or replay, got {mode!r}")
        self.stats = stats
        self.mode = mode
        self.stats_fn = stats_fn
        self.calls = 0

    def check_replayed(self) -> None:
        """After a ``replay`` forward: ``RuntimeError`` unless it used every recorded statistic."""
        if self.mode == "replay" and self.calls != len(self.stats):
            raise RuntimeError(_DIFFER)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.batch_norm:
            return func(*args, **kwargs)
        return self._batch_norm(*args, **kwargs)

    def _batch_norm(
        self, input, running_mean=None, running_var=None, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
    ):
        index = self.calls
        self.calls += 1
        if self.mode == "record":
            mean, var = self.stats_fn(input.detach())
            self.stats.append((mean, var))
        elif index < len(self.stats):
            mean, var = self.stats[index]
        else:
            raise RuntimeError(_DIFFER)
        if mean.shape[0] != input.shape[1]:
            raise RuntimeError(_DIFFER)
        return normalize(input, mean, var, weight, bias, eps)
