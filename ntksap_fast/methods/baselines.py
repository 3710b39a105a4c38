"""Pruning-at-initialization baselines on NTK-SAP's machinery: one ``prune`` for every method.

Every method scores the arena's flat vector of prunable weights (``ntksap_fast.engine.arena``), then keeps
exactly ``keep_count`` entries with ``ntksap_fast.select.topk.masked_topk_`` (largest scores win, ties to
the lower flat index, pruned entries never come back), globally or per layer, after each round of
the schedule (``density_schedule``). Scores, "higher = kept" (``w`` prunable weights, ``m`` mask,
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

SNIP, iter_snip and GraSP run the model in eval mode (dropout off, BatchNorm with its running
statistics) on ``data``, batches of ``(inputs, targets)``, summing ``loss_fn`` gradients over all
batches (pass only as many batches as you want scored). The model is never modified: the methods
run it through ``torch.func.functional_call`` with detached copies of its tensors.
"""
from __future__ import annotations

import inspect
import numbers
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..engine.arena import Arena, ParamSelector
from ..engine.engine import ModelRunner, preserved_state
from ..engine.plan import resolve_device
from ..io.masks import Masks
from ..options import OutputFn, ScorerOptions, resolve_input_shape
from ..select.schedule import SCHEDULES, density_schedule, keep_count
from ..scorer import NtkSapScorer
from ..select.selection import select_
from ..select.topk import masked_topk_

__all__ = ["prune", "METHODS", "DATA_METHODS", "DEFAULT_ITERATIONS", "SCOPES"]

METHODS = ("ntksap", "random", "magnitude", "snip", "grasp", "synflow", "iter_snip")
#: Methods that need ``data``.
DATA_METHODS = ("snip", "iter_snip", "grasp")
#: Rounds of the iterative methods when ``iterations`` is None; the others are one shot.
DEFAULT_ITERATIONS = {"ntksap": inspect.signature(NtkSapScorer.prune).parameters["iterations"].default,
                      "synflow": 100, "iter_snip": 100}
SCOPES = ("global", "layer")
#: Options ``prune`` takes itself and passes on to the NTK-SAP scorer.
_SHARED = ("seed", "params", "device", "output")
#: ``NtkSapScorer`` options that ``prune`` passes through as ``**ntksap_options``.
_NTKSAP_OPTIONS = tuple(n for n in ScorerOptions.names() if n not in _SHARED)
#: Options of ``NtkSapScorer.prune`` (method ntksap, global scope) that ``prune`` passes through.
_NTKSAP_PRUNE_OPTIONS = tuple(n for n, p in inspect.signature(NtkSapScorer.prune).parameters.items()
                              if p.kind is p.KEYWORD_ONLY and n not in ("schedule", "progress", "min_layer_density"))

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _Net:
    """A baseline's view of the model: the model runner (``engine.ModelRunner``) and its prunable weights.

    ``weights``: flat copy (length ``arena.numel``, the model's dtype) of the prunable weights
    (masked entries of a model carrying masks are zero); ``absolute=True`` gives SynFlow's float64
    ``|.|`` copies of every floating tensor.
    """

    def __init__(self, model: nn.Module, arena: Arena, device: torch.device, absolute: bool = False,
                 output: OutputFn | None = None) -> None:
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
            raise ValueError("data yielded no batches (a generator is used up after one pass; iter_snip and "
                             "grasp read data more than once: pass a list or a DataLoader)")

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
    def score(mask: torch.Tensor, round: int) -> torch.Tensor:
        return (net.loss_grad(net.weights * mask, data, loss_fn) * net.weights).abs_() * mask
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
        return (grad * w).detach().abs_()
    return score


def _select(arena: Arena, scores: torch.Tensor, mask: torch.Tensor, density: float, scope: str, method: str,
            min_layer_density: float) -> None:
    """Updates ``mask`` in place: keep ``keep_count`` of the highest scores, globally (each tensor at
    least ``min_layer_density`` of its entries) or per tensor."""
    nan = torch.isnan(scores) & mask
    if nan.any():
        bad = [n for n, v in arena.views(nan).items() if v.any()]
        raise ValueError(f"NaN in the {method} scores of {bad}: the model's output or gradient is not finite")
    if scope == "global":
        n_keep = min(keep_count(arena.numel, density), int(mask.sum()))
        select_(scores, mask, n_keep, arena.slots, min_layer_density)
        return
    for s in arena.slots:
        part = mask[s.offset : s.stop]
        masked_topk_(scores[s.offset : s.stop], part, min(keep_count(s.numel, density), int(part.sum())))


