"""Exact BatchNorm statistics of a whole draw from micro-batches, in one forward's worth of work.

When a draw of ``B`` inputs is run ``micro_batch`` inputs at a time, both branches must still
normalise with the clean branch's statistics over all ``B`` inputs (docs/DESIGN.md section 2). Those
statistics depend on each other layer by layer: BatchNorm ``k``'s input depends on the statistics of
BatchNorms ``0..k-1``. Recomputing every micro-batch from its input for each BatchNorm costs about
half a forward per BatchNorm layer; instead each micro-batch's forward runs once, paused at the
*frontier*, the next BatchNorm whose statistics are not final yet:

* one worker thread per micro-batch runs the clean forward without gradient; the workers run
  strictly one at a time, in micro-batch order (a token passed round-robin), so the work is
  sequential and deterministic;
* at BatchNorm ``k`` a worker folds its input into the draw's running (count, mean, M2) sums
  (``StatsAccumulator``, float64, Chan et al.) and passes the token on; the last micro-batch
  finalises the statistics; when the token comes back the worker normalises with them and
  runs on to BatchNorm ``k + 1``.

Each micro-batch therefore passes each layer once: the pre-pass costs one no-grad forward of the
draw in all, and holds each micro-batch's activation at the frontier (together about one layer's
activation of the whole draw). The statistics equal the whole draw's up to float64 summation order,
so the scores do not depend on ``micro_batch``.
"""
from __future__ import annotations

import threading
from typing import Callable

import torch

from .batchnorm import CleanStatsBatchNorm, StatsAccumulator

__all__ = ["frontier_stats"]

#: Runs micro-batch ``i``'s clean forward (no gradient) with the given BatchNorm mode.
RunMicroBatch = Callable[[int, CleanStatsBatchNorm], object]


class _Aborted(Exception):
    """Raised in waiting workers when another worker failed."""


class _Token:
    """Lets ``n`` workers run one at a time, round-robin, skipping finished ones."""

    def __init__(self, n: int) -> None:
        self.cond = threading.Condition()
        self.turn = 0
        self.finished = [False] * n
        self.error: BaseException | None = None

    def wait(self, i: int) -> None:
        with self.cond:
            while self.turn != i and self.error is None:
                self.cond.wait()
            if self.error is not None:
                raise _Aborted

    def pass_on(self, i: int, finished: bool = False) -> None:
        with self.cond:
            self.finished[i] = finished or self.finished[i]
            n = len(self.finished)
            nxt = next(((i + j) % n for j in range(1, n + 1) if not self.finished[(i + j) % n]), None)
            self.turn = -1 if nxt is None else nxt
            self.cond.notify_all()

    def fail(self, err: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = err
            self.cond.notify_all()


def frontier_stats(run: RunMicroBatch, n_micro: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(mean, unbiased var)`` in ``dtype`` for each BatchNorm call of the draw, in call order.

    Args:
        run: runs micro-batch ``i`` (``0 <= i < n_micro``) through the clean forward with the mode
            it is given; called once per micro-batch, each in its own thread.
        n_micro: number of micro-batches of the draw.
        dtype: dtype of the returned statistics (the engine's ``param_dtype``).
    """
    stats: list[tuple[torch.Tensor, torch.Tensor]] = []
    sums: list[StatsAccumulator] = []
    token = _Token(n_micro)
    grad_mode = torch.is_grad_enabled()

    def reach(i: int, index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if index > len(sums):
            raise RuntimeError("the model's BatchNorm calls differ between micro-batches of one draw")
        if index == len(sums):
            sums.append(StatsAccumulator())
        sums[index].add(x)
        if sums[index].adds == n_micro:
            stats.append(sums[index].finish(dtype))
        token.pass_on(i)
        token.wait(i)
        if index >= len(stats):
            raise RuntimeError("the model's BatchNorm calls differ between micro-batches of one draw")
        return stats[index]

    def worker(i: int) -> None:
        try:
            token.wait(i)
            with torch.set_grad_enabled(False):
                run(i, CleanStatsBatchNorm(stats, "frontier", frontier=lambda index, x: reach(i, index, x)))
            token.pass_on(i, finished=True)
        except _Aborted:
            pass
        except BaseException as err:  # noqa: BLE001 - re-raised in the calling thread
            token.fail(err)

    threads = [threading.Thread(target=worker, args=(i,), name=f"ntksap-prepass-{i}", daemon=True)
               for i in range(n_micro)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.set_grad_enabled(grad_mode)
    if token.error is not None:
        raise token.error
    if len(stats) != len(sums):
        raise RuntimeError("the model's BatchNorm calls differ between micro-batches of one draw")
    return stats
