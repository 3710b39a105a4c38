"""The paper's CIFAR models as plain ``nn.Module``s.

Each model carries ``input_shape`` (a tuple, without the batch dimension), so the pruning
functions can be called without one. Constructors take ``num_classes``.

* ``resnet20``, ``resnet32``, ``resnet56``: He et al.'s CIFAR ResNets (3 stages of 16/32/64
  channels, ``6n + 2`` layers, option-B 1x1 projection shortcuts).
* ``vgg16``, ``vgg16_bn``: VGG-16 for 32x32 inputs (13 conv layers, global average pool, one
  linear classifier), as in the Synaptic-Flow / NTK-SAP code bases.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["resnet20", "resnet32", "resnet56", "vgg16", "vgg16_bn", "MODELS", "CifarResNet", "VGG"]

CIFAR_INPUT_SHAPE = (3, 32, 32)


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs. Input ``(B, 3, 32, 32)`` float, output ``(B, num_classes)``.

    ``width``: channels of the first stage (16 in the paper); the stages have ``width``,
    ``2 * width`` and ``4 * width`` channels.
    """

    input_shape = CIFAR_INPUT_SHAPE

    def __init__(self, depth: int, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth must be 6n + 2 with n >= 1, got {depth}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers: list[nn.Module] = []
        in_planes = width
        for planes, stride in ((width, 1), (2 * width, 2), (4 * width, 2)):
            for i in range(n):
                layers.append(_BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)


_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class VGG(nn.Module):
    """VGG-16 for 32x32 inputs. Input ``(B, 3, 32, 32)`` float, output ``(B, num_classes)``."""

    input_shape = CIFAR_INPUT_SHAPE

    def __init__(self, num_classes: int = 10, batch_norm: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers.append(nn.Conv2d(in_channels, int(v), 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(int(v)))
            layers.append(nn.ReLU(inplace=True))
            in_channels = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        out = torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)
        return self.classifier(out)


def resnet20(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-20 (0.27M parameters)."""
    return CifarResNet(20, num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-32 (0.46M parameters)."""
    return CifarResNet(32, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-56 (0.85M parameters)."""
    return CifarResNet(56, num_classes)


def vgg16(num_classes: int = 10) -> VGG:
    """VGG-16 without BatchNorm, for 32x32 inputs."""
    return VGG(num_classes, batch_norm=False)


def vgg16_bn(num_classes: int = 10) -> VGG:
    """VGG-16 with BatchNorm, for 32x32 inputs (the paper's CIFAR-100 model)."""
    return VGG(num_classes, batch_norm=True)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "vgg16": vgg16,
    "vgg16_bn": vgg16_bn,
}
