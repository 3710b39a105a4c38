"""ntksap_fast.presets: the presets match DESIGN.md's table and fit ntk_sap_prune's signature."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from _tiny_models import default_prunable_names, expected_keep, flat
from ntksap_fast import PRESETS, ntk_sap_prune
from ntksap_fast import models as nf_models

# DESIGN.md section 2's table.
PAPER = {
    "cifar10": ("resnet20", (3, 32, 32), 10, 5, 500, 20),
    "cifar100": ("vgg16_bn", (3, 32, 32), 100, 4, 1000, 100),
    "tiny-imagenet": ("resnet18", (3, 64, 64), 200, 8, 2000, 100),
    "imagenet": ("resnet50", (3, 224, 224), 1000, 40, 10000, 100),
}


def _per_draw(preset) -> list[int]:
    bs = preset.options.batch_size
    return list(bs) if isinstance(bs, (list, tuple)) else [bs] * preset.options.draws


def test_presets_match_design_table():
    assert set(PRESETS) == set(PAPER)
    for key, (model, shape, classes, draws, total, iterations) in PAPER.items():
        p = PRESETS[key]
        assert p.model.split(":")[-1] == model, key
        assert tuple(p.input_shape) == shape, key
        assert p.num_classes == classes, key
        assert p.options.draws == draws, key
        sizes = _per_draw(p)
        assert len(sizes) == draws, key
        assert sum(sizes) == total, key
        assert all(isinstance(s, int) and 1 <= s <= 256 for s in sizes), key
        assert p.iterations == iterations, key
        assert p.options.epsilon == 0.01
        assert list(p.densities) == pytest.approx([0.8**k for k in range(2, 19)])
    assert _per_draw(PRESETS["cifar10"]) == [100] * 5
    assert _per_draw(PRESETS["cifar100"]) == [256, 256, 256, 232]
    assert _per_draw(PRESETS["tiny-imagenet"]) == [256] * 7 + [208]
    assert _per_draw(PRESETS["imagenet"]) == [256] * 39 + [16]


@pytest.mark.parametrize("key", sorted(PAPER))
def test_preset_kwargs_fit_prune_signature(key):
    kw = PRESETS[key].prune_kwargs()
    assert "density" not in kw
    inspect.signature(ntk_sap_prune).bind(nn.Linear(2, 2), 0.5, **kw)  # raises TypeError if not
    assert tuple(kw["input_shape"]) == PAPER[key][1]
    assert kw["draws"] == PAPER[key][3] and kw["iterations"] == PAPER[key][5]


@pytest.mark.slow
def test_cifar10_preset_runs():
    kw = PRESETS["cifar10"].prune_kwargs()
    kw.update(draws=1, batch_size=2, iterations=2)
    torch.manual_seed(0)
    model = nf_models.resnet20()
    rounds = []
    masks = ntk_sap_prune(model, 0.8**5, progress=False, on_round=lambda t, m: rounds.append(t), **kw)
    names = default_prunable_names(model)
    assert list(masks) == names
    n = sum(dict(model.named_parameters())[k].numel() for k in names)
    assert int(flat(masks).sum()) == expected_keep(n, 0.8**5)
    assert rounds == [1, 2]
