"""Channel units: the channels that must be pruned together, from Torch-Pruning's ``DependencyGraph``.

Removing output channel ``j`` of a convolution also removes what consumes it: input channel ``j``
of the next convolution, channel ``j`` of the BatchNorm between them, channel ``j`` of every
tensor added to it by a residual connection (and of the layers producing those), the matching
input features of a ``Linear`` after a flatten, the channel of a depthwise convolution and what
follows it, and its offset in a concatenation. Torch-Pruning (PyPI ``torch-pruning``) traces the
model once and groups these coupled slices (``DependencyGraph.get_all_groups``); we do not write
a dependency graph of our own. A **unit** is one channel of one group (one root index): the out
rows and in columns of every Conv/Linear weight in the group that carry that channel.

A unit's slices are plain masks in the ``torch.nn.utils.prune`` convention: a removed unit is
False in its whole filter (``weight[j]``) and in its consumers' input slices (``weight[:, j]``,
or the flattened features of channel ``j``). The masked model then never reads the removed
channel's values (whatever its BatchNorm makes of a zero filter), so the physically smaller model
of ``ntksap_fast.io.export`` computes the same function.

**What is never a unit** (the group is *frozen*: its channels stay, and why is recorded):

* channels that reach the model's output (classifier features) or come from its input;
* a group holding a layer whose channels cannot be cut exactly: a Conv/Linear weight that is not
  prunable (not in the arena), a grouped (not depthwise) or transposed convolution, LayerNorm,
  GroupNorm, multi-head attention, embeddings, recurrent layers, bare parameters, slices, and
  layers Torch-Pruning does not know (custom pruners);
* a group passing through an operation that mixes channels, which Torch-Pruning would treat as
  element-wise: a matrix product, a functional convolution or normalisation, softmax or a
  reduction over the channel dimension, a permutation, gathering or indexing; and an element-wise
  operation with an operand outside the traced graph (the model input, a buffer).

So a model's own custom layers never get a wrong unit: at worst their channels stay.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from ..engine.arena import Arena, Slot
from ..io.masks import unmasked_copy

__all__ = ["ChannelUnits", "channel_units", "working_copy"]

_OP = tp.ops.OPTYPE
#: Group members without prunable weights whose channels are cut exactly (one value per channel).
_PER_CHANNEL = (_OP.BN, _OP.PRELU, _OP.IN)
#: Operations Torch-Pruning maps channel to channel by itself (index mapping of cat/split/reshape).
_MAPPED = (_OP.CONCAT, _OP.SPLIT, _OP.RESHAPE)
#: Autograd nodes that mix channels, which Torch-Pruning would take for element-wise ones.
_MIXING = re.compile(
    r"mm|matmul|einsum|linear|convolution|norm|attention|softmax|permute|transpose|gather|scatter"
    r"|index|sort|topk|cum|fft|roll|flip|embedding|unfold|pixel|shuffle|take|where",
    re.IGNORECASE,
)


@dataclass
class ChannelUnits:
    """The channel units of a model over its arena.

    Attributes:
        graph: the ``torch_pruning.DependencyGraph`` traced on the working copy (for the surgery).
        roots: per group, the name of its root module (a Conv/Linear whose output channels it holds).
        group_of: ``(U,)`` int64, each unit's group.
        root_index: ``(U,)`` int64, each unit's output channel in its group's root module.
        sides: per arena slot with units: ``(slot, rows, cols, macs)``: ``rows`` ``(out,)`` /
            ``cols`` ``(in,)`` int64 unit of each output row / input column (``U`` = none), or None;
            ``macs`` the multiply-adds per weight entry per sample (output positions).
        frozen: root module name -> why that group's channels are never pruned.
    """

    graph: tp.DependencyGraph | None
    roots: list[str]
    group_of: torch.Tensor
    root_index: torch.Tensor
    sides: list[tuple[Slot, torch.Tensor | None, torch.Tensor | None, int]]
    frozen: dict[str, str]

    @property
    def count(self) -> int:
        """Number of units ``U``."""
        return int(self.group_of.numel())

    def units_of_group(self) -> torch.Tensor:
        """``(groups,)`` int64: how many units each group has."""
        return torch.bincount(self.group_of, minlength=len(self.roots))

    def to(self, device: torch.device | str) -> ChannelUnits:
        """The same units with their index tensors on ``device``."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return ChannelUnits(
            self.graph,
            self.roots,
            self.group_of.to(device),
            self.root_index.to(device),
            [(s, move(r), move(c), m) for s, r, c, m in self.sides],
            self.frozen,
        )

    @staticmethod
    def grid(flat: torch.Tensor, slot: Slot) -> torch.Tensor:
        """A view of a slot's entries of a flat ``(N,)`` buffer as ``(out, in, kernel)``."""
        return flat[slot.offset : slot.stop].view(slot.shape[0], slot.shape[1] if len(slot.shape) > 1 else 1, -1)

    def sums(self, values: torch.Tensor, per_entry: Callable[[int], float] | None = None) -> torch.Tensor:
        """``(U,)`` float64: the sum of the flat ``(N,)`` ``values`` over each unit's entries (each
        times ``per_entry(macs)`` of its tensor when given)."""
        out = torch.zeros(self.count + 1, dtype=torch.float64, device=self.group_of.device)
        for slot, rows, cols, macs in self.sides:
            grid = self.grid(values, slot).to(torch.float64)
            if per_entry is not None:
                grid = grid * per_entry(macs)
            if rows is not None:
                out.index_add_(0, rows, grid.sum((1, 2)))
            if cols is not None:
                out.index_add_(0, cols, grid.sum((0, 2)))
        return out[: self.count]

    def kept(self, counts: list[torch.Tensor], keep: torch.Tensor) -> int:
        """Entries left in the unit slots when only the units with ``keep`` (``(U,)`` bool) stay;
        ``counts`` holds each side's unpruned entries per (out, in) (``grid(mask).sum(-1)``)."""
        keep = torch.cat([keep, keep.new_ones(1)]).to(torch.float64)
        total = 0.0
        for (_slot, rows, cols, _), count in zip(self.sides, counts):
            row = keep[rows] if rows is not None else keep.new_ones(count.shape[0])
            col = keep[cols] if cols is not None else keep.new_ones(count.shape[1])
            total += float(row @ count @ col)
        return round(total)

    def cut_(self, mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Sets the flat bool ``mask`` False on every slice of the units without ``keep``; in place."""
        keep = torch.cat([keep, keep.new_ones(1)])
        for slot, rows, cols, _ in self.sides:
            grid = self.grid(mask, slot)
            if rows is not None:
                grid &= keep[rows].view(-1, 1, 1)
            if cols is not None:
                grid &= keep[cols].view(1, -1, 1)
        return mask


def working_copy(model: nn.Module) -> nn.Module:
    """A deep copy with plain weights (``torch.nn.utils.prune`` reparametrisations made permanent:
    ``weight = weight_orig * weight_mask``) and every parameter requiring grad (for the trace)."""
    work = unmasked_copy(model)
    for p in work.parameters():
        p.requires_grad_(True)
    return work


def _signed_dims(dims, ndim: int) -> list[int]:
    """Dims as saved by autograd (negative ones as unsigned 64-bit) in ``[0, ndim)``."""
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    return [(d - 2**64 if d >= 2**63 else d) % ndim for d in dims]


def _mixes_channels(grad_fn, channel_dim: int) -> str | None:
    """Why an autograd node Torch-Pruning calls element-wise is not channel-wise, or None."""
    name = grad_fn.name()
    operands = getattr(grad_fn, "next_functions", ())
    if operands and all(f is not None and type(f).__name__ == "AccumulateGrad" for f, _ in operands):
        return None  # a view of a parameter (a Linear's weight.t()): not on the activations' channels
    if any(f is None for f, _ in operands):
        return f"{name} has an operand outside the traced graph (the model input or a buffer)"
    if _MIXING.search(name):
        return f"{name} mixes channels"
    if hasattr(grad_fn, "_saved_dim"):
        sizes = getattr(grad_fn, "_saved_self_sym_sizes", None)
        if sizes is None:
            return f"{name} works along a dimension of unknown rank"
        ndim = len(sizes)
        if channel_dim % ndim in _signed_dims(grad_fn._saved_dim, ndim):
            return f"{name} works along the channel dimension"
    elif re.match(r"(Mean|Sum|Prod|Max|Min|Amax|Amin|Std|Var|Norm|LogSumExp)Backward", name):
        return f"{name} reduces over every dimension"
    return None


def _inner_nodes(result, inputs: set, limit: int = 8) -> set:
    """The autograd nodes a Conv/Linear call made between its inputs' nodes and ``result`` (a
    ``Linear`` on a sequence is view, addmm, view): its own arithmetic, not channel mixing."""
    found, frontier = set(), [result]
    for _ in range(limit):
        frontier = [
            f
            for node in frontier
            for f, _ in getattr(node, "next_functions", ())
            if f is not None and f not in inputs and f not in found and type(f).__name__ != "AccumulateGrad"
        ]
        found.update(frontier)
    return found


def _trace(
    work: nn.Module, input_shape: Sequence[int], output: Callable | None
) -> tuple[tp.DependencyGraph, set, dict[str, int], set[nn.Module], set]:
    """Traces ``work`` with one random input: the graph, the output's autograd nodes, the MACs per
    weight entry of each Conv/Linear, the Linear layers that act on token sequences (channel =
    last dimension) and the autograd nodes inside Conv/Linear calls. ``ValueError`` naming the
    layer where the forward fails."""
    param = next(work.parameters())
    dtype = param.dtype if param.is_floating_point() else torch.float32
    example = torch.randn(1, *input_shape, device=param.device, dtype=dtype)
    macs, tokens, internal, stack, outputs = {}, set(), set(), [], []

    def enter(module, inputs):
        stack.append(module)

    def leave(module, inputs, result):
        stack.pop()
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and isinstance(result, torch.Tensor):
            per_channel = result.shape[-1] if isinstance(module, nn.Linear) else result.shape[1]
            macs[module] = max(result.numel() // max(per_channel, 1), 1)
            if isinstance(module, nn.Linear) and result.dim() >= 3:
                tokens.add(module)
            internal.update(_inner_nodes(result.grad_fn, {x.grad_fn for x in inputs if isinstance(x, torch.Tensor)}))

    def forward(model: nn.Module, x: torch.Tensor):
        out = model(x)
        out = output(out) if output is not None else out
        outputs.extend(t for t in tp.utils.flatten_as_list(out) if isinstance(t, torch.Tensor))
        return out

    names = {m: n for n, m in work.named_modules()}
    hooks = [h for m in work.modules() for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(work, example, forward_fn=forward, verbose=False)
    except Exception as err:  # any failure of the user's forward or of the tracer
        where = f"layer {names.get(stack[-1])!r} ({type(stack[-1]).__name__})" if stack else "the model's own forward"
        raise ValueError(
            f"granularity='channel': Torch-Pruning cannot trace the model; {where} raised {type(err).__name__}: {err}"
        ) from err
    finally:
        for h in hooks:
            h.remove()
    ends = {t.grad_fn for t in outputs if t.grad_fn is not None}
    return graph, ends, {names[m] + ".weight": v for m, v in macs.items()}, tokens, internal


def _depthwise(module: nn.Module) -> bool:
    return module.groups > 1 and module.groups == module.in_channels == module.out_channels


def channel_units(
    work: nn.Module, arena: Arena, input_shape: Sequence[int], output: Callable | None = None
) -> ChannelUnits:
    """The channel units of ``work`` (a ``working_copy``: it is traced in eval mode) over ``arena``.

    ``arena``'s slot names must be ``work``'s parameter names. Raises ``ValueError`` naming the
    layer when Torch-Pruning cannot trace the model.
    """
    graph, ends, macs, tokens, internal = _trace(work, input_shape, output)
    names = {m: n for n, m in work.named_modules()}
    slots = {s.name: s for s in arena.slots}
    rows: dict[str, torch.Tensor] = {}
    cols: dict[str, torch.Tensor] = {}
    roots, group_of, root_index, frozen = [], [], [], {}
    for group in graph.get_all_groups():
        root = names[group[0].dep.target.module]
        plan, why = _group_plan(graph, group, names, slots, ends, tokens, internal)
        if why is None:
            tables = (rows, cols)
            taken = [n for n, side, idx, _ in plan if n in tables[side] and (tables[side][n][idx] >= 0).any()]
            why = f"its slices of {taken[0]!r} belong to another group" if taken else None
        if why is not None:
            frozen[root] = why
            continue
        first = len(group_of)
        channels = sorted({r for _, _, _, rs in plan for r in rs.tolist()})
        unit_of = {r: first + i for i, r in enumerate(channels)}
        group_of += [len(roots)] * len(channels)
        root_index += channels
        roots.append(root)
        for n, side, idx, rs in plan:
            table = (rows, cols)[side]
            if n not in table:
                table[n] = torch.full((slots[n].shape[side],), -1, dtype=torch.int64)
            table[n][idx] = torch.tensor([unit_of[r] for r in rs.tolist()], dtype=torch.int64)
    count = len(group_of)

    def pad(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else torch.where(t < 0, count, t)

    sides = [
        (s, pad(rows.get(s.name)), pad(cols.get(s.name)), macs.get(s.name, 1))
        for s in arena.slots
        if s.name in rows or s.name in cols
    ]
    return ChannelUnits(
        graph,
        roots,
        torch.tensor(group_of, dtype=torch.int64),
        torch.tensor(root_index, dtype=torch.int64),
        sides,
        frozen,
    )


def _group_plan(graph: tp.DependencyGraph, group, names: dict, slots: dict, ends: set, tokens: set, internal: set):
    """``([(slot name, side, indices, root indices)], None)`` for a group whose channels can be cut
    (side 0: output rows, 1: input columns), else ``(None, why)``."""
    plan = []
    channel_dim = -1 if any(it.dep.target.module in tokens for it in group.items) else 1
    for item in group.items:
        node, handler = item.dep.target, item.dep.handler
        module = node.module
        name = names.get(module, str(module))
        out_side = graph.is_out_channel_pruning_fn(handler)
        if node.type == _OP.OUTPUT or (out_side and node.grad_fn in ends):
            return None, f"its channels are the model's output (at {name!r})"
        if node.type in (_OP.CONV, _OP.DEPTHWISE_CONV, _OP.LINEAR):
            slot = f"{name}.weight"
            if slot not in slots:
                return None, f"{name!r} has a weight that is not prunable"
            if isinstance(module, nn.modules.conv._ConvNd):
                if module.transposed:
                    return None, f"{name!r} is a transposed convolution"
                if module.groups > 1 and not _depthwise(module):
                    return None, f"{name!r} is a grouped convolution (groups={module.groups})"
            side = 0 if out_side or node.type == _OP.DEPTHWISE_CONV else 1  # 0: output rows, 1: input columns
            plan.append(
                (
                    slot,
                    side,
                    torch.tensor(item.idxs, dtype=torch.int64),
                    torch.tensor(item.root_idxs, dtype=torch.int64),
                )
            )
        elif node.type == _OP.ELEMENTWISE:
            inside = node.grad_fn is None or node.grad_fn in internal
            why = None if inside else _mixes_channels(node.grad_fn, channel_dim)
            if why is not None:
                return None, why
        elif node.type not in _PER_CHANNEL + _MAPPED:
            return None, f"it holds {name!r} ({type(module).__name__}), whose channels are not cut exactly"
    if not any(side == 1 for _, side, _, _ in plan):
        return None, "no prunable layer reads its channels"
    return plan, None
