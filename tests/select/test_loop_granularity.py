"""select.loop with granularity: PruneOptions' rules, channel NTK-SAP against the float64 oracle, every
channel method through the one loop, checkpoint/resume and metadata carrying the granularity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _channel_models import IMAGE, resnet8
from ntksap_fast import export_pruned, ntk_sap_prune, prune
from ntksap_fast.io.checkpoint import CheckpointError
from ntksap_fast.select.loop import PruneOptions
from ntksap_fast.select.nm import is_nm
from ntksap_fast.select.schedule import keep_count
from ntksap_fast.testing.reference import reference_scores

SHAPE = (3, 6, 6)


def _two_groups() -> nn.Module:
    """Channel j of conv 0 is row j of 0.weight and column j of 3.weight; channel j of conv 3 is
    row j of 3.weight and column j of 8.weight. The classifier's outputs and the input stay."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    )


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        (dict(granularity="block"), ValueError, r"granularity must be one of \('weight', 'channel'\) or 'N:M'"),
        (dict(granularity=2), TypeError, "granularity must be a string"),
        (dict(granularity="4:2"), ValueError, "granularity '4:2': N must be"),
        (dict(granularity="channel", scope="layer"), ValueError, "granularity='channel' applies to scope='global'"),
        (dict(granularity="2:4", scope="layer"), ValueError, "granularity='2:4' applies to scope='global'"),
        (dict(granularity="channel", stats=True), ValueError, "apply to granularity='weight'"),
        (dict(granularity="2:4", min_layer_density=0.1), ValueError, "min_layer_density does not apply"),
    ],
)
def test_prune_options_check_the_granularity(kwargs, error, words):
    with pytest.raises(error, match=words):
        PruneOptions(density=0.5, **kwargs)
    assert PruneOptions(density=0.5, granularity=" 2 : 4").granularity == "2:4"


def test_one_round_of_channel_ntksap_removes_the_lowest_oracle_channel_scores():
    """The oracle's signed G (float64), summed over each channel's entries, |.| per multiply-add; channels
    go lowest first (each conv keeps its best) until at most keep_count(N, 0.5) entries remain."""
    model = _two_groups().double()
    settings = dict(draws=2, batch_size=3, epsilon=0.01, seed=3)
    masks = ntk_sap_prune(
        model, 0.5, SHAPE, iterations=1, granularity="channel", dtype=torch.float64, progress=False, **settings
    )
    g = reference_scores(model, None, None, SHAPE, dtype=torch.float64, signed=True, **settings)
    g0, g3, g8 = g[:108].view(4, 3, 3, 3), g[108:324].view(6, 4, 3, 3), g[324:].view(5, 6)
    # per multiply-add: both convs have 6 x 6 output positions, the Linear one
    units = [("0", j, float((g0[j].sum() + g3[:, j].sum()).abs()) / ((27 + 54) * 36)) for j in range(4)]
    units += [("3", j, float((g3[j].sum() + g8[:, j].sum()).abs()) / (36 * 36 + 5)) for j in range(6)]
    best = {layer: max((u for u in units if u[0] == layer), key=lambda u: u[2]) for layer in ("0", "3")}
    kept = {"0": set(range(4)), "3": set(range(6))}
    n_keep = keep_count(354, 0.5)
    for layer, j, _ in sorted((u for u in units if u not in best.values()), key=lambda u: u[2]):
        if 27 * len(kept["0"]) + 9 * len(kept["0"]) * len(kept["3"]) + 5 * len(kept["3"]) <= n_keep:
            break
        kept[layer].discard(j)
    assert set(torch.nonzero(masks["0.weight"].flatten(1).any(1)).flatten().tolist()) == kept["0"]
    assert set(torch.nonzero(masks["3.weight"].flatten(1).any(1)).flatten().tolist()) == kept["3"]
    assert sum(int(m.sum()) for m in masks.values()) <= n_keep


