"""Channel granularity (``granularity="channel"``): unit scores and the selection of whole channels.

**Units** (``ntksap_fast.select.channel_units``): the coupled channels Torch-Pruning's
``DependencyGraph`` finds, each with its slices of the prunable weights (output rows and input
columns). A weight entry can be in two units (its output and its input channel).

**Unit score.** A method gives per-entry *contributions* ``c`` (flat, ``(N,)``), and a unit's raw
score is ``|sum of c over its unpruned entries|``: for a channel-level mask variable ``m_u`` that
multiplies all its entries, ``dL/dm_u`` is that sum (entries another removed unit already cut
count 0), so the sum is taken before the absolute value:

* ``ntksap``: ``c = G``, the signed mask gradient summed over draws (``|G|`` is the weight score):
  the unit's NTK-SAP score is ``|sum over draws and the unit's entries of dL/dm|``.
* ``snip`` / ``iter_snip``: ``c = g * w`` (the exact channel-mask gradient of the loss).
* ``synflow``: ``c = dR/dw * w`` (all >= 0, so the sum of the weight scores).
* ``magnitude``: ``c = |w|``: the unit's L1 norm.
* ``random``: one uniform number per unit (seeded), no contributions.

**Normalisation.** Units differ in size by orders of magnitude (a ResNet-50 stage-4 residual
channel spans thousands of entries, a stage-1 channel hundreds) and in cost (an entry of an early
convolution is used at every one of its many output positions), so raw scores are not comparable
across layers. The score is divided by the multiply-adds the unit's unpruned entries make per
sample (``"flop"``, the default: each entry counts its layer's output positions), chosen from the
measurement in docs/DESIGN.md section 9 (``bench/channel_normalisation.py``): at the same kept
weights it gave the fewest FLOPs on every model and kept the most NTK trace on ResNet-50 and
VGG-16; per unpruned weight (``"weight"``) keeps the early, costly layers whole and prunes the late
ones, so the exported model is barely faster; the raw sum (``"none"``) cuts some groups far below the
others (the layer-collapse side of the table).
``"group"`` divides by the mean raw score of the group's alive units (Torch-Pruning's "mean"
group normaliser), so units compete relative to their own layer: for NTK-SAP it measured more FLOPs
and less NTK trace than per FLOP on ResNet-20 and VGG-16-bn (section 9), but it is the choice for
``magnitude`` (``normalisation_for``): L1 norms at initialisation say nothing about one layer against
another, and ranked per weight (47% test accuracy) or per FLOP (tests/select/test_loop_granularity.py)
the global L1 order cut the last convolution of the digits CNN to its floor (per group mean: 98%,
examples/results/structured_accuracy.md).

**Selection, each round** (``density_t`` of the schedule, ``N`` prunable entries): the units still
alive (any entry unpruned) are ranked by score, ties to the lower unit index (units are numbered
group by group in Torch-Pruning's order, then by channel); every group keeps its best
``max(1, keep_count(units_g, min_layer_density))`` units (a group never loses its last channel:
the model would be cut); the others are removed lowest score first, the fewest that bring the kept
entries to at most ``keep_count(N, density_t)`` (so the round undershoots by less than one
unit's entries; density still counts prunable weights, so structured and unstructured masks
compare at equal size). Removed units never come back. A budget that removing every removable
unit cannot meet is a ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..engine.arena import Arena
from .channel_units import channel_units, working_copy
from .schedule import keep_count

__all__ = ["NORMALISATIONS", "ChannelSelector", "normalisation_for"]

#: Unit score normalisations (module docstring); the first is the default.
NORMALISATIONS = ("flop", "weight", "none", "group")


def normalisation_for(method: str) -> str:
    """The normalisation ``method``'s unit scores get (module docstring): ``"group"`` for ``magnitude``,
    the default for the others."""
    return "group" if method == "magnitude" else NORMALISATIONS[0]


class ChannelSelector:
    """The channel selection step of a prune: built once per prune, called once per round.

    Args:
        model: the model being pruned (read only: a copy is traced).
        arena: its arena (``ntksap_fast.engine.arena.Arena``).
        input_shape: one input's shape (the trace runs one random input).
        output: picks the output tensor from what the model returns (as ``ScorerOptions.output``).
        device: where masks and scores live.
        min_layer_density: each group keeps at least this fraction of its units (at least one).
        invert: keep the LOWEST unit scores (the inverted-scores sanity check).
        random_seed: the ``random`` method: each unit gets one uniform score from a ``torch.Generator``
            seeded with it, and ``select_`` ignores ``scores``.
        normalisation: one of ``NORMALISATIONS``.

    Raises ``ValueError`` when Torch-Pruning cannot trace the model (naming the layer) or no channel
    can be pruned (with each group's reason).
    """

    def __init__(
        self,
        model: nn.Module,
        arena: Arena,
        input_shape: Sequence[int],
        *,
        output: Callable | None = None,
        device: torch.device | str = "cpu",
        min_layer_density: float = 0.0,
        invert: bool = False,
        random_seed: int | None = None,
        normalisation: str = NORMALISATIONS[0],
    ) -> None:
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
        work = working_copy(model)
        units = channel_units(work, Arena(work, arena.names), input_shape, output)
        if units.count == 0:
            reasons = "; ".join(f"{root}: {why}" for root, why in units.frozen.items())
            raise ValueError(f"granularity='channel': no channel of {type(model).__name__} can be pruned ({reasons})")
        self.arena, self.device, self.invert, self.normalisation = arena, torch.device(device), invert, normalisation
        self.units = units.to(self.device)
        self.units.graph = None  # the selection needs only the index tables (the traced copy is freed)
        sizes = units.units_of_group().tolist()
        self.floors = torch.tensor([max(1, keep_count(n, min_layer_density)) for n in sizes], device=self.device)
        self.group_start = torch.tensor([sum(sizes[:g]) for g in range(len(sizes))], device=self.device)
        self._random = None
        if random_seed is not None:
            generator = torch.Generator().manual_seed(int(random_seed))
            self._random = torch.rand(units.count, generator=generator, dtype=torch.float64).to(self.device)

    def alive(self, mask: torch.Tensor) -> torch.Tensor:
        """``(U,)`` bool: units with an unpruned entry in the flat bool ``mask``."""
        return self.units.sums(mask) > 0

    def unit_scores(self, contributions: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        """``(U,)`` float64 unit scores (module docstring) from flat ``(N,)`` contributions and the flat mask."""
        if self._random is not None:
            return self._random.clone()
        raw = self.units.sums(torch.where(mask, contributions, 0)).abs_()
        if self.normalisation == "none":
            return raw
        if self.normalisation == "group":
            alive, group_of = self.alive(mask).to(raw.dtype), self.units.group_of
            total = torch.zeros(len(self.units.roots), dtype=raw.dtype, device=raw.device)
            count = total.clone().index_add_(0, group_of, alive)
            mean = (total.index_add_(0, group_of, raw * alive) / count.clamp_min(1))[group_of]
            return torch.where(mean > 0, raw / mean, 0.0)
        size = self.units.sums(mask, (lambda macs: macs) if self.normalisation == "flop" else None)
        return raw / size.clamp_min(1)

    def select_(self, scores: torch.Tensor | None, mask: torch.Tensor, round: int, density_t: float) -> torch.Tensor:
        """One round (module docstring): removes the lowest-scoring units; ``mask`` in place.

        Args:
            scores: flat ``(N,)`` per-entry contributions (ignored for ``random``).
            mask: flat bool ``(N,)`` mask, True = unpruned.
            round: unused (the budget follows ``density_t``).
            density_t: the schedule's kept fraction after this round.
        Raises:
            ValueError: a NaN unit score (naming the group), or a budget no removal can meet;
                ``mask`` is unchanged then.
        """
        units, count = self.units, self.units.count
        alive = self.alive(mask)
        unit = self.unit_scores(scores, mask)
        bad = torch.isnan(unit) & alive
        if bad.any():
            groups = sorted({units.roots[g] for g in units.group_of[bad].tolist()})
            raise ValueError(
                f"NaN in the channel scores of the groups rooted at {groups}: the model's output or "
                "gradient is not finite"
            )
        if self.invert:
            unit = -unit
        key = torch.where(alive, unit, float("-inf"))
        order = torch.sort(key, descending=True, stable=True).indices  # best first, ties to the lower unit
        group = units.group_of[order]
        by_group = torch.sort(group, stable=True).indices
        rank = torch.empty_like(order)
        rank[by_group] = torch.arange(count, device=self.device) - self.group_start[group[by_group]]
        candidates = order[alive[order] & (rank >= self.floors[group])].flip(0)  # removable, lowest first
        unpruned = int(mask.sum())
        n_keep = min(keep_count(self.arena.numel, density_t), unpruned)
        counts = [units.grid(mask, slot).sum(-1, dtype=torch.float64) for slot, *_ in units.sides]
        others = unpruned - units.kept(counts, torch.ones_like(alive))  # unpruned entries outside every unit

        def keep_after(k: int) -> torch.Tensor:
            keep = alive.clone()
            keep[candidates[:k]] = False
            return keep

        lo, hi = 0, int(candidates.numel())
        least = others + units.kept(counts, keep_after(hi))
        if least > n_keep:
            raise ValueError(
                f"density {density_t:.6g} cannot be reached with granularity='channel': removing every "
                f"removable channel keeps {least} of {self.arena.numel} prunable weights (each group "
                "keeps at least one channel; frozen groups keep all theirs); raise the density"
            )
        while lo < hi:  # the fewest removals with kept <= n_keep (the count never grows with k)
            mid = (lo + hi) // 2
            if others + units.kept(counts, keep_after(mid)) <= n_keep:
                hi = mid
            else:
                lo = mid + 1
        return units.cut_(mask, keep_after(lo))

    def metadata(self) -> dict:
        """What the masks' metadata records of the channel selection."""
        return {
            "granularity": "channel",
            "channel_normalisation": self.normalisation,
            "channel_units": self.units.count,
            "channel_frozen": dict(self.units.frozen),
        }
