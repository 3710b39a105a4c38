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

* Layer types of other libraries or of the user: ``register_layer`` declares which of a type's
  tensors are prunable and their fan-in. Built in: Hugging Face GPT-2's ``Conv1D``, whose weight is
  stored ``(in, out)`` (``x @ W``), so ``fan_in = shape[0]``.

Biases, normalisation parameters, embeddings and every other parameter are not pruned by default
and keep the model's values during scoring.

**Models that carry masks.** ``torch.nn.utils.prune`` (and ``apply_masks``) turns ``weight`` into
a parameter ``weight_orig`` times a buffer ``weight_mask``, recomputed by a forward pre-hook. The
arena keeps the public name (``layer.weight``: masks, scores and files use it), binds the sampled
weights to ``weight_orig`` (the hook's product with ``weight_mask`` then changes nothing: the
sampled weights are already zero where the mask is), and ``start_mask`` reads the existing masks:
those entries start pruned and stay pruned.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import prune

__all__ = ["Slot", "Arena", "ParamSelector", "LayerRule", "register_layer", "default_prunable"]

#: Selects prunable tensors: parameter names, or a predicate ``(name, module, param) -> bool``
#: where ``name`` is the full (public) parameter name and ``module`` the module owning it.
ParamSelector = Iterable[str] | Callable[[str, nn.Module, nn.Parameter], bool]
#: ``fan_in(local_name, shape) -> int``: the inputs one output entry of the tensor sums over.
FanIn = Callable[[str, torch.Size], int]


def shape_fan_in(local_name: str, shape: torch.Size) -> int:
    """The default fan-in, ``shape[1] * prod(shape[2:])`` (PyTorch's ``(out, in, *kernel)`` layout)."""
    if len(shape) < 2:
        raise ValueError(
            f"a prunable tensor needs at least 2 dimensions for its fan-in, got shape {tuple(shape)} for {local_name!r}"
        )
    return int(shape[1]) * math.prod(int(s) for s in shape[2:])


@dataclass(frozen=True)
class LayerRule:
    """How a layer type is pruned: which of its own tensors by default, and their fan-in.

    Attributes:
        prunable: local parameter name (``"weight"``) -> pruned by default.
        fan_in: ``(local_name, shape) -> fan_in``; it sets the sampling spread ``sqrt(2 / fan_in)``.
    """

    prunable: Callable[[str], bool]
    fan_in: FanIn = shape_fan_in


_RULES: dict[type | str, LayerRule] = {}


def register_layer(
    layer: type | str, prunable: Iterable[str] | Callable[[str], bool] = ("weight",), fan_in: FanIn | None = None
) -> None:
    """Declares how NTK-SAP prunes a layer type (also subclasses; the most derived registration wins).

    Args:
        layer: the ``nn.Module`` subclass, or its ``"module.QualName"`` (for a class of a package that
            need not be imported, e.g. ``"transformers.pytorch_utils.Conv1D"``).
        prunable: the local names of its default prunable tensors, or a predicate on the local name.
        fan_in: ``(local_name, shape) -> int``; default ``shape[1] * prod(shape[2:])``.

    Example, a layer storing its weight as ``(in, out)``::

        register_layer(MyDense, prunable=("kernel",), fan_in=lambda name, shape: shape[0])
    """
    if not (isinstance(layer, str) or (isinstance(layer, type) and issubclass(layer, nn.Module))):
        raise TypeError(f"layer must be an nn.Module subclass or its 'module.QualName', got {layer!r}")
    if callable(prunable):
        is_prunable = prunable
    elif isinstance(prunable, str):
        raise TypeError("prunable must be a list of local tensor names or a predicate, not a single string")
    else:
        names = frozenset(prunable)
        is_prunable = names.__contains__
    if fan_in is not None and not callable(fan_in):
        raise TypeError(f"fan_in must be a callable (local_name, shape) -> int, got {type(fan_in).__name__}")
    _RULES[layer] = LayerRule(is_prunable, fan_in or shape_fan_in)


def layer_rule(module: nn.Module) -> LayerRule | None:
    """The registered rule of ``module``'s type or its nearest registered base class, or None."""
    for cls in type(module).__mro__:
        rule = _RULES.get(cls) or _RULES.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is not None:
            return rule
    return None


#: ``weight_ih_l0``, ``weight_hh_l1_reverse``, ``weight_hr_l0`` (LSTM projection); not ``bias_*``.
_RECURRENT_WEIGHT = re.compile(r"weight_(ih|hh|hr)_l\d+(_reverse)?")
for _layer in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear):
    register_layer(_layer)
