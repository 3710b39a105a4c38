"""ntksap_fast.io.export: channel masks -> a smaller dense model that computes what the masked model computes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from _arch_models import efficientnet, mobilenet_v3, vit
from _channel_models import IMAGE, concat_net, resnet8, tiny_vgg, with_random_norms
from _tiny_models import assert_same_snapshot, snapshot
from ntksap_fast import ntk_sap_prune
from ntksap_fast.engine.arena import Arena
from ntksap_fast.io.export import export_pruned
from ntksap_fast.io.masks import Masks, apply_masks, load_masks, save_masks
from ntksap_fast.select.schedule import density_schedule
from ntksap_fast.select.structured import ChannelSelector

MODELS = {  # builder, input shape, final density
    "resnet": (resnet8, IMAGE, 0.4),
    "vgg": (tiny_vgg, IMAGE, 0.4),
    "concat": (concat_net, IMAGE, 0.4),
    "efficientnet": (lambda: with_random_norms(efficientnet()), (3, 32, 32), 0.5),  # depthwise, squeeze-excitation
    "mobilenet_v3": (lambda: with_random_norms(mobilenet_v3()), (3, 32, 32), 0.5),  # hardswish, SE
    "vit": (vit, (3, 32, 32), 0.9),  # the MLP features (the residual stream has LayerNorms: it stays)
}


def channel_masks(model: nn.Module, shape, density: float, seed: int = 0) -> Masks:
    """Random channel masks (each unit one seeded score) in two rounds."""
    arena = Arena(model)
    selector = ChannelSelector(model, arena, shape, random_seed=seed)
    mask = arena.start_mask(model)
    for t, d in enumerate(density_schedule(density, 2)):
        selector.select_(None, mask, t, d)
    return Masks(
        {n: v.clone() for n, v in arena.views(mask).items()},
        metadata={"granularity": "channel", "input_shape": list(shape)},
    )


def masked(model: nn.Module, masks) -> nn.Module:
    return apply_masks(copy.deepcopy(model), masks)


@pytest.mark.parametrize("name", list(MODELS))
def test_the_exported_model_computes_the_masked_model_with_only_the_kept_weights(name):
    build, shape, density = MODELS[name]
    model = build().double()
    masks = channel_masks(model, shape, density)
    exported = export_pruned(model, masks)
    reference = masked(model, masks)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for batch_statistics in (False, True):  # BatchNorm with its running or with the batch's statistics
        for m in (*reference.modules(), *exported.modules()):  # dropout stays off: its masks would differ
            m.train(batch_statistics and isinstance(m, nn.modules.batchnorm._BatchNorm))
        with torch.no_grad():
            want, got = reference(x), exported(x)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))
    sizes = dict(exported.named_parameters())
    assert sum(sizes[n].numel() for n in masks) == sum(int(m.sum()) for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) < sum(m.numel() for m in masks.values())


def test_removed_channels_still_carry_their_batchnorm_shift_in_the_masked_model():
    """Why the equality above is not trivial: a removed channel of the masked model is not zero after
    its BatchNorm, so cutting only the filters (not their readers) changes the outputs."""
    model = resnet8().double().eval()
    masks = channel_masks(model, IMAGE, 0.4)
    filters_only = {
        n: m.flatten(1).any(1).view(-1, *[1] * (m.dim() - 1)).expand_as(m).clone() for n, m in masks.items()
    }
    x = torch.randn(2, *IMAGE, dtype=torch.float64)
    with torch.no_grad():
        assert not torch.allclose(masked(model, filters_only)(x), masked(model, masks)(x))


def test_the_original_is_untouched_and_modes_carry_over():
    model = resnet8().train()
    model.layers[0].eval()
    before = snapshot(model)
    exported = export_pruned(model, channel_masks(model, IMAGE, 0.5))
    assert_same_snapshot(before, model)
    assert [(n, m.training) for n, m in exported.named_modules()] == [(n, m.training) for n, m in model.named_modules()]
    assert exported.conv1 is not model.conv1 and exported.conv1.out_channels < model.conv1.out_channels


def test_a_model_carrying_the_masks_exports_the_same():
    model = tiny_vgg().double()
    masks = channel_masks(model, IMAGE, 0.4)
    carrying = masked(model, masks)
    x = torch.randn(2, *IMAGE, dtype=torch.float64)
    a, b = export_pruned(model, masks).eval(), export_pruned(carrying, masks).eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_masks_and_state_dict_rebuild_the_exported_model(tmp_path, suffix):
    model = resnet8()
    exported = export_pruned(model, channel_masks(model, IMAGE, 0.4)).eval()
    save_masks(channel_masks(model, IMAGE, 0.4), tmp_path / f"masks{suffix}")
    torch.save(exported.state_dict(), tmp_path / "state.pt")
    rebuilt = export_pruned(resnet8(), load_masks(tmp_path / f"masks{suffix}"))  # a fresh model, the saved plan
    rebuilt.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    x = torch.randn(2, *IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), exported(x), rtol=0, atol=0)


def test_only_channel_masks_export():
    model = resnet8()
    arena = Arena(model)
    weights = Masks(
        {
            n: torch.rand(v.shape, generator=torch.Generator().manual_seed(0)) < 0.5
            for n, v in arena.values(model).items()
        },
        metadata={"granularity": "weight"},
    )
    with pytest.raises(ValueError, match="only channel masks export.*granularity='weight'"):
        export_pruned(model, weights, IMAGE)
    with pytest.raises(ValueError, match=r"only channel masks export; \d+ pruned entries .*outside removed channels"):
        export_pruned(model, dict(weights), IMAGE)  # no metadata: told apart by their structure
    with pytest.raises(ValueError, match="granularity='2:4'"):
        export_pruned(model, Masks(weights, metadata={"granularity": "2:4"}), IMAGE)


def test_masks_that_cut_a_group_entirely_or_do_not_match_are_refused():
    model = resnet8()
    masks = channel_masks(model, IMAGE, 0.5)
    cut = dict(masks)
    cut["layers.0.conv1.weight"] = torch.zeros_like(cut["layers.0.conv1.weight"])
    cut["layers.0.conv2.weight"] = torch.zeros_like(cut["layers.0.conv2.weight"])
    with pytest.raises(ValueError, match=r"remove every channel of the groups rooted at \['layers.0.conv1'\]"):
        export_pruned(model, cut, IMAGE)
    wrong = dict(masks, **{"conv1.weight": masks["conv1.weight"][:2]})
    with pytest.raises(ValueError, match=r"masks\['conv1.weight'\] has shape \(2, 3, 3, 3\), expected \(4, 3, 3, 3\)"):
        export_pruned(model, wrong, IMAGE)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        export_pruned(masks, masks)


@pytest.mark.slow
def test_channel_ntksap_on_torchvision_resnet50_exports_a_quarter_of_the_weights():
    """Issue 25's case at a small input (64x64, few rounds): channel masks from ``ntk_sap_prune``, the
    exported model keeps 0.25 +- 0.03 of the prunable weights and computes the masked model (float64)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model, shape = torchvision.models.resnet50().double().eval(), (3, 64, 64)
    masks = ntk_sap_prune(
        model, 0.25, shape, granularity="channel", iterations=2, draws=1, batch_size=2, progress=False
    )
    assert masks.metadata["granularity"] == "channel"
    exported = export_pruned(model, masks).eval()
    params = dict(exported.named_parameters())
    kept = sum(params[n].numel() for n in masks) / sum(m.numel() for m in masks.values())
    assert abs(kept - 0.25) <= 0.03, kept
    assert kept == pytest.approx(sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()))
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        want, got = masked(model, masks)(x), exported(x)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))
