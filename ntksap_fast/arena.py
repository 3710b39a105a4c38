"""The arena: every prunable tensor of a model laid out in one flat vector.

A model's prunable weights get consecutive slots ``[offset, offset + numel)`` of a flat index space
of length ``numel``. Masks, scores, gradient accumulators and sampled weights are flat buffers over
that space, and per-tensor views of them cost nothing, so one operation covers every layer and the
global top-k runs on one vector with no concatenation.

Default prunable tensors (``default_prunable``) and how each is resampled. Every one is drawn from
Kaiming normal, fan-in mode, ReLU gain: ``N(0, 2 / fan_in)`` with ``fan_in = shape[1] *
prod(shape[2:])``, the number of inputs one output row sums over. This is the paper's rule (DESIGN.md
section 2) applied to the input dimension of each matrix; no kind gets its own gain.

* ``Conv1d/2d/3d.weight`` ``(out, in/groups, *k)``: ``fan_in = in/groups * prod(k)``;
  ``Linear.weight`` ``(out, in)``: ``fan_in = in``.
* ``MultiheadAttention.in_proj_weight`` ``(3E, E)``, the stacked query/key/value projections:
  ``fan_in = E``, since each of the ``3E`` rows (a q, k or v output) sees the ``E`` inputs.
  With separate projections (``kdim``/``vdim`` differ from ``E``): ``q_proj_weight`` ``(E, E)``,
  ``k_proj_weight`` ``(E, kdim)``, ``v_proj_weight`` ``(E, vdim)``: ``fan_in = E``, ``kdim``,
  ``vdim``. ``out_proj`` is a ``Linear`` (above).
* ``LSTM``/``GRU``/``RNN`` (any ``nn.RNNBase``), each layer ``l`` and direction (``_reverse``
  suffix when bidirectional), ``G`` gates (4 LSTM, 3 GRU, 1 RNN), hidden size ``H``, recurrent
  state size ``R`` (``H``, or the LSTM's ``proj_size`` when it is > 0):
  ``weight_ih_l{l}`` ``(G*H, in_l)``: ``fan_in = in_l`` (the input size for ``l = 0``, else ``R``,
  or ``2R`` when bidirectional); ``weight_hh_l{l}`` ``(G*H, R)``: ``fan_in = R``;
  ``weight_hr_l{l}`` ``(R, H)`` (LSTM projection): ``fan_in = H``. Each gate's row sums over that
  many inputs, as for ``in_proj_weight``.

Why one rule: a matrix is sampled the same whatever module holds it, so ``in_proj_weight`` samples
exactly as a ``Linear(E, 3E)`` ``qkv`` layer (Swin's, timm's) or three ``Linear(E, E)`` would, and
``weight_ih`` as the ``Linear`` an unrolled RNN cell would use. The ReLU gain is kept where no ReLU
follows (softmax attention, sigmoid/tanh gates), as the paper keeps it for its classifier layer.

Biases, normalisation parameters, embeddings and every other parameter are not pruned by default
and keep the model's values during scoring.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

__all__ = ["Slot", "Arena", "ParamSelector", "default_prunable"]

#: Selects prunable tensors: parameter names, or a predicate ``(name, module, param) -> bool``
#: where ``name`` is the full parameter name and ``module`` the module owning it.
ParamSelector = Iterable[str] | Callable[[str, nn.Module, nn.Parameter], bool]

_WEIGHT_OWNERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_ATTENTION_WEIGHTS = frozenset({"in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"})
#: ``weight_ih_l0``, ``weight_hh_l1_reverse``, ``weight_hr_l0`` (LSTM projection); not ``bias_*``.
_RECURRENT_WEIGHT = re.compile(r"weight_(ih|hh|hr)_l\d+(_reverse)?")


def default_prunable(name: str, module: nn.Module, param: nn.Parameter) -> bool:
    """The default prunable set (module docstring): the ``weight`` of Conv1d/2d/3d and Linear, the
    input projections of ``nn.MultiheadAttention`` (``in_proj_weight`` or ``q/k/v_proj_weight``)
    and the weight matrices of ``nn.LSTM``/``nn.GRU``/``nn.RNN`` (``weight_ih_l*``,
    ``weight_hh_l*``, ``weight_hr_l*``, ``_reverse`` included). ``name`` is the full parameter name,
    ``module`` the module owning it; ``param`` is not looked at."""
    local = name.rsplit(".", 1)[-1]
    if isinstance(module, _WEIGHT_OWNERS):
        return local == "weight"
    if isinstance(module, nn.MultiheadAttention):
        return local in _ATTENTION_WEIGHTS
    if isinstance(module, nn.RNNBase):
        return _RECURRENT_WEIGHT.fullmatch(local) is not None
    return False


@dataclass(frozen=True)
class Slot:
    """One prunable tensor's place in the arena.

    ``std = sqrt(2 / fan_in)`` is the Kaiming-normal (fan-in, ReLU gain) standard deviation of its
    sampled weights, ``fan_in = shape[1] * prod(shape[2:])`` (for each kind, see the module docstring).
    ``shape`` is the tensor's shape, ``offset``/``numel`` its flat index range.
    """

    name: str
    shape: torch.Size
    offset: int
    numel: int
    fan_in: int
    std: float

    @property
    def stop(self) -> int:
        return self.offset + self.numel


def _fan_in(name: str, shape: torch.Size) -> int:
    if len(shape) < 2:
        raise ValueError(
            f"params: prunable tensor {name!r} has shape {tuple(shape)}; NTK-SAP samples weights with "
            "fan_in = shape[1] * prod(kernel dims), which needs at least 2 dimensions"
        )
    return int(shape[1]) * math.prod(int(s) for s in shape[2:])


class Arena:
    """Flat layout of a model's prunable tensors.

    Attributes:
        slots: one ``Slot`` per prunable tensor, in ``model.named_parameters()`` order.
        numel: total number ``N`` of prunable entries.
    """

    def __init__(self, model: nn.Module, params: ParamSelector | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        owners = {}
        for module_name, module in model.named_modules(remove_duplicate=True):
            for pname, p in module.named_parameters(recurse=False):
                owners[f"{module_name}.{pname}" if module_name else pname] = module
        named = dict(model.named_parameters())
        if params is None:
            selected = [n for n, p in named.items() if default_prunable(n, owners[n], p)]
        elif callable(params):
            selected = [n for n, p in named.items() if params(n, owners[n], p)]
        elif isinstance(params, str):
            raise TypeError("params must be a list of parameter names or a predicate, not a single string")
        else:
            wanted = list(params)
            for n in wanted:
                if not isinstance(n, str):
                    raise TypeError(f"params must hold parameter names (str), got {type(n).__name__}")
            unknown = [n for n in wanted if n not in named]
            if unknown:
                raise ValueError(f"params: no parameter named {unknown[:5]} in the model")
            wanted_set = set(wanted)
            selected = [n for n in named if n in wanted_set]
        if not selected:
            raise ValueError(
                "model has nothing to prune: no Conv1d/2d/3d or Linear weight, MultiheadAttention input "
                "projection or LSTM/GRU/RNN weight found; pass params= to name the tensors"
                if params is None else "params selected no parameter of the model"
            )
        slots, offset = [], 0
        for n in selected:
            shape = named[n].shape
            fan_in = _fan_in(n, shape)
            numel = named[n].numel()
            slots.append(Slot(n, shape, offset, numel, fan_in, math.sqrt(2.0 / fan_in)))
            offset += numel
        self.slots: tuple[Slot, ...] = tuple(slots)
        self.numel: int = offset
        self._by_name = {s.name: s for s in self.slots}

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.slots]

    def __len__(self) -> int:
        return len(self.slots)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-tensor views of a buffer ``(*lead, numel)``: shapes ``(*lead, *param.shape)``."""
        if flat.dim() < 1 or flat.shape[-1] != self.numel:
            raise ValueError(f"expected a buffer whose last dim is {self.numel}, got shape {tuple(flat.shape)}")
        lead = flat.shape[:-1]
        return {s.name: flat[..., s.offset : s.stop].view(*lead, *s.shape) for s in self.slots}

    def flatten(self, tensors: Mapping[str, torch.Tensor], *, argname: str, dtype: torch.dtype,
                device: torch.device | str = "cpu") -> torch.Tensor:
        """One flat buffer from per-tensor values keyed by name; checks names and shapes.

        Raises ``ValueError`` naming ``argname`` when a name is missing or unknown or a shape differs.
        """
        if not isinstance(tensors, Mapping):
            raise TypeError(f"{argname} must be a dict of tensors keyed by parameter name, got {type(tensors).__name__}")
        missing = [n for n in self.names if n not in tensors]
        extra = [n for n in tensors if n not in self._by_name]
        if missing or extra:
            raise ValueError(
                f"{argname} must have exactly the prunable tensors' names; missing {missing[:5]}, unexpected {extra[:5]}"
            )
        flat = torch.empty(self.numel, dtype=dtype, device=device)
        for s in self.slots:
            t = tensors[s.name]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{argname}[{s.name!r}] must be a tensor, got {type(t).__name__}")
            if dtype == torch.bool and t.dtype != torch.bool:
                raise TypeError(f"{argname}[{s.name!r}] must be a bool tensor (True = kept), got {t.dtype}")
            if t.shape != s.shape:
                raise ValueError(f"{argname}[{s.name!r}] has shape {tuple(t.shape)}, expected {tuple(s.shape)}")
            flat[s.offset : s.stop] = t.detach().reshape(-1).to(device=device, dtype=dtype)
        return flat

    def std_vector(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Flat float32 vector of each entry's sampling standard deviation."""
        out = torch.empty(self.numel, dtype=torch.float32, device=device)
        for s in self.slots:
            out[s.offset : s.stop] = s.std
        return out
