"""The engine: NTK-SAP mask gradients, one pass per branch, no statistics pass, no model copy.

For draw ``s`` with weights ``theta``, perturbation ``z`` and inputs ``x`` (``ntksap_fast.engine.draws``),
the clean weights ``W_c = m * theta`` and perturbed weights ``W_p = m * (theta + eps * z)`` are flat
buffers; the model runs on per-tensor autograd leaves viewing them (its own parameters swapped out
for the call, ``torch.func.functional_call``-style), BatchNorm uses the clean branch's statistics
recorded during the clean forward (``ntksap_fast.engine.batchnorm``), ``L = sum((f_c - f_p)**2)``, and one
backward gives ``g_c, g_p``. Then

    dL/dm = theta * g_c + (theta + eps * z) * g_p = theta * (g_c + g_p) + eps * z * g_p,

accumulated over draws into one flat vector ``G``. A draw larger than ``micro_batch`` inputs gets
its BatchNorm statistics from one no-grad clean forward of the whole draw (it keeps no activations
for a backward, so its memory is a few of one layer's activations of the draw, far below a gradient
pass), then micro-batches run both branches with them: ``G`` does not depend on the micro-batch
size beyond float summation order. On CUDA, whole draws can be captured once per draw
size in a CUDA graph (``ntksap_fast.engine.graphs``) and replayed with new counters.

What differs between the PyTorch path and the Triton path sits behind a backend
(``ntksap_fast.engine.backend``). An ``Engine`` is built once per scorer and reused for every round.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from ..options import OutputFn
from .arena import Arena
from .backend import Backend, DrawStats, make_backend
from .batchnorm import CleanStatsBatchNorm
from .compiled import CompiledDraw
from .conv_guard import ConvGuard
from .graphs import DrawGraphs
from .plan import ScorerConfig

__all__ = ["Engine", "ModelRunner", "preserved_state"]


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Puts every module in eval mode (dropout off) for the block; restores each module's mode.

    Recurrent layers instead run in training mode with their dropout set to 0 (the same arithmetic):
    cuDNN's RNN backward refuses eval mode.
    """
    modes = [(m, m.training) for m in model.modules()]
    rnn_dropout = [(m, m.dropout) for m in model.modules() if isinstance(m, nn.RNNBase)]
    try:
        model.eval()
        for m, _ in rnn_dropout:
            m.training, m.dropout = True, 0.0
        yield
    finally:
        for m, training in modes:
            m.training = training
        for m, dropout in rnn_dropout:
            m.dropout = dropout


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """Channels-last copy of a 4-D/5-D input (batched draws are laid out before vmap)."""
    if torch._C._functorch.is_batchedtensor(x):
        return x
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


