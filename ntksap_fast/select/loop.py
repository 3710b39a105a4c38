"""The one prune loop: every method's rounds, selection, checkpoints, callbacks and metadata.

A method is a ``Scoring`` (its scores for a mask and a round, plus what its masks depend on);
``PruneOptions`` are the loop's own arguments, each checked once here, with the rules of which of
them combine. ``run`` does the rest the same way for every method:

* round ``t`` (``t = 0..T-1``) scores the current flat mask, then keeps exactly
  ``keep_count(N, d_t)`` entries (``density_schedule``) among the unpruned ones: the highest scores
  (the lowest with ``invert``), globally with the ``min_layer_density`` floors or per tensor
  (``scope="layer"``), ties to the lower flat index; pruned entries never come back;
* ``granularity`` other than ``"weight"`` hands the selection to a selector built once per prune:
  ``"channel"`` removes whole channels (``ntksap_fast.select.structured.ChannelSelector``: unit
  scores from the method's signed per-entry contributions, at most ``keep_count(N, d_t)`` entries
  kept), ``"N:M"`` keeps N of every M (``ntksap_fast.select.nm.NMSelector``);
* after each round: the checkpoint (atomic; a run with the same settings resumes after the last
  finished round and gives the identical masks), ``on_round``, the progress bar;
* the masks' metadata: the method, ``PruneOptions.metadata()`` and the method's own settings.

What goes into a checkpoint's settings is derived, never written out by hand: the fields of
``PruneOptions`` and ``ScorerOptions`` whose metadata says they change the masks
(``changes_masks``), the method's name and settings, the prunable tensors and a digest of the model
tensors the masks depend on (``Scoring.digest``). A new option is covered once it says whether it
changes the masks.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..analysis.stability import RoundStats
from ..engine.arena import Arena
from ..io.checkpoint import load_checkpoint, save_checkpoint
from ..io.masks import Masks
from ..options import OutputFn, changes_masks, check_density, check_float, check_int, resolve_input_shape
from .nm import NMSelector, parse_nm
from .schedule import SCHEDULES, density_schedule, keep_count
from .selection import select_
from .structured import ChannelSelector, normalisation_for
from .topk import masked_topk_

__all__ = ["PruneOptions", "Scoring", "run", "SCOPES", "GRANULARITIES", "checkpoint_settings", "select_round_"]

SCOPES = ("global", "layer")
#: What the selection keeps or removes together; besides these, ``"N:M"`` (e.g. ``"2:4"``).
GRANULARITIES = ("weight", "channel")
#: Methods whose channel score is defined (``ntksap_fast.select.structured``): GraSP's score is signed
#: with its own sign convention, and its channel form is not the sum's absolute value.
CHANNEL_METHODS = ("ntksap", "random", "magnitude", "snip", "iter_snip", "synflow")


def _loop_option(default: Any, help: str, masks: bool = True):
    """A ``PruneOptions`` field: its default, help, and whether its value changes the masks."""
    return field(default=default, metadata={"help": help, "changes_masks": masks})


@dataclass(frozen=True)
class PruneOptions:
    """The prune loop's arguments, checked when made (``TypeError``/``ValueError`` naming the argument).

    Rules of which combine (``ValueError`` otherwise): ``min_layer_density`` needs
    ``scope="global"`` (``"layer"`` keeps the same fraction of every tensor already); ``stats`` and
    ``target_overlap`` need ``scope="global"`` and a method with round statistics (NTK-SAP), and
    not ``invert`` (the split-half overlap measures how stable the choice of the HIGHEST scores
    is); ``max_draws`` needs ``target_overlap``, which implies ``stats``. ``granularity`` other than
    ``"weight"`` needs ``scope="global"`` (a channel spans several tensors; N:M is per group already)
    and no ``stats`` (those are of the entries' top-k); N:M takes no ``min_layer_density``.
    """

    density: float = _loop_option(None, "final kept fraction of the prunable entries, in (0, 1]")
    iterations: int = _loop_option(20, "rounds T: after round t the kept fraction is density_schedule(...)[t-1]")
    schedule: str = _loop_option("exponential", "kept fraction after round t: d**(t/T) or 1-(1-d)t/T")
    scope: str = _loop_option("global", "one top-k over all tensors, or per tensor ('layer')")
    granularity: str = _loop_option(
        "weight",
        "what is kept or removed together: 'weight' (entries), 'channel' "
        "(whole channels) or 'N:M' (N of every M along the input dim, e.g. '2:4')",
    )
    min_layer_density: float = _loop_option(0.0, "each tensor keeps at least this fraction of its entries")
    invert: bool = _loop_option(False, "keep the LOWEST scores each round (the inverted-scores sanity check)")
    target_overlap: float | None = _loop_option(None, "add draws to a round until its split-half overlap reaches this")
    max_draws: int | None = _loop_option(None, "most draws of a round with target_overlap (default 4 * draws)")
    stats: bool = _loop_option(False, "compute each round's RoundStats", masks=False)

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_("density", check_density(self.density))
        set_("iterations", check_int("iterations", self.iterations))
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if isinstance(self.granularity, str) and self.granularity not in GRANULARITIES and ":" not in self.granularity:
            raise ValueError(
                f"granularity must be one of {GRANULARITIES} or 'N:M' (e.g. '2:4'), got {self.granularity!r}"
            )
        if self.granularity not in GRANULARITIES:  # N:M: TypeError/ValueError naming granularity
            set_("granularity", "{}:{}".format(*parse_nm(self.granularity)))
        set_("min_layer_density", check_float("min_layer_density", self.min_layer_density))
        if not 0.0 <= self.min_layer_density <= 1.0:
            raise ValueError(f"min_layer_density must be in [0, 1], got {self.min_layer_density}")
        for name in ("invert", "stats"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {type(getattr(self, name)).__name__}")
        if self.target_overlap is not None:
            set_("target_overlap", check_float("target_overlap", self.target_overlap))
            if not 0.0 < self.target_overlap <= 1.0:
                raise ValueError(f"target_overlap must be in (0, 1], got {self.target_overlap}")
            set_("stats", True)
        if self.max_draws is not None:
            set_("max_draws", check_int("max_draws", self.max_draws))
            if self.target_overlap is None:
                raise ValueError("max_draws applies with target_overlap only")
        if self.scope == "layer" and self.min_layer_density != 0.0:
            raise ValueError(
                "min_layer_density applies to scope='global'; scope='layer' already keeps the same "
                "fraction of every tensor"
            )
        if self.stats and self.scope != "global":
            raise ValueError(
                "stats and target_overlap apply to scope='global' (the statistics are those of the global top-k)"
            )
        if self.granularity != "weight" and self.scope != "global":
            raise ValueError(
                f"granularity={self.granularity!r} applies to scope='global': scope='layer' keeps a "
                "fraction of each tensor, and a channel spans several tensors (N:M keeps N of every M "
                "in each group already)"
            )
        if self.granularity != "weight" and self.stats:
            raise ValueError(
                f"stats and target_overlap apply to granularity='weight' (the split-half overlap is "
                f"that of the entries' top-k), not {self.granularity!r}"
            )
        if self.granularity not in GRANULARITIES and self.min_layer_density != 0.0:
            raise ValueError(
                f"min_layer_density does not apply to granularity={self.granularity!r}: every eligible "
                "tensor keeps N/M of its entries"
            )
        if self.stats and self.invert:
            raise ValueError(
                "invert does not combine with stats or target_overlap: the split-half overlap measures "
                "how stable the choice of the highest scores is, not of the lowest"
            )

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The argument names, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def densities(self) -> list[float]:
        """Kept fraction after each round ``t = 1..T``."""
        return density_schedule(self.density, self.iterations, self.schedule)

    def mask_settings(self) -> dict[str, Any]:
        """``{name: value}`` of the arguments that change the masks (a checkpoint's settings)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if changes_masks(f)}

    def metadata(self) -> dict[str, Any]:
        """What the masks' metadata records of the loop: the arguments that change the masks."""
        return self.mask_settings()


class Scoring(Protocol):
    """A pruning method as the loop sees it.

    Attributes:
        name: the method (``"ntksap"``, ``"magnitude"``, ...), in the metadata and the checkpoint.
        arena: the prunable tensors (flat index space ``[0, arena.numel)``).
        device: where the flat mask and scores live.
        is_main: this process writes checkpoints and shows progress (rank 0 of a scale-out).
        ticks_per_round: progress-bar units one round makes (0: the loop counts rounds).
        has_stats: the method computes ``RoundStats`` (so ``stats``/``target_overlap`` apply).
        model: the model pruned (read only), input_shape: one input's shape (None: the model's own
            ``input_shape`` attribute), output: picks its output tensor: granularity ``"channel"``
            traces the model with them, and N:M reads its layer types.
        unit_seed: the ``random`` method's seed: with granularity ``"channel"`` each channel gets one
            uniform score from it (None: units are scored from ``round_scores``).
    """

    name: str
    arena: Arena
    device: torch.device
    is_main: bool
    ticks_per_round: int
    has_stats: bool
    model: nn.Module
    input_shape: tuple[int, ...] | None
    output: OutputFn | None
    unit_seed: int | None

    def check(self, options: PruneOptions) -> None:
        """Refuses (``ValueError``) what this method cannot do with ``options``."""

    def start_mask(self) -> torch.Tensor:
        """A new flat bool ``(N,)`` mask on ``device``: the masks the model carries (else all True)."""

    def round_scores(
        self, mask: torch.Tensor, round: int, density: float, options: PruneOptions, tick: Callable[[], None]
    ) -> tuple[torch.Tensor, RoundStats | None]:
        """Flat float ``(N,)`` scores of round ``round`` for the flat bool ``mask`` (higher = kept;
        only unpruned entries are read) and, with ``options.stats``, the round's ``RoundStats`` at
        ``density``. With ``options.granularity == "channel"``: the signed per-entry contributions
        whose sum over a channel's entries is its channel-mask score (``select.structured``). Calls
        ``tick`` once per progress unit."""

    def mask_settings(self) -> dict[str, Any]:
        """Everything else its masks depend on, as plain values (a checkpoint refuses other values)."""

    def metadata(self) -> dict[str, Any]:
        """How it computed, for the masks' metadata."""

    def digest(self) -> str:
        """A digest of the model tensors its masks depend on."""


def select_round_(
    arena: Arena, scores: torch.Tensor, mask: torch.Tensor, density: float, options: PruneOptions, method: str
) -> None:
    """Updates the flat ``mask`` in place: keeps ``keep_count(N, density)`` entries (at most the unpruned
    ones), the highest ``scores`` (the lowest with ``invert``), by ``options.scope``.

    Raises ``ValueError`` naming the tensors whose unpruned scores are NaN."""
    nan = torch.isnan(scores) & mask
    if nan.any():
        bad = [n for n, v in arena.views(nan).items() if v.any()]
        raise ValueError(f"NaN in the {method} scores of {bad}: the model's output or gradient is not finite")
    if options.invert:
        scores = scores.neg()
    if options.scope == "global":
        # a model that already carries masks may hold fewer than n_keep: then nothing more goes
        n_keep = min(keep_count(arena.numel, density), int(mask.sum()))
        select_(scores, mask, n_keep, arena.slots, options.min_layer_density)
        return
    for s in arena.slots:
        part = mask[s.offset : s.stop]
        masked_topk_(scores[s.offset : s.stop], part, min(keep_count(s.numel, density), int(part.sum())))


def build_selector(scoring: Scoring, options: PruneOptions) -> ChannelSelector | NMSelector | None:
    """The selection step of ``options.granularity`` (None: entries, ``select_round_``), built once."""
    if options.granularity == "weight":
        return None
    if options.granularity == "channel":
        if scoring.name not in CHANNEL_METHODS:
            raise ValueError(f"granularity='channel' applies to methods {CHANNEL_METHODS}, not {scoring.name!r}")
        shape = resolve_input_shape(scoring.model, scoring.input_shape)
        return ChannelSelector(
            scoring.model,
            scoring.arena,
            shape,
            output=scoring.output,
            device=scoring.device,
            min_layer_density=options.min_layer_density,
            invert=options.invert,
            random_seed=scoring.unit_seed,
            normalisation=normalisation_for(scoring.name),
        )
    return NMSelector(scoring.model, scoring.arena, options.granularity, options.density, invert=options.invert)


def checkpoint_settings(scoring: Scoring, options: PruneOptions) -> dict[str, Any]:
    """The settings a checkpoint is written with and must match to resume (see the module docstring)."""
    return {
        "method": scoring.name,
        **options.mask_settings(),
        **scoring.mask_settings(),
        "tensors": [(s.name, tuple(s.shape)) for s in scoring.arena.slots],
        "model_digest": scoring.digest(),
    }


def run(
    scoring: Scoring,
    options: PruneOptions,
    *,
    checkpoint: str | os.PathLike | None = None,
    progress: bool | None = None,
    on_round: Callable[..., None] | None = None,
) -> Masks:
    """Prunes with ``scoring`` over ``options.iterations`` rounds (see the module docstring).

    Args:
        checkpoint: a file path; after each round the mask and the round counter are written to it
            atomically (by the main process), and a call with the same settings and model resumes after
            the last finished round. Other settings, another model or a corrupted file:
            ``ValueError`` (``ntksap_fast.io.checkpoint.CheckpointError``).
        progress: a bar (None: only on a terminal; the main process only).
        on_round: called after each round as ``on_round(t, masks)``, or ``on_round(t, masks,
            round_stats)`` with ``options.stats``.
    Returns:
        ``Masks`` on the scoring device, with ``metadata`` saying what made them.
    """
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a file path, got {type(checkpoint).__name__}")
    if on_round is not None and not callable(on_round):
        raise TypeError(f"on_round must be callable (round, masks) -> None, got {type(on_round).__name__}")
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, got {type(progress).__name__}")
    if options.stats and not scoring.has_stats:
        raise ValueError(f"stats and target_overlap apply to method 'ntksap' (round statistics), not {scoring.name!r}")
    scoring.check(options)
    step = build_selector(scoring, options)
    arena = scoring.arena
    mask = scoring.start_mask()
    done = 0
    settings = checkpoint_settings(scoring, options) if checkpoint is not None else {}
    if checkpoint is not None and Path(checkpoint).exists():
        done, saved = load_checkpoint(checkpoint, settings)
        mask.copy_(saved.to(mask.device))
    densities = options.densities()
    rounds: list[dict] = []
    show = scoring.is_main and progress is not False
    per_round = max(scoring.ticks_per_round, 1)
    with tqdm(
        total=(options.iterations - done) * per_round,
        desc=scoring.name,
        unit="draw" if scoring.ticks_per_round else "round",
        disable=(None if progress is None else False) if show else True,
    ) as bar:
        tick = (lambda: bar.update(1)) if scoring.ticks_per_round else (lambda: None)
        for t in range(done, options.iterations):
            bar.set_postfix(round=f"{t + 1}/{options.iterations}", density=f"{densities[t]:.4f}")
            scores, info = scoring.round_scores(mask, t, densities[t], options, tick)
            if step is None:
                select_round_(arena, scores, mask, densities[t], options, scoring.name)
            else:
                step.select_(scores, mask, t, densities[t])
            if not scoring.ticks_per_round:
                bar.update(1)
            if checkpoint is not None and scoring.is_main:
                save_checkpoint(checkpoint, settings, t + 1, mask)
            if info is not None:
                rounds.append(info.as_dict())
            if on_round is not None:
                masks_now = {n: v.clone() for n, v in arena.views(mask).items()}
                on_round(t + 1, masks_now, info) if options.stats else on_round(t + 1, masks_now)
    metadata = {
        "method": scoring.name,
        **options.metadata(),
        **scoring.metadata(),
        **(step.metadata() if step is not None else {}),
    }
    if options.stats:
        metadata["rounds"] = rounds
    return Masks({n: v.clone() for n, v in arena.views(mask).items()}, metadata=metadata)
