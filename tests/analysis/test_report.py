"""Reports: tables, collapse rule, markdown, plots, channel tables and FLOPs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from ntksap_fast.analysis.report import (
    channel_table,
    collapsed_layers,
    layer_table,
    markdown_report,
    model_flops,
    plot_layer_density,
    plot_ntk_spectrum,
)
from ntksap_fast.io.masks import Masks

PNG = b"\x89PNG\r\n\x1a\n"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def example_masks() -> dict[str, torch.Tensor]:
    """Global density 0.5; 'c' keeps 0, 'd' keeps 1 of 1000 (0.001 < 0.01 * global)."""
    d = torch.zeros(1000, dtype=torch.bool)
    d[:1] = True
    a, b = torch.ones(400, dtype=torch.bool), torch.ones(600, dtype=torch.bool)
    c = torch.zeros(10, 2, dtype=torch.bool)
    keep = {"a.weight": a, "b.weight": b, "c.weight": c, "d.weight": d}
    e = torch.zeros(100, dtype=torch.bool)
    e[:40] = True  # density 0.4: fine
    keep["e.weight"] = e
    return keep


def test_collapse_rule_and_table():
    masks = example_masks()
    assert collapsed_layers(masks) == ["c.weight", "d.weight"]
    table = layer_table(masks)
    lines = table.splitlines()
    assert lines[0].split() == ["layer", "shape", "kept", "total", "density"]
    assert "c.weight" in lines[3] and "(10, 2)" in lines[3] and lines[3].endswith("<- collapsed")
    assert lines[-1].split() == ["total", "1041", "2120", f"{1041 / 2120:.4f}"]
    assert "collapsed" not in lines[5]


def test_markdown_report():
    text = markdown_report(example_masks(), {"model": "toy", "density": 0.5}, 1.25)
    assert "| model | `toy` |" in text
    assert "| layer | shape | kept | total | density |" in text
    assert "| `c.weight` | 10x2 | 0 | 20 | 0.0000 **collapsed** |" in text
    assert "**1041**" in text and "time: 1.25 s" in text
    assert "warning: layer collapse in 2 layer(s)" in text and "c.weight, d.weight" in text


def test_plots_return_figures_and_write_png(tmp_path):
    from matplotlib.figure import Figure

    masks = example_masks()
    fig = plot_layer_density(masks, tmp_path / "density.png")
    assert (tmp_path / "density.png").read_bytes()[:8] == PNG
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    heights = [bar.get_height() for bar in fig.axes[0].patches]
    assert heights == pytest.approx([int(m.sum()) / m.numel() for m in masks.values()])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == list(masks)
    assert isinstance(plot_layer_density(masks), Figure)  # no path: nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["density.png"]
    dense = torch.tensor([10.0, 3.0, 1.0, 0.0])
    spectrum = plot_ntk_spectrum(dense, dense / 4, tmp_path / "spectrum.png")
    assert (tmp_path / "spectrum.png").read_bytes()[:8] == PNG
    lines = spectrum.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["dense", "pruned"]
    assert list(lines[1].get_ydata()) == pytest.approx([2.5, 0.75, 0.25, 1e-11])  # 0 clipped to 1e-12 * 10


def test_plots_leave_the_users_matplotlib_alone(tmp_path):
    """The user's backend stays, pyplot is never imported (a fresh process sees exactly that)."""
    script = f"""
import sys, matplotlib, torch
matplotlib.use("svg")
from ntksap_fast.analysis.report import plot_layer_density, plot_ntk_spectrum
plot_layer_density({{"w": torch.tensor([True, False])}}, {str(tmp_path / "d.png")!r})
plot_ntk_spectrum(torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.5]), {str(tmp_path / "s.png")!r})
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
assert "matplotlib.pyplot" not in sys.modules
"""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": ROOT},
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "d.png").read_bytes()[:8] == PNG and (tmp_path / "s.png").read_bytes()[:8] == PNG


def test_bad_report_input():
    with pytest.raises(TypeError, match="bool"):
        layer_table({"w": torch.ones(3)})
    with pytest.raises(ValueError, match="empty"):
        layer_table({})


def _channel_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 2),
    )


def test_channel_table_counts_kept_channels_and_the_flops_before_and_after():
    """Written out: 2 FLOPs per multiply-add; conv 3->4 (3x3) and conv 4->6 (1x1) on 8x8, Linear 6->2.
    Removing channel 1 of the first conv leaves 3 of its outputs and 3 of the second conv's inputs."""
    model = _channel_net()
    masks = {
        "0.weight": torch.ones(4, 3, 3, 3, dtype=torch.bool),
        "3.weight": torch.ones(6, 4, 1, 1, dtype=torch.bool),
        "6.weight": torch.ones(2, 6, dtype=torch.bool),
    }
    masks["0.weight"][1] = False
    masks["3.weight"][:, 1] = False
    dense = 2 * (4 * 3 * 9 * 64 + 6 * 4 * 64 + 6 * 2)
    assert model_flops(model, (3, 8, 8)) == dense
    text = channel_table(model, Masks(masks, metadata={"input_shape": [3, 8, 8]}))
    assert text.splitlines()[1].split() == ["0.weight", "3", "4", "3", "3"]
    assert text.splitlines()[2].split() == ["3.weight", "6", "6", "3", "4"]
    after = 2 * (3 * 3 * 9 * 64 + 6 * 3 * 64 + 6 * 2)
    assert f"FLOPs per input: {dense:,} dense, {after:,} exported ({after / dense:.3f} of dense)" in text
    report = markdown_report(masks, {"model": "toy"}, 1.0, channels=text)
    assert "## Channels and FLOPs" in report and text in report
