"""Helpers shared by the API-level test files: tiny models, the keep-count formula written out
independently of the package, and a snapshot of everything pruning must leave alone."""

from __future__ import annotations

import math

import torch
from torch import nn

FAST = dict(draws=1, batch_size=4, progress=False)
SCORE_FAST = dict(draws=1, batch_size=4)


def expected_keep(n_total: int, density: float) -> int:
    """DESIGN.md: n_keep = N - floor((1 - d) * N), computed independently of the package."""
    return n_total - math.floor((1.0 - density) * n_total)


def expected_schedule(density: float, iterations: int, schedule: str) -> list[float]:
    if schedule == "exponential":
        return [density ** (t / iterations) for t in range(1, iterations + 1)]
    return [1.0 - (1.0 - density) * t / iterations for t in range(1, iterations + 1)]


def default_prunable_names(model: nn.Module) -> list[str]:
    """Names, in named_parameters() order, of the weight of every Conv1d/2d/3d and Linear."""
    owner = {}
    for mname, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = mod
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    return [n for n, _ in model.named_parameters() if isinstance(owner[n], kinds) and n.endswith("weight")]


def flat(masks: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([m.reshape(-1) for m in masks.values()])


def mlp(seed: int = 0, width: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4))


class TinyCNN(nn.Module):
    """Conv + BN + grouped conv + BN + Linear, input (3, 8, 8)."""

    input_hw = (3, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(self.drop(x))


def tiny_cnn(seed: int = 0) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN()


CNN_SHAPE = (3, 8, 8)
MLP_SHAPE = (6,)


def snapshot(model: nn.Module) -> dict:
    """Everything about the model that pruning must leave alone."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "param_ids": [(n, id(p)) for n, p in model.named_parameters()],
        "buffer_ids": [(n, id(b)) for n, b in model.named_buffers()],
        "training": [(n, m.training) for n, m in model.named_modules()],
        "requires_grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "grads": [(n, p.grad is None) for n, p in model.named_parameters()],
        "hooks": [
            (
                n,
                dict(m._forward_hooks),
                dict(m._forward_pre_hooks),
                dict(m._backward_hooks),
                dict(getattr(m, "_forward_hooks_with_kwargs", {})),
            )
            for n, m in model.named_modules()
        ],
        "global_hooks": (
            len(torch.nn.modules.module._global_forward_hooks),
            len(torch.nn.modules.module._global_forward_pre_hooks),
        ),
    }


def assert_same_snapshot(before: dict, model: nn.Module) -> None:
    after = snapshot(model)
    assert list(before["state"]) == list(after["state"])
    for k, v in before["state"].items():
        w = after["state"][k]
        assert v.dtype == w.dtype and v.shape == w.shape, k
        assert torch.equal(v, w), f"state_dict[{k!r}] changed"
    assert before["param_ids"] == after["param_ids"], "parameters were replaced"
    assert before["buffer_ids"] == after["buffer_ids"], "buffers were replaced"
    assert before["training"] == after["training"], "train/eval modes changed"
    assert before["requires_grad"] == after["requires_grad"], "requires_grad flags changed"
    assert before["grads"] == after["grads"], ".grad of a parameter changed"
    for (n, fh, fph, bh, fhk), (n2, fh2, fph2, bh2, fhk2) in zip(before["hooks"], after["hooks"]):
        assert n == n2
        assert fh == fh2, f"forward hooks of {n!r} changed"
        assert fph == fph2, f"forward pre-hooks of {n!r} changed"
        assert bh == bh2, f"backward hooks of {n!r} changed"
        assert fhk == fhk2, f"forward hook kwargs flags of {n!r} changed"
    assert before["global_hooks"] == after["global_hooks"], "global module hooks changed"
