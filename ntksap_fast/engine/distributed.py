"""Sharing a round's draws across ``torch.distributed`` ranks.

Each rank computes the mask gradient of draws ``rank, rank + world, ...``; one all-reduce sums
them and every rank then selects the same mask. The counters make each draw's random numbers the
same wherever it runs, so the result equals a one-process run up to float summation order.
Works with gloo (CPU tensors) and NCCL (CUDA tensors); launch with ``torchrun``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DrawShare"]


@dataclass(frozen=True)
class DrawShare:
    """This process's part of the work: its rank, the world size and its process group."""

    rank: int = 0
    world: int = 1
    group: dist.ProcessGroup | None = None

    @classmethod
    def current(cls, process_group: dist.ProcessGroup | None = None) -> DrawShare:
        """The default group when ``torch.distributed`` is initialised, else a one-process share."""
        if process_group is None and not (dist.is_available() and dist.is_initialized()):
            return cls()
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(
                f"process_group must be a torch.distributed.ProcessGroup, got {type(process_group).__name__}"
            )
        return cls(dist.get_rank(process_group), dist.get_world_size(process_group), process_group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def draws(self, n_draws: int) -> list[int]:
        """Indices of the draws this rank computes."""
        return list(range(self.rank, n_draws, self.world))

    def all_reduce(self, grad: torch.Tensor) -> torch.Tensor:
        """Sums ``grad`` over the ranks, in place; returns it."""
        if self.world > 1:
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=self.group)
        return grad