class ModelRunner:
    """Runs the model with given prunable weights, its other tensors fixed (the one model runner:
    the engine's passes and the baselines' scores).

    ``fixed`` holds detached copies on ``device`` of the non-prunable parameters and buffers
    (floating ones in ``param_dtype``, or passed through ``transform``); ``refresh()`` copies the
    model's current values into them in place (their addresses stay, so captured CUDA graphs stay
    valid). The prunable weights bind to each slot's parameter (``weight_orig`` in a model carrying
    ``torch.nn.utils.prune`` masks, whose pre-hook multiplies by the mask: the model's ``weight``
    attribute is put back afterwards). Inputs run channels-last; bfloat16 runs under autocast; CPU
    convolutions run under ``ConvGuard`` (``ntksap_fast.engine.conv_guard``: oneDNN's strided
    narrow-channel bug).
    """

    def __init__(
        self,
        model: nn.Module,
        arena: Arena,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        param_dtype: torch.dtype = torch.float32,
        output: OutputFn | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.model, self.arena, self.output = model, arena, output
        self.device, self.dtype, self.param_dtype = device, dtype, param_dtype
        self.rnns = [m for m in model.modules() if isinstance(m, nn.RNNBase)]
        self.masked = [
            (model.get_submodule(s.name.rpartition(".")[0]), s.name.rpartition(".")[2])
            for s in arena.slots
            if s.mask is not None
        ]
        self.fixed: dict[str, torch.Tensor] = {}
        prunable = set(arena.params)
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name not in prunable:
                t = t.detach().to(device=device, dtype=param_dtype if t.is_floating_point() else t.dtype, copy=True)
                self.fixed[name] = transform(t) if transform is not None and t.is_floating_point() else t

    def refresh(self) -> None:
        """Copies the model's current non-prunable tensors into ``fixed``."""
        current = dict(self.model.named_parameters())
        current.update(self.model.named_buffers())
        with torch.no_grad():
            for name, t in self.fixed.items():
                t.copy_(current[name])

    @contextlib.contextmanager
    def bound(self, weights: dict[str, torch.Tensor]) -> Iterator[None]:
        """The model's parameters and buffers swapped for ``fixed`` plus ``weights`` (keyed by public
        name) during the block."""
        by_param = {s.param: weights[s.name] for s in self.arena.slots}
        kept = [(m, attr, m.__dict__.get(attr)) for m, attr in self.masked]
        try:
            with _reparametrize_module(self.model, {**self.fixed, **by_param}, tie_weights=True, strict=False):
                yield
        finally:
            for m, attr, value in kept:  # the prune pre-hook set it from the bound weights
                m.__dict__[attr] = value
            for m in self.rnns:  # they cache their weights: point the cache back at the parameters
                m._init_flat_weights()

    def run(self, x: torch.Tensor, bn: CleanStatsBatchNorm | None = None) -> torch.Tensor:
        """The bound model's output (``param_dtype``) for input batch ``x``."""
        autocast = (
            torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=False)
            if self.dtype == torch.bfloat16
            else contextlib.nullcontext()
        )
        guard = ConvGuard() if self.device.type == "cpu" else contextlib.nullcontext()
        with autocast, guard, bn if bn is not None else contextlib.nullcontext():
            out = self.model(_channels_last(x))
        if self.output is not None:
            out = self.output(out)
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"the model returned {type(out).__name__}, not a tensor: pass output=, a function "
                "that picks the tensor to compare, e.g. output=lambda out: out['logits']"
            )
        return out.to(self.param_dtype)

    def __call__(
        self, weights: dict[str, torch.Tensor], x: torch.Tensor, bn: CleanStatsBatchNorm | None = None
    ) -> torch.Tensor:
        with self.bound(weights):
            return self.run(x, bn)

    def weights(self) -> torch.Tensor:
        """The model's prunable values as one flat ``param_dtype`` buffer on the device (through
        ``transform``); a masked tensor's entries as its ``torch.nn.utils.prune`` product."""
        flat = self.arena.flatten(
            self.arena.values(self.model), argname="model", dtype=self.param_dtype, device=self.device
        )
        return flat.mul_(self.arena.start_mask(self.model, self.device))

    def check_input_shape(self, input_shape: tuple[int, ...]) -> None:
        """Runs a two-input forward; raises ``ValueError`` naming ``input_shape`` if the model rejects it."""
        weights = self.arena.views(torch.zeros(self.arena.numel, device=self.device, dtype=self.param_dtype))
        x = torch.zeros(2, *input_shape, device=self.device, dtype=self.param_dtype)
        try:
            with torch.no_grad():
                self(weights, x, CleanStatsBatchNorm([], "record"))
        except (RuntimeError, IndexError) as err:
            raise ValueError(
                f"input_shape {tuple(input_shape)} does not fit the model (a forward on a batch of shape "
                f"{tuple(x.shape)} failed: {str(err).splitlines()[0]})"
            ) from err

    def probe_draw(self, input_shape: tuple[int, ...], n: int, backward: bool = True) -> None:
        """A whole draw of ``n`` zero inputs with zero weights (for the memory plan's measurement); without
        its backward when ``backward`` is False (the CPU plan counts what the forwards save for it)."""
        weights = _leaves(self.arena, torch.zeros(self.arena.numel, device=self.device, dtype=self.param_dtype))
        x = torch.zeros(n, *input_shape, device=self.device, dtype=self.param_dtype)
        stats_bn: list[tuple[torch.Tensor, torch.Tensor]] = []
        out_clean = self(weights, x, CleanStatsBatchNorm(stats_bn, "record"))
        out_pert = self(weights, x, CleanStatsBatchNorm(stats_bn, "replay"))
        if backward:
            torch.autograd.grad((out_clean - out_pert).square().sum(), list(weights.values()))


