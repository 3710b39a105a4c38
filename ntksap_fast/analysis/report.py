"""Reports on masks: per-layer tables, layer-collapse warnings, density plots, NTK spectra.

Layer collapse rule: a layer is flagged when it keeps nothing (``kept == 0``) or its density is
below ``COLLAPSE_RATIO`` (1%) of the global density, e.g. under 0.05% of its weights at a global
density of 5%. Such a layer almost cuts the network's signal path.

NTK spectrum: the empirical NTK of a batch ``X`` of ``B`` inputs is ``J J^T`` with ``J`` the
Jacobian of the flattened outputs ``f(X)`` (``B * O`` entries, rows ordered sample-major: row
``a * O + i`` is output ``i`` of sample ``a``; outputs are *flattened*, not summed) with respect to
the prunable weights at the model's *current* values. For a pruned model the pruned weights are
set to zero and their Jacobian columns dropped (they are no longer trainable). The model runs with
dropout off and BatchNorm normalising with the batch's own statistics, on a copy.
Plots are ``matplotlib.figure.Figure`` objects built without pyplot (matplotlib is imported only
when a plot is drawn; the user's backend and pyplot state are never touched): the functions return
the figure and write it to a file when given a path.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.utils import prune

from ..engine.arena import Arena, ParamSelector
from ..engine.engine import preserved_state
from ..io.export import export_pruned
from ..io.masks import _check_masks
from ..options import resolve_input_shape
from .stability import HOW_TO_READ

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "stability_table",
    "channel_rows",
    "model_flops",
    "channel_table",
    "COLLAPSE_RATIO",
    "layer_rows",
    "collapsed_layers",
    "collapse_warning",
    "layer_table",
    "markdown_report",
    "plot_layer_density",
    "check_ntk_size",
    "empirical_ntk",
    "ntk_eigenvalues",
    "plot_ntk_spectrum",
]

#: A layer whose density is below this fraction of the global density is reported as collapsed.
COLLAPSE_RATIO = 0.01


def layer_rows(masks: Mapping[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], int, int]]:
    """``(name, shape, kept, total)`` per mask, in the dict's order."""
    _check_masks(masks)
    if not masks:
        raise ValueError("masks is empty")
    return [(n, tuple(m.shape), int(m.sum()), m.numel()) for n, m in masks.items()]


def _totals(rows) -> tuple[int, int]:
    return sum(r[2] for r in rows), sum(r[3] for r in rows)


