"""The arena: prunable tensors by layer rule (register_layer, fan-in) and models that carry masks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import ntksap_fast.engine.arena as arena_mod
from ntksap_fast import NtkSapScorer, apply_masks, ntk_sap_prune, ntk_sap_scores, prune, register_layer
from ntksap_fast.engine.arena import Arena

SHAPE = (3, 8, 8)
FAST = dict(draws=2, batch_size=4)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    )


class Dense(nn.Module):
    """A layer storing its weight ``(in, out)``, as Hugging Face's GPT-2 ``Conv1D`` does."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(n_in, n_out) / math.sqrt(n_in))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.kernel + self.bias


@pytest.fixture
def clean_rules():
    saved = dict(arena_mod._RULES)
    yield
    arena_mod._RULES.clear()
    arena_mod._RULES.update(saved)


def test_register_layer_declares_prunable_tensors_and_fan_in(clean_rules):
    model = nn.Sequential(Dense(7, 3), nn.ReLU(), nn.Linear(3, 2))
    assert Arena(model).names == ["2.weight"]  # unknown type: not pruned by default
    register_layer(Dense, prunable=("kernel",), fan_in=lambda name, shape: shape[0])
    arena = Arena(model)
    assert arena.names == ["0.kernel", "2.weight"]
    assert [s.fan_in for s in arena.slots] == [7, 3]
    assert arena.slots[0].std == pytest.approx(math.sqrt(2 / 7))
    with pytest.raises(TypeError, match="layer"):
        register_layer(42)
    with pytest.raises(TypeError, match="fan_in"):
        register_layer(Dense, fan_in=3)


def test_gpt2_conv1d_rule_by_qualified_name_without_importing_transformers():
    fake = type("Conv1D", (Dense,), {"__module__": "transformers.pytorch_utils"})
    fake.__qualname__ = "Conv1D"
    layer = fake.__new__(fake)
    Dense.__init__(layer, 9, 4)
    layer.weight = layer.kernel  # Conv1D's weight (in, out)
    del layer.kernel
    arena = Arena(nn.Sequential(layer))
    assert arena.names == ["0.weight"] and arena.slots[0].fan_in == 9  # shape[0], not shape[1] = 4


def test_gpt2_conv1d_of_transformers_samples_with_its_input_dimension():
    from transformers import pytorch_utils  # the test extra installs it

    layer = pytorch_utils.Conv1D(12, 5)  # nf=12 outputs, nx=5 inputs: weight (5, 12)
    assert tuple(layer.weight.shape) == (5, 12)
    assert Arena(nn.Sequential(layer)).slots[0].fan_in == 5


def _masks(model: nn.Module, density: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.rand(p.shape, generator=g) < density
        for n, p in model.named_parameters()
        if n.endswith("weight") and p.dim() > 1
    }


def _state(model: nn.Module) -> tuple:
    tensors = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    hooks = [(type(m).__name__, list(m._forward_pre_hooks)) for m in model.modules()]
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight_orig")}
    return tensors, hooks, weights


def _same_state(a: tuple, b: tuple) -> bool:
    return (
        a[0].keys() == b[0].keys()
        and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
        and a[1] == b[1]
        and all(torch.equal(a[2][k], b[2][k]) for k in a[2])
    )


@pytest.mark.parametrize("how", ["apply_masks", "l1_unstructured"])
def test_model_carrying_masks_keeps_public_names_and_starts_from_its_masks(how):
    plain = _net()
    masked = _net()
    if how == "apply_masks":
        apply_masks(masked, _masks(masked, 0.6, 1))
    else:
        for m in masked.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                torch_prune.l1_unstructured(m, "weight", amount=0.4)
    existing = {
        n: m.weight_mask.bool()
        for n, m in [(f"{k}.weight", v) for k, v in masked.named_modules() if hasattr(v, "weight_mask")]
    }
    arena = Arena(masked)
    assert arena.names == [n for n, p in plain.named_parameters() if n.endswith("weight") and p.dim() > 1]
    assert arena.params == [n.replace("weight", "weight_orig") for n in arena.names]
    assert torch.equal(arena.start_mask(masked), torch.cat([existing[n].reshape(-1) for n in arena.names]))

    before = _state(masked)
    scorer = NtkSapScorer(masked, SHAPE, **FAST)
    got = scorer.scores()
    # the same numbers as the unmasked model scored with those masks: the prune hook changes nothing
    want = ntk_sap_scores(plain, SHAPE, existing, **FAST)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-6 * float(want[n].abs().max()))
        assert not got[n][~existing[n]].any()
    assert _same_state(before, _state(masked))


