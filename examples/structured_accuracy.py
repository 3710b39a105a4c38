"""Test accuracy of structured masks on scikit-learn's 8x8 digits: channel and 2:4 NTK-SAP against baselines.

A small CNN (3x3 convolutions 1-16-32-32 with BatchNorm and ReLU, a 2x2 max-pool after the second,
global average pooling, Linear 32-10; 14,288 prunable weights; narrow enough that halving it costs
accuracy: dense 1-8-16-16 reaches about 97%, 1-16-32-32 99%) is pruned at initialization, trained
with the masks applied (``ntksap_fast.apply_masks``) and evaluated on a held-out 20% split, over
several seeds (initialisation, pruning randomness, training order). Rows:

* channel masks at ``--channel-density`` (kept fraction of the prunable weights):
  NTK-SAP (``granularity="channel"``); uniform width scaling (every layer's width times one factor,
  the dense model whose weight count is nearest NTK-SAP's, its own initialisation); random channels
  at NTK-SAP's widths (each layer keeps as many channels as NTK-SAP's masks, chosen uniformly); L1
  channels at NTK-SAP's widths (each layer keeps its filters of largest L1 norm, Li et al. 2017);
  the library's global L1 channels (``prune(method="magnitude", granularity="channel")``: a
  channel's L1 norm over the mean of its layer's, ranked across layers).
* 2:4 masks (``granularity="2:4"``; the first convolution, 1 input channel, stays dense): NTK-SAP,
  magnitude, random; and unstructured NTK-SAP at density 0.5 (the same kept fraction).

Writes ``results/structured_accuracy.md`` (mean ± std and min-max test accuracy). Data ship with
scikit-learn (no download). Run by hand: ``python examples/structured_accuracy.py`` (needs
scikit-learn: ``pip install -e '.[examples]'``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from torch import nn

try:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
except ImportError as err:  # an optional dependency: say how to get it
    raise SystemExit("examples/structured_accuracy.py needs scikit-learn: pip install -e '.[examples]'") from err

from digits_accuracy import train_eval as digits_train_eval  # examples/, beside this script

from ntksap_fast import apply_masks
from ntksap_fast.methods.baselines import prune

HERE = Path(__file__).resolve().parent
WIDTHS = (16, 32, 32)
#: NTK-SAP's settings in every row: 20 rounds of 5 draws x 100 inputs (the defaults).
NTKSAP = dict(iterations=20, progress=False)


class DigitsCNN(nn.Module):
    """Input ``(1, 8, 8)``; ``convs`` in order, each followed by BatchNorm and ReLU; ``fc`` the classifier."""

    input_shape = (1, 8, 8)

    def __init__(self, widths: tuple[int, int, int] = WIDTHS) -> None:
        super().__init__()
        chans = (1, *widths)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1, bias=False) for a, b in zip(chans, chans[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm2d(b) for b in widths)
        self.fc = nn.Linear(widths[-1], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = torch.relu(norm(conv(x)))
            if i == 1:
                x = nn.functional.max_pool2d(x, 2)
        return self.fc(x.mean(dim=(2, 3)))


def cnn(seed: int, widths: tuple[int, int, int] = WIDTHS) -> DigitsCNN:
    torch.manual_seed(seed)
    return DigitsCNN(widths)


def weight_count(widths: tuple[int, int, int]) -> int:
    """Prunable weights (conv and Linear weights) of a ``DigitsCNN`` of these widths."""
    chans = (1, *widths)
    return sum(9 * a * b for a, b in zip(chans, chans[1:])) + 10 * widths[-1]


def load(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Images ``(n, 1, 8, 8)`` float32 scaled to [0, 1] and int64 labels, 80/20 stratified split."""
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    as_x = lambda a: torch.tensor(a / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)  # noqa: E731
    return as_x(x_tr), torch.tensor(y_tr), as_x(x_te), torch.tensor(y_te)


def train_eval(model: nn.Module, data: tuple[torch.Tensor, ...], epochs: int, seed: int) -> float:
    """The digits example's training (Adam, batches of 64) at lr 3e-3; test accuracy in percent."""
    return digits_train_eval(model, data, epochs, seed, lr=3e-3)


