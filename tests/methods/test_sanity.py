"""Sanity-check switches: shuffled masks keep each tensor's count, inverted scores keep the lowest."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ntksap_fast import NtkSapScorer, density_schedule
from ntksap_fast.io.masks import Masks
from ntksap_fast.methods.sanity import keep_lowest, shuffle_masks


def keep_n(n: int, d: float) -> int:
    return n - math.floor((1.0 - d) * n)


def random_masks(seed: int = 0) -> Masks:
    gen = torch.Generator().manual_seed(seed)
    return Masks(
        {
            "a.weight": torch.rand(6, 5, generator=gen) < 0.3,
            "b.weight": torch.rand(40, generator=gen) < 0.7,
            "c.weight": torch.zeros(3, 2, 2, dtype=torch.bool),
        },
        metadata={"method": "ntksap", "seed": 4},
    )


# ----------------------------------------------------------------------------------------------
# shuffle_masks
# ----------------------------------------------------------------------------------------------
def test_shuffle_keeps_each_count_and_is_seeded() -> None:
    masks = random_masks()
    before = {n: m.clone() for n, m in masks.items()}
    shuffled = shuffle_masks(masks, seed=3)
    assert isinstance(shuffled, Masks) and list(shuffled) == list(masks)
    for name, m in masks.items():
        assert shuffled[name].shape == m.shape and shuffled[name].dtype == torch.bool
        assert int(shuffled[name].sum()) == int(m.sum())
        assert torch.equal(m, before[name])  # the input is not changed
    assert not torch.equal(shuffled["b.weight"], masks["b.weight"])  # 28 of 40 moved: equal by chance 1 in 1e9
    assert shuffled.metadata == {"method": "ntksap", "seed": 4, "shuffle_seed": 3}
    again, other = shuffle_masks(masks, seed=3), shuffle_masks(masks, seed=4)
    assert all(torch.equal(again[n], shuffled[n]) for n in masks)
    assert not torch.equal(other["b.weight"], shuffled["b.weight"])
    plain = shuffle_masks(dict(masks), seed=3)  # a plain dict works the same
    assert plain.metadata == {"shuffle_seed": 3} and all(torch.equal(plain[n], shuffled[n]) for n in masks)


def test_shuffle_moves_every_entry_uniformly() -> None:
    """Over many seeds each position is kept with probability count / numel (5 standard errors)."""
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[0, :] = True  # 5 of 20 kept, all in the first row
    runs = 2000
    kept = sum(shuffle_masks({"w": mask}, seed=s)["w"].double() for s in range(runs)) / runs
    tolerance = 5 * math.sqrt(0.25 * 0.75 / runs)
    assert (kept - 0.25).abs().max() < tolerance


def test_shuffle_bad_arguments() -> None:
    with pytest.raises(ValueError, match="seed"):
        shuffle_masks(random_masks(), seed=-1)
    with pytest.raises(TypeError, match="seed"):
        shuffle_masks(random_masks(), seed=1.5)
    with pytest.raises(TypeError, match=r"masks\['w'\] must be a bool tensor"):
        shuffle_masks({"w": torch.ones(3)}, seed=0)


# ----------------------------------------------------------------------------------------------
# keep_lowest
# ----------------------------------------------------------------------------------------------
def lowest_by_sorting(scores: dict, density: float, masks: dict | None) -> dict:
    """The specification spelled out: sort the unpruned entries by (score, flat index), keep the first."""
    flat = torch.cat([s.reshape(-1) for s in scores.values()]).tolist()
    alive = [True] * len(flat) if masks is None else torch.cat([m.reshape(-1) for m in masks.values()]).tolist()
    order = sorted((i for i in range(len(flat)) if alive[i]), key=lambda i: (flat[i], i))
    keep = torch.zeros(len(flat), dtype=torch.bool)
    keep[order[: keep_n(len(flat), density)]] = True
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = keep[start : start + s.numel()].reshape(s.shape)
        start += s.numel()
    return out


@pytest.mark.parametrize(
    "density, with_masks",
    [(1.0, False), (0.5, False), (0.31, False), (0.05, False), (0.5, True), (0.31, True), (0.05, True)],
)
def test_keep_lowest_matches_sorting_with_ties(density: float, with_masks: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    scores = {
        "a.weight": torch.randint(0, 4, (6, 5), generator=gen).float(),  # few values: many ties
        "b.weight": torch.randint(0, 4, (40,), generator=gen).double(),
    }
    scores["a.weight"][0, :3] = torch.tensor([-0.0, 0.0, -0.0])  # -0.0 == 0.0
    masks = None
    if with_masks:
        masks = {n: torch.rand(s.shape, generator=gen) < 0.9 for n, s in scores.items()}
        assert sum(int(m.sum()) for m in masks.values()) >= keep_n(70, 0.5)  # 64 of 70 unpruned
    kept = keep_lowest(scores, density, masks)
    want = lowest_by_sorting(scores, density, masks)
    assert list(kept) == list(scores) and kept.metadata == {"invert": True}
    assert all(torch.equal(kept[n], want[n]) for n in scores)
    if masks is not None:
        assert not any((kept[n] & ~masks[n]).any() for n in scores)  # pruned entries stay pruned


def test_keep_lowest_ties_go_to_the_lower_flat_index_across_tensors() -> None:
    scores = {"a": torch.tensor([5.0, 1.0, 1.0]), "b": torch.tensor([1.0, 0.5])}
    kept = keep_lowest(scores, 0.4)  # keep 2 of 5: 0.5 and the first 1.0
    assert kept["a"].tolist() == [False, True, False] and kept["b"].tolist() == [False, True]


def test_keep_lowest_errors() -> None:
    scores = {"a": torch.tensor([1.0, float("nan"), 2.0])}
    with pytest.raises(ValueError, match="NaN"):
        keep_lowest(scores, 0.5)
    kept = keep_lowest(scores, 0.3, {"a": torch.tensor([True, False, True])})  # NaN at a pruned entry: ignored
    assert kept["a"].tolist() == [True, False, False]
    with pytest.raises(ValueError, match="unpruned"):
        keep_lowest({"a": torch.ones(4)}, 0.75, {"a": torch.tensor([True, False, False, True])})
    with pytest.raises(ValueError, match="density"):
        keep_lowest({"a": torch.ones(4)}, 0.0)
    with pytest.raises(ValueError, match=r"masks\['a'\] has shape \(3,\)"):
        keep_lowest({"a": torch.ones(4)}, 0.5, {"a": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="names of scores"):
        keep_lowest({"a": torch.ones(4)}, 0.5, {"b": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(TypeError, match=r"scores\['a'\] must be a float tensor"):
        keep_lowest({"a": torch.ones(4, dtype=torch.int64)}, 0.5)
    with pytest.raises(TypeError, match="non-empty dict"):
        keep_lowest({}, 0.5)


def test_inverted_ntksap_rounds_are_nested_and_exact() -> None:
    """The loop in the sanity module's docstring: each round keeps the lowest scores among the
    entries the previous round kept, exactly keep_count of them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    scorer, masks = NtkSapScorer(model, (3, 8, 8), draws=1, batch_size=2), None
    n_total = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    for t, d in enumerate(density_schedule(0.2, 3)):
        scores = scorer.scores(masks, round=t)
        new = keep_lowest(scores, d, masks)
        assert sum(int(m.sum()) for m in new.values()) == keep_n(n_total, d)
        if masks is not None:
            assert not any((new[n] & ~masks[n]).any() for n in new)
        kept_max = max(float(scores[n][new[n]].max()) for n in new)
        dropped = [scores[n][masks[n] & ~new[n]] if masks is not None else scores[n][~new[n]] for n in new]
        assert kept_max <= min(float(s.min()) for s in dropped if s.numel())  # the lowest were kept
        masks = new


def test_prune_with_invert_is_keep_lowest_after_every_round() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    scorer, want = NtkSapScorer(model, (3, 8, 8), draws=1, batch_size=2), None
    for t, d in enumerate(density_schedule(0.2, 3)):
        want = keep_lowest(scorer.scores(want, round=t), d, want)
    got = scorer.prune(0.2, 3, invert=True, progress=False)
    assert got.metadata["invert"] is True
    assert list(got) == list(want) and all(torch.equal(got[n], want[n]) for n in want)
    with pytest.raises(TypeError, match="invert"):
        scorer.prune(0.2, 3, invert=1)
