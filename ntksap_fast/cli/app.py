"""``ntksap`` command line (also ``python -m ntksap_fast``): prune a model, print and save reports.

Models (``ntksap_fast.cli.sources``): a ``ntksap_fast.models`` name, ``torchvision:NAME``,
``timm:NAME`` (input shape from timm's ``pretrained_cfg`` unless ``--input-shape``) or
``package.module:callable``, the user's own factory. Usage errors exit with code 2, runtime errors
(no GPU driver, out of memory, a file that cannot be written) with code 1, each with one line on
stderr.

Settings come from, highest first: explicit flags, ``--preset`` (the paper's NTK-SAP settings:
model, classes, input shape, rounds, draws, inputs per draw, epsilon), the library's defaults.
The preset's rounds apply to ``--method ntksap``; other iterative methods use their own defaults
(``ntksap_fast.methods.baselines.DEFAULT_ITERATIONS``) unless ``--iterations`` is given. Models are built
with random weights only (never pretrained: no network access), initialised from ``--seed``: the
masks depend on the model's non-pruned parameters too (biases, normalisation weights, and for
magnitude pruning the weights themselves), so the same command and seed give the same masks.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .. import __version__
from ..analysis.ntk import check_ntk_size, ntk_eigenvalues
from ..analysis.report import (
    channel_table,
    collapse_warning,
    layer_table,
    markdown_report,
    plot_layer_density,
    plot_ntk_spectrum,
    stability_table,
)
from ..engine.plan import SETTLED_KEYS
from ..io.masks import check_mask_path, save_masks
from ..methods.baselines import DATA_METHODS, DEFAULT_ITERATIONS, METHODS, SCOPES, prune
from ..methods.sanity import shuffle_masks
from ..models import MODELS
from ..options import ScorerOptions
from ..presets import PAPER_OPTIONS, PRESETS
from .sources import build_model, default_input_shape

__all__ = ["main", "build_parser"]

_EPILOG = """\
example:
  ntksap prune --preset cifar10 --density 0.05 --out masks.pt --report report.md --plot density.png
  ntksap prune torchvision:resnet18 --num-classes 10 --input-shape 3,64,64 --density 0.1 \\
      --iterations 5 --draws 2 --batch-size 16 --out masks.safetensors
  ntksap prune resnet20 --method synflow --density 0.02 --scope global
  ntksap prune timm:resnet18 --input-shape 3,64,64 --draws 2 --batch-size 8 --out masks.pt
  ntksap prune mymodels:tiny_cnn --input-shape 3,16,16 --out masks.pt   # mymodels.py: def tiny_cnn(): ...
  ntksap prune resnet20 --invert --shuffle --out sanity.pt                # sanity checks
  ntksap prune resnet20 --granularity channel --density 0.3 --report report.md   # whole channels, FLOPs

methods needing data (snip, iter_snip, grasp) are available from Python only:
  ntksap_fast.methods.baselines.prune(model, method="snip", density=0.05, data=loader)