def collapsed_layers(masks: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of layers with ``kept == 0`` or density ``< COLLAPSE_RATIO * global density``."""
    rows = layer_rows(masks)
    kept_all, total_all = _totals(rows)
    limit = COLLAPSE_RATIO * kept_all / total_all
    return [n for n, _, kept, total in rows if kept == 0 or kept / total < limit]


def layer_table(masks: Mapping[str, torch.Tensor]) -> str:
    """Aligned text table: name, shape, kept, total, density per layer, then the total row."""
    rows = layer_rows(masks)
    flagged = set(collapsed_layers(masks))
    width = max(len("layer"), *(len(r[0]) for r in rows))
    lines = [f"{'layer':<{width}}  {'shape':>18}  {'kept':>10}  {'total':>10}  {'density':>8}"]
    for name, shape, kept, total in rows:
        flag = "  <- collapsed" if name in flagged else ""
        lines.append(f"{name:<{width}}  {str(shape):>18}  {kept:>10}  {total:>10}  {kept / total:>8.4f}{flag}")
    kept_all, total_all = _totals(rows)
    lines.append(f"{'total':<{width}}  {'':>18}  {kept_all:>10}  {total_all:>10}  {kept_all / total_all:>8.4f}")
    return "\n".join(lines)


def collapse_warning(masks: Mapping[str, torch.Tensor]) -> str | None:
    """One-line warning listing collapsed layers, or None when there are none."""
    flagged = collapsed_layers(masks)
    if not flagged:
        return None
    return (
        f"warning: layer collapse in {len(flagged)} layer(s) (kept == 0 or density < "
        f"{COLLAPSE_RATIO:g} x global density): {', '.join(flagged)}"
    )


def markdown_report(
    masks: Mapping[str, torch.Tensor],
    settings: Mapping[str, object],
    seconds: float,
    *,
    title: str = "NTK-SAP pruning report",
    channels: str | None = None,
) -> str:
    """Markdown report: settings, per-layer table, totals, timing and layer-collapse warnings.

    Args:
        masks: ``{name: bool tensor}`` (True = kept).
        settings: what produced the masks (model, method, density, ...), shown as a table.
        seconds: wall time of the prune.
        channels: a ``channel_table`` (channel masks), shown in a section "Channels and FLOPs".
    """
    rows = layer_rows(masks)
    flagged = set(collapsed_layers(masks))
    kept_all, total_all = _totals(rows)
    out = [f"# {title}", "", "## Settings", "", "| setting | value |", "|---|---|"]
    out += [f"| {k} | `{v}` |" for k, v in settings.items()]
    out += ["", "## Layers", "", "| layer | shape | kept | total | density |", "|---|---|---:|---:|---:|"]
    for name, shape, kept, total in rows:
        mark = " **collapsed**" if name in flagged else ""
        out.append(f"| `{name}` | {'x'.join(map(str, shape))} | {kept} | {total} | {kept / total:.4f}{mark} |")
    out.append(f"| **total** | | **{kept_all}** | **{total_all}** | **{kept_all / total_all:.4f}** |")
    out += [
        "",
        "## Totals",
        "",
        f"- kept {kept_all} of {total_all} prunable weights "
        f"(density {kept_all / total_all:.6f}) in {len(rows)} tensors",
        f"- time: {seconds:.2f} s",
        "",
        "## Layer collapse",
        "",
    ]
    warning = collapse_warning(masks)
    out.append(
        warning
        if warning
        else f"No layer collapsed (rule: kept == 0 or density < {COLLAPSE_RATIO:g} x global density)."
    )
    if channels is not None:
        out += ["", "## Channels and FLOPs", "", "```", channels, "```"]
    rounds = getattr(masks, "metadata", {}).get("rounds")
    if rounds:
        out += [
            "",
            "## Stability",
            "",
            HOW_TO_READ,
            "",
            "| round | density | draws | split-half overlap | relative SE |",
            "|---:|---:|---:|---:|---:|",
        ]
        out += [
            f"| {r['round'] + 1} | {r['density']:.4f} | {r['draws']} | {r['split_half_overlap']:.3f} | "
            f"{r['relative_se']:.3f} |"
            for r in rounds
        ]
    return "\n".join(out) + "\n"


def stability_table(rounds: Sequence[Mapping[str, object]]) -> str:
    """Plain-text table of per-round stability figures (``masks.metadata["rounds"]``)."""
    lines = [f"{'round':>5}  {'density':>8}  {'draws':>5}  {'split-half overlap':>18}  {'relative SE':>11}"]
    lines += [
        f"{r['round'] + 1:>5}  {r['density']:>8.4f}  {r['draws']:>5}  {r['split_half_overlap']:>18.3f}  "
        f"{r['relative_se']:>11.3f}"
        for r in rounds
    ]
    return "\n".join(lines + [HOW_TO_READ])


def channel_rows(masks: Mapping[str, torch.Tensor]) -> list[tuple[str, int, int, int, int]]:
    """``(name, kept outputs, outputs, kept inputs, inputs)`` per mask: a channel is kept while any of
    its entries is (output ``j``: ``mask[j]``; input ``i``: ``mask[:, i]``)."""
    rows = []
    for name, _, _, _ in layer_rows(masks):
        m = masks[name]
        inputs = m.transpose(0, 1).reshape(m.shape[1], -1).any(1) if m.dim() > 1 else m.new_ones(1)
        rows.append((name, int(m.reshape(m.shape[0], -1).any(1).sum()), m.shape[0], int(inputs.sum()), len(inputs)))
    return rows


def model_flops(model: nn.Module, input_shape: Sequence[int] | None = None) -> int:
    """FLOPs of one forward of one input ``(1, *input_shape)`` in eval mode, as
    ``torch.utils.flop_counter.FlopCounterMode`` counts them (2 per multiply-add of convolutions and
    matrix products; element-wise work is not counted). ``model`` is not modified."""
    from torch.utils.flop_counter import FlopCounterMode

    shape = resolve_input_shape(model, input_shape)
    first = next(model.parameters())
    counter = FlopCounterMode(display=False)
    with preserved_state(model), torch.no_grad(), counter:
        model(torch.zeros(1, *shape, device=first.device, dtype=first.dtype))
    return counter.get_total_flops()


def channel_table(
    model: nn.Module, masks: Mapping[str, torch.Tensor], input_shape: Sequence[int] | None = None, *, output=None
) -> str:
    """Each layer's kept output and input channels, then the model's FLOPs per input before and after
    (``model_flops`` of ``model`` and of ``export_pruned(model, masks)``, channel masks only)."""
    if input_shape is None and getattr(masks, "metadata", {}).get("input_shape") is not None:
        input_shape = tuple(masks.metadata["input_shape"])
    rows = channel_rows(masks)
    width = max(len("layer"), *(len(r[0]) for r in rows))
    lines = [f"{'layer':<{width}}  {'out kept':>9}  {'out':>6}  {'in kept':>9}  {'in':>6}"]
    lines += [f"{n:<{width}}  {ko:>9}  {o:>6}  {ki:>9}  {i:>6}" for n, ko, o, ki, i in rows]
    before = model_flops(model, input_shape)
    after = model_flops(export_pruned(model, masks, input_shape, output=output), input_shape)
    lines.append(f"FLOPs per input: {before:,} dense, {after:,} exported ({after / before:.3f} of dense)")
    return "\n".join(lines)


def _figure(figsize: tuple[float, float]) -> Figure:
    """A new ``matplotlib.figure.Figure`` (no pyplot, no backend change)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install matplotlib (or 'ntksap_fast[plot]')") from err
    return Figure(figsize=figsize)


def _finish(fig: Figure, path: str | os.PathLike | None) -> Figure:
    """Lays ``fig`` out, writes it to ``path`` (format from the extension, 120 dpi) if given; returns it."""
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_layer_density(
    masks: Mapping[str, torch.Tensor], path: str | os.PathLike | None = None, *, title: str | None = None
) -> Figure:
    """Bar chart of each layer's density (collapsed layers red), global density as a dashed line.

    Returns the ``matplotlib.figure.Figure`` (one axes, one bar per mask in the dict's order) and
    writes it to ``path`` when given (e.g. ``"density.png"``; the format follows the extension).
    """
    rows = layer_rows(masks)
    flagged = set(collapsed_layers(masks))
    kept_all, total_all = _totals(rows)
    fig = _figure((max(6.0, 0.25 * len(rows) + 2), 4.5))
    ax = fig.subplots()
    colors = ["tab:red" if r[0] in flagged else "tab:blue" for r in rows]
    ax.bar(range(len(rows)), [r[2] / r[3] for r in rows], color=colors)
    ax.axhline(
        kept_all / total_all, color="k", linestyle="--", linewidth=1, label=f"global density {kept_all / total_all:.4f}"
    )
    ax.set_xticks(range(len(rows)), [r[0] for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("density (kept / total)")
    ax.set_title(title or "Per-layer density (red: collapsed)")
    ax.legend()
    return _finish(fig, path)


def _limit_error(what: str, entries: int, limit: int) -> ValueError:
    return ValueError(
        f"the Jacobian has {what} = {entries} entries, above max_jacobian_entries={limit}; "
        "use a smaller batch or model, or raise the limit"
    )


def _copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also of a model carrying ``torch.nn.utils.prune`` masks: their
    computed ``weight`` attributes are not graph leaves, which deepcopy refuses; the copy gets them
    detached (its pre-hooks recompute them) and ``model``'s own are put back."""
    computed = [
        (m, hook._tensor_name)
        for m in model.modules()
        for hook in m._forward_pre_hooks.values()
        if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name in m.__dict__
    ]
    saved = [(m, name, m.__dict__[name]) for m, name in computed]
    try:
        for m, name, value in saved:
            m.__dict__[name] = value.detach()
        return copy.deepcopy(model)
    finally:
        for m, name, value in saved:
            m.__dict__[name] = value


def check_ntk_size(
    model: nn.Module,
    *,
    input_shape: Sequence[int] | None = None,
    batch_size: int = 8,
    params: ParamSelector | None = None,
    max_jacobian_entries: int = 10**8,
) -> int:
    """Raises the ``ValueError`` that ``ntk_eigenvalues`` would raise for its size limit, cheaply.

    Checks ``batch_size * P`` first (``P`` prunable weights, no forward), then
    ``batch_size * O * P`` with ``O`` from a no-grad forward of one zero input on a copy in eval
    mode (``model`` is not touched). Returns the number of Jacobian entries ``batch_size * O * P``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    limit = int(max_jacobian_entries)
    arena = Arena(model, params)
    if batch_size * arena.numel > limit:
        raise _limit_error("at least batch * params", batch_size * arena.numel, limit)
    shape = resolve_input_shape(model, input_shape)
    work = _copy(model).eval()
    first = next(work.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    with torch.no_grad():
        outputs = work(torch.zeros(1, *shape, device=device, dtype=dtype)).numel()
    entries = batch_size * outputs * arena.numel
    if entries > limit:
        raise _limit_error("batch * outputs * params", entries, limit)
    return entries


def empirical_ntk(
    model: nn.Module,
    inputs: torch.Tensor,
    masks: Mapping[str, torch.Tensor] | None = None,
    *,
    params: ParamSelector | None = None,
    max_jacobian_entries: int = 10**8,
) -> torch.Tensor:
    """Empirical NTK ``J J^T`` over the prunable weights: float64 ``(B * O, B * O)``.

    ``inputs``: ``(B, *input_shape)``; ``O`` outputs per sample (flattened). ``masks`` zeroes
    pruned weights and drops their Jacobian columns. Raises ``ValueError`` when
    ``B * O * P`` (``P`` prunable weights) exceeds ``max_jacobian_entries``. ``model`` is not modified.
    """
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 1:
        raise TypeError(f"inputs must be a tensor of shape (B, *input_shape), got {type(inputs).__name__}")
    arena = Arena(model, params)
    limit = int(max_jacobian_entries)
    if inputs.shape[0] * arena.numel > limit:
        raise _limit_error("at least batch * params", inputs.shape[0] * arena.numel, limit)
    work = _copy(model).eval()
    for m in work.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    weights = list(arena.values(work).values())  # weight_orig where the model carries masks
    for p in work.parameters():
        p.requires_grad_(False)
    keep = arena.start_mask(work)
    if masks is not None:
        keep &= arena.flatten(masks, argname="masks", dtype=torch.bool)
    with torch.no_grad():
        for w, k in zip(weights, arena.views(keep).values()):
            w.mul_(k.to(w.device, w.dtype))
    keep_cols = keep.to(weights[0].device, weights[0].dtype)
    for w in weights:
        w.requires_grad_(True)
    out = work(inputs.to(weights[0].device, weights[0].dtype)).reshape(-1)
    if out.numel() * arena.numel > limit:
        raise _limit_error("batch * outputs * params", out.numel() * arena.numel, limit)
    jac = torch.empty(out.numel(), arena.numel, dtype=out.dtype, device=out.device)
    for r in range(out.numel()):
        grads = torch.autograd.grad(
            out[r], weights, retain_graph=r + 1 < out.numel(), allow_unused=True, materialize_grads=True
        )
        jac[r] = torch.cat([g.reshape(-1) for g in grads]) * keep_cols
    jac = jac.double()
    return jac @ jac.T


def ntk_eigenvalues(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    batch_size: int = 8,
    seed: int = 0,
    params: ParamSelector | None = None,
    max_jacobian_entries: int = 10**8,
) -> torch.Tensor:
    """Eigenvalues (float64 ``(B * O,)``, descending) of the empirical NTK on ``batch_size``
    standard-normal inputs drawn with ``seed`` (same seed, same inputs: dense and pruned compare).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    shape = resolve_input_shape(model, input_shape)
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch_size, *shape, generator=gen)
    ntk = empirical_ntk(model, inputs, masks, params=params, max_jacobian_entries=max_jacobian_entries)
    return torch.linalg.eigvalsh(ntk).flip(0)


def plot_ntk_spectrum(
    dense: torch.Tensor, pruned: torch.Tensor, path: str | os.PathLike | None = None, *, title: str | None = None
) -> Figure:
    """Both spectra (1-D eigenvalue tensors), descending, on one log-scale axes.

    Eigenvalues <= 0 (numerical zeros) are clipped to 1e-12 times the largest dense eigenvalue.
    Returns the ``matplotlib.figure.Figure`` and writes it to ``path`` when given.
    """
    floor = 1e-12 * float(dense.max().clamp_min(1e-300))
    fig = _figure((6, 4))
    ax = fig.subplots()
    for eig, label in ((dense, "dense"), (pruned, "pruned")):
        vals = eig.detach().double().cpu().sort(descending=True).values.clamp_min(floor)
        ax.plot(range(1, len(vals) + 1), vals.numpy(), marker=".", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("index")
    ax.set_ylabel("NTK eigenvalue")
    ax.set_title(title or "Empirical NTK spectrum")
    ax.legend()
    return _finish(fig, path)
