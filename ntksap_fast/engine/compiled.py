"""The per-draw step under ``torch.compile``: one graph from a draw's weights and inputs to ``G``.

What is compiled (``CompiledDraw``), for one whole draw: the clean forward (recording each
BatchNorm's statistics), the perturbed forward (replaying them), the loss ``sum((f_c - f_p)**2)``,
its gradient with respect to both branches' weights (``torch.func.grad``, traced into the same
graph: AOTAutograd compiles the forward and backward together, and inductor fuses the
normalisation, elementwise and copy work around the convolutions and matmuls) and the backend's
reduction into ``G`` (and the stability sums). Sampling the weights and the inputs stays outside:
it reads the round and draw counters, which change at every draw. Everything the graph reads is a
tensor (weights, inputs, mask, counters on the device, the model's other tensors), so a new round,
draw or mask reuses the graph. A round whose draws differ in size (ImageNet's 39 x 256 + 16) marks
the batch dimension dynamic: one graph serves every size (padding is no option: padded rows would
change the BatchNorm statistics).

Numerics: the same float32 operations in another order and with fused multiply-adds, so compiled
scores differ from eager ones by rounding amplified by ``1 / epsilon`` (docs/DESIGN.md section 7),
no more (tests/engine/test_compiled.py against the float64 oracle). The BatchNorm statistics stay
float64 reductions rounded once (``batchnorm.batch_stats``); the Triton kernels enter the graph as
custom ops (``ntksap_fast.kernels.ops``).

When the step cannot be compiled (dynamo or inductor refuses something in the user's model), the
scorer runs its draws eagerly from then on, logs why once at WARNING, and keeps the reason in
``error`` (``describe`` shows it as ``compile_error``).

Each ``CompiledDraw`` compiles its own copy of the step function: dynamo keeps compiled graphs per
code object and stops compiling one after ``torch._dynamo.config.recompile_limit`` variants (8),
which a process that makes scorers for several models would otherwise reach, silently running the
rest eagerly.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable

import torch

from .arena import Arena
from .backend import Backend, DrawStats, Sampled
from .batchnorm import CleanStatsBatchNorm

__all__ = ["CompiledDraw", "BACKEND"]

log = logging.getLogger("ntksap_fast")

#: ``torch.compile`` backend of the step (tests switch to ``"aot_eager"``, which traces the same
#: graph and runs it without generating code, where only the graph is checked).
BACKEND = "inductor"


def _own_copy(fn: Callable) -> Callable:
    """``fn`` (a bound method) with a code object of its own, so dynamo's cache of it is this engine's."""
    func = fn.__func__
    copy = types.FunctionType(
        func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__, func.__closure__
    )
    return types.MethodType(copy, fn.__self__)


def _dynamic_batch(x: torch.Tensor) -> None:
    """Marks the batch dim of ``x`` dynamic (dynamo compiles a batch of 1 apart, as a constant)."""
    if x.shape[0] > 1:
        torch._dynamo.mark_dynamic(x, 0)


class CompiledDraw:
    """One engine's compiled draw steps; ``draw(sampled, x, grad, stats, micro)`` adds one draw to ``grad``.

    A whole draw is one graph (``_whole``). A draw in micro-batches of ``micro`` inputs is two: the
    no-grad clean forward of the whole draw that records the BatchNorm statistics (``_record``),
    then, per micro-batch, both branches replaying them, the loss and its gradient, summed in a
    ``(2, N)`` buffer (``_micro``, the batch dim dynamic: the last micro-batch is smaller); the
    backend's reduction follows once per draw, eagerly, as in the engine.

    Args:
        runner: the engine's ``ModelRunner``; backend: its ``Backend`` (statistics and reduction).

    Attributes:
        error: why compiling was given up (None while it works).
    """

    def __init__(self, runner, backend: Backend) -> None:
        self.runner, self.backend, self.arena = runner, backend, runner.arena
        self.error: str | None = None
        self._compiled = {
            step: torch.compile(_own_copy(step), backend=BACKEND, fullgraph=True)
            for step in (self._whole, self._record, self._micro)
        }

    def draw(
        self,
        sampled: Sampled,
        x: torch.Tensor,
        grad: torch.Tensor,
        stats: DrawStats | None,
        micro: int | None = None,
        dynamic_batch: bool = False,
    ) -> None:
        """Adds the draw whose weights are ``sampled`` (one draw, ``(1, N)``) and inputs ``x`` ``(B, *shape)``
        to ``grad`` (and ``stats``), in micro-batches of ``micro`` inputs when given and smaller than
        ``B``. ``dynamic_batch``: the round's draws differ in size (one graph for every size)."""
        if dynamic_batch:
            _dynamic_batch(x)
        if micro is None or micro >= x.shape[0]:
            self._run(self._whole, sampled, x, grad, stats)
            return
        recorded = self._run(self._record, sampled, x)
        g_flat = torch.zeros(2, self.arena.numel, dtype=sampled.w_clean.dtype, device=sampled.w_clean.device)
        for start in range(0, x.shape[0], micro):
            part = x[start : start + micro]
            _dynamic_batch(part)
            self._run(self._micro, sampled, part, recorded, g_flat)
        self.backend.accumulate(grad, sampled, g_flat[0:1], g_flat[1:2], stats)

    def _run(self, step: Callable, *args):
        """``step(*args)`` compiled; eagerly once compiling has failed (the reason kept, logged once)."""
        if self.error is None:
            try:
                return self._compiled[step](*args)
            except torch._dynamo.exc.TorchDynamoException as err:  # an unsupported model: eagerly from now on
                self.error = "; ".join(
                    f"{type(e).__name__}: {(str(e).strip() or ' ').splitlines()[0]}"
                    for e in (err, err.__cause__)
                    if e is not None
                )
                log.warning("NTK-SAP: the draw step could not be compiled, running eagerly (%s)", self.error)
        return step(*args)

    def _loss(
        self,
        clean: dict[str, torch.Tensor],
        pert: dict[str, torch.Tensor],
        x: torch.Tensor,
        recorded: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """``sum((f_clean - f_pert)**2)`` for inputs ``x``, both branches normalised with the clean branch's
        BatchNorm statistics: recorded by the clean forward, or ``recorded`` (the whole draw's)."""
        replayed = recorded is not None
        recorded = recorded if replayed else []
        bn_clean = CleanStatsBatchNorm(recorded, "replay" if replayed else "record", stats_fn=self.backend.batch_stats)
        out_clean = self.runner(clean, x, bn_clean)
        bn_pert = CleanStatsBatchNorm(recorded, "replay")
        out_pert = self.runner(pert, x, bn_pert)
        bn_clean.check_replayed()
        bn_pert.check_replayed()
        return (out_clean - out_pert).square().sum()

    def _gradients(
        self, sampled: Sampled, x: torch.Tensor, recorded: list[tuple[torch.Tensor, torch.Tensor]] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss's gradients with respect to the clean and the perturbed weights, each flat ``(1, N)``."""
        arena: Arena = self.arena
        clean, pert = arena.views(sampled.w_clean[0]), arena.views(sampled.w_pert[0])
        grads = torch.func.grad(self._loss, argnums=(0, 1))(clean, pert, x, recorded)
        return tuple(torch.cat([v.reshape(-1) for v in g.values()]).unsqueeze(0) for g in grads)

    def _whole(self, sampled: Sampled, x: torch.Tensor, grad: torch.Tensor, stats: DrawStats | None) -> None:
        self.backend.accumulate(grad, sampled, *self._gradients(sampled, x, None), stats)

    def _record(self, sampled: Sampled, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        recorded: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            bn = CleanStatsBatchNorm(recorded, "record", stats_fn=self.backend.batch_stats)
            self.runner(self.arena.views(sampled.w_clean[0]), x, bn)
        return recorded

    def _micro(
        self, sampled: Sampled, x: torch.Tensor, recorded: list[tuple[torch.Tensor, torch.Tensor]], g_flat: torch.Tensor
    ) -> None:
        g_clean, g_pert = self._gradients(sampled, x, recorded)
        g_flat[0:1].add_(g_clean)
        g_flat[1:2].add_(g_pert)
