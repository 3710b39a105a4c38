"""The ``ntksap`` command line end to end on tiny runs, its errors, and the demo wrapper (where models
come from: test_sources.py)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import ntksap_fast
from ntksap_fast import NtkSapScorer, density_schedule, load_masks
from ntksap_fast.analysis.report import model_flops
from ntksap_fast.cli import app as cli
from ntksap_fast.cli.app import build_parser, main
from ntksap_fast.cli.demo import main as demo_main
from ntksap_fast.cli.sources import build_model
from ntksap_fast.methods.sanity import keep_lowest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--draws", "1", "--batch-size", "2", "--iterations", "2", "--no-progress"]
PNG = b"\x89PNG\r\n\x1a\n"


def keep_n(n: int, d: float) -> int:
    return n - math.floor((1.0 - d) * n)


def test_prune_resnet20_writes_masks_report_plot(tmp_path, capsys):
    out, report, plot = tmp_path / "masks.pt", tmp_path / "report.md", tmp_path / "density.png"
    code = main(
        [
            "prune",
            "resnet20",
            "--density",
            "0.1",
            *TINY,
            "--out",
            str(out),
            "--report",
            str(report),
            "--plot",
            str(plot),
        ]
    )
    assert code == 0
    masks = load_masks(out)
    total = sum(m.numel() for m in masks.values())
    assert total == 270896 and len(masks) == 22
    assert sum(int(m.sum()) for m in masks.values()) == keep_n(total, 0.1)
    text = report.read_text()
    assert "| layer | shape | kept | total | density |" in text and "| `fc.weight` | 10x64 |" in text
    assert f"**{keep_n(total, 0.1)}**" in text and "| draws | `1` |" in text
    assert plot.read_bytes()[:8] == PNG
    printed = capsys.readouterr().out
    assert "layers.8.conv2.weight" in printed and "time:" in printed
    assert printed.splitlines()[0].startswith("model resnet20, num_classes model default, method ntksap")


def test_torchvision_model_safetensors(tmp_path, capsys):
    out = tmp_path / "masks.safetensors"
    code = main(
        [
            "prune",
            "torchvision:squeezenet1_1",
            "--num-classes",
            "3",
            "--input-shape",
            "3,32,32",
            "--method",
            "synflow",
            "--density",
            "0.2",
            "--iterations",
            "2",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    masks = load_masks(out)
    assert masks["classifier.1.weight"].shape == (3, 512, 1, 1)
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == keep_n(total, 0.2)


def test_preset_with_overrides_and_other_method(capsys):
    assert main(["prune", "--preset", "cifar10", "--method", "synflow", "--iterations", "2", "--no-progress"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "model resnet20, num_classes 10, method synflow, density 0.05, iterations 2" in first
    assert "draws" not in first


def test_demo_wrapper(capsys):
    assert demo_main(["--iterations", "1", "--draws", "1", "--batch-size", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "num_classes 10, method ntksap, density 0.05, iterations 1" in printed
    assert "total" in printed and "time:" in printed


@pytest.mark.parametrize(
    "argv, words",
    [
        (["prune", "resnet99"], "unknown model 'resnet99'"),
        (["prune", "torchvision:nonesuch"], "torchvision has no model 'nonesuch'"),
        (["prune", "--preset", "mnist"], "invalid choice: 'mnist'"),
        (["prune"], "give a model"),
        (["prune", "resnet20", "--method", "snip"], "needs training data"),
        (["prune", "resnet20", "--method", "magnitude", "--draws", "2"], "--draws apply to --method ntksap only"),
        (["prune", "resnet20", "--input-shape", "3,x"], "comma-separated positive ints"),
        (["prune", "resnet20", "--num-classes", "0"], "--num-classes must be >= 1"),
        (["prune", "resnet20", "--draws", "0"], "draws must be >= 1"),
        (["prune", "resnet20", "--density", "1.5"], "density must be in (0, 1]"),
        (["prune", "resnet20", "--plot", "out.jpg"], "expected a .png path"),
        (["prune", "resnet20", "--out", "/no/such/folder/m.pt"], "does not exist"),
        (["prune", "resnet20", "--out", "masks.bin"], "--out: path 'masks.bin': unknown mask file extension '.bin'"),
        (["prune", "resnet20", "--out", "masks"], "unknown mask file extension '(none)'"),
        (["prune", "torchvision:resnet18", "--iterations", "1"], "input_shape is needed"),
        (["prune", "resnet20", "--method", "magnitude", "--iterations", "3"], "one shot"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["prune", "resnet20", "--min-layer-density", "1.5"], "min_layer_density must be in [0, 1]"),
        (["prune", "resnet20", "--device", "cuda:x"], "--device: Invalid device string: 'cuda:x'"),
        (["prune", "no_such_module_xyz:make"], "cannot import 'no_such_module_xyz'"),
        (["prune", ":make"], "expected NAME, torchvision:NAME, timm:NAME or package.module:callable"),
        (["prune", "os.path:sep"], "'sep' is a str, expected a callable"),
        # the library's rules of which arguments combine (PruneOptions), reported as they are
        (
            ["prune", "resnet20", "--invert", "--target-overlap", "0.5"],
            "invert does not combine with stats or target_overlap",
        ),
        (
            ["prune", "resnet20", "--scope", "layer", "--min-layer-density", "0.1"],
            "min_layer_density applies to scope='global'",
        ),
        (["prune", "resnet20", "--max-draws", "9"], "max_draws applies with target_overlap only"),
        (["prune", "resnet20", "--method", "magnitude", "--target-overlap", "0.5"], "apply to method 'ntksap'"),
    ],
)
def test_bad_arguments_exit_2(argv, words, capsys):
    with pytest.raises(SystemExit) as info:
        main([*argv, "--no-progress"] if argv[0] == "prune" else argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_help_shows_example():
    proc = subprocess.run(
        [sys.executable, "-m", "ntksap_fast", "prune", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        timeout=120,
    )
    assert proc.returncode == 0
    assert "example:" in proc.stdout and "ntksap prune --preset cifar10" in proc.stdout
    assert "--input-shape" in proc.stdout


def test_out_records_the_settings(tmp_path):
    out = tmp_path / "masks.safetensors"
    assert main(["prune", "resnet20", "--density", "0.1", *TINY, "--seed", "3", "--out", str(out)]) == 0
    meta = load_masks(out).metadata
    assert {
        k: meta[k]
        for k in (
            "model",
            "method",
            "density",
            "iterations",
            "schedule",
            "draws",
            "batch_size",
            "epsilon",
            "seed",
            "scope",
        )
    } == {
        "model": "resnet20",
        "method": "ntksap",
        "density": 0.1,
        "iterations": 2,
        "schedule": "exponential",
        "draws": 1,
        "batch_size": 2,
        "epsilon": 0.01,
        "seed": 3,
        "scope": "global",
    }
    assert meta["dtype"] in ("float32", "torch.float32")
    assert meta["fingerprint"].startswith("sha256:") and meta["package_version"] == ntksap_fast.__version__


@pytest.mark.parametrize(
    "extra",
    [["--method", "magnitude"], ["--draws", "1", "--batch-size", "2", "--iterations", "3"]],
    ids=["magnitude", "ntksap"],
)
@pytest.mark.slow
def test_two_processes_give_identical_masks(tmp_path, extra):
    """Same command, same seed, two processes: the same mask file, bit for bit (issue 14.7)."""
    outs = [tmp_path / f"run{i}.safetensors" for i in range(2)]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ntksap_fast",
                "prune",
                "resnet20",
                "--density",
                "0.1",
                "--seed",
                "0",
                *extra,
                "--no-progress",
                "--out",
                str(out),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for out in outs
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    first, second = (load_masks(out) for out in outs)
    assert list(first) == list(second)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert first.metadata == second.metadata


def test_spectrum_size_is_checked_before_the_prune(tmp_path, monkeypatch, capsys):
    def no_prune(*args, **kwargs):
        raise AssertionError("the prune ran before the --spectrum size check")

    monkeypatch.setattr(cli, "prune", no_prune)
    with pytest.raises(SystemExit) as info:
        main(["prune", "vgg16", "--method", "magnitude", "--no-progress", "--spectrum", str(tmp_path / "s.png")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--spectrum: the Jacobian has at least batch * params" in err and "max_jacobian_entries" in err


def test_min_layer_density_keeps_every_layer(tmp_path):
    plain, guarded = tmp_path / "plain.pt", tmp_path / "guarded.pt"
    common = ["prune", "resnet20", "--method", "synflow", "--density", "0.02", "--iterations", "2", "--no-progress"]
    assert main([*common, "--out", str(plain)]) == 0
    assert int(load_masks(plain)["fc.weight"].sum()) == 0  # SynFlow alone empties the classifier here
    assert main([*common, "--min-layer-density", "0.01", "--out", str(guarded)]) == 0
    masks = load_masks(guarded)
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == keep_n(total, 0.02)
    assert all(int(m.sum()) >= keep_n(m.numel(), 0.01) for m in masks.values())
    assert masks.metadata["min_layer_density"] == 0.01


def test_cli_shows_the_scorers_decisions_and_stability(tmp_path, capsys):
    report = tmp_path / "r.md"
    code = main(
        [
            "prune",
            "resnet20",
            "--density",
            "0.2",
            "--iterations",
            "2",
            "--draws",
            "3",
            "--batch-size",
            "4",
            "--input-shape",
            "3,16,16",
            "--no-progress",
            "--report",
            str(report),
            "--target-overlap",
            "0.99",
            "--max-draws",
            "4",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "scorer: device cpu, dtype float32, backend torch, micro_batch None" in out
    assert "split-half overlap" in out and "relative SE" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and len(line.split()) == 5]
    assert [r[0] for r in rows] == ["1", "2"] and all(r[2] == "4" for r in rows)  # draws added up to max_draws
    text = report.read_text()
    assert "## Stability" in text and "| 2 | 0.2000 | 4 |" in text


# ----------------------------------------------------------------------------------------------
# Version, devices, runtime errors
# ----------------------------------------------------------------------------------------------
def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"ntksap {ntksap_fast.__version__}\n"


@pytest.mark.parametrize("available, device", [(True, "cuda"), (False, "cpu")])
def test_device_defaults_to_cuda_when_available(monkeypatch, available, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    assert build_parser().parse_args(["prune", "resnet20"]).device == device


def test_runtime_errors_exit_1_with_one_line(monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nSee the documentation")

    monkeypatch.setattr(cli, "prune", out_of_memory)
    assert main(["prune", "resnet20", "--method", "magnitude", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err == "ntksap: error: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable CUDA device")
def test_cuda_without_a_gpu_exits_1(capsys):
    assert main(["prune", "resnet20", "--device", "cuda", *TINY]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ntksap: error: ") and err.count("\n") == 1 and "Traceback" not in err


# ----------------------------------------------------------------------------------------------
# Sanity switches
# ----------------------------------------------------------------------------------------------
def test_invert_keeps_the_lowest_scores_each_round(tmp_path, capsys):
    out, plain = tmp_path / "inverted.pt", tmp_path / "plain.pt"
    common = ["prune", "resnet20", "--density", "0.1", "--input-shape", "3,16,16", *TINY]
    assert main([*common, "--invert", "--out", str(out)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert ", invert True," in first and f"device {'cuda' if torch.cuda.is_available() else 'cpu'}" in first
    masks = load_masks(out)
    assert masks.metadata["invert"] is True
    scorer, want = (
        NtkSapScorer(
            build_model("resnet20", seed=0), (3, 16, 16), draws=1, batch_size=2, device=masks.metadata["device"]
        ),
        None,
    )
    for t, d in enumerate(density_schedule(0.1, 2)):
        want = keep_lowest(scorer.scores(want, round=t), d, want)
    assert list(masks) == list(want) and all(torch.equal(masks[n], want[n].cpu()) for n in want)
    assert main([*common, "--out", str(plain)]) == 0
    normal = load_masks(plain)
    overlap = sum(int((masks[n] & normal[n]).sum()) for n in masks) / sum(int(m.sum()) for m in masks.values())
    assert overlap < 0.1  # the highest and the lowest scores hardly meet


def test_shuffle_keeps_each_layers_count(tmp_path):
    plain, shuffled = tmp_path / "plain.safetensors", tmp_path / "shuffled.safetensors"
    common = ["prune", "resnet20", "--method", "magnitude", "--density", "0.1", "--seed", "2", "--no-progress"]
    assert main([*common, "--out", str(plain)]) == 0
    assert main([*common, "--shuffle", "--out", str(shuffled)]) == 0
    a, b = load_masks(plain), load_masks(shuffled)
    assert b.metadata["shuffle_seed"] == 2 and b.metadata["shuffle"] is True
    assert all(int(a[n].sum()) == int(b[n].sum()) for n in a)
    assert not torch.equal(a["fc.weight"], b["fc.weight"])


# Granularity
# ----------------------------------------------------------------------------------------------
def test_channel_granularity_reports_kept_channels_and_flops(tmp_path, capsys):
    out, report = tmp_path / "masks.safetensors", tmp_path / "report.md"
    code = main(
        [
            "prune",
            "resnet20",
            "--method",
            "magnitude",
            "--granularity",
            "channel",
            "--density",
            "0.3",
            "--input-shape",
            "3,16,16",
            "--no-progress",
            "--out",
            str(out),
            "--report",
            str(report),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert ", granularity channel," in printed.splitlines()[0]
    masks = load_masks(out)
    assert masks.metadata["granularity"] == "channel"
    exported = ntksap_fast.export_pruned(build_model("resnet20", seed=0), masks)  # the saved plan rebuilds it
    assert "fc.weight                          10      10" in printed  # the classifier's outputs stay
    kept = exported.fc.in_features
    assert f"fc.weight                          10      10         {kept:>2}      64" in printed
    flops = (model_flops(build_model("resnet20", seed=0), (3, 16, 16)), model_flops(exported, (3, 16, 16)))
    assert f"FLOPs per input: {flops[0]:,} dense, {flops[1]:,} exported" in printed
    assert "## Channels and FLOPs" in report.read_text()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--granularity", "blocks"], "granularity must be one of ('weight', 'channel') or 'N:M'"),
        (["--granularity", "channel", "--scope", "layer"], "granularity='channel' applies to scope='global'"),
        (["--granularity", "channel", "--shuffle"], "--shuffle shuffles entries within each tensor"),
        (["--granularity", "2:4", "--density", "0.3"], "density must be N/M = 0.5"),
    ],
)
def test_bad_granularity_exits_2(argv, words, capsys):
    with pytest.raises(SystemExit) as info:
        main(["prune", "resnet20", "--method", "magnitude", *argv, "--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
