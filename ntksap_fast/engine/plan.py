"""The settled configuration of a scorer: every decision about how it computes, made once.

``resolve``: options + model + device -> ``ScorerConfig`` (device, precision, backend, micro-batch,
draw batching, CUDA graphs, memory plan). Each of these is decided here and nowhere else; the engine
receives only settled values. ``describe`` is the one writer of the settled configuration (the
scorer's ``repr``, the CLI's settings line, the masks' metadata and the checkpoint). ``precision``
and ``tf32_policy`` hold the precision rule and the TF32 policy.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..options import ScorerOptions, user_stacklevel
from . import memory
from .arena import Arena
from .backend import resolve_backend

__all__ = ["ScorerConfig", "resolve", "describe", "precision", "tf32_policy", "resolve_device", "SETTLED_KEYS"]

log = logging.getLogger("ntksap_fast")


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
        memory: the memory plan's numbers (None where none was made: ``resolve``).
        compile: run each whole draw through ``torch.compile`` (``ntksap_fast.engine.compiled``).
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
    compile: bool = False


def precision(dtype: torch.dtype, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """``(compute dtype, param dtype)``: bfloat16 computes under autocast with float32 weights, inputs,
    losses and ``G``; float32 and float64 are both.

    A ``RuntimeWarning`` when bfloat16 on this CPU would be slower than float32, not faster: without
    native bfloat16 (e.g. AVX2-only CPUs) PyTorch's CPU convolutions fall back to slow reference
    kernels (measured on a 2-core AVX2 EPYC: a ResNet-20 round 10x, a ResNet-50 draw 14x slower).
    """
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_bfloat16():
        warnings.warn(
            "dtype=torch.bfloat16 on a CPU without native bfloat16 (AVX-512 BF16 or AMX): PyTorch's "
            "convolutions fall back to slow reference kernels, about 10x slower than float32 here; "
            "use dtype=torch.float32 on this machine",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
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


def resolve(
    options: ScorerOptions,
    model: nn.Module,
    arena: Arena,
    input_shape: tuple[int, ...],
    make_runner: Callable[[torch.device, torch.dtype, torch.dtype], Any],
) -> tuple[ScorerConfig, Any]:
    """The settled configuration of a scorer of ``model`` with ``options``, and its model runner.

    ``make_runner(device, dtype, param_dtype)`` builds the model runner (``engine.ModelRunner``) once
    the device and precision are known; it checks ``input_shape`` and, on CUDA, runs two probe
    draws to measure the bytes one input adds (the memory plan, ``ntksap_fast.engine.memory``), which
    decides the micro-batch (unless given) and CUDA graphs. On the CPU it does the same when
    ``micro_batch`` is not given and draws are larger than the probe's (``_host_plan``): there the
    kernel kills a process that runs out of memory, with no Python error. The runner is returned
    for the engine.

    Raises:
        MemoryError: on the CPU, when not even one input fits in the memory available.
    """
    device = resolve_device(model, options.device)
    dtype, param_dtype = precision(options.dtype, device)
    backend = resolve_backend(device, dtype)
    draw_batch = options.draw_batch
    if draw_batch > 1 and any(isinstance(m, nn.RNNBase) for m in model.modules()):
        draw_batch = 1  # vmap has no batching rule for the fused recurrent ops
    largest = max(options.batch_sizes())
    micro, graphs, plan, per_input = options.micro_batch, False, None, 0.0
    fixed = 8 * arena.numel * torch.finfo(param_dtype).bits // 8  # weights, noise, gradients, G, stats
    host_usable = _host_usable(model, input_shape, device, micro, largest, fixed)
    counter = FlopCounterMode(display=False)  # the forward's FLOPs: what compiling would save on
    with tf32_policy(options.allow_tf32):  # the model runs here: under the scorer's TF32 policy
        runner = make_runner(device, dtype, param_dtype)
        with counter if options.compile is None and device.type == "cpu" else contextlib.nullcontext():
            runner.check_input_shape(input_shape)
        if device.type == "cuda" or host_usable is not None:
            cuda = device.type == "cuda"  # the CPU's measure needs only the forwards (``memory``)
            per_input = memory.measure_bytes_per_input(lambda n: runner.probe_draw(input_shape, n, cuda), device)
    if host_usable is not None:
        micro, draw_batch, plan = _host_plan(model, input_shape, host_usable, per_input, fixed, largest, draw_batch)
    if device.type == "cuda":
        plan = memory.plan(memory.device_usable_bytes(device), per_input, fixed, largest)
        if micro is None:
            micro = plan.max_inputs
        graphs = plan.graphs and draw_batch == 1 and backend == "triton"
    if micro is not None and micro >= largest:
        micro = None
    graphs = graphs and micro is None
    compiled = _compile(options, device, model, counter.get_total_flops() / 2 * sum(options.batch_sizes()))
    config = ScorerConfig(
        device,
        dtype,
        param_dtype,
        backend,
        micro,
        draw_batch if micro is None else 1,
        graphs,
        options.allow_tf32,
        plan,
        compiled,
    )
    log.info("NTK-SAP scorer settled: %s", ", ".join(f"{k}={v}" for k, v in describe(config).items()))
    return config, runner


#: Measured on a 2-core AVX-512 Xeon, torch 2.14 (bench/results/cpu-compile-2026-12-03.txt): a draw's
#: forward and backward, both branches, run at about this many FLOPs per second per thread, and
#: compiling the step costs about this many seconds per module with an empty inductor cache.
CPU_FLOPS_PER_THREAD = 5e10
COMPILE_SECONDS_PER_MODULE = 1.0
#: ``compile=None`` compiles when one round's estimated work exceeds this multiple of the compile time.
COMPILE_PAYS = 10.0


def _compile(options: ScorerOptions, device: torch.device, model: nn.Module, round_forward_flops: float) -> bool:
    """Whether the draws run compiled (``ntksap_fast.engine.compiled``), logged with the reason.

    ``compile=False``, or draws batched through vmap (``ScorerOptions`` refuses ``compile=True`` with
    them: compiled draws run one at a time, whole or in micro-batches): no. ``True``: yes.
    ``None``: on a GPU no (not measured there yet); on a CPU when one round's work
    (``round_forward_flops``, the forward FLOPs of all its inputs, times 6: forward and backward of
    two branches) at ``CPU_FLOPS_PER_THREAD`` per thread is over ``COMPILE_PAYS`` times the cold
    compile time (``COMPILE_SECONDS_PER_MODULE`` per module): one round, since the scorer does not
    know how many rounds it will serve. The ImageNet preset compiles (est. ~1 h per round against
    ~3 min), the CIFAR ones do not (seconds per round against a minute or two).
    """
    if options.compile is False or options.draw_batch > 1:
        return False
    if options.compile:
        return True
    if device.type != "cpu":
        return False
    round_s = 6 * round_forward_flops / (CPU_FLOPS_PER_THREAD * torch.get_num_threads())
    compile_s = COMPILE_SECONDS_PER_MODULE * sum(1 for _ in model.modules())
    decision = round_s > COMPILE_PAYS * compile_s
    log.info("NTK-SAP: compile=%s: a round is estimated at %.0f s, compiling at %.0f s", decision, round_s, compile_s)
    return decision


#: Inputs of the larger probe draw (``memory.measure_bytes_per_input``): smaller draws are not planned on the CPU.
PROBE_INPUTS = 4


def _host_usable(
    model: nn.Module, input_shape: tuple[int, ...], device: torch.device, micro: int | None, largest: int, fixed: int
) -> int | None:
    """The host memory the CPU plan works with (``memory.host_usable_bytes``), None where no plan is made:
    off the CPU, with ``micro_batch`` given, draws no larger than the probe's, or memory unknown.
    ``MemoryError`` before the probe when not even the weight buffers (``fixed`` bytes) fit."""
    if device.type != "cpu" or micro is not None or largest <= PROBE_INPUTS:
        return None
    usable = memory.host_usable_bytes()
    if usable is None:
        log.info("NTK-SAP: the host's available memory is unknown here (no /proc/meminfo): whole draws")
        return None
    if fixed > memory.HEADROOM * usable:
        raise _not_enough(model, input_shape, "the weight buffers alone need", fixed, usable)
    return usable


def _host_plan(
    model: nn.Module,
    input_shape: tuple[int, ...],
    usable: int,
    per_input: float,
    fixed: int,
    largest: int,
    draw_batch: int,
) -> tuple[int | None, int, memory.MemoryPlan]:
    """``(micro_batch, draw_batch, plan)`` on the CPU: a pass holds at most what fits in ``HEADROOM`` of the
    ``usable`` host memory; vmap-batched draws are cut first, then draws are split in equal micro-batches
    (the fewest passes that fit, each as small as that allows: exact, ``engine.Engine``). ``MemoryError``
    when one input does not fit."""
    plan = memory.plan(usable, per_input, fixed, largest * draw_batch)
    if fixed + per_input > memory.HEADROOM * usable:
        raise _not_enough(model, input_shape, "one input needs", fixed + per_input, usable)
    if plan.max_inputs is None:
        return None, draw_batch, plan
    if plan.max_inputs >= largest:
        log.info(
            "NTK-SAP: draw_batch=%d: %d draws of %d inputs at once would need about %s of host memory, %s available",
            plan.max_inputs // largest,
            draw_batch,
            largest,
            _gib(fixed + per_input * largest * draw_batch),
            _gib(usable),
        )
        return None, plan.max_inputs // largest, plan
    micro = math.ceil(largest / math.ceil(largest / plan.max_inputs))
    log.info(
        "NTK-SAP: micro_batch=%d: a draw of %d inputs would need about %s of host memory (%s an input), %s available",
        micro,
        largest,
        _gib(fixed + per_input * largest),
        _gib(per_input),
        _gib(usable),
    )
    return micro, 1, plan


def _not_enough(model: nn.Module, input_shape: tuple[int, ...], what: str, needed: float, usable: int) -> MemoryError:
    """The CPU plan's error: ``what`` (``"one input needs"``) ``needed`` bytes, more than fit in ``usable``."""
    return MemoryError(
        f"NTK-SAP scorer of {type(model).__name__} with input_shape {tuple(input_shape)}: {what} about "
        f"{_gib(needed)} of host memory, more than {memory.HEADROOM:.0%} of the {_gib(usable)} available to this "
        "process; nothing was run. Free memory, or use a smaller model or input"
    )


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


