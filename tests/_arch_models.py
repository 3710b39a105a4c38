"""Tiny instances of modern architecture families for tests/test_architectures.py.

Each builder is seeded and returns a model small enough for a few CPU forwards per second on two
cores. ``FAMILIES`` maps a family name to ``(builder, input_shape, output)``: one input's shape
without the batch dim, and the ``output=`` selector the model needs (None when it returns a tensor).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torchvision.models import VisionTransformer
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf
from torchvision.models.mobilenetv3 import MobileNetV3, _mobilenet_v3_conf
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

IMAGE = (3, 32, 32)
SEQUENCE = (5, 6)  # (time steps, features), batch_first


def vit() -> nn.Module:
    """torchvision ViT: 16 patches of 8x8, 2 encoder blocks (nn.MultiheadAttention), hidden 16."""
    torch.manual_seed(0)
    return VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10
    )


def swin() -> nn.Module:
    """torchvision Swin (v1): 8x8 tokens, 2x2 windows, two blocks per stage (the second shifted)."""
    torch.manual_seed(0)
    return SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[2, 2], num_heads=[1, 2], window_size=[2, 2], num_classes=10
    )


def swin_v2() -> nn.Module:
    """torchvision Swin v2 blocks (cosine attention, log-spaced continuous position bias MLP)."""
    torch.manual_seed(0)
    return SwinTransformer(
        patch_size=[4, 4],
        embed_dim=8,
        depths=[2, 2],
        num_heads=[1, 2],
        window_size=[2, 2],
        num_classes=10,
        block=SwinTransformerBlockV2,
        downsample_layer=PatchMergingV2,
    )


def convnext() -> nn.Module:
    """torchvision ConvNeXt: LayerNorm, depthwise 7x7, GELU, layer scale, two stages of one block."""
    torch.manual_seed(0)
    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=10)


def efficientnet() -> nn.Module:
    """torchvision EfficientNet-B0's first three MBConv stages (SiLU, squeeze-excitation, BatchNorm)."""
    torch.manual_seed(0)
    stages, _ = _efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.1)
    return EfficientNet(stages[:3], dropout=0.2, num_classes=10, last_channel=32)


def mobilenet_v3() -> nn.Module:
    """torchvision MobileNetV3-Small's first five blocks (SE with ReLU, then SE with hardswish)."""
    torch.manual_seed(0)
    blocks, _ = _mobilenet_v3_conf("mobilenet_v3_small", width_mult=0.25, reduced_tail=True)
    assert any(b.use_hs and b.use_se for b in blocks[:5])
    return MobileNetV3(blocks[:5], last_channel=32, num_classes=10)


class SequenceClassifier(nn.Module):
    """A 2-layer recurrent net (batch_first) whose last step goes through a Linear to 4 classes.

    The last step of each direction is its final hidden state ``h_n`` (time ``T - 1`` forward,
    time 0 in reverse): the reverse direction's output at ``T - 1`` is its first step, with a zero
    state, so ``out[:, -1]`` would leave its ``weight_hh`` without any gradient.
    """

    def __init__(self, cell: type[nn.RNNBase], bidirectional: bool) -> None:
        super().__init__()
        self.directions = 2 if bidirectional else 1
        self.rnn = cell(SEQUENCE[1], 8, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(8 * self.directions, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h_n = self.rnn(x)
        if isinstance(h_n, tuple):  # LSTM: (h_n, c_n)
            h_n = h_n[0]
        return self.head(torch.cat(list(h_n[-self.directions :]), dim=1))


def lstm_bidirectional() -> nn.Module:
    torch.manual_seed(0)
    return SequenceClassifier(nn.LSTM, bidirectional=True)


def gru() -> nn.Module:
    torch.manual_seed(0)
    return SequenceClassifier(nn.GRU, bidirectional=False)


class DictEncoder(nn.Module):
    """nn.TransformerEncoder over a sequence; returns ``{"logits", "hidden"}`` like a HF model."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(SEQUENCE[1], 16)
        layer = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.encoder(self.embed(x))
        return {"logits": self.head(hidden.mean(1)), "hidden": hidden}


def dict_encoder() -> nn.Module:
    torch.manual_seed(0)
    return DictEncoder()


def logits(out: dict[str, Any]) -> torch.Tensor:
    return out["logits"]


FAMILIES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], Callable[[Any], torch.Tensor] | None]] = {
    "vit": (vit, IMAGE, None),
    "swin": (swin, IMAGE, None),
    "swin_v2": (swin_v2, IMAGE, None),
    "convnext": (convnext, IMAGE, None),
    "efficientnet": (efficientnet, IMAGE, None),
    "mobilenet_v3": (mobilenet_v3, IMAGE, None),
    "lstm_bidirectional": (lstm_bidirectional, SEQUENCE, None),
    "gru": (gru, SEQUENCE, None),
    "dict_encoder": (dict_encoder, SEQUENCE, logits),
}


class TwoAttentions(nn.Module):
    """A packed MHA (E = 64: ``in_proj_weight`` (192, 64)) feeding one with separate projections
    (E = 32, kdim = 16, vdim = 48: ``q/k/v_proj_weight`` (32, 32), (32, 16), (32, 48))."""

    def __init__(self) -> None:
        super().__init__()
        self.packed = nn.MultiheadAttention(64, 4, batch_first=True)
        self.to_q, self.to_k, self.to_v = nn.Linear(64, 32), nn.Linear(64, 16), nn.Linear(64, 48)
        self.split = nn.MultiheadAttention(32, 2, kdim=16, vdim=48, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.packed(x, x, x)
        o, _ = self.split(self.to_q(h), self.to_k(h), self.to_v(h))
        return self.head(o.mean(1))
