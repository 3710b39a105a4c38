"""The ``ntksap`` command line end to end on tiny runs, its errors, and the demo wrapper."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import ntksap_fast
from ntksap_fast import cli, load_masks
from ntksap_fast.cli import build_model, main
from ntksap_fast.demo import main as demo_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--draws", "1", "--batch-size", "2", "--iterations", "2", "--no-progress"]
PNG = b"\x89PNG\r\n\x1a\n"


def keep_n(n: int, d: float) -> int:
    return n - math.floor((1.0 - d) * n)


def test_prune_resnet20_writes_masks_report_plot(tmp_path, capsys):
    out, report, plot = tmp_path / "masks.pt", tmp_path / "report.md", tmp_path / "density.png"
    code = main(["prune", "resnet20", "--density", "0.1", *TINY, "--out", str(out), "--report", str(report),
                 "--plot", str(plot)])
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
    code = main(["prune", "torchvision:squeezenet1_1", "--num-classes", "3", "--input-shape", "3,32,32",
                 "--method", "synflow", "--density", "0.2", "--iterations", "2", "--no-progress", "--out", str(out)])
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


@pytest.mark.parametrize("argv, words", [
    (["prune", "resnet99"], "unknown model 'resnet99'"),
    (["prune", "torchvision:nonesuch"], "torchvision has no model 'nonesuch'"),
    (["prune", "--preset", "mnist"], "invalid choice: 'mnist'"),
    (["prune"], "give a model"),
    (["prune", "resnet20", "--method", "snip"], "needs training data"),
    (["prune", "resnet20", "--method", "magnitude", "--draws", "2"], "--draws apply to --method ntksap only"),
    (["prune", "resnet20", "--input-shape", "3,x"], "comma-separated positive ints"),
    (["prune", "resnet20", "--num-classes", "0"], "--num-classes must be >= 1"),
    (["prune", "resnet20", "--draws", "0"], "draws must be >= 1"),
    (["prune", "resnet20", "--density", "1.5"], "density must be a number in (0, 1]"),
    (["prune", "resnet20", "--plot", "out.jpg"], "expected a .png path"),
    (["prune", "resnet20", "--out", "/no/such/folder/m.pt"], "does not exist"),
    (["prune", "resnet20", "--out", "masks.bin"], "--out: path 'masks.bin': unknown mask file extension '.bin'"),
    (["prune", "resnet20", "--out", "masks"], "unknown mask file extension '(none)'"),
    (["prune", "torchvision:resnet18", "--iterations", "1"], "input_shape is needed"),
    (["prune", "resnet20", "--method", "magnitude", "--iterations", "3"], "one shot"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["prune", "resnet20", "--min-layer-density", "1.5"], "min_layer_density must be in [0, 1]"),
])
def test_bad_arguments_exit_2(argv, words, capsys):
    with pytest.raises(SystemExit) as info:
        main([*argv, "--no-progress"] if argv[0] == "prune" else argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_help_shows_example():
    proc = subprocess.run([sys.executable, "-m", "ntksap_fast", "prune", "--help"], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert proc.returncode == 0
    assert "example:" in proc.stdout and "ntksap prune --preset cifar10" in proc.stdout
    assert "--input-shape" in proc.stdout


def test_out_records_the_settings(tmp_path):
    out = tmp_path / "masks.safetensors"
    assert main(["prune", "resnet20", "--density", "0.1", *TINY, "--seed", "3", "--out", str(out)]) == 0
    meta = load_masks(out).metadata
    assert {k: meta[k] for k in ("model", "method", "density", "iterations", "schedule", "draws", "batch_size",
                                 "epsilon", "seed", "scope")} == {
        "model": "resnet20", "method": "ntksap", "density": 0.1, "iterations": 2, "schedule": "exponential",
        "draws": 1, "batch_size": 2, "epsilon": 0.01, "seed": 3, "scope": "global"}
    assert meta["dtype"] in ("float32", "torch.float32")
    assert meta["fingerprint"].startswith("sha256:") and meta["package_version"] == ntksap_fast.__version__


def test_build_model_is_seeded_and_restores_the_global_rng():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = build_model("resnet20", seed=5).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    b = build_model("resnet20", seed=5).state_dict()
    c = build_model("resnet20", seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc.bias"], c["fc.bias"]) and not torch.equal(a["conv1.weight"], c["conv1.weight"])


@pytest.mark.parametrize("extra", [["--method", "magnitude"], ["--draws", "1", "--batch-size", "2", "--iterations", "3"]],
                         ids=["magnitude", "ntksap"])
def test_two_processes_give_identical_masks(tmp_path, extra):
    """Same command, same seed, two processes: the same mask file, bit for bit (issue 14.7)."""
    outs = [tmp_path / f"run{i}.safetensors" for i in range(2)]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "ntksap_fast", "prune", "resnet20", "--density", "0.1",
                               "--seed", "0", *extra, "--no-progress", "--out", str(out)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for out in outs]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    first, second = (load_masks(out) for out in outs)
    assert list(first) == list(second)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert first.metadata == second.metadata


def test_spectrum_size_is_checked_before_the_prune(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")

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
    code = main(["prune", "resnet20", "--density", "0.2", "--iterations", "2", "--draws", "3", "--batch-size", "4",
                 "--input-shape", "3,16,16", "--no-progress", "--report", str(report), "--target-overlap", "0.99",
                 "--max-draws", "4"])
    assert code == 0
    out = capsys.readouterr().out
    assert "scorer: device cpu, dtype float32, backend torch, micro_batch None" in out
    assert "split-half overlap" in out and "relative SE" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and len(line.split()) == 5]
    assert [r[0] for r in rows] == ["1", "2"] and all(r[2] == "4" for r in rows)  # draws added up to max_draws
    text = report.read_text()
    assert "## Stability" in text and "| 2 | 0.2000 | 4 |" in text
