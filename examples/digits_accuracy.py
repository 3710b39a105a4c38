"""Test accuracy after pruning at initialization, every method, on scikit-learn's 8x8 digits.

An MLP 64-256-256-10 (ReLU) is pruned at initialization by each method of
``ntksap_fast.methods.baselines.prune`` at several densities, trained with the masks applied
(``ntksap_fast.apply_masks``), and evaluated on a held-out split; 3 seeds (initialisation, pruning
randomness, training order). Writes ``results/digits_accuracy.md`` (mean +- std test accuracy) and
``results/digits_accuracy.png``. Runs on the CPU in a few minutes; the data ship with scikit-learn
(no download). Run by hand: ``python examples/digits_accuracy.py`` (needs scikit-learn and matplotlib:
``pip install -e '.[examples]'``).
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
    raise SystemExit("examples/digits_accuracy.py needs scikit-learn: pip install -e '.[examples]'") from err

from ntksap_fast import apply_masks
from ntksap_fast.methods.baselines import METHODS, prune

HERE = Path(__file__).resolve().parent


def load(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Standardised float32 features ``(n, 64)`` and int64 labels, 80/20 stratified split."""
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return as_x(x_tr), torch.tensor(y_tr), as_x(x_te), torch.tensor(y_te)


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    model.input_shape = (64,)
    return model


def train_eval(model: nn.Module, data: tuple[torch.Tensor, ...], epochs: int, seed: int, lr: float = 1e-3) -> float:
    """Adam (learning rate ``lr``), batches of 64; returns test accuracy in percent."""
    x_tr, y_tr, x_te, y_te = data
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x_tr), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return 100.0 * (model(x_te).argmax(1) == y_te).float().mean().item()


def run(densities: list[float], seeds: int, epochs: int) -> tuple[dict, dict, list[float]]:
    """Accuracies ``{(method, density): [acc per seed]}``, prune seconds per method, dense accuracies."""
    data = load()
    prune_batches = [(data[0][i : i + 128], data[1][i : i + 128]) for i in (0, 128)]  # 256 training examples
    acc: dict = {}
    seconds: dict = {m: [] for m in METHODS}
    dense = []
    for seed in range(seeds):
        init = mlp(seed)
        dense.append(train_eval(copy.deepcopy(init), data, epochs, seed))
        for method in METHODS:
            for d in densities:
                start = time.perf_counter()
                masks = prune(init, method, density=d, data=prune_batches, seed=seed, progress=False)
                seconds[method].append(time.perf_counter() - start)
                model = apply_masks(copy.deepcopy(init), masks)
                acc.setdefault((method, d), []).append(train_eval(model, data, epochs, seed))
                print(f"seed {seed} {method:>9} density {d:<5} acc {acc[(method, d)][-1]:.2f}", flush=True)
    return acc, seconds, dense


def fmt(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.1f}"


def write_table(
    path: Path, acc: dict, seconds: dict, dense: list[float], densities: list[float], seeds: int, epochs: int
) -> None:
    lines = [
        "# Digits (8x8, scikit-learn): test accuracy (%) after pruning at initialization",
        "",
        f"MLP 64-256-256-10, {sum(m.weight.numel() for m in mlp(0) if isinstance(m, nn.Linear)):,} "
        f"prunable weights; Adam lr 1e-3, {epochs} epochs, batch 64; "
        f"mean ± std over {seeds} seeds. Dense: {fmt(dense)}. Data methods (snip, iter_snip, grasp) score "
        "on 256 training examples (2 batches of 128). Iterations: ntksap 20 (5 draws x 100 inputs), synflow "
        "100, iter_snip 100, others one shot; global scope, exponential schedule.",
        "",
        "| method | " + " | ".join(f"d = {d}" for d in densities) + " | prune time (s) |",
        "|---|" + "---:|" * (len(densities) + 1),
    ]
    for method in METHODS:
        cells = [fmt(acc[(method, d)]) for d in densities]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {statistics.mean(seconds[method]):.2f} |")
    lines += ["", "Produced by `python examples/digits_accuracy.py`; figure: `digits_accuracy.png`.", ""]
    path.write_text("\n".join(lines))


def plot(path: Path, acc: dict, dense: list[float], densities: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, ylim in zip(axes, (None, (85, 99))):
        for method in METHODS:
            means = [statistics.mean(acc[(method, d)]) for d in densities]
            stds = [statistics.stdev(acc[(method, d)]) if len(acc[(method, d)]) > 1 else 0.0 for d in densities]
            ax.errorbar(densities, means, yerr=stds, marker="o", capsize=3, label=method)
        ax.axhline(statistics.mean(dense), color="k", linestyle="--", linewidth=1, label="dense")
        ax.set_xscale("log")
        ax.set_xticks(densities, [f"{d:g}" for d in densities])
        ax.minorticks_off()
        ax.set_xlabel("density (kept fraction of weights)")
        ax.set_ylabel("test accuracy (%)")
        if ylim:
            ax.set_ylim(*ylim)
    axes[0].set_title("Digits MLP, pruned at initialization")
    axes[1].set_title("zoom: 85-99%")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.2, 0.1, 0.05, 0.02])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny ops: one thread is much faster than several fighting for shared cores
    args.out_dir.mkdir(parents=True, exist_ok=True)
    acc, seconds, dense = run(args.densities, args.seeds, args.epochs)
    write_table(args.out_dir / "digits_accuracy.md", acc, seconds, dense, args.densities, args.seeds, args.epochs)
    plot(args.out_dir / "digits_accuracy.png", acc, dense, args.densities)
    print((args.out_dir / "digits_accuracy.md").read_text())


if __name__ == "__main__":
    main()
