"""Checkpoints of ``ntk_sap_prune``: resume to identical masks, refuse anything that would mix runs.

Every setting the masks depend on is stored; a resume that changes any one of them must raise
``CheckpointError`` (a ``ValueError``) naming it, and so must a model whose non-pruned tensors
(biases, BatchNorm parameters and buffers) differ (``checkpoint.model_digest``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from _files import mode, plain_open_mode, umask
from _oracle_models import bn_convnet
from ntksap_fast import ScorerOptions, ntk_sap_prune
from ntksap_fast.io.checkpoint import CheckpointError, load_checkpoint, model_digest, save_checkpoint
from ntksap_fast.options import changes_masks
from ntksap_fast.select.loop import PruneOptions

SHAPE = (3, 8, 8)
BASE = dict(
    input_shape=SHAPE,
    iterations=4,
    schedule="exponential",
    draws=2,
    batch_size=4,
    epsilon=0.01,
    seed=3,
    params=None,
    dtype=None,
)


class _Interrupt(Exception):
    pass


def _interrupt_after(k):
    def hook(t, masks):
        if t == k:
            raise _Interrupt

    return hook


def _prune(path, model=None, density=0.1, **overrides):
    kwargs = BASE | overrides
    return ntk_sap_prune(bn_convnet() if model is None else model, density, progress=False, checkpoint=path, **kwargs)


@pytest.fixture
def interrupted(tmp_path):
    """A checkpoint holding round 1 of 4 of the BASE prune of ``bn_convnet()`` at density 0.1."""
    path = tmp_path / "ckpt.bin"
    with pytest.raises(_Interrupt):
        _prune(path, on_round=_interrupt_after(1))
    return path


def test_interrupted_run_resumes_to_identical_masks(tmp_path, interrupted):
    uninterrupted = _prune(None)
    rounds_run = []
    resumed = _prune(interrupted, on_round=lambda t, m: rounds_run.append(t))
    assert rounds_run == [2, 3, 4]  # round 1 came from the checkpoint
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name])
    again = _prune(interrupted, on_round=lambda t, m: rounds_run.append(t))  # finished: no round runs
    assert rounds_run == [2, 3, 4] and all(torch.equal(again[n], uninterrupted[n]) for n in again)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.bin"]  # no temporary files left behind


def _wider_convnet() -> nn.Module:
    """bn_convnet with one more channel in its first conv: same names, other shapes."""
    model = bn_convnet()
    model[0] = nn.Conv2d(3, 8, 3, padding=1)
    model[1] = nn.BatchNorm2d(8)
    model[4] = nn.Conv2d(8, 8, 3, padding=1, groups=2)
    return model


# setting -> (the change, the word the error must contain)
CHANGES = {
    "density": (dict(density=0.2), "density"),
    "iterations": (dict(iterations=5), "iterations"),
    "schedule": (dict(schedule="linear"), "schedule"),
    "draws": (dict(draws=3), "draws"),
    "batch_size": (dict(batch_size=[4, 5]), "batch_size"),
    "epsilon": (dict(epsilon=0.02), "epsilon"),
    "seed": (dict(seed=4), "seed"),
    "input_shape": (dict(input_shape=(3, 10, 10)), "input_shape"),
    "dtype": (dict(dtype=torch.float64), "dtype"),
    "params": (dict(params=["0.weight", "4.weight"]), "tensors"),
    "tensor shapes": (dict(model=_wider_convnet()), "tensors"),
}


@pytest.mark.parametrize("setting", list(CHANGES))
def test_resume_with_another_setting_is_refused(interrupted, setting):
    change, word = CHANGES[setting]
    with pytest.raises(CheckpointError, match=word):
        _prune(interrupted, **change)
    _prune(interrupted)  # the checkpoint itself is still good for the same settings


#: A value other than BASE's for every option that changes the masks (``changes_masks``). An option
#: marked so without an entry here fails the test below, so a new option is covered when it is added.
OTHER_VALUES = {
    "draws": 3,
    "batch_size": 5,
    "epsilon": 0.02,
    "seed": 4,
    "dtype": torch.float64,
    "allow_tf32": False,
    "density": 0.2,
    "iterations": 5,
    "schedule": "linear",
    "scope": "layer",
    "min_layer_density": 0.05,
    "invert": True,
    "target_overlap": 0.9,
    "max_draws": 6,
    "compile": True,
    "granularity": "2:4",
}


def test_every_option_that_changes_the_masks_is_in_the_checkpoint(interrupted):
    """Derived, not listed: each field of ScorerOptions and PruneOptions that says it changes the masks
    is refused, by name, when a resume gives it another value."""
    names = [f.name for cls in (ScorerOptions, PruneOptions) for f in dataclasses.fields(cls) if changes_masks(f)]
    assert not set(names) - set(OTHER_VALUES), f"give OTHER_VALUES a changed value of {set(names) - set(OTHER_VALUES)}"
    assert set(OTHER_VALUES) <= set(names), f"no longer said to change the masks: {set(OTHER_VALUES) - set(names)}"
    for name in names:
        change = {name: OTHER_VALUES[name]}
        if name == "max_draws":
            change["target_overlap"] = 0.9  # max_draws applies with target_overlap only
        if name == "granularity":
            change["density"] = 0.5  # N:M masks keep N/M of each group
        with pytest.raises(CheckpointError, match=rf"\b{name}\b"):
            _prune(interrupted, **change)
    _prune(interrupted)  # and the checkpoint still resumes with its own settings


def test_resume_with_other_biases_is_refused(interrupted):
    """Same names and shapes, other non-pruned values: the masks would differ, so no silent resume.
    (Needs the prune to store ``model_digest(model, prunable names)`` in its checkpoint settings.)"""
    model = bn_convnet()
    with torch.no_grad():
        model[9].bias.add_(0.5)
    with pytest.raises(CheckpointError):
        _prune(interrupted, model=model)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_corrupted_checkpoint_is_refused(interrupted, damage):
    data = bytearray(interrupted.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-10] ^= 0xFF
    else:
        data = bytearray()
    interrupted.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted|truncated|not an ntksap_fast checkpoint"):
        _prune(interrupted)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600)])
def test_checkpoint_has_the_mode_open_gives(tmp_path, mask, expected):
    path = tmp_path / "ckpt.bin"
    with umask(mask):
        save_checkpoint(path, {"seed": 3}, 1, torch.ones(5, dtype=torch.bool))
        assert mode(path) == expected == plain_open_mode(tmp_path)
        save_checkpoint(path, {"seed": 3}, 2, torch.ones(5, dtype=torch.bool))  # the next round's write
    assert mode(path) == expected and load_checkpoint(path, {"seed": 3})[0] == 2


@pytest.mark.parametrize("failing", ["os.fsync", "os.replace"])
def test_interrupted_checkpoint_write_keeps_the_old_checkpoint(tmp_path, monkeypatch, failing):
    path = tmp_path / "ckpt.bin"
    save_checkpoint(path, {"seed": 3}, 1, torch.ones(5, dtype=torch.bool))
    old = path.read_bytes()

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(failing, fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"seed": 3}, 2, torch.zeros(5, dtype=torch.bool))
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["ckpt.bin"]


def test_checkpoint_argument_type():
    with pytest.raises(TypeError, match="checkpoint"):
        _prune(123)


# ---------------------------------------------------------------------------------------------
# model_digest
# ---------------------------------------------------------------------------------------------
PRUNABLE = ["0.weight", "4.weight", "9.weight"]


def _changed(edit) -> str:
    model = bn_convnet()
    with torch.no_grad():
        edit(model)
    return model_digest(model, PRUNABLE)


def test_model_digest_sees_every_non_pruned_tensor_and_nothing_else():
    base = model_digest(bn_convnet(), PRUNABLE)
    assert len(base) == 64 and base == model_digest(bn_convnet(), PRUNABLE)
    changed = {
        "bias": lambda m: m[0].bias[3].add_(1e-6),
        "bn weight": lambda m: m[1].weight[0].mul_(-1),
        "running_mean": lambda m: m[5].running_mean[2].add_(1.0),
        "running_var": lambda m: m[5].running_var[0].mul_(2.0),
    }
    for what, edit in changed.items():
        assert _changed(edit) != base, what
    unchanged = {
        "prunable weight": lambda m: m[4].weight.normal_(),
        "num_batches_tracked": lambda m: m[1].num_batches_tracked.add_(7),
        "requires_grad": lambda m: m[0].bias.requires_grad_(False),
        "strides": lambda m: m[1].register_buffer("running_mean", torch.stack([m[1].running_mean] * 2, 1)[:, 0]),
    }
    for what, edit in unchanged.items():
        assert _changed(edit) == base, what
    assert model_digest(bn_convnet().double(), PRUNABLE) != base  # dtype is part of it
    assert model_digest(bn_convnet(), PRUNABLE[:2]) != base  # a tensor moved in or out of the prunable set


def test_model_digest_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        model_digest("resnet", PRUNABLE)
    with pytest.raises(TypeError, match="prunable"):
        model_digest(bn_convnet(), "0.weight")
    with pytest.raises(ValueError, match="prunable"):
        model_digest(bn_convnet(), ["0.weight", "nope.weight"])
