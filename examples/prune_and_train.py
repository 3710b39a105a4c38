"""Prune your own model with NTK-SAP, then train it: the whole workflow in one runnable script.

1. build any ``nn.Module`` (here a small CNN; ``--model resnet20`` for the paper's CIFAR ResNet);
2. ``ntk_sap_prune`` it at initialization (small settings, so it runs in seconds on a CPU);
3. ``apply_masks``: the ``torch.nn.utils.prune`` convention, each pruned ``weight`` becomes
   ``weight_orig * weight_mask``, so training cannot bring a pruned weight back;
4. train a few steps (random data stands in for your data loader) and check the pruned weights are
   still exactly zero;
5. ``torch.nn.utils.prune.remove``: make the pruning permanent (plain ``weight`` parameters with
   zeros, no hooks), then save the ``state_dict`` and the masks, reload both, check they agree.

Run: ``python examples/prune_and_train.py [--model resnet20] [--density 0.1] [--steps 20]``.
Prints one line per step of the workflow and exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune

from ntksap_fast import apply_masks, load_masks, mask_density, ntk_sap_prune, save_masks
from ntksap_fast.models import resnet20


def small_cnn(num_classes: int = 10) -> nn.Module:
    """A small CNN for ``(B, 3, 32, 32)`` inputs: your own model goes here."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, num_classes),
    )


MODELS = {"small_cnn": small_cnn, "resnet20": resnet20}


def pruned_weights_are_zero(model: nn.Module, masks: dict[str, torch.Tensor]) -> bool:
    """Whether every pruned entry (mask False) of every masked parameter is exactly 0."""
    for name, mask in masks.items():
        module_name, _, attr = name.rpartition(".")
        weight = getattr(model.get_submodule(module_name), attr)
        if bool(weight.detach()[~mask.to(weight.device)].ne(0).any()):
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="small_cnn")
    parser.add_argument("--density", type=float, default=0.1, help="kept fraction (default 0.1)")
    parser.add_argument("--iterations", type=int, default=3, help="NTK-SAP rounds (paper: 20)")
    parser.add_argument("--draws", type=int, default=2, help="NTK-SAP draws per round (paper: 5)")
    parser.add_argument("--batch-size", type=int, default=16, help="NTK-SAP inputs per draw (paper: 100)")
    parser.add_argument("--steps", type=int, default=10, help="training steps (default 10)")
    parser.add_argument("--out", help="folder for model.pt and masks.safetensors (default: a temporary one)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    input_shape = (3, 32, 32)

    # 1-2. Build and prune at initialization. The masks carry the settings that made them.
    model = MODELS[args.model]()
    masks = ntk_sap_prune(
        model,
        args.density,
        input_shape,
        iterations=args.iterations,
        draws=args.draws,
        batch_size=args.batch_size,
        seed=0,
    )
    print(f"pruned: {len(masks)} tensors, density {mask_density(masks):.4f}")

    # 3. Apply them: weight = weight_orig * weight_mask from now on.
    apply_masks(model, masks)
    assert pruned_weights_are_zero(model, masks), "apply_masks left a pruned weight non-zero"

    # 4. Train as usual; random batches stand in for a data loader.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.train()
    for _ in range(args.steps):
        x, y = torch.randn(32, *input_shape), torch.randint(0, 10, (32,))
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"trained: {args.steps} steps, last loss {loss.item():.4f}")
    if not pruned_weights_are_zero(model, masks):
        print("FAILED: a pruned weight became non-zero during training")
        return 1
    print("check: pruned weights are still zero after training")

    # 5. Make it permanent, save, reload.
    for name in masks:
        module_name, _, attr = name.rpartition(".")
        prune.remove(model.get_submodule(module_name), attr)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.out or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), folder / "model.pt")
        save_masks(masks, folder / "masks.safetensors", metadata={"model": args.model, "trained_steps": args.steps})
        fresh = MODELS[args.model]()
        fresh.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
        reloaded = load_masks(folder / "masks.safetensors", fresh)  # checks names and shapes
        trained, loaded = model.state_dict(), fresh.state_dict()
        same = trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)
        if not same or not pruned_weights_are_zero(fresh, reloaded):
            print("FAILED: the reloaded model differs or has a non-zero pruned weight")
            return 1
        about = ", ".join(
            f"{k} {reloaded.metadata[k]}" for k in ("method", "density", "fingerprint") if k in reloaded.metadata
        )
        print(f"saved and reloaded: {folder / 'model.pt'}, {folder / 'masks.safetensors'} ({about})")
    print("ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
