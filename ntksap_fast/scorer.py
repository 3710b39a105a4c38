"""``NtkSapScorer``: the session object every entry point goes through.

Everything that does not change between rounds and calls is decided and built once, when the
scorer is made: the arena, the backend (PyTorch or Triton), the memory plan (micro-batch, CUDA
graphs), draw batching, the precision policy, and the engine with its buffers, compiled kernels and
captured graphs. ``repr(scorer)`` shows what was decided. A user scoring the same model repeatedly
keeps one scorer: the second call costs only the draws.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .analysis.stability import RoundStats, round_stats
from .engine.arena import Arena, ParamSelector
from .engine.distributed import DrawShare
from .engine.engine import Engine, ModelRunner, preserved_state
from .engine.plan import describe, resolve, tf32_policy
from .io.checkpoint import model_digest
from .io.masks import Masks
from .options import OutputFn, ScorerOptions, check_density, check_int, resolve_input_shape
from .select.loop import PruneOptions
from .select.loop import run as run_prune
from .select.schedule import keep_count

__all__ = ["NtkSapScorer", "ntk_sap_scores", "ntk_sap_prune"]

_D = ScorerOptions  # defaults come from ScorerOptions (written once there)
_P = PruneOptions  # and the prune loop's from PruneOptions


class NtkSapScorer:
    """NTK-SAP scores of one model, set up once and reused for every round and call.

    Args:
        model: any ``nn.Module``; it is never modified. Its non-prunable tensors (biases,
            normalisation parameters, buffers) are read again at every call. A model carrying
            ``torch.nn.utils.prune`` masks (``apply_masks``) starts from them: those entries stay
            pruned, and masks and scores use the public names (``layer.weight``).
        input_shape: one input's shape without the batch dim; optional for models that carry
            ``input_shape`` (``ntksap_fast.models``).
        draws, batch_size, epsilon, seed, params, device, dtype, micro_batch, draw_batch,
        process_group, allow_tf32, output, compile: ``ntksap_fast.options.ScorerOptions`` (each one's meaning
            and default is written there once).

    ``repr(scorer)`` shows what was settled (``engine.plan.describe``); ``scorer.options`` holds the
    checked options and ``scorer.config`` the settled configuration.
    """

    def __init__(
        self,
        model: nn.Module,
        input_shape: Sequence[int] | None = None,
        *,
        draws: int = _D.draws,
        batch_size: int | Sequence[int] = _D.batch_size,
        epsilon: float = _D.epsilon,
        seed: int = _D.seed,
        params: ParamSelector | None = _D.params,
        device: torch.device | str | None = _D.device,
        dtype: torch.dtype = _D.dtype,
        micro_batch: int | None = _D.micro_batch,
        draw_batch: int = _D.draw_batch,
        process_group=_D.process_group,
        allow_tf32: bool | None = _D.allow_tf32,
        output: OutputFn | None = _D.output,
        compile: bool | None = _D.compile,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.options = ScorerOptions(**ScorerOptions.arguments(locals()))
        self.model = model
        self.draws, self.batch_sizes = self.options.draws, self.options.batch_sizes()
        self.epsilon, self.seed = self.options.epsilon, self.options.seed
        self.input_shape = resolve_input_shape(model, input_shape)
        self.arena = Arena(model, self.options.params)
        self.share = DrawShare.current(self.options.process_group)
        self.local_draws = self.share.draws(self.draws)

        def make_runner(device: torch.device, dtype: torch.dtype, param_dtype: torch.dtype) -> ModelRunner:
            return ModelRunner(model, self.arena, device, dtype, param_dtype, self.options.output)

        with preserved_state(model):
            self.config, runner = resolve(self.options, model, self.arena, self.input_shape, make_runner)
        self.engine = Engine(runner, self.input_shape, self.config, self.seed, self.epsilon)
        self.mask = torch.ones(self.arena.numel, dtype=torch.bool, device=self.config.device)

    def __repr__(self) -> str:
        shown = {
            "tensors": len(self.arena),
            "N": self.arena.numel,
            "input_shape": self.input_shape,
            "draws": self.draws,
            "batch_size": self._batch_text(),
            "epsilon": self.epsilon,
            "seed": self.seed,
            **self.settled(),
            "ranks": self.share.world,
        }
        return f"NtkSapScorer({type(self.model).__name__}, {', '.join(f'{k}={v}' for k, v in shown.items())})"

    def _batch_text(self) -> str:
        sizes = self.batch_sizes
        return str(sizes[0]) if len(set(sizes)) == 1 else ",".join(map(str, sizes))

    def settled(self) -> dict:
        """How the scorer computes, as plain values (``engine.plan.describe`` of the settled configuration)."""
        graphs, compiled = self.engine.graphs, self.engine.compiled
        return describe(
            self.config, graphs.error if graphs is not None else None, compiled.error if compiled is not None else None
        )

    def settings(self) -> dict:
        """What the scorer computes and how, as plain values (for reports, mask files and checkpoints)."""
        return {
            "draws": self.draws,
            "batch_sizes": list(self.batch_sizes),
            "epsilon": self.epsilon,
            "seed": self.seed,
            "input_shape": list(self.input_shape),
            **self.settled(),
        }

    # ------------------------------------------------------------------------------------------
    def flat_mask(self, masks: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
        """A new flat bool ``(N,)`` mask on the device from per-tensor masks (None = dense), and-ed with
        the masks the model already carries (``torch.nn.utils.prune``)."""
        mask = self.arena.start_mask(self.model, self.config.device)
        if masks is not None:
            mask &= self.arena.flatten(masks, argname="masks", dtype=torch.bool, device=self.config.device)
        return mask

    def flat_scores(
        self, mask: torch.Tensor, round: int = 0, on_draw: Callable[[], None] | None = None
    ) -> torch.Tensor:
        """Flat float32 scores ``|G| * mask`` of one round for a flat bool ``(N,)`` mask on the device.

        Raises ``ValueError`` naming the tensors whose scores are NaN.
        """
        return self._round(mask, round, on_draw)[0]

    def _round(
        self,
        mask: torch.Tensor,
        round: int,
        on_draw: Callable[[], None] | None = None,
        density: float | None = None,
        target_overlap: float | None = None,
        max_draws: int | None = None,
        signed: bool = False,
    ) -> tuple[torch.Tensor, RoundStats | None]:
        """Scores of one round and, when ``density`` is given, its ``RoundStats`` at that density.
        ``signed``: ``G * mask`` instead of ``|G| * mask`` (the channel score sums ``G`` first).

        With ``target_overlap``, draws ``D, D+1, ...`` (the counter generator's order; each of the
        first draw's batch size) are added until the split-half overlap reaches it or ``max_draws``
        draws are summed.
        """
        if mask is not self.mask:
            self.mask.copy_(mask)
        stats = density is not None
        sizes = list(self.batch_sizes)
        drawn = self.draws
        with tf32_policy(self.config.allow_tf32), preserved_state(self.model):
            self.engine.runner.refresh()
            self.engine.mask_gradient(self.mask, round, sizes, self.local_draws, on_draw, stats=stats)
            totals = self._totals(stats)
            info = self._stats(totals, round, drawn, density) if stats else None
            while (
                target_overlap is not None
                and max_draws is not None
                and drawn < max_draws
                and not info.split_half_overlap >= target_overlap
            ):  # NaN (one draw) adds draws too
                new = list(range(drawn, min(drawn + self.share.world, max_draws)))
                sizes += [self.batch_sizes[0]] * len(new)
                mine = [d for d in new if d % self.share.world == self.share.rank]
                self.engine.mask_gradient(self.mask, round, sizes, mine, on_draw, stats=True, accumulate=True)
                drawn = new[-1] + 1
                totals = self._totals(True)
                info = self._stats(totals, round, drawn, density)
        scores = totals[0] * self.mask if signed else totals[0].abs().mul_(self.mask)
        return scores.to(torch.float32), info

    def _totals(self, stats: bool) -> list[torch.Tensor]:
        """``[G]`` or ``[G, G_odd, sum c**2]`` summed over ranks (copies; the engine's sums stay)."""
        parts = [self.engine.grad] + (list(self.engine.stats) if stats else [])
        totals = [self.share.all_reduce(p.clone()) if self.share.world > 1 else p for p in parts]
        if torch.isnan(totals[0]).any():
            bad = [n for n, v in self.arena.views(totals[0] * self.mask).items() if torch.isnan(v).any()]
            if bad:
                raise ValueError(f"NaN in the NTK-SAP scores of {bad}: the model's output or gradient is not finite")
        return totals

    def _stats(self, totals: list[torch.Tensor], round: int, draws: int, density: float) -> RoundStats:
        n_keep = min(keep_count(self.arena.numel, density), int(self.mask.sum()))
        return round_stats(totals[0], totals[1], totals[2], self.mask, draws, n_keep, round, density)

    def scores(
        self,
        masks: Mapping[str, torch.Tensor] | None = None,
        round: int = 0,
        *,
        stats: bool = False,
        density: float | None = None,
    ):
        """One scoring round: ``{name: float32 tensor of the parameter's shape}``, ``|sum_s dL_s/dm| * mask``.

        Args:
            masks: current masks (bool, parameter shapes) keyed by parameter name; None = dense.
            round: the round counter of the random numbers (``ntk_sap_prune`` scores round ``t`` with
                ``round=t``).
            stats: also return the round's ``RoundStats`` (``ntksap_fast.analysis.stability``), the
                split-half overlap taken at ``density`` (the kept fraction you would prune to;
                required with ``stats=True``).
        Returns:
            the scores, or ``(scores, RoundStats)`` with ``stats=True``.
        """
        round = check_int("round", round, minimum=0)
        if stats and density is None:
            raise ValueError("scores(stats=True) needs density=, the kept fraction the split-half overlap is taken at")
        if density is not None:
            density = check_density(density)
        flat, info = self._round(self.flat_mask(masks), round, density=density if stats else None)
        out = {n: v.clone() for n, v in self.arena.views(flat).items()}
        return (out, info) if stats else out

    # The prune loop's view of the scorer (``select.loop.Scoring``) ---------------------------------
    name = "ntksap"
    has_stats = True
    unit_seed = None

    @property
    def output(self) -> OutputFn | None:
        return self.options.output

    @property
    def device(self) -> torch.device:
        return self.config.device

    @property
    def is_main(self) -> bool:
        return self.share.is_main

    @property
    def ticks_per_round(self) -> int:
        return len(self.local_draws)

    def check(self, options: PruneOptions) -> None:
        if options.max_draws is not None and options.max_draws < self.draws:
            raise ValueError(f"max_draws must be >= draws ({self.draws}), got {options.max_draws}")

    def start_mask(self) -> torch.Tensor:
        """The scorer's device mask set to the masks the model carries (all True if none)."""
        return self.mask.copy_(self.arena.start_mask(self.model, self.config.device))

    def round_scores(
        self, mask: torch.Tensor, round: int, density: float, options: PruneOptions, tick: Callable[[], None]
    ) -> tuple[torch.Tensor, RoundStats | None]:
        max_draws = options.max_draws
        if options.target_overlap is not None and max_draws is None:
            max_draws = 4 * self.draws
        return self._round(
            mask,
            round,
            tick,
            density if options.stats else None,
            options.target_overlap,
            max_draws,
            signed=options.granularity == "channel",
        )

    def mask_settings(self) -> dict:
        """The options that change the masks (``ScorerOptions.mask_settings``) and the input shape."""
        return {**self.options.mask_settings(), "input_shape": list(self.input_shape)}

    def metadata(self) -> dict:
        return self.settings()

    def digest(self) -> str:
        """The model tensors NTK-SAP reads but does not resample (``model_digest``)."""
        return model_digest(self.model, self.arena.params)

    def prune(
        self,
        density: float,
        iterations: int = _P.iterations,
        *,
        schedule: str = _P.schedule,
        scope: str = _P.scope,
        granularity: str = _P.granularity,
        min_layer_density: float = _P.min_layer_density,
        invert: bool = _P.invert,
        target_overlap: float | None = _P.target_overlap,
        max_draws: int | None = _P.max_draws,
        stats: bool = _P.stats,
        checkpoint: str | os.PathLike | None = None,
        progress: bool | None = None,
        on_round: Callable[..., None] | None = None,
    ) -> Masks:
        """Iterative NTK-SAP: ``iterations`` scoring rounds, a top-k after each (``select.loop.run``).

        After round ``t`` the kept fraction is ``density ** (t / iterations)`` (or linear); exactly
        ``N - floor((1 - d_t) * N)`` entries stay, the highest-scoring among those still unpruned,
        ties to the lower flat index; pruned entries never come back.

        Args:
            schedule: ``"exponential"`` or ``"linear"``; scope: ``"global"`` (one top-k over all
                tensors) or ``"layer"`` (each tensor keeps that fraction of its own entries).
            granularity: ``"weight"`` (entries, the paper), ``"channel"`` (whole channels: a channel's
                score is ``|sum over draws and its entries of dL/dm|`` per unpruned weight, and at most
                ``keep_count(N, d_t)`` entries stay; ``ntksap_fast.select.structured``; the masks
                export to a smaller model with ``export_pruned``) or ``"N:M"`` such as ``"2:4"`` (N of
                every M along the input dim, ``density`` = N/M; ``ntksap_fast.select.nm``).
            min_layer_density: each prunable tensor keeps at least this fraction of its entries (its
                highest-scoring unpruned ones; ``ntksap_fast.select.selection``), the rest is chosen
                globally; the total stays exactly ``n_keep``. 0 (default): plain global top-k.
            invert: keep the LOWEST scores among the unpruned entries each round (the inverted-scores
                sanity check, Frankle et al. 2021; ``ntksap_fast.methods.sanity``); counts and ties as
                usual, the floors keep each tensor's lowest.
            target_overlap: add draws to a round (in the counter generator's order, each of the first
                draw's batch size) until its split-half overlap reaches this value or the round has
                ``max_draws`` draws (default ``4 * draws``). Implies ``stats``.
            stats: compute each round's ``RoundStats`` (split-half overlap at the round's density,
                relative standard error); they go to ``on_round`` and to ``masks.metadata["rounds"]``.
            checkpoint, progress, on_round: as for ``ntksap_fast.select.loop.run`` (a checkpoint
                resumes after its last finished round with the identical final masks; other settings
                or another model's non-prunable tensors are refused, naming what differs).
            Which of these combine: ``ntksap_fast.select.loop.PruneOptions``.
        Returns:
            ``Masks``: ``{name: bool tensor of the parameter's shape}`` (True = kept) on the compute
            device, with ``metadata`` saying what made them (written by ``save_masks``).
        """
        options = PruneOptions(**{k: v for k, v in locals().items() if k in PruneOptions.names()})
        return run_prune(self, options, checkpoint=checkpoint, progress=progress, on_round=on_round)


def ntk_sap_scores(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    *,
    round: int = 0,
    draws: int = _D.draws,
    batch_size: int | Sequence[int] = _D.batch_size,
    epsilon: float = _D.epsilon,
    seed: int = _D.seed,
    params: ParamSelector | None = _D.params,
    device: torch.device | str | None = _D.device,
    dtype: torch.dtype = _D.dtype,
    micro_batch: int | None = _D.micro_batch,
    draw_batch: int = _D.draw_batch,
    process_group=_D.process_group,
    allow_tf32: bool | None = _D.allow_tf32,
    output: OutputFn | None = _D.output,
    compile: bool | None = _D.compile,
) -> dict[str, torch.Tensor]:
    """One NTK-SAP scoring round: ``NtkSapScorer(model, input_shape, ...).scores(masks, round)``.

    To score the same model repeatedly, keep an ``NtkSapScorer`` instead (its set-up is paid once).

    Args:
        model: any ``nn.Module``; it is not modified.
        input_shape: one input's shape without the batch dim; optional for models that carry
            ``input_shape`` (``ntksap_fast.models``).
        masks: current masks (bool, parameter shapes) keyed by parameter name; None = dense (or the
            masks the model carries).
        round: counter of the random numbers (round ``t`` of ``ntk_sap_prune`` uses ``round=t``).
        the others: ``ntksap_fast.options.ScorerOptions``.
    Returns:
        ``{name: float32 tensor of the parameter's shape}``: ``|sum_s dL_s/dm| * (mask != 0)``.
    """
    return NtkSapScorer(model, input_shape, **ScorerOptions.arguments(locals())).scores(masks, round)


def ntk_sap_prune(
    model: nn.Module,
    density: float,
    input_shape: Sequence[int] | None = None,
    *,
    iterations: int = _P.iterations,
    schedule: str = _P.schedule,
    scope: str = _P.scope,
    granularity: str = _P.granularity,
    min_layer_density: float = _P.min_layer_density,
    invert: bool = _P.invert,
    target_overlap: float | None = _P.target_overlap,
    max_draws: int | None = _P.max_draws,
    stats: bool = _P.stats,
    draws: int = _D.draws,
    batch_size: int | Sequence[int] = _D.batch_size,
    epsilon: float = _D.epsilon,
    seed: int = _D.seed,
    params: ParamSelector | None = _D.params,
    device: torch.device | str | None = _D.device,
    dtype: torch.dtype = _D.dtype,
    micro_batch: int | None = _D.micro_batch,
    draw_batch: int = _D.draw_batch,
    process_group=_D.process_group,
    allow_tf32: bool | None = _D.allow_tf32,
    output: OutputFn | None = _D.output,
    compile: bool | None = _D.compile,
    checkpoint: str | os.PathLike | None = None,
    progress: bool | None = None,
    on_round: Callable[..., None] | None = None,
) -> Masks:
    """Iterative NTK-SAP: ``NtkSapScorer(model, input_shape, ...).prune(density, iterations, ...)``.

    After round ``t`` the kept fraction is ``density ** (t / iterations)`` (or linear); exactly
    ``N - floor((1 - d_t) * N)`` entries stay, the highest-scoring among those still unpruned,
    ties to the lower flat index; pruned entries never come back. A model that already carries
    masks starts from them. The scorer's options as for ``NtkSapScorer`` (``ScorerOptions``);
    the prune loop's arguments (``PruneOptions``: ``iterations``, ``schedule``, ``scope``,
    ``granularity``, ``min_layer_density``, ``invert``, ``target_overlap``, ``max_draws``, ``stats``) and
    ``checkpoint``, ``progress``, ``on_round`` as for ``NtkSapScorer.prune``.

    Returns:
        ``Masks``: ``{name: bool tensor of the parameter's shape}`` for every prunable tensor (True =
        kept), on the compute device, with ``metadata`` saying what made them.
    """
    scorer = NtkSapScorer(model, input_shape, **ScorerOptions.arguments(locals()))
    options = PruneOptions(**{k: v for k, v in locals().items() if k in PruneOptions.names()})
    return run_prune(scorer, options, checkpoint=checkpoint, progress=progress, on_round=on_round)