#: What ``describe`` reports, in its order (the CLI's settings line prints these keys of the metadata).
SETTLED_KEYS = ("device", "dtype", "backend", "micro_batch", "draw_batch", "graphs", "allow_tf32", "compile")


def describe(config: ScorerConfig, graphs_error: str | None = None, compile_error: str | None = None) -> dict[str, Any]:
    """The settled configuration as plain values (``repr``, CLI settings line, mask metadata, checkpoint):
    ``SETTLED_KEYS``, then ``graphs_error`` / ``compile_error`` (why CUDA graphs or the compiled
    step were switched off after a failure, if they were) and ``memory`` (the GPU memory plan's
    numbers) where they apply."""
    values = (
        str(config.device),
        str(config.dtype).removeprefix("torch."),
        config.backend,
        config.micro_batch,
        config.draw_batch,
        config.graphs and graphs_error is None,
        config.allow_tf32,
        config.compile and compile_error is None,
    )
    out = dict(zip(SETTLED_KEYS, values, strict=True))
    if graphs_error is not None:
        out["graphs_error"] = graphs_error
    if compile_error is not None:
        out["compile_error"] = compile_error
    if config.memory is not None:
        out["memory"] = f"usable {_gib(config.memory.usable)}, {_gib(config.memory.per_input)} per input"
    return out


def resolve_device(model: nn.Module, device) -> torch.device:
    """``device`` as a ``torch.device``; the model's (first parameter's) device when None."""
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must name a torch device, got {device!r}") from err


def cpu_has_bfloat16() -> bool:
    """Whether oneDNN runs bfloat16 convolutions natively on this CPU (AVX-512 BF16 or AMX).

    True when PyTorch cannot tell (the probe is private API).
    """
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return True if probe is None else bool(probe())
    except RuntimeError:
        return True
