"""Small models for the channel-granularity tests (tests/select/test_structured.py, tests/io/test_export.py).

Each builder is seeded. ``with_random_norms`` gives every BatchNorm random affine parameters and
running statistics, so a removed channel's BatchNorm output (its shift) is far from zero: the
exported model must match the masked one although the masked model still computes that channel.
"""

from __future__ import annotations

import torch
from torch import nn

from ntksap_fast.models import CifarResNet

IMAGE = (3, 16, 16)


def with_random_norms(model: nn.Module, seed: int = 1) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=generator))
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator))
                m.running_mean.copy_(0.5 * torch.randn(m.running_mean.shape, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=generator))
    return model


def resnet8() -> nn.Module:
    """The paper's CIFAR ResNet with one block per stage and 4, 8, 16 channels."""
    torch.manual_seed(0)
    return with_random_norms(CifarResNet(8, num_classes=10, width=4))


class TinyVGG(nn.Module):
    """conv-bn-relu blocks with max pools, a flatten of a 2x2 map (4 features per channel) into a
    hidden Linear, then the classifier: the flatten's index mapping couples channel j of the last
    conv to input features 4j..4j+3."""

    def __init__(self) -> None:
        super().__init__()
        layers, width = [], 3
        for out in (8, "M", 12, "M", 16, "M"):
            if out == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(width, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
                width = out
        self.features = nn.Sequential(*layers)
        self.hidden = nn.Linear(16 * 2 * 2, 24)
        self.classifier = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.hidden(torch.flatten(self.features(x), 1))))


def tiny_vgg() -> nn.Module:
    torch.manual_seed(0)
    return with_random_norms(TinyVGG())


class ConcatNet(nn.Module):
    """Two branches concatenated along the channels (an Inception/DenseNet pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.left = nn.Sequential(nn.Conv2d(6, 5, 1), nn.BatchNorm2d(5), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(6, 7, 3, padding=1), nn.BatchNorm2d(7), nn.ReLU())
        self.merge = nn.Conv2d(12, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = self.merge(torch.cat([self.left(x), self.right(x)], dim=1))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(x), 1), 1))


def concat_net() -> nn.Module:
    torch.manual_seed(0)
    return with_random_norms(ConcatNet())


class MixingNet(nn.Module):
    """A channel-mixing matrix product between two convs (Torch-Pruning calls it element-wise), a
    grouped convolution, and a LayerNorm over features: all three groups must stay whole."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.mix = nn.Parameter(torch.randn(6, 6), requires_grad=False)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv3 = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.einsum("bchw,cd->bdhw", x, self.mix)
        x = torch.relu(self.grouped(torch.relu(self.conv2(x))))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv3(x)), 1), 1)
        return self.fc(self.norm(self.head(x)))


def mixing_net() -> nn.Module:
    torch.manual_seed(0)
    return MixingNet()