"""
_DESCRIPTION = """\
Prune a randomly initialised model (never pretrained weights) and report per-layer densities.
Settings, highest first: explicit flags, --preset (the paper's NTK-SAP settings: model, classes,
input shape, rounds, draws, inputs per draw, epsilon), the library's defaults. The preset's rounds
apply to --method ntksap; other iterative methods use their own defaults unless --iterations is given.
"""
#: The scorer's options the CLI takes as flags (``ScorerOptions.cli_fields``; ``--seed`` also seeds the model).
_SCORER_FLAGS = tuple(f for f in ScorerOptions.cli_fields() if f.name != "seed")
#: Arguments of the prune loop (``PruneOptions``) the CLI takes as flags beyond the common ones.
_PRUNE_FLAGS = ("target_overlap", "max_draws")
#: Errors of the run itself (no GPU driver, out of memory, a file that cannot be written): exit code 1.
_RUNTIME_ERRORS = (RuntimeError, OSError, MemoryError)


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints like 3,32,32, got {text!r}") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints like 3,32,32, got {text!r}")
    return shape


def build_parser() -> argparse.ArgumentParser:
    """The ``ntksap`` argument parser (subcommand ``prune``)."""
    parser = argparse.ArgumentParser(
        prog="ntksap",
        description="Fast NTK-SAP pruning at initialization.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ntksap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "prune",
        help="prune a model and report per-layer densities",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model",
        nargs="?",
        help=f"one of {', '.join(MODELS)}; torchvision:NAME; timm:NAME; or "
        "package.module:callable, your own factory returning an nn.Module (default: the preset's model)",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="the paper's setting to start from")
    p.add_argument("--num-classes", type=int, help="model outputs (default: the preset's, else the model's default)")
    p.add_argument("--method", choices=METHODS, default="ntksap", help="scoring method (default ntksap)")
    p.add_argument("--density", type=float, default=0.05, help="final kept fraction in (0, 1] (default 0.05)")
    p.add_argument("--iterations", type=int, help="pruning rounds T (default: preset, else the method's default)")
    p.add_argument(
        "--schedule",
        choices=("exponential", "linear"),
        default="exponential",
        help="kept fraction after round t: d**(t/T) or 1-(1-d)t/T (default exponential)",
    )
    p.add_argument("--scope", choices=SCOPES, default="global", help="top-k over all layers or per layer")
    p.add_argument(
        "--granularity",
        default="weight",
        help="what is kept or removed together: weight (entries, the "
        "paper), channel (whole channels: the masks export to a smaller, faster model; the kept channels "
        "and FLOPs are reported) or N:M such as 2:4 (default weight)",
    )
    p.add_argument(
        "--min-layer-density",
        type=float,
        default=0.0,
        help="collapse guard: each tensor keeps at least this fraction of its entries, the rest is "
        "chosen globally (default 0: plain global top-k)",
    )
    _add_ntksap_options(p)
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the model's initialisation and of the random numbers of the prune (default 0)",
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument(
        "--device",
        default=device,
        help=f"torch device, e.g. cpu or cuda:1 (default: cuda when available, else cpu; here {device})",
    )
    p.add_argument(
        "--invert",
        action="store_true",
        help="sanity check: keep the LOWEST scores after every round (the prune loop's invert=True)",
    )
    p.add_argument(
        "--shuffle",
        action="store_true",
        help="sanity check: shuffle the final masks within each "
        "tensor, keeping its count, seeded with --seed (ntksap_fast.methods.sanity.shuffle_masks)",
    )
    p.add_argument("--input-shape", type=_shape, help="one input's shape, e.g. 3,32,32 (default: preset or model)")
    p.add_argument("--out", help="write the masks and the settings that made them here (.pt, .pth or .safetensors)")
    p.add_argument("--report", help="write a markdown report here")
    p.add_argument("--plot", help="write a per-layer density bar chart here (.png)")
    p.add_argument("--spectrum", help="write dense vs pruned NTK eigenvalues here (.png; small models only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(command_parser=p)
    return parser


def _add_ntksap_options(p: argparse.ArgumentParser) -> None:
    """The NTK-SAP options (``--method ntksap`` only)."""
    for f in _SCORER_FLAGS:  # derived from ScorerOptions: its help text and default
        default = f.default if f.metadata["choices"] is None else str(f.default).removeprefix("torch.")
        in_presets = "preset, else " if f.name in PAPER_OPTIONS else ""
        help_text = f"NTK-SAP: {f.metadata['help']}" + (
            f" (default: {in_presets}{default})" if default is not None else ""
        )
        if f.metadata["choices"] is not None:  # the flag takes a name; _settings parses it
            p.add_argument("--" + f.name.replace("_", "-"), choices=f.metadata["choices"], help=help_text)
        elif f.metadata["cli"] is bool:  # --name / --no-name, absent: the library decides
            p.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction, help=help_text)
        else:
            p.add_argument("--" + f.name.replace("_", "-"), type=_flag_type(f.metadata["cli"]), help=help_text)
    p.add_argument(
        "--target-overlap",
        type=float,
        help="NTK-SAP: add draws to a round until its split-half overlap reaches this (0, 1]",
    )
    p.add_argument(
        "--max-draws", type=int, help="NTK-SAP with --target-overlap: most draws per round (default 4 x draws)"
    )


def _flag_type(parse: Callable[[str], object]) -> Callable[[str], object]:
    """``parse`` with its ``ValueError`` as argparse's usage error (its message shown as it is)."""

    def convert(text: str) -> object:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    return convert


