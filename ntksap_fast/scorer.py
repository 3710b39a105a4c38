"""``NtkSapScorer``: the session object every entry point goes through.

Everything that does not change between rounds and calls is decided and built once, when the
scorer is made: the arena, the backend (PyTorch or Triton), the memory plan (micro-batch, CUDA
graphs), draw batching, the precision policy, and the engine with its buffers, compiled kernels and
captured graphs. ``repr(scorer)`` shows what was decided. A user scoring the same model repeatedly
keeps one scorer: the second call costs only the draws.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from . import arguments as args
from . import memory
from .arena import Arena, ParamSelector
from .backend import resolve_backend
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import DrawShare
from .engine import Engine, EngineConfig, OutputFn, preserved_state
from .schedule import SCHEDULES, density_schedule, keep_count
from .topk import masked_topk_

__all__ = ["NtkSapScorer", "tf32_policy"]


@contextlib.contextmanager
def tf32_policy(allow_tf32: bool | None) -> Iterator[None]:
    """PyTorch's TF32 flags (cuDNN convolutions and CUDA matmuls) set to ``allow_tf32`` for the block
    and restored afterwards, also on error; ``None`` leaves them as they are."""
    if allow_tf32 is None:
        yield
        return
    if not isinstance(allow_tf32, bool):
        raise TypeError(f"allow_tf32 must be True, False or None, got {type(allow_tf32).__name__}")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow_tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class NtkSapScorer:
    """NTK-SAP scores of one model, set up once and reused for every round and call.

    Args:
        model: any ``nn.Module``; it is never modified. Its non-prunable tensors (biases,
            normalisation parameters, buffers) are read again at every call.
        input_shape: one input's shape without the batch dim; optional for models that carry
            ``input_shape`` (``ntksap_fast.models``).
        draws: weight/input draws per round; batch_size: inputs per draw (an int, or one per draw).
        epsilon: perturbation size; seed: seed of every random number (with round and draw).
        params: prunable tensors (names or a predicate ``(name, module, param) -> bool``); default
            every Conv/Linear weight.
        device: where to compute (default the model's); dtype: float32 (default), bfloat16 (faster)
            or float64 (for checking).
        micro_batch: most inputs per forward (exact: results do not depend on it); default on a GPU:
            from the memory plan (``ntksap_fast.memory``), whole draws when they fit.
        draw_batch: draws run together through ``torch.func.vmap``; default 1 (in sequence; on a
            GPU small networks use CUDA graphs instead, which measured faster).
        process_group: share the draws over the ranks of this ``torch.distributed`` group (default:
            the default group when ``torch.distributed`` is initialised).
        allow_tf32: TF32 for cuDNN convolutions and CUDA matmuls during the scorer's calls; None
            (default) keeps PyTorch's global flags. TF32 moves GPU scores by a few percent (README).
        output: picks the tensor to compare from what the model returns, for models returning a
            tuple, dict or dataclass (e.g. ``output=lambda out: out.logits``).
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int] | None = None, *, draws: int = 5,
                 batch_size: int | Sequence[int] = 100, epsilon: float = 0.01, seed: int = 0,
                 params: ParamSelector | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, micro_batch: int | None = None, draw_batch: int | None = None,
                 process_group=None, allow_tf32: bool | None = None, output: OutputFn | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if output is not None and not callable(output):
            raise TypeError(f"output must be a callable picking the output tensor, got {type(output).__name__}")
        if allow_tf32 is not None and not isinstance(allow_tf32, bool):
            raise TypeError(f"allow_tf32 must be True, False or None, got {type(allow_tf32).__name__}")
        self.model = model
        self.draws = args.check_int("draws", draws)
        self.batch_sizes = args.batch_sizes(self.draws, batch_size)
        self.epsilon = args.check_epsilon(epsilon)
        self.seed = args.check_seed(seed)
        self.input_shape = args.resolve_input_shape(model, input_shape)
        self.allow_tf32 = allow_tf32
        self.arena = Arena(model, params)
        device = args.resolve_device(model, device)
        dtype = args.resolve_dtype(dtype)
        if micro_batch is not None:
            micro_batch = args.check_int("micro_batch", micro_batch)
        draw_batch = 1 if draw_batch is None else args.check_int("draw_batch", draw_batch)
        self.share = DrawShare.current(process_group)
        self.local_draws = self.share.draws(self.draws)
        config = EngineConfig(device=device, dtype=dtype, backend=resolve_backend(device, dtype),
                              micro_batch=micro_batch, draw_batch=draw_batch)
        self.memory_plan: memory.MemoryPlan | None = None
        with tf32_policy(allow_tf32), preserved_state(model):
            engine = Engine(model, self.arena, self.input_shape, config, self.seed, self.epsilon, output)
            engine.check_input_shape()
            if device.type == "cuda":
                per_input = memory.measure_bytes_per_input(engine.probe_draw, device)
                fixed = 8 * self.arena.numel * torch.finfo(config.param_dtype).bits // 8
                self.memory_plan = memory.plan(memory.device_usable_bytes(device), per_input, fixed,
                                               max(self.batch_sizes))
                micro = micro_batch if micro_batch is not None else self.memory_plan.micro_batch
                if micro is not None and micro >= max(self.batch_sizes):
                    micro = None
                graphs = (self.memory_plan.graphs and micro is None and draw_batch == 1
                          and config.backend == "triton")
                config = dataclasses.replace(config, micro_batch=micro, graphs=graphs)
                engine = Engine(model, self.arena, self.input_shape, config, self.seed, self.epsilon, output)
        self.config = config
        self.engine = engine
        self.mask = torch.ones(self.arena.numel, dtype=torch.bool, device=device)

    # ------------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        c = self.config
        graphs = "off"
        if self.engine.graphs is not None:
            graphs = f"off ({self.engine.graphs.error})" if self.engine.graphs.error else "on"
        tf32 = {None: "PyTorch's flags", True: "on", False: "off"}[self.allow_tf32]
        plan = ""
        if self.memory_plan is not None:
            plan = (f", memory=(usable {_gib(self.memory_plan.usable)}, "
                    f"{_gib(self.memory_plan.per_input)} per input)")
        return (f"NtkSapScorer({type(self.model).__name__}, tensors={len(self.arena)}, N={self.arena.numel}, "
                f"input_shape={self.input_shape}, draws={self.draws}, batch_size={self._batch_text()}, "
                f"epsilon={self.epsilon}, seed={self.seed}, device={c.device}, dtype={str(c.dtype).split('.')[-1]}, "
                f"backend={c.backend}, micro_batch={c.micro_batch or 'whole draws'}, draw_batch={c.draw_batch}, "
                f"graphs={graphs}, tf32={tf32}, ranks={self.share.world}{plan})")

    def _batch_text(self) -> str:
        sizes = self.batch_sizes
        return str(sizes[0]) if len(set(sizes)) == 1 else ",".join(map(str, sizes))

    def settings(self) -> dict:
        """What the scorer computes and how, as plain values (for reports and mask files)."""
        c = self.config
        return {"draws": self.draws, "batch_sizes": list(self.batch_sizes), "epsilon": self.epsilon,
                "seed": self.seed, "input_shape": list(self.input_shape), "dtype": str(c.dtype).split(".")[-1],
                "device": str(c.device), "backend": c.backend, "micro_batch": c.micro_batch,
                "draw_batch": c.draw_batch, "graphs": self.engine.graphs is not None and not self.engine.graphs.error,
                "allow_tf32": self.allow_tf32}

    # ------------------------------------------------------------------------------------------
    def flat_mask(self, masks: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
        """A new flat bool ``(N,)`` mask on the device from per-tensor masks (None = dense)."""
        if masks is None:
            return torch.ones(self.arena.numel, dtype=torch.bool, device=self.config.device)
        return self.arena.flatten(masks, argname="masks", dtype=torch.bool, device=self.config.device)

    def flat_scores(self, mask: torch.Tensor, round: int = 0, on_draw: Callable[[], None] | None = None) -> torch.Tensor:
        """Flat float32 scores ``|G| * mask`` of one round for a flat bool ``(N,)`` mask on the device.

        Raises ``ValueError`` naming the tensors whose scores are NaN.
        """
        if mask is not self.mask:
            self.mask.copy_(mask)
        with tf32_policy(self.allow_tf32), preserved_state(self.model):
            self.engine.forward.refresh()
            grad = self.engine.mask_gradient(self.mask, round, self.batch_sizes, self.local_draws, on_draw)
            scores = self.share.all_reduce(grad).abs().mul_(self.mask).to(torch.float32)
        if torch.isnan(scores).any():
            bad = [n for n, v in self.arena.views(scores).items() if torch.isnan(v).any()]
            raise ValueError(f"NaN in the NTK-SAP scores of {bad}: the model's output or gradient is not finite")
        return scores

    def scores(self, masks: Mapping[str, torch.Tensor] | None = None, round: int = 0) -> dict[str, torch.Tensor]:
        """One scoring round: ``{name: float32 tensor of the parameter's shape}``, ``|sum_s dL_s/dm| * mask``.

        Args:
            masks: current masks (bool, parameter shapes) keyed by parameter name; None = dense.
            round: the round counter of the random numbers (``ntk_sap_prune`` scores round ``t`` with
                ``round=t``).
        """
        round = args.check_int("round", round, minimum=0)
        scores = self.flat_scores(self.flat_mask(masks), round)
        return {n: v.clone() for n, v in self.arena.views(scores).items()}

    def prune(self, density: float, iterations: int = 20, *, schedule: str = "exponential",
              checkpoint: str | os.PathLike | None = None, progress: bool | None = None,
              on_round: Callable[[int, dict[str, torch.Tensor]], None] | None = None) -> dict[str, torch.Tensor]:
        """Iterative NTK-SAP: ``iterations`` scoring rounds, global top-k after each.

        After round ``t`` the kept fraction is ``density ** (t / iterations)`` (or linear); exactly
        ``N - floor((1 - d_t) * N)`` entries stay, the highest-scoring among those still unpruned,
        ties to the lower flat index; pruned entries never come back. ``progress`` shows a bar per
        draw (None: only on a terminal; rank 0 only); ``on_round(t, masks)`` is called after each
        round with the masks so far.

        ``checkpoint``: a file path; after each round the mask and the round counter are written to
        it atomically (by rank 0), and a call with the same settings resumes after the last finished
        round, giving the identical final masks. A checkpoint written with other settings, or a
        corrupted one, raises ``ValueError`` (``ntksap_fast.checkpoint.CheckpointError``).

        Returns:
            ``{name: bool tensor of the parameter's shape}`` (True = kept) on the compute device.
        """
        density = args.check_density(density)
        iterations = args.check_int("iterations", iterations)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(f"checkpoint must be a file path, got {type(checkpoint).__name__}")
        if on_round is not None and not callable(on_round):
            raise TypeError(f"on_round must be callable (round, masks) -> None, got {type(on_round).__name__}")
        n_total = self.arena.numel
        mask = self.mask
        mask.fill_(True)
        done = 0
        settings = {
            "tensors": [(s.name, tuple(s.shape)) for s in self.arena.slots], "density": density,
            "iterations": iterations, "schedule": schedule, "batch_sizes": tuple(self.batch_sizes),
            "epsilon": self.epsilon, "seed": self.seed, "input_shape": self.input_shape,
            "dtype": str(self.config.dtype),
        }
        if checkpoint is not None and Path(checkpoint).exists():
            done, saved = load_checkpoint(checkpoint, settings)
            mask.copy_(saved)
        densities = density_schedule(density, iterations, schedule)
        show = self.share.is_main and (progress is None or progress)
        with tqdm(total=(iterations - done) * len(self.local_draws), desc="NTK-SAP", unit="draw",
                  disable=None if progress is None and show else not show) as bar:
            for t in range(done, iterations):
                bar.set_postfix(round=f"{t + 1}/{iterations}", density=f"{densities[t]:.4f}")
                scores = self.flat_scores(mask, round=t, on_draw=lambda: bar.update(1))
                masked_topk_(scores, mask, keep_count(n_total, densities[t]))
                if checkpoint is not None and self.share.is_main:
                    save_checkpoint(checkpoint, settings, t + 1, mask)
                if on_round is not None:
                    on_round(t + 1, {n: v.clone() for n, v in self.arena.views(mask).items()})
        return {n: v.clone() for n, v in self.arena.views(mask).items()}
