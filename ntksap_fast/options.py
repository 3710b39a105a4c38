"""The user's options and the checks of every public argument.

* ``ScorerOptions``: every option of ``NtkSapScorer`` (and so of ``ntk_sap_scores``,
  ``ntk_sap_prune``, ``prune(method="ntksap")``, the CLI and the presets), its default, its check
  and its help text, written once. The other entry points derive their option lists from it
  (``ScorerOptions.names()``, ``cli_fields()``).
* ``check_*``, ``resolve_input_shape``, ``batch_sizes``: the checks shared by every entry point, so
  errors read the same (``TypeError``/``ValueError`` naming the argument).

How the options are turned into a computation (device, precision, backend, memory plan) is
decided in ``ntksap_fast.engine.plan``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .engine.arena import ParamSelector

__all__ = [
    "ScorerOptions",
    "DTYPES",
    "OutputFn",
    "changes_masks",
    "parse_sizes",
    "check_int",
    "check_float",
    "check_epsilon",
    "check_seed",
    "check_density",
    "resolve_input_shape",
    "batch_sizes",
    "user_stacklevel",
]

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


def _option(
    default: Any,
    help: str,
    cli: Callable[[str], Any] | None = None,
    choices: Sequence[str] | None = None,
    masks: bool = False,
):
    """A ``ScorerOptions`` field: its default, its help text, how the CLI parses it (None: not a flag),
    and whether its value changes the masks (``changes_masks``)."""
    return field(default=default, metadata={"help": help, "cli": cli, "choices": choices, "changes_masks": masks})


def changes_masks(f: dataclasses.Field) -> bool:
    """Whether an option (a field of ``ScorerOptions`` or of the prune loop's ``PruneOptions``) changes
    the masks: a checkpoint written with another value is refused, naming it. Options whose value
    cannot be compared (``params`` as a predicate, ``output``) are not: the checkpoint records the
    prunable tensors and a digest of the model instead."""
    return bool(f.metadata.get("changes_masks", False))


@dataclass(frozen=True)
class ScorerOptions:
    """Every option of ``NtkSapScorer``, checked when made (``TypeError``/``ValueError`` naming the option)."""

    draws: int = _option(5, "weight/input draws per round", int, masks=True)
    batch_size: int | tuple[int, ...] = _option(
        100, "inputs per draw: N, or one per draw N1,N2,...", parse_sizes, masks=True
    )
    epsilon: float = _option(0.01, "perturbation size of the finite difference", float, masks=True)
    seed: int = _option(0, "seed of every random number (with the round and the draw)", int, masks=True)
    params: ParamSelector | None = _option(
        None,
        "prunable tensors: names or a predicate (name, module, param) -> "
        "bool; default every Conv/Linear weight, attention input "
        "projection, recurrent weight and registered layer type",
    )
    device: torch.device | str | None = _option(None, "where to compute (default the model's device)")
    dtype: torch.dtype = _option(
        torch.float32,
        "compute precision: float32, bfloat16 (faster on GPUs and on CPUs "
        "with native bfloat16) or float64 (for checking)",
        DTYPES.__getitem__,
        tuple(DTYPES),
        masks=True,
    )
    micro_batch: int | None = _option(
        None, "most inputs per forward (exact; default from the memory plan: whole draws when they fit)", int
    )
    draw_batch: int = _option(1, "draws run together through torch.func.vmap (1: in sequence)", int)
    process_group: Any = _option(
        None, "share the draws over this torch.distributed group (default: the default group when initialised)"
    )
    allow_tf32: bool | None = _option(
        None,
        "TF32 for cuDNN convolutions and CUDA matmuls during the scorer's calls (None: PyTorch's global flags)",
        masks=True,
    )
    output: OutputFn | None = _option(
        None, "picks the tensor to compare from what the model returns, e.g. lambda out: out.logits"
    )
    compile: bool | None = _option(
        None,
        "torch.compile each draw's work, one draw at a time (None: on a CPU when "
        "a round's work is far larger than compiling, e.g. the ImageNet "
        "preset; off on GPUs until measured there)",
        bool,
        masks=True,
    )

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_("draws", check_int("draws", self.draws))
        if isinstance(self.batch_size, (list, tuple)):
            set_("batch_size", tuple(batch_sizes(self.draws, self.batch_size)))
        else:
            set_("batch_size", check_int("batch_size", self.batch_size))
        set_("epsilon", check_epsilon(self.epsilon))
        set_("seed", check_seed(self.seed))
        if self.dtype is None:  # dtype=None and draw_batch=None stand for their defaults
            set_("dtype", torch.float32)
        if self.draw_batch is None:
            set_("draw_batch", 1)
        if self.dtype not in DTYPES.values():
            raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float64, got {self.dtype}")
        if self.micro_batch is not None:
            set_("micro_batch", check_int("micro_batch", self.micro_batch))
        set_("draw_batch", check_int("draw_batch", self.draw_batch))
        if self.allow_tf32 is not None and not isinstance(self.allow_tf32, bool):
            raise TypeError(f"allow_tf32 must be True, False or None, got {type(self.allow_tf32).__name__}")
        if self.compile is not None and not isinstance(self.compile, bool):
            raise TypeError(f"compile must be True, False or None, got {type(self.compile).__name__}")
        if self.compile and self.draw_batch > 1:
            raise ValueError(f"compile=True runs one draw at a time: draw_batch must be 1, got {self.draw_batch}")
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
        return batch_sizes(self.draws, self.batch_size)

    def mask_settings(self) -> dict[str, Any]:
        """``{name: plain value}`` of the options that change the masks (``changes_masks``), as a
        checkpoint records them: ``batch_size`` as one size per draw, a dtype by its name."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if changes_masks(f)}
        if "batch_size" in values:
            values["batch_size"] = self.batch_sizes()
        return {k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v for k, v in values.items()}


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``; ``TypeError``/``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_float(name: str, value) -> float:
    """``value`` as a float; ``TypeError`` naming ``name`` unless it is a real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_epsilon(value) -> float:
    epsilon = check_float("epsilon", value)
    if not math.isfinite(epsilon) or epsilon <= 0:
        raise ValueError(f"epsilon must be a finite number > 0, got {value}")
    return epsilon


def check_seed(value) -> int:
    seed = check_int("seed", value, minimum=0)
    if seed >= 2**64:
        raise ValueError(f"seed must be < 2**64, got {value}")
    return seed


def check_density(value, name: str = "density") -> float:
    density = check_float(name, value)
    if not (0.0 < density <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return density


def resolve_input_shape(model: nn.Module, input_shape) -> tuple[int, ...]:
    """``input_shape`` as a tuple of ints, or the model's own ``input_shape`` attribute if None."""
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
        if input_shape is None:
            raise ValueError(
                f"input_shape is needed: {type(model).__name__} does not say what input it takes; pass one "
                "sample's shape without the batch dimension, e.g. input_shape=(3, 224, 224)"
            )
    if isinstance(input_shape, torch.Size):
        input_shape = tuple(input_shape)
    if not isinstance(input_shape, (tuple, list)) or not input_shape:
        raise TypeError(f"input_shape must be a non-empty tuple of ints, got {input_shape!r}")
    for s in input_shape:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1:
            raise ValueError(f"input_shape must hold positive ints, got {tuple(input_shape)!r}")
    return tuple(int(s) for s in input_shape)


def batch_sizes(draws: int, batch_size: int | Sequence[int]) -> list[int]:
    """Inputs per draw, one entry per draw, from an int or a list of ``draws`` ints."""
    if isinstance(batch_size, (list, tuple)):
        sizes = [check_int("batch_size", b) for b in batch_size]
        if len(sizes) != draws:
            raise ValueError(f"batch_size has {len(sizes)} entries but draws is {draws}; give one size per draw")
        return sizes
    return [check_int("batch_size", batch_size)] * draws


def user_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` called by the caller of this function that points
    at the first frame outside the package (the user's line, whichever entry point they used)."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level