def kept_fraction(masks: dict[str, torch.Tensor]) -> float:
    return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def kept_channels(model: DigitsCNN, masks: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each convolution's kept output channels: those whose filter keeps an entry."""
    names = [f"convs.{i}.weight" for i in range(len(model.convs))]
    return [torch.nonzero(masks[n].flatten(1).any(dim=1)).flatten() for n in names]


def channel_masks(model: DigitsCNN, kept: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Masks keeping channels ``kept[i]`` of convolution ``i``: its filters and its consumer's inputs."""
    masks = {
        n: torch.ones_like(p, dtype=torch.bool)
        for n, p in model.named_parameters()
        if n.endswith("weight") and p.dim() > 1
    }
    consumers = [f"convs.{i + 1}.weight" for i in range(len(model.convs) - 1)] + ["fc.weight"]
    for i, (channels, consumer) in enumerate(zip(kept, consumers)):
        removed = torch.ones(model.convs[i].out_channels, dtype=torch.bool)
        removed[channels] = False
        masks[f"convs.{i}.weight"][removed] = False
        masks[consumer][:, removed] = False
    return masks


def uniform_widths(target: int) -> tuple[int, int, int]:
    """Widths ``(w/2, w, w)`` (the full model's ratios) whose weight count is nearest ``target``."""
    candidates = [(max(1, round(w / 2)), w, w) for w in range(1, WIDTHS[1] + 1)]
    return min(candidates, key=lambda widths: abs(weight_count(widths) - target))


Row = tuple[nn.Module, float, tuple[int, ...]]  # model to train, kept fraction of the weights, conv widths


def masked_row(init: DigitsCNN, masks: dict[str, torch.Tensor]) -> Row:
    widths = tuple(len(k) for k in kept_channels(init, masks))
    return apply_masks(copy.deepcopy(init), masks), kept_fraction(masks), widths


def channel_rows(init: DigitsCNN, seed: int, density: float) -> dict[str, Row]:
    """The channel rows (module docstring)."""
    ntksap = prune(init, "ntksap", density=density, granularity="channel", seed=seed, **NTKSAP)
    kept = kept_channels(init, ntksap)
    gen = torch.Generator().manual_seed(seed)
    random_kept = [torch.randperm(conv.out_channels, generator=gen)[: len(k)] for conv, k in zip(init.convs, kept)]
    l1_kept = [
        conv.weight.detach().flatten(1).abs().sum(1).argsort(descending=True, stable=True)[: len(k)]
        for conv, k in zip(init.convs, kept)
    ]
    widths = uniform_widths(round(kept_fraction(ntksap) * weight_count(WIDTHS)))
    global_l1 = prune(init, "magnitude", density=density, granularity="channel", progress=False)
    return {
        "channel NTK-SAP": masked_row(init, ntksap),
        "uniform width scaling": (cnn(1000 + seed, widths), weight_count(widths) / weight_count(WIDTHS), widths),
        "random channels, NTK-SAP's widths": masked_row(init, channel_masks(init, random_kept)),
        "L1 channels, NTK-SAP's widths": masked_row(init, channel_masks(init, l1_kept)),
        "L1 channels, global (magnitude)": masked_row(init, global_l1),
    }


def nm_rows(init: DigitsCNN, seed: int) -> dict[str, Row]:
    """The 2:4 rows and unstructured NTK-SAP at 0.5."""
    masks = {
        "2:4 NTK-SAP": prune(init, "ntksap", density=0.5, granularity="2:4", seed=seed, **NTKSAP),
        "2:4 magnitude": prune(init, "magnitude", density=0.5, granularity="2:4", progress=False),
        "2:4 random": prune(init, "random", density=0.5, granularity="2:4", seed=seed, progress=False),
        "unstructured NTK-SAP, d = 0.5": prune(init, "ntksap", density=0.5, seed=seed, **NTKSAP),
    }
    return {row: masked_row(init, m) for row, m in masks.items()}


def run(seeds: int, epochs: int, channel_density: float, parts: list[str]) -> dict[str, dict[str, list]]:
    """``{row: {"acc": [per seed], "kept": [...], "widths": [...], "reference": NTK-SAP row or None}}``."""
    data = load()
    results: dict = {}
    for seed in range(seeds):
        init = cnn(seed)
        rows = {"dense": ((copy.deepcopy(init), 1.0, WIDTHS), None)}  # row: (Row, the NTK-SAP row it compares to)
        start = time.perf_counter()
        if "channel" in parts:
            rows.update({r: (v, "channel NTK-SAP") for r, v in channel_rows(init, seed, channel_density).items()})
        if "nm" in parts:
            rows.update({r: (v, "2:4 NTK-SAP") for r, v in nm_rows(init, seed).items()})
        pruning = time.perf_counter() - start
        for row, ((model, fraction, widths), reference) in rows.items():
            entry = results.setdefault(row, {"acc": [], "kept": [], "widths": [], "reference": reference})
            entry["acc"].append(train_eval(model, data, epochs, seed))
            entry["kept"].append(fraction)
            entry["widths"].append(widths)
            print(f"seed {seed} {row:<34} kept {fraction:.3f} widths {widths} acc {entry['acc'][-1]:.2f}", flush=True)
        print(f"seed {seed}: pruning {pruning:.1f} s", flush=True)
    return results


def fmt(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {std:.1f} | {min(values):.1f}-{max(values):.1f}"


def fmt_widths(widths: list[tuple[int, ...]]) -> str:
    """The conv widths over the seeds: one ``a-b-c``, or each coordinate's range ``a-b..c``."""
    if len(set(widths)) == 1:
        return "-".join(map(str, widths[0]))
    return "-".join(f"{min(w)}..{max(w)}" if min(w) != max(w) else str(w[0]) for w in zip(*widths))


def paired(results: dict, row: str) -> str:
    """The row's accuracy minus its NTK-SAP row's, seed by seed: mean, and in how many seeds NTK-SAP is ahead."""
    reference = results[row]["reference"]
    if reference is None or reference == row:
        return ""
    diffs = [a - b for a, b in zip(results[row]["acc"], results[reference]["acc"])]
    ahead = sum(d < 0 for d in diffs)
    return f"{statistics.mean(diffs):+.1f} ({reference} ahead in {ahead} of {len(diffs)})"


def write_table(path: Path, results: dict, seeds: int, epochs: int, channel_density: float, command: str) -> None:
    lines = [
        "# Structured masks on digits (8x8, scikit-learn): test accuracy (%) after pruning at initialization",
        "",
        f"CNN 3x3 conv 1-{'-'.join(map(str, WIDTHS))} (BatchNorm, ReLU, max-pool), global average pool, "
        f"Linear {WIDTHS[-1]}-10: {weight_count(WIDTHS):,} prunable weights. Adam lr 3e-3, {epochs} epochs, "
        f"batch 64; {seeds} seeds (initialisation, pruning randomness, training order); 1,437 training and 360 "
        f"test images (one test image is 0.28 points). Channel rows at density {channel_density} (kept fraction of "
        "the prunable weights); 2:4 rows at 0.5 of the eligible tensors (the first convolution, 1 input channel, "
        "stays dense). NTK-SAP: 20 rounds of 5 draws x 100 inputs, exponential schedule; magnitude and random "
        "one shot. Widths: kept output channels of the three convolutions (a range over the seeds).",
        "",
        "| masks | kept fraction of weights | conv widths | accuracy mean ± std | min-max | paired Δ vs NTK-SAP |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row, entry in results.items():
        lines.append(
            f"| {row} | {statistics.mean(entry['kept']):.3f} | {fmt_widths(entry['widths'])} | "
            f"{fmt(entry['acc'])} | {paired(results, row)} |"
        )
    lines += ["", f"Produced by `{command}`.", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--channel-density", type=float, default=0.25)
    parser.add_argument("--parts", nargs="+", choices=("channel", "nm"), default=["channel", "nm"])
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny ops: one thread is much faster than several fighting for shared cores
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = run(args.seeds, args.epochs, args.channel_density, args.parts)
    command = "python examples/structured_accuracy.py" + "".join(
        f" --{k.replace('_', '-')} {v if not isinstance(v, list) else ' '.join(v)}"
        for k, v in vars(args).items()
        if k != "out_dir" and v != parser.get_default(k)
    )
    write_table(
        args.out_dir / "structured_accuracy.md", results, args.seeds, args.epochs, args.channel_density, command
    )
    print((args.out_dir / "structured_accuracy.md").read_text())


if __name__ == "__main__":
    main()
