"""The scorer's options and the one place they are settled.

* ``ScorerOptions``: every option of ``NtkSapScorer`` (and so of ``ntk_sap_scores``,
  ``ntk_sap_prune``, ``prune(method="ntksap")``, the CLI and the presets), its default, its check
  and its help text, written once. The other entry points derive their option lists from it
  (``ScorerOptions.names()``, ``cli_fields()``).
* ``resolve``: options + model + device -> ``ScorerConfig``, the settled configuration (device,
  precision, backend, micro-batch, draw batching, CUDA graphs, memory plan). Each of these is
  decided here and nowhere else; the engine receives only settled values.
* ``describe``: the settled configuration as plain values, the one writer for the scorer's
  ``repr``, the CLI's settings line, the masks' metadata and the checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from . import arguments as args
from .engine import memory
from .engine.arena import Arena, ParamSelector
from .engine.backend import resolve_backend

__all__ = ["ScorerOptions", "ScorerConfig", "resolve", "describe", "precision", "tf32_policy", "DTYPES",
           "SETTLED_KEYS", "OutputFn"]

log = logging.getLogger("ntksap_fast")

#: Picks the tensor to compare from what the model returns (e.g. ``lambda out: out.logits``).
OutputFn = Callable[[Any], torch.Tensor]
#: Compute precisions by name (the CLI's ``--dtype`` and the metadata use the names).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def parse_sizes(text: str) -> int | tuple[int, ...]:
    """``"100"`` -> 100, ``"256,256,232"`` -> (256, 256, 232): a batch size from the command line."""
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise ValueError(f"expected a positive int or comma-separated positive ints like 256,256,232, got {text!r}")
    return sizes[0] if len(sizes) == 1 else sizes


def _option(default: Any, help: str, cli: Callable[[str], Any] | None = None, choices: Sequence[str] | None = None):
    """A ``ScorerOptions`` field: its default, its help text, and how the CLI parses it (None: not a flag)."""
    return field(default=default, metadata={"help": help, "cli": cli, "choices": choices})


@dataclass(frozen=True)
class ScorerOptions:
    """Every option of ``NtkSapScorer``, checked when made (``TypeError``/``ValueError`` naming the option)."""

    draws: int = _option(5, "weight/input draws per round", int)
    batch_size: int | tuple[int, ...] = _option(100, "inputs per draw: N, or one per draw N1,N2,...", parse_sizes)
    epsilon: float = _option(0.01, "perturbation size of the finite difference", float)
    seed: int = _option(0, "seed of every random number (with the round and the draw)", int)
    params: ParamSelector | None = _option(None, "prunable tensors: names or a predicate (name, module, param) -> "
                                                 "bool; default every Conv/Linear weight, attention input "
                                                 "projection, recurrent weight and registered layer type")
    device: torch.device | str | None = _option(None, "where to compute (default the model's device)")
    dtype: torch.dtype = _option(torch.float32, "compute precision: float32, bfloat16 (faster on GPUs and on CPUs "
                                                "with native bfloat16) or float64 (for checking)",
                                 DTYPES.__getitem__, tuple(DTYPES))
    micro_batch: int | None = _option(None, "most inputs per forward (exact; default from the memory plan on a "
                                            "GPU: whole draws when they fit)", int)
    draw_batch: int = _option(1, "draws run together through torch.func.vmap (1: in sequence)", int)
    process_group: Any = _option(None, "share the draws over this torch.distributed group (default: the "
                                       "default group when initialised)")
    allow_tf32: bool | None = _option(None, "TF32 for cuDNN convolutions and CUDA matmuls during the scorer's "
                                            "calls (None: PyTorch's global flags)")
    output: OutputFn | None = _option(None, "picks the tensor to compare from what the model returns, e.g. "
                                            "lambda out: out.logits")

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_("draws", args.check_int("draws", self.draws))
        if isinstance(self.batch_size, (list, tuple)):
            set_("batch_size", tuple(args.batch_sizes(self.draws, self.batch_size)))
        else:
            set_("batch_size", args.check_int("batch_size", self.batch_size))
        set_("epsilon", args.check_epsilon(self.epsilon))
        set_("seed", args.check_seed(self.seed))
        if self.dtype is None:  # None (as for every optional argument) means the default
            set_("dtype", torch.float32)
        if self.draw_batch is None:
            set_("draw_batch", 1)
        if self.dtype not in DTYPES.values():
            raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float64, got {self.dtype}")
        if self.micro_batch is not None:
            set_("micro_batch", args.check_int("micro_batch", self.micro_batch))
        set_("draw_batch", args.check_int("draw_batch", self.draw_batch))
        if self.allow_tf32 is not None and not isinstance(self.allow_tf32, bool):
            raise TypeError(f"allow_tf32 must be True, False or None, got {type(self.allow_tf32).__name__}")
        if self.output is not None and not callable(self.output):
            raise TypeError(f"output must be a callable picking the output tensor, got {type(self.output).__name__}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def arguments(cls, scope: Mapping[str, Any]) -> dict[str, Any]:
        """The options among a function's arguments (``locals()`` of a public entry point whose
        signature spells them out): ``{name: value}`` for every option name."""
        return {name: scope[name] for name in cls.names()}

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of option ``name``."""
        return {f.name: f.default for f in dataclasses.fields(cls)}[name]

    @classmethod
    def cli_fields(cls) -> list[dataclasses.Field]:
        """The options the command line takes as flags (``--name-with-dashes``); metadata: help, cli, choices."""
        return [f for f in dataclasses.fields(cls) if f.metadata["cli"] is not None]

    def batch_sizes(self) -> list[int]:
        """Inputs of each draw, one entry per draw."""
        return args.batch_sizes(self.draws, self.batch_size)