def _check_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag in ("out", "report", "plot", "spectrum"):
        path = getattr(args, flag)
        if path is None:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            parser.error(f"--{flag}: folder {folder!r} does not exist")
        if flag == "out":
            try:
                check_mask_path(path)
            except ValueError as err:
                parser.error(f"--out: {err}")
        if flag in ("plot", "spectrum") and not path.lower().endswith(".png"):
            parser.error(f"--{flag}: expected a .png path, got {path!r}")
        if flag in ("plot", "spectrum") and importlib.util.find_spec("matplotlib") is None:
            parser.error(f"--{flag} needs matplotlib: pip install matplotlib (or 'ntksap_fast[plot]')")


def _settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[dict, dict]:
    """Resolves flags against the preset: (model settings, ``prune`` keyword arguments)."""
    preset = PRESETS[args.preset] if args.preset else None
    given = {f.name for f in _SCORER_FLAGS if getattr(args, f.name) is not None}
    if args.method in DATA_METHODS:
        parser.error(
            f"--method {args.method} needs training data, which the CLI does not take; use "
            f"ntksap_fast.methods.baselines.prune(model, method={args.method!r}, density=..., data=loader)"
        )
    if args.method != "ntksap" and given:
        parser.error(f"{', '.join('--' + k.replace('_', '-') for k in sorted(given))} apply to --method ntksap only")
    try:
        torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device: {err}")
    model_name = args.model or (preset.model if preset else None)
    if model_name is None:
        parser.error("give a model (e.g. resnet20 or torchvision:resnet50) or a --preset")
    num_classes = args.num_classes if args.num_classes is not None else (preset.num_classes if preset else None)
    if num_classes is not None and num_classes < 1:
        parser.error(f"--num-classes must be >= 1, got {num_classes}")
    input_shape = args.input_shape or (preset.input_shape if preset else None)
    if args.shuffle and args.granularity != "weight":
        parser.error(f"--shuffle shuffles entries within each tensor, which breaks --granularity {args.granularity}")
    kwargs = {
        "density": args.density,
        "schedule": args.schedule,
        "scope": args.scope,
        "seed": args.seed,
        "device": args.device,
        "input_shape": input_shape,
        "progress": not args.no_progress,
        "granularity": args.granularity,
    }
    if args.min_layer_density:
        kwargs["min_layer_density"] = args.min_layer_density
    if args.iterations is not None:
        kwargs["iterations"] = args.iterations
    elif preset is not None and args.method == "ntksap":
        kwargs["iterations"] = preset.iterations
    if args.method == "ntksap":
        defaults = preset.prune_kwargs() if preset else {}
        for f in _SCORER_FLAGS:
            value = getattr(args, f.name) if f.name in given else defaults.get(f.name)
            if value is not None:
                kwargs[f.name] = f.metadata["cli"](value) if f.metadata["choices"] is not None else value
        if not args.invert and args.scope == "global" and args.granularity == "weight":  # per-round stability
            kwargs["stats"] = True
    if args.invert:
        kwargs["invert"] = True
    for k in _PRUNE_FLAGS:  # the library says which combinations it refuses (PruneOptions)
        if getattr(args, k) is not None:
            kwargs[k] = getattr(args, k)
    sanity = {k: True for k in ("invert", "shuffle") if getattr(args, k)}
    return {"model": model_name, "num_classes": num_classes, **sanity}, kwargs


