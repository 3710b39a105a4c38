"""Where the ``ntksap`` command's models come from (``ntksap_fast.cli.sources``): the package's own,
the user's factory (on PYTHONPATH or in the current folder), timm; seeded, input shapes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ntksap_fast import load_masks
from ntksap_fast.cli.app import main
from ntksap_fast.cli.sources import build_model, default_input_shape
from ntksap_fast.select.schedule import keep_count

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_build_model_is_seeded_and_restores_the_global_rng():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = build_model("resnet20", seed=5).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    b = build_model("resnet20", seed=5).state_dict()
    c = build_model("resnet20", seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc.bias"], c["fc.bias"]) and not torch.equal(a["conv1.weight"], c["conv1.weight"])


USER_MODELS = """
from torch import nn


def tiny_cnn(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))


def not_a_model(num_classes=10):
    return 42


def no_classes():
    return tiny_cnn()
"""


def test_user_module_on_pythonpath_writes_masks(tmp_path):
    """`ntksap prune mymodels:tiny_cnn` with mymodels on PYTHONPATH, run from another folder."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "mymodels.py").write_text(USER_MODELS)
    (tmp_path / "run").mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "lib"), ROOT]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ntksap_fast",
            "prune",
            "mymodels:tiny_cnn",
            "--input-shape",
            "3,16,16",
            "--num-classes",
            "7",
            "--density",
            "0.2",
            "--draws",
            "1",
            "--batch-size",
            "2",
            "--iterations",
            "2",
            "--no-progress",
            "--out",
            "masks.safetensors",
        ],
        cwd=tmp_path / "run",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    masks = load_masks(tmp_path / "run" / "masks.safetensors")
    assert list(masks) == ["0.weight", "4.weight"] and masks["4.weight"].shape == (7, 4)
    assert sum(int(m.sum()) for m in masks.values()) == keep_count(108 + 28, 0.2)
    assert masks.metadata["model"] == "mymodels:tiny_cnn" and masks.metadata["num_classes"] == 7


def test_user_module_in_the_current_folder_and_its_errors(tmp_path, monkeypatch, capsys):
    (tmp_path / "ntksap_cli_user_models.py").write_text(USER_MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])  # restored afterwards
    monkeypatch.delitem(sys.modules, "ntksap_cli_user_models", raising=False)
    path_before = list(sys.path)
    model = build_model("ntksap_cli_user_models:tiny_cnn", num_classes=3, seed=1)
    assert model[4].out_features == 3 and sys.path == path_before  # found in the current folder, path restored
    again = build_model("ntksap_cli_user_models:tiny_cnn", num_classes=3, seed=1)
    assert torch.equal(model[0].weight, again[0].weight)  # seeded
    for name, words in (
        ("ntksap_cli_user_models:not_a_model", "returned a int, expected a torch.nn.Module"),
        ("ntksap_cli_user_models:missing", "has no attribute 'missing'"),
        ("ntksap_cli_user_models:no_classes", "with num_classes=5: TypeError"),
    ):
        with pytest.raises(SystemExit) as info:
            main(["prune", name, "--num-classes", "5", "--input-shape", "3,8,8", "--no-progress"])
        assert info.value.code == 2 and words in capsys.readouterr().err
    monkeypatch.delitem(sys.modules, "ntksap_cli_user_models")


def test_timm_resnet18_writes_masks(tmp_path, capsys):
    out = tmp_path / "masks.pt"
    assert (
        main(
            [
                "prune",
                "timm:resnet18",
                "--input-shape",
                "3,64,64",
                "--num-classes",
                "10",
                "--density",
                "0.1",
                "--draws",
                "1",
                "--batch-size",
                "2",
                "--iterations",
                "1",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    masks = load_masks(out)
    assert masks["fc.weight"].shape == (10, 512) and len(masks) == 21
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == keep_count(total, 0.1)
    assert "input_shape (3, 64, 64)" in capsys.readouterr().out.splitlines()[0]


def test_timm_input_shape_comes_from_pretrained_cfg(capsys):
    import timm  # the test extra installs it

    assert default_input_shape(timm.create_model("resnet18", pretrained=False)) == (3, 224, 224)
    assert default_input_shape(build_model("resnet20")) == (3, 32, 32)
    assert main(["prune", "timm:mobilevit_xxs", "--method", "magnitude", "--density", "0.5", "--no-progress"]) == 0
    assert "input_shape (3, 256, 256)" in capsys.readouterr().out.splitlines()[0]  # mobilevit's is 256
