"""Small seeded models for the oracle, multi-round and checkpoint tests.

Every builder seeds torch's generator itself, so a model's non-prunable tensors (biases,
BatchNorm affine parameters) do not depend on which tests ran before. BatchNorm layers get
non-trivial affine parameters and *wrong* running statistics: NTK-SAP must ignore the running
statistics (it normalises with the clean branch's batch statistics), so a path that reads them
disagrees with the oracle.
"""

from __future__ import annotations

import torch
from torch import nn


def _scramble_batchnorm(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.randn_like(m.weight))
                m.bias.copy_(torch.randn_like(m.bias))
                m.running_mean.copy_(torch.randn_like(m.running_mean) * 3)
                m.running_var.copy_(torch.rand_like(m.running_var) * 5 + 0.1)
    return model


def mlp(seed: int = 0) -> nn.Module:
    """Linear, BatchNorm1d, ReLU, Linear, Tanh, Linear; input (20,)."""
    torch.manual_seed(seed)
    return _scramble_batchnorm(
        nn.Sequential(
            nn.Flatten(),
            nn.Linear(20, 24),
            nn.BatchNorm1d(24),
            nn.ReLU(),
            nn.Linear(24, 24),
            nn.Tanh(),
            nn.Linear(24, 5),
        )
    )


def bn_convnet(seed: int = 0) -> nn.Module:
    """Conv2d + BatchNorm2d + ReLU + max-pool, grouped conv + BatchNorm2d + ReLU, Linear; input (3, 8, 8)."""
    torch.manual_seed(seed)
    return _scramble_batchnorm(
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1, groups=2),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 4),
        )
    )


class TinyResNet(nn.Module):
    """Stem, one strided basic block with a 1x1-conv + BatchNorm shortcut, head; input (3, 8, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 12, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.shortcut = nn.Sequential(nn.Conv2d(8, 12, 1, stride=2, bias=False), nn.BatchNorm2d(12))
        self.fc = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        x = torch.relu(y + self.shortcut(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def tiny_resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _scramble_batchnorm(TinyResNet())


def conv1d(seed: int = 0) -> nn.Module:
    """Conv1d + BatchNorm1d + ReLU, grouped Conv1d + ReLU, Linear; input (4, 30)."""
    torch.manual_seed(seed)
    return _scramble_batchnorm(
        nn.Sequential(
            nn.Conv1d(4, 8, 5, padding=2),
            nn.BatchNorm1d(8),
            nn.ReLU(),
            nn.Conv1d(8, 8, 3, groups=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
            nn.Linear(8, 3),
        )
    )


#: name -> (builder, input shape)
MODELS = {
    "mlp": (mlp, (20,)),
    "bn_convnet": (bn_convnet, (3, 8, 8)),
    "tiny_resnet": (tiny_resnet, (3, 8, 8)),
    "conv1d": (conv1d, (4, 30)),
}


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Concatenation of a dict of tensors in its (named_parameters) order, on the CPU."""
    return torch.cat([v.reshape(-1).cpu() for v in tensors.values()])
