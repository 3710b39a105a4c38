"""Bad input to ntk_sap_prune / ntk_sap_scores (the checks in ntksap_fast.options, applied by
ScorerOptions and the scorer): a ValueError or TypeError that names the argument,
for every option, params, input_shape, the model and the masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _tiny_models import CNN_SHAPE, FAST, MLP_SHAPE, SCORE_FAST, default_prunable_names, mlp, tiny_cnn
from ntksap_fast import models as nf_models
from ntksap_fast import ntk_sap_prune, ntk_sap_scores


@pytest.mark.parametrize("entry", ["prune", "scores"])
def test_params_errors(entry):
    model = tiny_cnn(0)

    def call(params):
        if entry == "prune":
            return ntk_sap_prune(model, 0.5, CNN_SHAPE, iterations=1, params=params, **FAST)
        return ntk_sap_scores(model, CNN_SHAPE, params=params, **SCORE_FAST)

    with pytest.raises(ValueError, match="params") as info:
        call(["conv1.weight", "nope.weight"])
    assert "nope.weight" in str(info.value)
    with pytest.raises(ValueError):
        call([])
    with pytest.raises(ValueError):
        call(lambda n, m, p: False)
    with pytest.raises(ValueError) as info:
        call(["conv1.weight", "fc.bias"])  # 1-D: fan_in needs >= 2 dims
    assert "fc.bias" in str(info.value) or "params" in str(info.value)


PRUNE_BAD = [
    ("density", 0),
    ("density", 0.0),
    ("density", -0.1),
    ("density", 1.5),
    ("density", float("nan")),
    ("density", "0.5"),
    ("density", None),
    ("iterations", 0),
    ("iterations", -1),
    ("iterations", 2.5),
    ("iterations", True),
    ("draws", 0),
    ("draws", 2.5),
    ("draws", True),
    ("batch_size", 0),
    ("batch_size", 2.5),
    ("batch_size", True),
    ("batch_size", [4, 4, 4]),
    ("batch_size", [4, 0]),
    ("epsilon", 0),
    ("epsilon", 0.0),
    ("epsilon", -0.01),
    ("epsilon", float("inf")),
    ("epsilon", float("nan")),
    ("epsilon", "0.01"),
    ("seed", -1),
    ("seed", 1.5),
    ("schedule", "cosine"),
    ("schedule", None),
    ("dtype", torch.float16),
    ("dtype", torch.int32),
    ("dtype", "float32"),
    ("micro_batch", 0),
    ("micro_batch", 2.5),
    ("device", "not-a-device"),
]


@pytest.mark.parametrize("arg,value", PRUNE_BAD, ids=[f"{a}={v!r}" for a, v in PRUNE_BAD])
def test_prune_bad_arguments(arg, value):
    model = mlp(0)
    kw = dict(density=0.5, iterations=2, draws=2, batch_size=4, progress=False)
    kw[arg] = value
    density = kw.pop("density")
    with pytest.raises((ValueError, TypeError), match=arg):
        ntk_sap_prune(model, density, MLP_SHAPE, **kw)


SCORES_BAD = [
    ("draws", 0),
    ("draws", 2.5),
    ("draws", True),
    ("batch_size", 0),
    ("batch_size", 2.5),
    ("batch_size", [4]),
    ("epsilon", 0),
    ("epsilon", float("inf")),
    ("epsilon", float("nan")),
    ("seed", -1),
    ("round", -1),
    ("round", 0.5),
    ("dtype", torch.float16),
    ("micro_batch", 0),
]


@pytest.mark.parametrize("arg,value", SCORES_BAD, ids=[f"{a}={v!r}" for a, v in SCORES_BAD])
def test_scores_bad_arguments(arg, value):
    model = mlp(0)
    kw = dict(draws=2, batch_size=4)
    kw[arg] = value
    with pytest.raises((ValueError, TypeError), match=arg):
        ntk_sap_scores(model, MLP_SHAPE, **kw)


@pytest.mark.parametrize("entry", ["prune", "scores"])
def test_input_shape_errors(entry):
    def call(model, shape):
        if entry == "prune":
            return ntk_sap_prune(model, 0.5, shape, iterations=1, **FAST)
        return ntk_sap_scores(model, shape, **SCORE_FAST)

    with pytest.raises(ValueError, match="input_shape"):
        call(mlp(0), (5,))  # Linear(6, ...) does not take 5 features
    with pytest.raises(ValueError, match="input_shape"):
        call(tiny_cnn(0), (6,))  # Conv2d on a 2-D batch
    with pytest.raises(ValueError, match="input_shape"):
        call(mlp(0), None)  # a plain model does not carry input_shape
    with pytest.raises((ValueError, TypeError), match="input_shape"):
        call(mlp(0), (0,))
    # The package's models carry input_shape: None is fine.
    torch.manual_seed(0)
    model = nf_models.resnet20()
    assert model.input_shape == (3, 32, 32)
    if entry == "prune":
        masks = ntk_sap_prune(model, 0.5, iterations=1, draws=1, batch_size=2, progress=False)
    else:
        masks = ntk_sap_scores(model, draws=1, batch_size=2)
    assert list(masks) == default_prunable_names(model)


@pytest.mark.parametrize("entry", ["prune", "scores"])
def test_model_errors(entry):
    def call(model):
        if entry == "prune":
            return ntk_sap_prune(model, 0.5, MLP_SHAPE, iterations=1, **FAST)
        return ntk_sap_scores(model, MLP_SHAPE, **SCORE_FAST)

    with pytest.raises(TypeError, match="model"):
        call(lambda x: x)
    with pytest.raises(TypeError, match="model"):
        call({"0.weight": torch.ones(2, 6)})
    with pytest.raises(ValueError):
        call(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError):
        call(nn.Sequential(nn.BatchNorm1d(6)))
    with pytest.raises(ValueError):
        call(nn.Sequential(nn.LayerNorm(6), nn.ReLU()))


def test_scores_bad_masks():
    model = tiny_cnn(0)
    params = dict(model.named_parameters())
    names = default_prunable_names(model)
    good = {k: torch.ones(params[k].shape, dtype=torch.bool) for k in names}

    missing = dict(good)
    missing.pop(names[0])
    extra = dict(good, **{"bn1.weight": torch.ones(4, dtype=torch.bool)})
    unknown = dict(good, **{"nope.weight": torch.ones(2, 2, dtype=torch.bool)})
    wrong_shape = dict(good, **{names[1]: torch.ones(3, 3, dtype=torch.bool)})
    transposed = dict(good, **{"fc.weight": torch.ones(params["fc.weight"].shape[::-1], dtype=torch.bool)})
    for bad in (missing, extra, unknown, wrong_shape, transposed):
        with pytest.raises(ValueError, match="masks"):
            ntk_sap_scores(model, CNN_SHAPE, bad, **SCORE_FAST)
    with pytest.raises(TypeError, match="masks"):
        ntk_sap_scores(model, CNN_SHAPE, [good[k] for k in names], **SCORE_FAST)
    with pytest.raises(TypeError, match="masks"):
        ntk_sap_scores(model, CNN_SHAPE, dict(good, **{names[0]: [[True]]}), **SCORE_FAST)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.uint8])
def test_scores_non_bool_masks_rejected(dtype):
    """Masks are bool tensors (True = kept); a float/int mask is rejected, not silently cast."""
    model = tiny_cnn(0)
    params = dict(model.named_parameters())
    names = default_prunable_names(model)
    bad = {k: torch.ones(params[k].shape, dtype=dtype) for k in names}
    with pytest.raises((TypeError, ValueError), match="masks"):
        ntk_sap_scores(model, CNN_SHAPE, bad, **SCORE_FAST)
