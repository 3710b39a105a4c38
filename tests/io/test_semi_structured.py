"""``to_semi_structured``: its checks and CPU refusal; which layers it converts and that the copy
computes the masked model, with PyTorch's CUDA-only converter replaced by a stand-in on the CPU;
the real conversion on a GPU (not run without one)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ntksap_fast.io import semi_structured
from ntksap_fast.io.masks import apply_masks
from ntksap_fast.io.semi_structured import to_semi_structured


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def _two_of_four(shape: tuple[int, int], shift: int = 0) -> torch.Tensor:
    """Keeps inputs 2g + (row + shift) % 2 ... : 2 of every 4, varying by row."""
    cols = torch.arange(shape[1])
    rows = torch.arange(shape[0])[:, None]
    return ((cols // 2 + rows + shift) % 2 == 0).expand(shape).clone()


class _Marked(torch.Tensor):
    """Stands in for a semi-structured tensor on the CPU: the dense values, marked as converted."""


@pytest.fixture
def cpu_converter(monkeypatch):
    monkeypatch.setattr(semi_structured, "_check_cuda", lambda model: None)
    monkeypatch.setattr(semi_structured, "_convert", lambda weight: weight.clone().as_subclass(_Marked))


def test_refuses_a_cpu_model() -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"model must be on a CUDA device.*CUDA only.*\['cpu'\]"):
        to_semi_structured(model, {"2.weight": _two_of_four((8, 8))})


@pytest.mark.parametrize(
    "masks, error, message",
    [
        ([], TypeError, "masks must be a dict"),
        ({"2.weight": torch.ones(8, 8)}, TypeError, r"masks\['2.weight'\] must be a bool tensor"),
        ({"9.weight": torch.ones(8, 8, dtype=torch.bool)}, ValueError, "no parameter named '9.weight'"),
        ({"2.weight": torch.ones(8, 4, dtype=torch.bool)}, ValueError, r"masks\['2.weight'\] has shape \(8, 4\)"),
    ],
)
def test_checks_masks(masks, error, message) -> None:
    with pytest.raises(error, match=message):
        to_semi_structured(_model(), masks)


def test_checks_model() -> None:
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        to_semi_structured({"weight": torch.ones(4, 4)})


def test_converts_2_of_4_linears_only(cpu_converter, caplog) -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = {
        "0.weight": torch.rand(8, 6) > 0.5,
        "2.weight": _two_of_four((8, 8)),
        "4.weight": torch.ones(4, 8, dtype=torch.bool),
    }
    with caplog.at_level("INFO", logger="ntksap_fast"):
        out = to_semi_structured(model, masks)
    assert type(out[2].weight.data) is _Marked and not out[2].weight.requires_grad
    assert type(out[0].weight.data) is not _Marked and type(out[4].weight.data) is not _Marked
    assert "['2.weight']" in caplog.text and "input dimension 6 is not a multiple of 4" in caplog.text
    assert "'4.weight': 'more than 2 nonzeros" in caplog.text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model untouched
    x = torch.randn(5, 6)
    masked = {n: p * masks[n] if n in masks else p for n, p in model.named_parameters()}
    torch.testing.assert_close(out(x), torch.func.functional_call(model, masked, (x,)))


def test_masks_the_model_carries(cpu_converter) -> None:
    model = _model()
    apply_masks(model, {"2.weight": _two_of_four((8, 8))})
    out = to_semi_structured(model)
    assert type(out[2].weight.data) is _Marked
    assert not any(n.endswith("_orig") for n, _ in out.named_parameters())
    assert hasattr(model[2], "weight_orig") and hasattr(model[2], "weight_mask")  # still masked, still its own
    x = torch.randn(5, 6)
    torch.testing.assert_close(out(x), model(x))


def test_nothing_convertible(cpu_converter, monkeypatch) -> None:
    def refuse(weight):
        raise RuntimeError("shape not supported")

    monkeypatch.setattr(semi_structured, "_convert", refuse)
    with pytest.raises(
        ValueError,
        match=r"no Linear weight .*'2.weight': 'torch.sparse.to_sparse_semi_structured "
        r"refused it: shape not supported'",
    ):
        to_semi_structured(_model(), {"2.weight": _two_of_four((8, 8))})


@pytest.mark.cuda  # semi-structured sparse tensors are CUDA only
def test_cuda_linear_matches_dense() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64)).half().cuda()
    masks = {"0.weight": _two_of_four((128, 128)).cuda(), "2.weight": _two_of_four((64, 128), 1).cuda()}
    out = to_semi_structured(model, masks)
    x = torch.randn(64, 128, dtype=torch.half, device="cuda")
    masked = {n: p * masks[n] if n in masks else p for n, p in model.named_parameters()}
    want = torch.func.functional_call(model, masked, (x,))
    assert isinstance(out[0].weight, torch.sparse.SparseSemiStructuredTensor)
    torch.testing.assert_close(out(x), want, rtol=1e-2, atol=1e-2)