def _check_args(method, density, scope, schedule, iterations, data, loss_fn, options) -> int:
    """Validates ``prune``'s arguments; returns the number of rounds."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0.0 < density <= 1.0:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if iterations is None:
        iterations = DEFAULT_ITERATIONS.get(method, 1)
    elif isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    elif method not in DEFAULT_ITERATIONS and iterations != 1:
        raise ValueError(f"iterations: method {method!r} is one shot (iterations=1); iterative methods are "
                         f"{tuple(DEFAULT_ITERATIONS)}")
    if method in DATA_METHODS and data is None:
        raise ValueError(f"method {method!r} needs data: an iterable of (inputs, targets) batches, e.g. a DataLoader")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (outputs, targets) -> loss, got {type(loss_fn).__name__}")
    unknown = sorted(set(options) - set(_NTKSAP_OPTIONS) - set(_NTKSAP_PRUNE_OPTIONS))
    if unknown:
        raise TypeError(f"prune() got unexpected keyword arguments {unknown}")
    if options and method != "ntksap":
        raise TypeError(f"{sorted(options)} apply to method 'ntksap' only, not {method!r}")
    return iterations


def prune(
    model: nn.Module,
    method: str = "ntksap",
    *,
    density: float,
    iterations: int | None = None,
    schedule: str = "exponential",
    scope: str = "global",
    data: Batches | None = None,
    loss_fn: LossFn = nn.functional.cross_entropy,
    input_shape: Sequence[int] | None = None,
    seed: int = ScorerOptions.seed,
    params: ParamSelector | None = ScorerOptions.params,
    device: torch.device | str | None = ScorerOptions.device,
    progress: bool | None = None,
    min_layer_density: float = 0.0,
    output: OutputFn | None = ScorerOptions.output,
    **ntksap_options,
) -> Masks:
    """Prune ``model`` at initialization with ``method`` (see the module docstring for the scores).

    Args:
        model: any ``nn.Module``; it is not modified.
        method: one of ``METHODS``.
        density: final kept fraction in (0, 1].
        iterations: rounds (default ``DEFAULT_ITERATIONS``; one-shot methods take only 1);
            after round ``t`` the kept fraction is ``density_schedule(density, T, schedule)[t-1]``.
        scope: ``"global"`` (one top-k over all tensors) or ``"layer"`` (each tensor keeps
            ``keep_count(numel, d_t)`` of its own entries).
        data, loss_fn: batches of ``(inputs, targets)`` and the loss, for snip / iter_snip / grasp
            (ignored by the other methods).
        input_shape: one input's shape, for ntksap and synflow (default ``model.input_shape``).
        seed: seed of ``random`` and ``ntksap``; params: prunable tensors (default every
            Conv/Linear weight); device: where to compute (default the model's);
            progress: bar over rounds (None: only on a terminal).
        min_layer_density: with ``scope="global"``, each tensor keeps at least this fraction of its
            entries (``ntksap_fast.select.selection``); 0 (default): plain global top-k.
        output: picks the tensor from what the model returns (tuple, dict, dataclass), e.g.
            ``output=lambda out: out.logits``.
        ntksap_options: method ``ntksap`` only: the other ``ScorerOptions`` (``draws``,
            ``batch_size``, ``epsilon``, ``dtype``, ...), and the keyword options of
            ``NtkSapScorer.prune`` (``stats``, ``target_overlap``, ``max_draws``, ``checkpoint``,
            ``on_round``; global scope).
    Returns:
        ``Masks``: ``{name: bool tensor of the parameter's shape}`` (True = kept) on the compute
        device, with ``metadata`` saying what made them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    iterations = _check_args(method, density, scope, schedule, iterations, data, loss_fn, ntksap_options)
    if output is not None and not callable(output):
        raise TypeError(f"output must be a callable picking the output tensor, got {type(output).__name__}")
    if scope == "layer" and min_layer_density != 0.0:
        raise ValueError("min_layer_density applies to scope='global'; scope='layer' already keeps the same "
                         "fraction of every tensor")
    if method == "ntksap":
        prune_options = {k: ntksap_options.pop(k) for k in _NTKSAP_PRUNE_OPTIONS if k in ntksap_options}
        if prune_options and scope != "global":
            raise ValueError(f"{sorted(prune_options)} apply to scope='global' only")
        ntksap = NtkSapScorer(model, input_shape, seed=seed, params=params, device=device, output=output,
                              **ntksap_options)
        if scope == "global":
            return ntksap.prune(density, iterations, schedule=schedule, progress=progress,
                                min_layer_density=min_layer_density, **prune_options)
    arena = Arena(model, params)
    device = resolve_device(model, device)
    with preserved_state(model):
        if method == "ntksap":
            score_fn = ntksap.flat_scores
        elif method == "random":
            gen = torch.Generator().manual_seed(seed)
            score_fn = _fixed(torch.rand(arena.numel, generator=gen, dtype=torch.float64).to(device))
        elif method == "magnitude":
            score_fn = _fixed(_Net(model, arena, device, output=output).weights.abs())
        elif method == "synflow":
            score_fn = _synflow(_Net(model, arena, device, absolute=True, output=output), resolve_input_shape(model, input_shape))
        elif method == "grasp":
            score_fn = _grasp(_Net(model, arena, device, output=output), data, loss_fn)
        else:
            score_fn = _snip(_Net(model, arena, device, output=output), data, loss_fn)
        mask = arena.start_mask(model, device)  # a model carrying masks starts from them
        densities = density_schedule(float(density), iterations, schedule)
        for t, d_t in enumerate(tqdm(densities, desc=method, unit="round",
                                     disable=None if progress is None else not progress)):
            _select(arena, score_fn(mask, t), mask, d_t, scope, method, min_layer_density)
    metadata = {"method": method, "density": float(density), "iterations": iterations, "schedule": schedule,
                "scope": scope, "seed": seed, "min_layer_density": min_layer_density}
    if method == "ntksap":
        metadata.update(ntksap.settings())
    return Masks({n: v.clone() for n, v in arena.views(mask).items()}, metadata=metadata)
