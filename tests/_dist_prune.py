"""Worker for tests/engine/test_scaleout.py: a gloo prune under torchrun; rank 0 saves the result."""

import sys

import torch
import torch.distributed as dist
from torch import nn

from ntksap_fast import ntk_sap_prune, ntk_sap_scores
from ntksap_fast.models import CifarResNet

KWARGS = dict(input_shape=(3, 16, 16), draws=3, batch_size=6, seed=11)


def build_model() -> nn.Module:
    """The model every process builds: seeded, so its non-prunable tensors agree across processes."""
    torch.manual_seed(0)
    return CifarResNet(8)


def main(out: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    model = build_model()
    masks = ntk_sap_prune(model, 0.2, iterations=3, progress=False, **KWARGS)
    scores = ntk_sap_scores(model, **KWARGS)
    if dist.get_rank() == 0:
        # Plain dicts of tensors, so the test can load them with weights_only=True.
        torch.save({"masks": dict(masks), "scores": dict(scores), "world": dist.get_world_size()}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