def _is_channel_mask(masks) -> bool:
    for v in masks.values():
        rows, cols = v.flatten(1).any(1), v.transpose(0, 1).flatten(1).any(1)
        outer = rows.view(-1, *[1] * (v.dim() - 1)) & cols.view(1, -1, *[1] * (v.dim() - 2))
        if not torch.equal(v, outer.expand_as(v)):
            return False
    return True


@pytest.mark.parametrize("method", ["ntksap", "magnitude", "random", "snip", "iter_snip", "synflow"])
def test_every_channel_method_gives_channel_masks_at_the_density(method):
    model = resnet8()
    data = [(torch.randn(4, *IMAGE, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3]))]
    extra = {"ntksap": dict(draws=1, batch_size=2), "snip": dict(data=data), "iter_snip": dict(data=data)}
    iterations = 1 if method in ("magnitude", "random", "snip") else 2
    masks = prune(
        model,
        method,
        density=0.4,
        iterations=iterations,
        granularity="channel",
        input_shape=IMAGE,
        progress=False,
        **extra.get(method, {}),
    )
    total = sum(m.numel() for m in masks.values())
    assert 0.37 * total < sum(int(m.sum()) for m in masks.values()) <= keep_count(total, 0.4)
    assert _is_channel_mask(masks)
    assert masks.metadata["granularity"] == "channel" and masks.metadata["channel_units"] == 56
    export_pruned(model, masks)  # they export


def test_grasp_and_channels_do_not_combine():
    data = [(torch.randn(2, *IMAGE), torch.tensor([0, 1]))]
    with pytest.raises(ValueError, match="granularity='channel' applies to methods .* not 'grasp'"):
        prune(resnet8(), "grasp", density=0.5, granularity="channel", input_shape=IMAGE, data=data, progress=False)


def test_a_checkpoint_resumes_a_channel_prune_and_refuses_another_granularity(tmp_path):
    model, path = resnet8(), tmp_path / "ck.pt"
    kwargs = dict(density=0.3, iterations=3, granularity="channel", input_shape=IMAGE, progress=False)
    whole = prune(model, "synflow", **kwargs)

    def stop(t, masks):
        if t == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prune(model, "synflow", checkpoint=path, on_round=stop, **kwargs)
    resumed = prune(model, "synflow", checkpoint=path, **kwargs)
    assert all(torch.equal(whole[n], resumed[n]) for n in whole)
    with pytest.raises(CheckpointError, match="granularity"):
        prune(model, "synflow", checkpoint=path, **dict(kwargs, granularity="weight"))


def test_n_m_runs_through_the_loop():
    model = resnet8()
    masks = prune(model, "magnitude", density=0.5, granularity="2:4", progress=False)
    assert masks.metadata["granularity"] == "2:4"
    assert all(is_nm(masks[n], 2, 4) for n in masks if n not in masks.metadata["nm_dense"])


def _digits_cnn() -> nn.Module:
    """The CNN of examples/structured_accuracy.py (8x8 inputs, a max-pool before the last conv)."""
    torch.manual_seed(0)
    block = lambda i, o: [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]  # noqa: E731
    return nn.Sequential(
        *block(1, 16), *block(16, 32), nn.MaxPool2d(2), *block(32, 32), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 10),
    )  # fmt: skip


def test_global_magnitude_channels_rank_within_layers_and_do_not_collapse_the_last_conv():
    """L1 norms per multiply-add would cut the last conv (a quarter of the positions) to its floor of
    one channel; relative to their layer's mean every conv keeps several (select.structured)."""
    model, shape = _digits_cnn(), (1, 8, 8)
    masks = prune(model, "magnitude", density=0.25, granularity="channel", input_shape=shape, progress=False)
    assert masks.metadata["channel_normalisation"] == "group"
    kept = [int(masks[f"{i}.weight"].flatten(1).any(1).sum()) for i in (0, 3, 7)]
    assert min(kept) >= 4, kept
    per_flop = prune(model, "snip", density=0.25, granularity="channel", input_shape=shape, progress=False,
                     data=[(torch.randn(8, *shape), torch.arange(8))])  # fmt: skip
    assert per_flop.metadata["channel_normalisation"] == "flop"