@pytest.mark.parametrize("how", ["apply_masks", "l1_unstructured"])
def test_re_pruning_a_masked_model_to_a_lower_density(how):
    model = _net()
    if how == "apply_masks":
        first = ntk_sap_prune(model, 0.4, SHAPE, iterations=2, progress=False, **FAST)
        apply_masks(model, first)
    else:
        torch_prune.global_unstructured(
            [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))],
            pruning_method=torch_prune.L1Unstructured,
            amount=0.6,
        )
    # The starting mask as the model holds it: the modules' weight_mask buffers (Arena.start_mask, which
    # reads them for the scorer, is under test here).
    start_masks = {f"{n}.weight": m.weight_mask.bool() for n, m in model.named_modules() if hasattr(m, "weight_mask")}
    assert len(start_masks) == 3 and 0 < sum(int(m.sum()) for m in start_masks.values())
    n_total = sum(m.numel() for m in start_masks.values())
    before = _state(model)

    def flat_and_start(masks):
        """The masks and the starting mask as flat vectors, in the masks' order (every layer is there)."""
        assert set(masks) == set(start_masks)
        return torch.cat([m.reshape(-1) for m in masks.values()]), torch.cat(
            [start_masks[n].reshape(-1) for n in masks]
        )

    for rounds in (1, 3):  # round 1 of 3 keeps more than the model has: nothing more goes then
        seen = []

        def check(t, masks, rounds=rounds, seen=seen):
            flat, start = flat_and_start(masks)
            d_t = 0.1 ** (t / rounds)
            assert int(flat.sum()) == min(n_total - math.floor((1 - d_t) * n_total), int(start.sum()))
            assert not (flat & ~start).any()  # no pruned entry returns, in any round
            seen.append(t)

        again = ntk_sap_prune(model, 0.1, SHAPE, iterations=rounds, progress=False, on_round=check, **FAST)
        flat, start = flat_and_start(again)
        assert seen == list(range(1, rounds + 1))
        assert int(flat.sum()) == n_total - math.floor(0.9 * n_total)  # the count is over all entries
        assert not (flat & ~start).any()
    flat, start = flat_and_start(prune(model, "magnitude", density=0.2))
    assert not (flat & ~start).any()
    assert _same_state(before, _state(model))


def test_layout_fan_in_views_and_flatten():
    """Consecutive slots in named_parameters order, fan-in = shape[1] * prod(shape[2:]) (grouped and
    depthwise convolutions count their group's inputs), views that share the buffer, flatten's
    checks naming the argument."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Conv1d(6, 6, 5, groups=6), nn.Linear(7, 3))
    arena = Arena(model)
    assert arena.names == ["0.weight", "1.weight", "2.weight"]
    assert [(s.offset, s.numel, s.fan_in) for s in arena.slots] == [(0, 108, 18), (108, 30, 5), (138, 21, 7)]
    assert arena.numel == 159 and len(arena) == 3
    assert [s.std for s in arena.slots] == pytest.approx([math.sqrt(2 / f) for f in (18, 5, 7)], rel=1e-12)
    std = arena.std_vector()
    assert std.dtype == torch.float32 and std.shape == (159,)
    assert bool((std[108:138] == torch.tensor(math.sqrt(2 / 5), dtype=torch.float32)).all())
    flat = torch.arange(2 * 159, dtype=torch.float32).view(2, 159)
    views = arena.views(flat)
    assert views["1.weight"].shape == (2, 6, 1, 5) and views["1.weight"].data_ptr() == flat[:, 108:].data_ptr()
    values = {n: p.detach() for n, p in model.named_parameters() if n.endswith("weight")}
    back = arena.views(arena.flatten(values, argname="weights", dtype=torch.float64))
    assert all(torch.equal(back[n], v.double()) for n, v in values.items())
    with pytest.raises(ValueError, match="weights"):
        arena.flatten({n: v for n, v in values.items() if n != "2.weight"}, argname="weights", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"weights\['2.weight'\]"):
        arena.flatten(dict(values, **{"2.weight": torch.zeros(7, 3)}), argname="weights", dtype=torch.float32)
    with pytest.raises(TypeError, match=r"masks\['0.weight'\]"):
        arena.flatten(values, argname="masks", dtype=torch.bool)
    with pytest.raises(ValueError, match="159"):
        arena.views(torch.zeros(158))
