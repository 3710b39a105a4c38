"""The paper's four settings (docs/DESIGN.md section 2) as presets."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Preset", "PRESETS"]


@dataclass(frozen=True)
class Preset:
    """One setting of the paper.

    Attributes:
        model: model name (``ntksap_fast.models`` or ``torchvision:<name>``).
        input_shape: one input's shape; num_classes: outputs of the model.
        draws, batch_size: draws per round and inputs per draw (an int or one per draw).
        iterations: rounds T; epsilon: perturbation size.
        densities: the final densities the paper reports (``0.8 ** k``).
    """

    model: str
    input_shape: tuple[int, ...]
    num_classes: int
    draws: int
    batch_size: int | tuple[int, ...]
    iterations: int
    epsilon: float = 0.01
    densities: tuple[float, ...] = field(default=tuple(0.8**k for k in range(2, 19)))

    def prune_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``ntk_sap_prune`` for this setting (density left to the caller)."""
        return {
            "input_shape": self.input_shape, "iterations": self.iterations, "draws": self.draws,
            "batch_size": self.batch_size, "epsilon": self.epsilon,
        }


PRESETS: dict[str, Preset] = {
    "cifar10": Preset("resnet20", (3, 32, 32), 10, draws=5, batch_size=100, iterations=20),
    "cifar100": Preset("vgg16_bn", (3, 32, 32), 100, draws=4, batch_size=(256, 256, 256, 232), iterations=100),
    "tiny-imagenet": Preset("torchvision:resnet18", (3, 64, 64), 200, draws=8,
                            batch_size=(256,) * 7 + (208,), iterations=100),
    "imagenet": Preset("torchvision:resnet50", (3, 224, 224), 1000, draws=40,
                       batch_size=(256,) * 39 + (16,), iterations=100),
}
