"""Reports: tables, collapse rule, markdown, plots, and the empirical NTK against closed forms."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from ntksap_fast.analysis.report import (
    channel_table,
    check_ntk_size,
    collapsed_layers,
    empirical_ntk,
    layer_table,
    markdown_report,
    model_flops,
    ntk_eigenvalues,
    plot_layer_density,
    plot_ntk_spectrum,
)
from ntksap_fast.io.masks import Masks

PNG = b"\x89PNG\r\n\x1a\n"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def linear(d_in=5, d_out=3) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(d_in, d_out).double()


def bool_mask(shape, p=0.5, seed=1) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < p


def closed_form_linear_ntk(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """f(x) = W x: NTK[(a, i), (b, j)] = delta_ij * sum_k keep_ik x_ak x_bk (keep = 1: x_a . x_b delta_ij)."""
    b, o = x.shape[0], keep.shape[0]
    e = torch.einsum("ik,ak,bk->aib", keep.double(), x, x)
    return torch.einsum("aib,ij->aibj", e, torch.eye(o, dtype=torch.float64)).reshape(b * o, b * o)


def test_linear_ntk_closed_form_dense_and_masked():
    model = linear()
    x = torch.randn(4, 5, dtype=torch.float64)
    dense = empirical_ntk(model, x)
    assert dense.shape == (12, 12) and dense.dtype == torch.float64
    torch.testing.assert_close(dense, torch.kron(x @ x.T, torch.eye(3, dtype=torch.float64)))
    keep = bool_mask((3, 5))
    torch.testing.assert_close(empirical_ntk(model, x, {"weight": keep}), closed_form_linear_ntk(x, keep))


def test_linear_eigenvalues_are_gram_eigenvalues_repeated():
    model = linear()
    eig = ntk_eigenvalues(model, input_shape=(5,), batch_size=4, seed=7)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(7)).double()  # the documented inputs
    want = torch.linalg.eigvalsh(x @ x.T).repeat_interleave(3).sort(descending=True).values
    assert torch.all(eig[:-1] >= eig[1:])
    torch.testing.assert_close(eig, want)


def test_mlp_ntk_matches_jacrev_and_leaves_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double().train()
    model[2].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 4, dtype=torch.float64)
    masks = {"0.weight": bool_mask((6, 4)), "2.weight": bool_mask((2, 6), seed=2)}
    params = dict(model.named_parameters())

    def f(w0, w2):
        return functional_call(
            model, {**params, "0.weight": w0 * masks["0.weight"], "2.weight": w2 * masks["2.weight"]}, (x,)
        ).reshape(-1)

    jacs = jacrev(f, argnums=(0, 1))(params["0.weight"].detach(), params["2.weight"].detach())
    jac = torch.cat([j.reshape(6, -1) * m.reshape(1, -1) for j, m in zip(jacs, masks.values())], 1)
    torch.testing.assert_close(empirical_ntk(model, x, masks), jac @ jac.T)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and not model[2].weight.requires_grad and model[0].weight.requires_grad


def test_ntk_size_limit_and_bad_masks():
    model = linear()
    with pytest.raises(ValueError, match="max_jacobian_entries=20"):
        empirical_ntk(model, torch.randn(4, 5, dtype=torch.float64), max_jacobian_entries=20)
    with pytest.raises(ValueError, match="masks"):
        empirical_ntk(model, torch.randn(4, 5, dtype=torch.float64), {"bias": torch.ones(3, dtype=torch.bool)})


def test_check_ntk_size_agrees_with_the_computation():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))  # P = 32, O = 3
    assert check_ntk_size(model, input_shape=(5,), batch_size=8) == 8 * 3 * 32
    before = [m.training for m in model.modules()]
    for limit, words in (
        (8 * 32 - 1, "at least batch \\* params = 256"),
        (8 * 3 * 32 - 1, "batch \\* outputs \\* params = 768"),
    ):
        with pytest.raises(ValueError, match=words):
            check_ntk_size(model, input_shape=(5,), batch_size=8, max_jacobian_entries=limit)
        with pytest.raises(ValueError, match=words):
            ntk_eigenvalues(model, input_shape=(5,), batch_size=8, max_jacobian_entries=limit)
    ntk_eigenvalues(model, input_shape=(5,), batch_size=8, max_jacobian_entries=8 * 3 * 32)
    assert [m.training for m in model.modules()] == before
    with pytest.raises(ValueError, match="batch_size"):
        check_ntk_size(model, input_shape=(5,), batch_size=0)


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


def test_ntk_of_a_model_carrying_masks_equals_the_ntk_with_those_masks():
    from ntksap_fast import apply_masks
    from ntksap_fast.analysis.report import ntk_eigenvalues

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    masks = {"0.weight": torch.rand(6, 4) < 0.5, "2.weight": torch.rand(3, 6) < 0.5}
    want = ntk_eigenvalues(model, masks, input_shape=(4,))
    apply_masks(model, masks)  # its weight attributes are computed tensors, not leaves: deepcopy refuses them
    weight = model[0].weight
    torch.testing.assert_close(ntk_eigenvalues(model, input_shape=(4,)), want)
    assert model[0].weight is weight  # the model's own attribute is back


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
