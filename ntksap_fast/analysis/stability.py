"""How much a round's scores would move with other draws: split-half overlap and standard error.

NTK-SAP scores are sums of per-draw contributions ``c_d`` (``G = sum_d c_d``), and sampling noise
dominates them entry by entry. From the draws already computed, with two extra running sums
(the odd-numbered draws' share ``G_odd`` and ``sum_d c_d**2``, ``ntksap_fast.engine.engine``):

* ``split_half_overlap``: the Jaccard overlap ``|A & B| / |A | B|`` of the masks that the odd and
  the even draws alone would keep at the round's density (the highest ``|G_odd|`` and
  ``|G - G_odd|`` among the unpruned entries, ``n_keep`` of each). 1 means the two halves agree
  entry for entry; values far below 1 mean the kept set is decided by the draws, and more draws
  would change it.
* ``relative_se``: the standard error of ``G`` relative to its size, over the unpruned entries,
  ``||SE||_2 / ||G||_2`` with ``SE_e = sqrt(D * var_e)`` and ``var_e`` the sample variance of
  ``c_d`` over the ``D`` draws (NaN with one draw).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..select.topk import masked_topk

__all__ = ["RoundStats", "round_stats", "HOW_TO_READ"]

#: One sentence for reports.
HOW_TO_READ = (
    "split-half overlap: Jaccard overlap of the masks the odd and the even draws alone would keep "
    "(1 = the halves agree; low values mean more draws would change the mask); relative SE: "
    "standard error of the summed scores over their size (sampling noise of the estimate)."
)


@dataclass(frozen=True)
class RoundStats:
    """Stability figures of one scoring round (see the module docstring).

    Attributes:
        round: the round counter; draws: draws summed in it; density: the kept fraction the
        split-half masks were taken at; split_half_overlap: in [0, 1] (NaN with one draw);
        relative_se: ``||SE||/||G||`` over the unpruned entries (NaN with one draw).
    """

    round: int
    draws: int
    density: float
    split_half_overlap: float
    relative_se: float

    def as_dict(self) -> dict:
        return asdict(self)


def round_stats(
    grad: torch.Tensor,
    odd: torch.Tensor,
    sq: torch.Tensor,
    mask: torch.Tensor,
    draws: int,
    n_keep: int,
    round: int,
    density: float,
) -> RoundStats:
    """``RoundStats`` from the flat sums ``G`` (``grad``), ``G_odd`` and ``sum c_d**2`` of ``draws`` draws.

    Args:
        grad, odd, sq: flat ``(N,)`` float tensors; mask: flat bool ``(N,)``, True = unpruned;
        n_keep: entries the round keeps (the split-half masks keep as many); round, density: recorded.
    """
    if draws < 2:
        return RoundStats(round, draws, density, math.nan, math.nan)
    g = grad.double()
    halves = [odd.double().abs() * mask, (g - odd.double()).abs() * mask]
    kept_odd, kept_even = (masked_topk(h, mask, n_keep) for h in halves)
    union = int((kept_odd | kept_even).sum())
    overlap = int((kept_odd & kept_even).sum()) / union if union else 1.0
    var = ((sq.double() - g.square() / draws) / (draws - 1)).clamp_(min=0.0)
    se2 = (draws * var * mask).sum()
    g2 = (g.square() * mask).sum()
    rse = math.sqrt(se2.item() / g2.item()) if g2.item() > 0 else math.nan
    return RoundStats(round, draws, density, overlap, rse)