def _describe(spec: dict, model: nn.Module, kwargs: dict) -> dict:
    """The settings shown on screen and in the report."""
    method = kwargs["method"]
    rounds = kwargs.get("iterations", DEFAULT_ITERATIONS.get(method, 1))
    classes = spec["num_classes"] if spec["num_classes"] is not None else "model default"
    out = {
        "model": spec["model"],
        "num_classes": classes,
        "method": method,
        "density": kwargs["density"],
        "iterations": rounds,
        "schedule": kwargs["schedule"],
        "scope": kwargs["scope"],
        "seed": kwargs["seed"],
        "granularity": kwargs["granularity"],
        "min_layer_density": kwargs.get("min_layer_density", 0.0),
    }
    if method == "ntksap":
        out |= {k: kwargs.get(k, ScorerOptions.default(k)) for k in PAPER_OPTIONS}
    out |= {k: True for k in ("invert", "shuffle") if spec.get(k)}
    out |= {
        "input_shape": kwargs["input_shape"],
        "device": kwargs["device"],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    return out


def _prune(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    _check_paths(parser, args)
    spec, kwargs = _settings(parser, args)
    kwargs["method"] = args.method
    try:
        model = build_model(spec["model"], spec["num_classes"], seed=args.seed)
    except (ValueError, ImportError) as err:  # unknown model, a factory that fails, bad --num-classes
        parser.error(str(err))
    model = model.to(args.device)  # no driver: a runtime error (exit code 1)
    if kwargs["input_shape"] is None:
        kwargs["input_shape"] = default_input_shape(model)
    if args.spectrum:  # refuse a model too large for the spectrum before the prune, not after it
        try:
            check_ntk_size(model, input_shape=kwargs["input_shape"])
        except ValueError as err:
            parser.error(f"--spectrum: {err}")
    settings = _describe(spec, model, kwargs)
    print(", ".join(f"{k} {v}" for k, v in settings.items()), flush=True)
    start = time.perf_counter()
    try:
        masks = prune(model, **kwargs)
    except (ValueError, TypeError) as err:  # the library's argument checks
        parser.error(str(err))
    if args.shuffle:
        masks = shuffle_masks(masks, args.seed)
    seconds = time.perf_counter() - start
    meta = getattr(masks, "metadata", {})
    if args.method == "ntksap":  # what the scorer decided
        print("scorer: " + ", ".join(f"{k} {meta.get(k)}" for k in SETTLED_KEYS))
    print(layer_table(masks))
    channels = None
    if meta.get("granularity") == "channel":  # kept channels, and the FLOPs of the exported model
        channels = channel_table(model, masks, kwargs["input_shape"])
        print(channels)
    if meta.get("rounds"):
        print(stability_table(meta["rounds"]))
    print(f"time: {seconds:.2f} s ({seconds / settings['iterations']:.3f} s per round)")
    if args.shuffle:
        print(f"masks shuffled within each tensor (seed {args.seed}): the per-layer counts are the method's")
    warning = collapse_warning(masks)
    if warning:
        print(warning)
    if args.out:
        # what the library recorded (what really ran) wins over the CLI's view of the same setting
        save_masks(masks, args.out, metadata={**settings, **getattr(masks, "metadata", {})})
        print(f"masks: {args.out}")
    if args.report:
        with open(args.report, "w") as f:
            f.write(
                markdown_report(
                    masks, settings, seconds, title=f"{args.method} pruning report: {spec['model']}", channels=channels
                )
            )
        print(f"report: {args.report}")
    if args.plot:
        plot_layer_density(masks, args.plot, title=f"{spec['model']}, {args.method}, density {args.density}")
        print(f"plot: {args.plot}")
    if args.spectrum:
        try:
            dense = ntk_eigenvalues(model, input_shape=kwargs["input_shape"], seed=args.seed)
            pruned = ntk_eigenvalues(model, masks, input_shape=kwargs["input_shape"], seed=args.seed)
        except ValueError as err:
            parser.error(f"--spectrum: {err}")
        plot_ntk_spectrum(dense, pruned, args.spectrum, title=f"NTK spectrum, {spec['model']}, {args.method}")
        print(f"spectrum: {args.spectrum}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        return _prune(args.command_parser, args)
    except _RUNTIME_ERRORS as err:
        lines = str(err).strip().splitlines()
        print(f"ntksap: error: {type(err).__name__}: {lines[0] if lines else 'no message'}", file=sys.stderr)
        return 1
