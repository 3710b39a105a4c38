"""Reports on masks: per-layer tables, layer-collapse warnings, density plots, NTK spectra.

Layer collapse rule: a layer is flagged when it keeps nothing (``kept == 0``) or its density is
below ``COLLAPSE_RATIO`` (1%) of the global density, e.g. under 0.05% of its weights at a global
density of 5%. Such a layer almost cuts the network's signal path.

NTK spectrum: ``ntk_eigenvalues`` and the other NTK computations live in
``ntksap_fast.analysis.ntk`` (re-exported here); ``plot_ntk_spectrum`` draws them.
Plots are ``matplotlib.figure.Figure`` objects built without pyplot (matplotlib is imported only
when a plot is drawn; the user's backend and pyplot state are never touched): the functions return
the figure and write it to a file when given a path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..engine.engine import preserved_state
from ..io.export import export_pruned
from ..io.masks import _check_masks
from ..options import resolve_input_shape
from .ntk import check_ntk_size, empirical_ntk, ntk_eigenvalues
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