register_layer(nn.MultiheadAttention, ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"))
register_layer(nn.RNNBase, lambda local: _RECURRENT_WEIGHT.fullmatch(local) is not None)
register_layer("transformers.pytorch_utils.Conv1D", fan_in=lambda local, shape: int(shape[0]))


def default_prunable(name: str, module: nn.Module, param: nn.Parameter) -> bool:
    """The default prunable set (module docstring): what ``register_layer`` declared for the type of
    ``module`` (the module owning the tensor; ``name`` its full public name, ``param`` unused)."""
    rule = layer_rule(module)
    return rule is not None and rule.prunable(name.rsplit(".", 1)[-1])


@dataclass(frozen=True)
class Slot:
    """One prunable tensor's place in the arena.

    ``name`` is the public name (``layer.weight``, also for a model carrying ``torch.nn.utils.prune``
    masks), ``param`` the parameter holding its values (``layer.weight_orig`` there, else ``name``)
    and ``mask`` the buffer of its existing mask (``layer.weight_mask``) or None. ``std =
    sqrt(2 / fan_in)`` is the Kaiming-normal (fan-in, ReLU gain) standard deviation of its sampled
    weights. ``shape`` is the tensor's shape, ``offset``/``numel`` its flat index range.
    """

    name: str
    shape: torch.Size
    offset: int
    numel: int
    fan_in: int
    std: float
    param: str
    mask: str | None

    @property
    def stop(self) -> int:
        return self.offset + self.numel


def _public_names(model: nn.Module) -> dict[str, tuple[str, str | None, nn.Module]]:
    """``{parameter path: (public name, mask buffer path or None, owning module)}`` for every parameter.

    A tensor reparametrised by ``torch.nn.utils.prune`` (``<t>_orig`` times ``<t>_mask``) is known by
    its public name ``<t>``.
    """
    out = {}
    for module_name, module in model.named_modules(remove_duplicate=True):
        prefix = f"{module_name}." if module_name else ""
        pruned = {
            hook._tensor_name
            for hook in module._forward_pre_hooks.values()
            if isinstance(hook, prune.BasePruningMethod)
        }
        for local, _ in module.named_parameters(recurse=False):
            base = local[: -len("_orig")] if local.endswith("_orig") else None
            if base in pruned:
                out[prefix + local] = (prefix + base, f"{prefix}{base}_mask", module)
            else:
                out[prefix + local] = (prefix + local, None, module)
    return out


class Arena:
    """Flat layout of a model's prunable tensors.

    Attributes:
        slots: one ``Slot`` per prunable tensor, in ``model.named_parameters()`` order.
        numel: total number ``N`` of prunable entries.
    """

    def __init__(self, model: nn.Module, params: ParamSelector | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        public = _public_names(model)
        named = {public[path][0]: (path, p) for path, p in model.named_parameters() if path in public}
        if params is None:
            selected = [n for n, (path, p) in named.items() if default_prunable(n, public[path][2], p)]
        elif callable(params):
            selected = [n for n, (path, p) in named.items() if params(n, public[path][2], p)]
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
                "projection, LSTM/GRU/RNN weight or registered layer type (ntksap_fast.register_layer) found; "
                "pass params= to name the tensors"
                if params is None
                else "params selected no parameter of the model"
            )
        slots, offset = [], 0
        for n in selected:
            path, p = named[n]
            _, mask, module = public[path]
            rule = layer_rule(module)
            local = n.rsplit(".", 1)[-1]
            try:
                fan_in = int((rule.fan_in if rule is not None else shape_fan_in)(local, p.shape))
            except ValueError as err:
                raise ValueError(
                    f"params: prunable tensor {n!r}: {err}; NTK-SAP samples weights from N(0, 2 / fan_in)"
                ) from err
            if fan_in < 1:
                raise ValueError(f"the fan-in of {n!r} must be >= 1, got {fan_in} (see register_layer)")
            slots.append(Slot(n, p.shape, offset, p.numel(), fan_in, math.sqrt(2.0 / fan_in), path, mask))
            offset += p.numel()
        self.slots: tuple[Slot, ...] = tuple(slots)
        self.numel: int = offset
        self._by_name = {s.name: s for s in self.slots}

    @property
    def params(self) -> list[str]:
        """The parameter paths holding the prunable values (``weight_orig`` where masks are applied)."""
        return [s.param for s in self.slots]

    def values(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``{public name: the model's parameter}`` (for a masked tensor its ``_orig``, unmasked)."""
        named = dict(model.named_parameters())
        return {s.name: named[s.param] for s in self.slots}

    def start_mask(self, model: nn.Module, device: torch.device | str = "cpu") -> torch.Tensor:
        """Flat bool ``(N,)``: False where the model already carries a ``torch.nn.utils.prune`` mask
        that prunes the entry, True elsewhere."""
        flat = torch.ones(self.numel, dtype=torch.bool, device=device)
        buffers = dict(model.named_buffers())
        for s in self.slots:
            if s.mask is not None:
                flat[s.offset : s.stop] = buffers[s.mask].detach().reshape(-1).to(device) != 0
        return flat

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

    def flatten(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        argname: str,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """One flat buffer from per-tensor values keyed by name; checks names and shapes.

        Raises ``ValueError`` naming ``argname`` when a name is missing or unknown or a shape differs.
        """
        if not isinstance(tensors, Mapping):
            raise TypeError(
                f"{argname} must be a dict of tensors keyed by parameter name, got {type(tensors).__name__}"
            )
        missing = [n for n in self.names if n not in tensors]
        extra = [n for n in tensors if n not in self._by_name]
        if missing or extra:
            raise ValueError(
                f"{argname} must have exactly the prunable tensors' names; missing {missing[:5]}, "
                f"unexpected {extra[:5]}"
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
