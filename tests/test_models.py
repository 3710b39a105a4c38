"""ntksap_fast.models: CIFAR ResNets and VGG-16 have the published layer counts and parameter counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ntksap_fast import models as nf_models


def cifar_resnet_param_count(depth: int, num_classes: int = 10) -> int:
    """Parameters of He et al.'s CIFAR ResNet with option-B (1x1 conv + BN) shortcuts."""
    n = (depth - 2) // 6

    def conv(cin, cout, k):
        return cin * cout * k * k

    def bn(c):
        return 2 * c

    total = conv(3, 16, 3) + bn(16)
    cin = 16
    for planes in (16, 32, 64):
        for _ in range(n):
            total += conv(cin, planes, 3) + bn(planes) + conv(planes, planes, 3) + bn(planes)
            if cin != planes:
                total += conv(cin, planes, 1) + bn(planes)
            cin = planes
    return total + 64 * num_classes + num_classes


@pytest.mark.parametrize(
    "name,depth,approx", [("resnet20", 20, 0.27e6), ("resnet32", 32, 0.46e6), ("resnet56", 56, 0.85e6)]
)
def test_cifar_resnets(name, depth, approx):
    model = getattr(nf_models, name)()
    count = sum(p.numel() for p in model.parameters())
    assert count == cifar_resnet_param_count(depth)
    assert abs(count - approx) / approx < 0.02
    assert tuple(model.input_shape) == (3, 32, 32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == depth - 1 + 2  # 6n + 1 convs on the main path + 2 projection shortcuts
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    m100 = getattr(nf_models, name)(num_classes=100)
    assert sum(p.numel() for p in m100.parameters()) == cifar_resnet_param_count(depth, 100)
    with torch.no_grad():
        assert m100.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 100)
    assert nf_models.MODELS[name] is getattr(nf_models, name)


@pytest.mark.parametrize("depth", [0, 2, 7, 19, 21, -4])
def test_cifar_resnet_depth_validation(depth):
    with pytest.raises(ValueError, match="depth"):
        nf_models.CifarResNet(depth)


def test_vgg16():
    bn = nf_models.vgg16_bn(num_classes=100)
    plain = nf_models.vgg16()
    for model, n_bn in ((bn, 13), (plain, 0)):
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        assert len(convs) == 13
        assert len(bns) == n_bn
        assert len(linears) == 1
        assert tuple(model.input_shape) == (3, 32, 32)
        assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
        assert all(c.kernel_size == (3, 3) for c in convs)
        assert all((c.bias is None) == (n_bn > 0) for c in convs)
    assert bn.classifier.out_features == 100
    with torch.no_grad():
        assert bn.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 100)
        assert plain.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