def _leaves(arena: Arena, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-tensor views of ``flat`` as separate autograd leaves.

    One leaf per tensor, not views of one flat leaf: the backward of a view scatters into a zero
    tensor of the whole arena, which costs O(layers x N) (seconds on ResNet-50).
    """
    return {n: v.detach().requires_grad_(True) for n, v in arena.views(flat).items()}


def _groups(ids: list[int], batch_sizes: Sequence[int], size: int) -> list[list[int]]:
    """Consecutive draws with equal batch sizes, at most ``size`` per group."""
    groups: list[list[int]] = []
    for draw in ids:
        last = groups[-1] if groups else None
        if last and len(last) < size and batch_sizes[last[0]] == batch_sizes[draw]:
            last.append(draw)
        else:
            groups.append([draw])
    return groups


class Engine:
    """A model's draws on one device: built once per scorer, reused for every round.

    Args:
        runner: the model runner (``ModelRunner``, built for ``config``'s device and precision).
        input_shape: one input's shape.
        config: the settled configuration (``ntksap_fast.engine.plan.resolve``); nothing here re-decides it.
        seed, epsilon: the prune's seed and perturbation size.
    """

    def __init__(
        self, runner: ModelRunner, input_shape: tuple[int, ...], config: ScorerConfig, seed: int, epsilon: float
    ) -> None:
        self.arena, self.input_shape, self.config, self.runner = runner.arena, input_shape, config, runner
        self.backend: Backend = make_backend(
            config.backend, self.arena, seed, epsilon, config.device, config.param_dtype, max_group=config.draw_batch
        )
        self.grad = torch.zeros(self.arena.numel, dtype=config.param_dtype, device=config.device)
        self.stats: DrawStats | None = None
        self.graphs = DrawGraphs(config.device) if config.graphs and self.backend.capturable else None
        self.compiled = CompiledDraw(runner, self.backend) if config.compile else None

    def mask_gradient(
        self,
        mask: torch.Tensor,
        round: int,
        batch_sizes: Sequence[int],
        draw_ids: Sequence[int] | None = None,
        on_draw: Callable[[], None] | None = None,
        stats: bool = False,
        accumulate: bool = False,
    ) -> torch.Tensor:
        """``G = sum over draws of dL_s/dm``: flat ``param_dtype`` ``(N,)`` on the device.

        The returned tensor is the engine's own buffer, overwritten by the next call.

        Args:
            mask: flat bool ``(N,)`` (True = unpruned) on the device.
            round: the round counter; batch_sizes: inputs per draw, one entry per draw of the round.
            draw_ids: which draws of the round to compute (default all); the rest contribute nothing.
            on_draw: optional callable run after each draw (progress).
            stats: also fill ``self.stats`` (split-half and sum-of-squares accumulators).
            accumulate: add to what the previous call left in ``G`` (and ``self.stats``) instead of
                starting from zero (more draws of the same round).
        """
        if stats and self.stats is None:
            self.stats = DrawStats(torch.zeros_like(self.grad), torch.zeros_like(self.grad))
        if not accumulate:
            self.grad.zero_()
            if stats:
                for acc in self.stats:
                    acc.zero_()
        draw_stats = self.stats if stats else None
        self.backend.begin_round(mask, round)
        ids = list(range(len(batch_sizes)) if draw_ids is None else draw_ids)
        mixed = len(set(batch_sizes)) > 1  # a compiled step then takes every size with one graph
        for group in _groups(ids, batch_sizes, self.config.draw_batch):
            batch_size = batch_sizes[group[0]]
            self.backend.set_draws(group)
            if len(group) > 1:
                self._batched_draws(batch_size, draw_stats)
            elif self.graphs is not None:
                self.graphs.run((batch_size, stats), lambda n=batch_size: self._one_draw(n, draw_stats, mixed))
            else:
                self._one_draw(batch_size, draw_stats, mixed)
            if on_draw is not None:
                for _ in group:
                    on_draw()
        return self.grad

    def _one_draw(self, batch_size: int, stats: DrawStats | None, mixed_sizes: bool = False) -> None:
        """The staged draw's contribution to ``grad`` (micro-batched when ``micro_batch < batch_size``;
        through the compiled steps when compiling, the batch dim dynamic when ``mixed_sizes``)."""
        backend, arena, runner = self.backend, self.arena, self.runner
        sampled = backend.sample()
        if self.compiled is not None:
            self.compiled.draw(
                sampled,
                backend.inputs(0, self.input_shape, range(batch_size)),
                self.grad,
                stats,
                self.config.micro_batch,
                dynamic_batch=mixed_sizes,
            )
            return
        clean, pert = _leaves(arena, sampled.w_clean[0]), _leaves(arena, sampled.w_pert[0])
        micro = min(self.config.micro_batch or batch_size, batch_size)
        n_micro = math.ceil(batch_size / micro)

        inputs = backend.inputs(0, self.input_shape, range(batch_size))  # sliced per micro-batch
        stats_bn: list[tuple[torch.Tensor, torch.Tensor]] = []
        if n_micro > 1:  # the whole draw's statistics first
            with runner.bound(clean), torch.no_grad():
                runner.run(inputs, CleanStatsBatchNorm(stats_bn, "record", stats_fn=backend.batch_stats))
        leaves = [*clean.values(), *pert.values()]
        g_flat = torch.empty(2, arena.numel, dtype=sampled.w_clean.dtype, device=sampled.w_clean.device)
        for i in range(n_micro):
            x = inputs[i * micro : (i + 1) * micro]
            bn_clean = CleanStatsBatchNorm(
                stats_bn, "record" if n_micro == 1 else "replay", stats_fn=backend.batch_stats
            )
            out_clean = runner(clean, x, bn_clean)
            bn_pert = CleanStatsBatchNorm(stats_bn, "replay")
            out_pert = runner(pert, x, bn_pert)
            bn_clean.check_replayed()
            bn_pert.check_replayed()
            grads = torch.autograd.grad(backend.loss(out_clean, out_pert), leaves)
            if i == 0:
                torch.cat([g.reshape(-1) for g in grads], out=g_flat.view(-1))
            else:
                g_flat.view(-1).add_(torch.cat([g.reshape(-1) for g in grads]))
        backend.accumulate(self.grad, sampled, g_flat[0:1], g_flat[1:2], stats)

    def _batched_draws(self, batch_size: int, stats: DrawStats | None) -> None:
        """The staged draws' contributions, ``k`` whole draws at once (``torch.func.vmap`` over draws).

        Inside vmap the backend's statistics see batched tensors (the Triton backend falls back to
        PyTorch ops there); the loss of all ``k`` draws is taken outside vmap.
        """
        backend, arena, runner = self.backend, self.arena, self.runner
        sampled = backend.sample()
        k = sampled.w_clean.shape[0]
        x = torch.stack([backend.inputs(i, self.input_shape, range(batch_size)) for i in range(k)])
        clean, pert = _leaves(arena, sampled.w_clean), _leaves(arena, sampled.w_pert)
        if x.dim() in (5, 6):  # each draw's batch channels-last
            order = (0, 1, *range(3, x.dim()), 2)
            x = x.permute(order).contiguous().permute(0, 1, x.dim() - 1, *range(2, x.dim() - 1))

        def draw_outputs(
            clean_w: dict[str, torch.Tensor], pert_w: dict[str, torch.Tensor], xs: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            stats_bn: list[tuple[torch.Tensor, torch.Tensor]] = []
            out_clean = runner(clean_w, xs, CleanStatsBatchNorm(stats_bn, "record", stats_fn=backend.batch_stats))
            bn_pert = CleanStatsBatchNorm(stats_bn, "replay")
            out_pert = runner(pert_w, xs, bn_pert)
            bn_pert.check_replayed()
            return out_clean, out_pert

        loss = backend.loss(*torch.func.vmap(draw_outputs)(clean, pert, x))
        grads = torch.autograd.grad(loss, [*clean.values(), *pert.values()])
        g_clean = torch.cat([g.reshape(k, -1) for g in grads[: len(arena)]], dim=1)
        g_pert = torch.cat([g.reshape(k, -1) for g in grads[len(arena) :]], dim=1)
        backend.accumulate(self.grad, sampled, g_clean, g_pert, stats)
