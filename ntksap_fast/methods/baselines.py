"""Pruning-at-initialization baselines on NTK-SAP's machinery: one ``prune`` for every method.

Every method scores the arena's flat vector of prunable weights (``ntksap_fast.engine.arena``); the
one prune loop (``ntksap_fast.select.loop``) keeps exactly ``keep_count`` entries after each round
of the schedule (largest scores win, ties to the lower flat index, pruned entries never come back),
globally or per layer, with the same checkpoints, callbacks and metadata for every method. Scores,
"higher = kept" (``w`` prunable weights, ``m`` mask,
``g = sum over batches of dL/dw`` at the masked weights ``m * w``):

* ``ntksap``: NTK-SAP through one ``NtkSapScorer`` (set up once for all rounds, either scope).
* ``random``: i.i.d. uniform scores from a ``torch.Generator`` seeded with ``seed``.
* ``magnitude``: ``|w|``.
* ``snip``: ``|g * w|`` (Lee et al. 2019), one shot.
* ``iter_snip``: SNIP re-scored after each round with the current mask applied.
* ``grasp``: the GraSP paper's score is ``S = -w * Hg`` (``H`` the Hessian, ``Hg`` by double
  backprop, ``g`` held fixed) and GraSP removes the *highest* ``S``; so the kept score is
  ``w * Hg = -S``: the lowest ``S`` are kept. One shot, no logit temperature (pass
  ``loss_fn=lambda out, y: F.cross_entropy(out / 200, y)`` for the GraSP code's T = 200).
* ``synflow``: data-free (Tanaka et al. 2020): a float64 copy of the model with every floating
  parameter and buffer replaced by its absolute value (BatchNorm running statistics included),
  eval mode, input all ones ``(1, *input_shape)``, ``R = sum(f(1; m * |w|))``, score
  ``|dR/dw * w|``, iterative.

**Channels** (``granularity="channel"``, ``ntksap_fast.select.structured``): a channel's score is
``|sum over its unpruned entries of c|`` per unpruned weight, with the per-entry contribution ``c``
whose absolute value is the weight score above: ``G`` (ntksap), ``g * w`` (snip, iter_snip: the
exact channel-mask gradient of the loss), ``dR/dw * w`` (synflow, all >= 0), ``|w|`` (magnitude:
the channel's L1 norm per weight); ``random`` draws one uniform score per channel from ``seed``.
GraSP has no channel form here.

SNIP, iter_snip and GraSP run the model in eval mode (dropout off, BatchNorm with its running
statistics) on ``data``, batches of ``(inputs, targets)``, summing ``loss_fn`` gradients over all
batches (pass only as many batches as you want scored). The model is never modified: the methods
run it through ``torch.func.functional_call`` with detached copies of its tensors.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..engine.arena import Arena, ParamSelector
from ..engine.engine import ModelRunner, preserved_state
from ..engine.plan import resolve_device
from ..io.checkpoint import model_digest
from ..io.masks import Masks
from ..options import OutputFn, ScorerOptions, resolve_input_shape
from ..scorer import NtkSapScorer
from ..select.loop import SCOPES, PruneOptions
from ..select.loop import run as run_prune

__all__ = ["prune", "METHODS", "DATA_METHODS", "DEFAULT_ITERATIONS", "SCOPES"]

METHODS = ("ntksap", "random", "magnitude", "snip", "grasp", "synflow", "iter_snip")
#: Methods that need ``data``.
DATA_METHODS = ("snip", "iter_snip", "grasp")
#: Rounds of the iterative methods when ``iterations`` is None; the others are one shot.
DEFAULT_ITERATIONS = {"ntksap": PruneOptions.iterations, "synflow": 100, "iter_snip": 100}
#: Options ``prune`` takes itself and passes on to the NTK-SAP scorer.
_SHARED = ("seed", "params", "device", "output")
#: ``NtkSapScorer`` options that ``prune`` passes through as ``**ntksap_options``.
_NTKSAP_OPTIONS = tuple(n for n in ScorerOptions.names() if n not in _SHARED)

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _Net:
    """A baseline's view of the model: the model runner (``engine.ModelRunner``) and its prunable weights.

    ``weights``: flat copy (length ``arena.numel``, the model's dtype) of the prunable weights
    (masked entries of a model carrying masks are zero); ``absolute=True`` gives SynFlow's float64
    ``|.|`` copies of every floating tensor.
    """

    def __init__(
        self,
        model: nn.Module,
        arena: Arena,
        device: torch.device,
        absolute: bool = False,
        output: OutputFn | None = None,
    ) -> None:
        dtype = torch.float64 if absolute else arena.values(model)[arena.names[0]].dtype
        self.device = device
        self.runner = ModelRunner(model, arena, device, dtype, dtype, output, transform=torch.abs if absolute else None)
        self.weights = self.runner.weights()
        if absolute:
            self.weights.abs_()

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.runner(self.runner.arena.views(flat), x)

    def batches(self, data: Batches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``data``'s batches on the device; ``ValueError`` when there are none."""
        count = 0
        for batch in data:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError(f"data must yield (inputs, targets) pairs, got {type(batch).__name__}")
            count += 1
            yield batch[0].to(self.device), batch[1].to(self.device)
        if count == 0:
            raise ValueError(
                "data yielded no batches (a generator is used up after one pass; iter_snip and "
                "grasp read data more than once: pass a list or a DataLoader)"
            )

    def loss_grad(self, flat: torch.Tensor, data: Batches, loss_fn: LossFn) -> torch.Tensor:
        """``sum over batches of d loss_fn(f(x; flat), y) / d flat``, same shape as ``flat``."""
        leaf = flat.detach().requires_grad_(True)
        grad = torch.zeros_like(flat)
        for x, y in self.batches(data):
            grad += torch.autograd.grad(loss_fn(self(leaf, x), y), leaf)[0]
        return grad


def _fixed(scores: torch.Tensor) -> Callable[[torch.Tensor, int], torch.Tensor]:
    return lambda mask, round: scores


def _snip(net: _Net, data: Batches, loss_fn: LossFn) -> Callable[[torch.Tensor, int], torch.Tensor]:
    def score(mask: torch.Tensor, round: int) -> torch.Tensor:  # signed g * w: |.| is the weight score
        return net.loss_grad(net.weights * mask, data, loss_fn) * net.weights * mask

    return score


def _grasp(net: _Net, data: Batches, loss_fn: LossFn) -> Callable[[torch.Tensor, int], torch.Tensor]:
    def score(mask: torch.Tensor, round: int) -> torch.Tensor:
        w = (net.weights * mask).requires_grad_(True)
        g = net.loss_grad(w, data, loss_fn)
        hg = torch.zeros_like(g)
        for x, y in net.batches(data):
            (grad,) = torch.autograd.grad(loss_fn(net(w, x), y), w, create_graph=True)
            hg += torch.autograd.grad((grad * g).sum(), w)[0]
        return w.detach() * hg  # = -S_GraSP: keeping the highest keeps the lowest S

    return score


def _synflow(net: _Net, input_shape: tuple[int, ...]) -> Callable[[torch.Tensor, int], torch.Tensor]:
    ones = torch.ones(1, *input_shape, dtype=torch.float64, device=net.device)

    def score(mask: torch.Tensor, round: int) -> torch.Tensor:
        w = (net.weights * mask).requires_grad_(True)
        (grad,) = torch.autograd.grad(net(w, ones).sum(), w)
        return (grad * w).detach()  # >= 0: |.| is the weight score

    return score


class _BaselineScoring:
    """A baseline method as the prune loop sees it (``select.loop.Scoring``): scores from ``score_fn``."""

    is_main = True
    ticks_per_round = 0  # the loop counts rounds
    has_stats = False

    def __init__(
        self,
        name: str,
        model: nn.Module,
        arena: Arena,
        device: torch.device,
        score_fn: Callable[[torch.Tensor, int], torch.Tensor],
        settings: dict[str, Any],
        input_shape: Sequence[int] | None,
        output: OutputFn | None,
    ) -> None:
        self.name, self.model, self.arena, self.device = name, model, arena, device
        self.score_fn, self.settings = score_fn, settings
        self.input_shape, self.output = input_shape, output
        self.unit_seed = settings.get("seed") if name == "random" else None

    def check(self, options: PruneOptions) -> None:
        pass

    def start_mask(self) -> torch.Tensor:
        return self.arena.start_mask(self.model, self.device)  # a model carrying masks starts from them

    def round_scores(
        self, mask: torch.Tensor, round: int, density: float, options: PruneOptions, tick: Callable[[], None]
    ) -> tuple[torch.Tensor, None]:
        """``score_fn``'s per-entry contributions: signed for channels, their absolute value for the
        weight score (GraSP's is signed: its kept score is ``w * Hg`` itself)."""
        contributions = self.score_fn(mask, round)
        signed = options.granularity == "channel" or self.name == "grasp"
        return (contributions if signed else contributions.abs()), None

    def mask_settings(self) -> dict[str, Any]:
        return dict(self.settings)

    def metadata(self) -> dict[str, Any]:
        return dict(self.settings)

    def digest(self) -> str:
        """Every tensor of the model: the baselines read the prunable weights' values too."""
        return model_digest(self.model, ())


def _check_method(method, iterations, data, loss_fn, ntksap_options) -> int:
    """Validates what ``prune`` adds to the loop's arguments; returns the number of rounds."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if iterations is None:
        iterations = DEFAULT_ITERATIONS.get(method, 1)
    elif method not in DEFAULT_ITERATIONS and iterations != 1:
        raise ValueError(
            f"iterations: method {method!r} is one shot (iterations=1); iterative methods are "
            f"{tuple(DEFAULT_ITERATIONS)}"
        )
    if method in DATA_METHODS and data is None:
        raise ValueError(f"method {method!r} needs data: an iterable of (inputs, targets) batches, e.g. a DataLoader")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (outputs, targets) -> loss, got {type(loss_fn).__name__}")
    unknown = sorted(set(ntksap_options) - set(_NTKSAP_OPTIONS))
    if unknown:
        raise TypeError(f"prune() got unexpected keyword arguments {unknown}")
    if ntksap_options and method != "ntksap":
        raise TypeError(f"{sorted(ntksap_options)} apply to method 'ntksap' only, not {method!r}")
    return iterations


def _baseline(
    method: str,
    model: nn.Module,
    arena: Arena,
    device: torch.device,
    seed: int,
    input_shape: Sequence[int] | None,
    data: Batches | None,
    loss_fn: LossFn,
    output: OutputFn | None,
) -> _BaselineScoring:
    """The scoring of a method other than NTK-SAP, with what its masks depend on (``settings``)."""
    settings: dict[str, Any] = {}
    if method == "random":
        gen = torch.Generator().manual_seed(seed)
        score_fn = _fixed(torch.rand(arena.numel, generator=gen, dtype=torch.float64).to(device))
        settings["seed"] = seed
    elif method == "magnitude":
        score_fn = _fixed(_Net(model, arena, device, output=output).weights.abs())
    elif method == "synflow":
        shape = resolve_input_shape(model, input_shape)
        score_fn = _synflow(_Net(model, arena, device, absolute=True, output=output), shape)
        settings["input_shape"] = list(shape)
    elif method == "grasp":
        score_fn = _grasp(_Net(model, arena, device, output=output), data, loss_fn)
    else:
        score_fn = _snip(_Net(model, arena, device, output=output), data, loss_fn)
    return _BaselineScoring(method, model, arena, device, score_fn, settings, input_shape, output)


def prune(
    model: nn.Module,
    method: str = "ntksap",
    *,
    density: float,
    iterations: int | None = None,
    schedule: str = PruneOptions.schedule,
    scope: str = PruneOptions.scope,
    granularity: str = PruneOptions.granularity,
    min_layer_density: float = PruneOptions.min_layer_density,
    invert: bool = PruneOptions.invert,
    target_overlap: float | None = PruneOptions.target_overlap,
    max_draws: int | None = PruneOptions.max_draws,
    stats: bool = PruneOptions.stats,
    checkpoint: str | os.PathLike | None = None,
    progress: bool | None = None,
    on_round: Callable[..., None] | None = None,
    data: Batches | None = None,
    loss_fn: LossFn = nn.functional.cross_entropy,
    input_shape: Sequence[int] | None = None,
    seed: int = ScorerOptions.seed,
    params: ParamSelector | None = ScorerOptions.params,
    device: torch.device | str | None = ScorerOptions.device,
    output: OutputFn | None = ScorerOptions.output,
    **ntksap_options,
) -> Masks:
    """Prune ``model`` at initialization with ``method`` (see the module docstring for the scores).

    Every method runs through the one prune loop (``ntksap_fast.select.loop.run``), so each gets the
    schedule, both scopes, ``min_layer_density``, ``invert``, checkpoint/resume, ``on_round``,
    progress and the metadata; ``stats``/``target_overlap``/``max_draws`` where the method defines
    round statistics (ntksap).

    Args:
        model: any ``nn.Module``; it is not modified.
        method: one of ``METHODS``.
        density: final kept fraction in (0, 1].
        iterations: rounds (default ``DEFAULT_ITERATIONS``; one-shot methods take only 1);
            after round ``t`` the kept fraction is ``density_schedule(density, T, schedule)[t-1]``.
        schedule, scope, granularity, min_layer_density, invert, target_overlap, max_draws, stats: the
            loop's arguments (``ntksap_fast.select.loop.PruneOptions``: meaning and which combine).
            ``granularity="channel"`` (methods ``select.loop.CHANNEL_METHODS``; channel scores in the
            module docstring) needs ``input_shape`` (or ``model.input_shape``) to trace the model.
        checkpoint, progress, on_round: as for ``ntksap_fast.select.loop.run``. A checkpoint of
            snip, iter_snip or grasp cannot tell other ``data`` or ``loss_fn`` apart: resume with the
            same ones.
        data, loss_fn: batches of ``(inputs, targets)`` and the loss, for snip / iter_snip / grasp
            (ignored by the other methods).
        input_shape: one input's shape, for ntksap, synflow and channels (default ``model.input_shape``).
        seed: seed of ``random`` and ``ntksap``; params: prunable tensors (default every
            Conv/Linear weight); device: where to compute (default the model's).
        output: picks the tensor from what the model returns (tuple, dict, dataclass), e.g.
            ``output=lambda out: out.logits``.
        ntksap_options: method ``ntksap`` only: the other ``ScorerOptions`` (``draws``,
            ``batch_size``, ``epsilon``, ``dtype``, ...).
    Returns:
        ``Masks``: ``{name: bool tensor of the parameter's shape}`` (True = kept) on the compute
        device, with ``metadata`` saying what made them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    iterations = _check_method(method, iterations, data, loss_fn, ntksap_options)
    if output is not None and not callable(output):
        raise TypeError(f"output must be a callable picking the output tensor, got {type(output).__name__}")
    options = PruneOptions(**{k: v for k, v in locals().items() if k in PruneOptions.names()})
    if method == "ntksap":
        scoring = NtkSapScorer(
            model, input_shape, seed=seed, params=params, device=device, output=output, **ntksap_options
        )
        return run_prune(scoring, options, checkpoint=checkpoint, progress=progress, on_round=on_round)
    arena = Arena(model, params)
    with preserved_state(model):
        scoring = _baseline(
            method, model, arena, resolve_device(model, device), seed, input_shape, data, loss_fn, output
        )
        return run_prune(scoring, options, checkpoint=checkpoint, progress=progress, on_round=on_round)