@dataclass(frozen=True)
class ScorerConfig:
    """The settled configuration of one scorer (made by ``resolve``; nothing downstream re-decides it).

    Attributes:
        device: where the passes run.
        dtype: compute precision of the passes (bfloat16 runs under autocast).
        param_dtype: dtype of the weights, inputs, losses and ``G`` (float64 for float64, else float32).
        backend: ``"torch"`` or ``"triton"`` (``ntksap_fast.engine.backend``).
        micro_batch: most inputs per forward; None = whole draws.
        draw_batch: whole draws run together through ``torch.func.vmap``; 1 = in sequence.
        graphs: capture each whole draw size in a CUDA graph and replay it.
        allow_tf32: TF32 policy during the scorer's calls (None: PyTorch's flags).
        memory: the GPU memory plan's numbers (None off CUDA).
    """

    device: torch.device
    dtype: torch.dtype = torch.float32
    param_dtype: torch.dtype = torch.float32
    backend: str = "torch"
    micro_batch: int | None = None
    draw_batch: int = 1
    graphs: bool = False
    allow_tf32: bool | None = None
    memory: memory.MemoryPlan | None = None


def precision(dtype: torch.dtype, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """``(compute dtype, param dtype)``: bfloat16 computes under autocast with float32 weights, inputs,
    losses and ``G``; float32 and float64 are both.

    A ``RuntimeWarning`` when bfloat16 on this CPU would be slower than float32, not faster: without
    native bfloat16 (e.g. AVX2-only CPUs) PyTorch's CPU convolutions fall back to slow reference
    kernels (measured on a 2-core AVX2 EPYC: a ResNet-20 round 10x, a ResNet-50 draw 14x slower).
    """
    if device.type == "cpu" and dtype == torch.bfloat16 and not args.cpu_has_bfloat16():
        warnings.warn("dtype=torch.bfloat16 on a CPU without native bfloat16 (AVX-512 BF16 or AMX): PyTorch's "
                      "convolutions fall back to slow reference kernels, about 10x slower than float32 here; "
                      "use dtype=torch.float32 on this machine", RuntimeWarning, stacklevel=args.user_stacklevel())
    return dtype, (torch.float64 if dtype == torch.float64 else torch.float32)


@contextlib.contextmanager
def tf32_policy(allow_tf32: bool | None) -> Iterator[None]:
    """PyTorch's TF32 flags (cuDNN convolutions and CUDA matmuls) set to ``allow_tf32`` for the block
    and restored afterwards, also on error; ``None`` leaves them as they are."""
    if allow_tf32 is None:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow_tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def resolve(options: ScorerOptions, model: nn.Module, arena: Arena, input_shape: tuple[int, ...],
            make_forward: Callable[[torch.device, torch.dtype, torch.dtype], Any]) -> tuple[ScorerConfig, Any]:
    """The settled configuration of a scorer of ``model`` with ``options``, and its model runner.

    ``make_forward(device, dtype, param_dtype)`` builds the model runner (``engine.Forward``) once
    the device and precision are known; it checks ``input_shape`` and, on CUDA, runs two probe
    draws to measure the bytes one input adds (the memory plan, ``ntksap_fast.engine.memory``), which
    decides the micro-batch (unless given) and CUDA graphs. The runner is returned for the engine.
    """
    device = args.resolve_device(model, options.device)
    dtype, param_dtype = precision(options.dtype, device)
    backend = resolve_backend(device, dtype)
    draw_batch = options.draw_batch
    if draw_batch > 1 and any(isinstance(m, nn.RNNBase) for m in model.modules()):
        draw_batch = 1  # vmap has no batching rule for the fused recurrent ops
    largest = max(options.batch_sizes())
    micro, graphs, plan, per_input = options.micro_batch, False, None, 0.0
    with tf32_policy(options.allow_tf32):  # the model runs here: under the scorer's TF32 policy
        forward = make_forward(device, dtype, param_dtype)
        forward.check_input_shape(input_shape)
        if device.type == "cuda":
            per_input = memory.measure_bytes_per_input(lambda n: forward.probe_draw(input_shape, n), device)
    if device.type == "cuda":
        fixed = 8 * arena.numel * torch.finfo(param_dtype).bits // 8  # weights, noise, gradients, G, stats
        plan = memory.plan(memory.device_usable_bytes(device), per_input, fixed, largest)
        if micro is None:
            micro = plan.max_inputs
        graphs = plan.graphs and draw_batch == 1 and backend == "triton"
    if micro is not None and micro >= largest:
        micro = None
    graphs = graphs and micro is None
    config = ScorerConfig(device, dtype, param_dtype, backend, micro, draw_batch if micro is None else 1, graphs,
                          options.allow_tf32, plan)
    log.info("NTK-SAP scorer settled: %s", ", ".join(f"{k}={v}" for k, v in describe(config).items()))
    return config, forward


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


#: What ``describe`` reports, in its order (the CLI's settings line prints these keys of the metadata).
SETTLED_KEYS = ("device", "dtype", "backend", "micro_batch", "draw_batch", "graphs", "allow_tf32")


def describe(config: ScorerConfig, graphs_error: str | None = None) -> dict[str, Any]:
    """The settled configuration as plain values (``repr``, CLI settings line, mask metadata, checkpoint):
    ``SETTLED_KEYS``, then ``graphs_error`` (why CUDA graphs were switched off after a failed
    capture, if they were) and ``memory`` (the GPU memory plan's numbers) where they apply."""
    values = (str(config.device), str(config.dtype).removeprefix("torch."), config.backend, config.micro_batch,
              config.draw_batch, config.graphs and graphs_error is None, config.allow_tf32)
    out = dict(zip(SETTLED_KEYS, values, strict=True))
    if graphs_error is not None:
        out["graphs_error"] = graphs_error
    if config.memory is not None:
        out["memory"] = f"usable {_gib(config.memory.usable)}, {_gib(config.memory.per_input)} per input"
    return out
