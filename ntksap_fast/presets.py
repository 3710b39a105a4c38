"""The paper's four settings (docs/DESIGN.md section 2) as presets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .options import ScorerOptions

__all__ = ["Preset", "PRESETS", "PAPER_OPTIONS"]

#: The scorer options each of the paper's settings fixes (the others stay at their defaults).
PAPER_OPTIONS = ("draws", "batch_size", "epsilon")


@dataclass(frozen=True)
class Preset:
    """One setting of the paper.

    Attributes:
        model: model name (``ntksap_fast.models`` or ``torchvision:<name>``).
        input_shape: one input's shape; num_classes: outputs of the model.
        iterations: rounds T.
        options: the scorer's options of the setting (draws, inputs per draw; the rest at their
            ``ScorerOptions`` defaults, epsilon 0.01 among them).
        densities: the final densities the paper reports (``0.8 ** k``).
    """

    model: str
    input_shape: tuple[int, ...]
    num_classes: int
    iterations: int
    options: ScorerOptions
    densities: tuple[float, ...] = field(default=tuple(0.8**k for k in range(2, 19)))

    def prune_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``ntk_sap_prune`` for this setting (density left to the caller): the
        input shape, the rounds and the scorer options the paper sets (``PAPER_OPTIONS``)."""
        return {
            "input_shape": self.input_shape,
            "iterations": self.iterations,
            **{name: getattr(self.options, name) for name in PAPER_OPTIONS},
        }


PRESETS: dict[str, Preset] = {
    "cifar10": Preset("resnet20", (3, 32, 32), 10, 20, ScorerOptions(draws=5, batch_size=100)),
    "cifar100": Preset("vgg16_bn", (3, 32, 32), 100, 100, ScorerOptions(draws=4, batch_size=(256, 256, 256, 232))),
    "tiny-imagenet": Preset(
        "torchvision:resnet18", (3, 64, 64), 200, 100, ScorerOptions(draws=8, batch_size=(256,) * 7 + (208,))
    ),
    "imagenet": Preset(
        "torchvision:resnet50", (3, 224, 224), 1000, 100, ScorerOptions(draws=40, batch_size=(256,) * 39 + (16,))
    ),
}
