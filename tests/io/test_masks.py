"""Mask files: self-describing metadata, checks against a model, clear errors on bad files."""

from __future__ import annotations

import collections
import copy
import os
import pickle

import pytest
import torch
from torch import nn

import ntksap_fast
from _files import mode, plain_open_mode, umask
from _tiny_models import CNN_SHAPE, FAST, assert_same_snapshot, default_prunable_names, snapshot, tiny_cnn
from ntksap_fast import ntk_sap_prune
from ntksap_fast.io.masks import Masks, apply_masks, check_mask_path, load_masks, save_masks


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def small_masks(model: nn.Module, metadata: dict | None = None) -> Masks:
    gen = torch.Generator().manual_seed(1)
    names = ("0.weight", "3.weight")
    params = dict(model.named_parameters())
    return Masks({n: torch.rand(params[n].shape, generator=gen) < 0.5 for n in names}, metadata=metadata)


SETTINGS = {
    "method": "ntksap",
    "density": 0.05,
    "iterations": 20,
    "schedule": "exponential",
    "draws": 5,
    "batch_size": (256, 256, 232),
    "epsilon": 0.01,
    "seed": 3,
    "dtype": torch.float32,
}


# ----------------------------------------------------------------------------------------------
# The Masks class
# ----------------------------------------------------------------------------------------------
def test_masks_is_a_dict_with_metadata() -> None:
    m = Masks({"a": torch.ones(2, dtype=torch.bool)}, metadata={"seed": 1})
    assert isinstance(m, dict) and list(m) == ["a"] and m.metadata == {"seed": 1}
    assert Masks().metadata == {} and Masks(b=torch.zeros(1, dtype=torch.bool)).keys() == {"b"}
    for clone in (m.copy(), copy.copy(m), copy.deepcopy(m)):
        assert isinstance(clone, Masks) and clone.metadata == {"seed": 1} and clone.metadata is not m.metadata
        assert torch.equal(clone["a"], m["a"])
    assert copy.deepcopy(m)["a"] is not m["a"] and copy.copy(m)["a"] is m["a"]
    assert dict(m) == {"a": m["a"]}
    plain = pickle.loads(pickle.dumps(m))  # pickled as a plain mapping (torch.load-safe), metadata dropped
    assert type(plain) is collections.OrderedDict and list(plain) == ["a"] and torch.equal(plain["a"], m["a"])


def test_torch_save_of_masks_loads_weights_only(tmp_path) -> None:
    """torch.save(masks) then the default torch.load works as it did when masks were plain dicts."""
    masks = small_masks(small_model(), metadata=SETTINGS)
    torch.save(masks, tmp_path / "raw.pt")
    loaded = torch.load(tmp_path / "raw.pt")  # weights_only=True is the default
    assert list(loaded) == list(masks) and all(torch.equal(loaded[n], masks[n]) for n in masks)
    assert load_masks(tmp_path / "raw.pt").metadata == {}  # and load_masks reads it as a plain-dict file


# ----------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors", ".PT"])
def test_round_trip_with_metadata(tmp_path, suffix: str) -> None:
    model = small_model()
    masks = small_masks(model, metadata=SETTINGS)
    path = tmp_path / f"masks{suffix}"
    save_masks(masks, path, metadata={"seed": 4, "note": "run 7"})
    loaded, meta = load_masks(path, model, with_metadata=True)
    assert isinstance(loaded, Masks) and list(loaded) == list(masks)
    assert all(torch.equal(loaded[n], masks[n]) for n in masks)
    assert loaded.metadata == meta
    # the argument wins over masks.metadata; tuples come back as lists, dtypes as strings
    assert meta["seed"] == 4 and meta["note"] == "run 7" and meta["density"] == 0.05
    assert meta["batch_size"] == [256, 256, 232] and meta["dtype"] == "torch.float32"
    assert meta["package_version"] == ntksap_fast.__version__
    assert meta["fingerprint"].startswith("sha256:")
    assert load_masks(path).metadata == meta  # without the model, same result
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # no temporary left behind


def test_pt_file_is_weights_only_loadable(tmp_path) -> None:
    masks = small_masks(small_model(), metadata=SETTINGS)
    save_masks(masks, tmp_path / "m.pt")
    content = torch.load(tmp_path / "m.pt", weights_only=True)
    assert content["format"] == "ntksap_fast.masks/1" and set(content["masks"]) == set(masks)


def test_safetensors_header_holds_the_metadata(tmp_path) -> None:
    from safetensors import safe_open

    save_masks(small_masks(small_model(), metadata=SETTINGS), tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        header = f.metadata()
    assert header["format"] == "ntksap_fast.masks/1" and '"method": "ntksap"' in header["ntksap_fast"]


def test_plain_dict_files_still_load(tmp_path) -> None:
    from safetensors.torch import save_file

    masks = small_masks(small_model())
    torch.save(dict(masks), tmp_path / "old.pt")
    save_file(dict(masks), str(tmp_path / "old.safetensors"))
    for name in ("old.pt", "old.safetensors"):
        loaded = load_masks(tmp_path / name)
        assert loaded.metadata == {} and all(torch.equal(loaded[n], masks[n]) for n in masks)


def test_plain_dict_gets_fingerprint_and_version(tmp_path) -> None:
    model = small_model()
    masks = dict(small_masks(model))
    save_masks(masks, tmp_path / "m.safetensors")
    meta = load_masks(tmp_path / "m.safetensors").metadata
    assert set(meta) == {"fingerprint", "package_version"} and meta["package_version"] == ntksap_fast.__version__


# ----------------------------------------------------------------------------------------------
# Checks against a model, fingerprint
# ----------------------------------------------------------------------------------------------
def test_load_with_model_names_the_first_misfit(tmp_path) -> None:
    model = small_model()
    path = tmp_path / "m.pt"
    save_masks(small_masks(model), path)
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 7))
    with pytest.raises(ValueError, match=r"m\.pt.* does not fit the model: masks\['3\.weight'\] has shape \(5, 144\)"):
        load_masks(path, other)
    # the FIRST mask misfits (a check that skipped it would pass the case above)
    first_off = nn.Sequential(nn.Conv2d(3, 4, 5, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    with pytest.raises(
        ValueError,
        match=r"masks\['0\.weight'\] has shape \(4, 3, 3, 3\), the model's parameter has "
        r"\(4, 3, 5, 5\)",
    ):
        load_masks(path, first_off)
    renamed = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match=r"no parameter named '3\.weight'"):
        load_masks(path, renamed)
    # a model with the masks applied (weight -> weight_orig * weight_mask) still fits
    apply_masks(model, load_masks(path))
    load_masks(path, model)


def test_fingerprint_of_names_and_shapes(tmp_path) -> None:
    model = small_model()
    masks = {n: m for n, m in small_masks(model).items()}
    save_masks(masks, tmp_path / "a.pt")
    fp = load_masks(tmp_path / "a.pt").metadata["fingerprint"]
    # Pinned: files written today must compare equal with fingerprints computed by later versions.
    assert fp == "sha256:" + __import__("hashlib").sha256(b"0.weight:4x3x3x3;3.weight:5x144").hexdigest()[:16]
    save_masks(dict(reversed(list(masks.items()))), tmp_path / "b.pt")  # order does not matter
    save_masks({n: ~m for n, m in masks.items()}, tmp_path / "c.pt")  # values do not matter
    assert (
        load_masks(tmp_path / "b.pt").metadata["fingerprint"]
        == load_masks(tmp_path / "c.pt").metadata["fingerprint"]
        == fp
    )
    save_masks({"0.weight": masks["0.weight"]}, tmp_path / "d.pt")
    assert load_masks(tmp_path / "d.pt").metadata["fingerprint"] != fp


# ----------------------------------------------------------------------------------------------
# Bad paths and bad files
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["masks.bin", "masks", "masks.safetensor", "masks.pt.gz"])
def test_unknown_extension_is_refused(tmp_path, name: str) -> None:
    with pytest.raises(ValueError, match="unknown mask file extension"):
        save_masks(small_masks(small_model()), tmp_path / name)
    assert not (tmp_path / name).exists()
    with pytest.raises(ValueError, match="unknown mask file extension"):
        check_mask_path(name)
    assert check_mask_path("a.SafeTensors") == "safetensors" and check_mask_path("a.pth") == "torch"


def test_unstorable_metadata_leaves_no_file(tmp_path) -> None:
    with pytest.raises(TypeError, match=r"metadata\['model'\]"):
        save_masks(small_masks(small_model()), tmp_path / "m.pt", metadata={"model": nn.Linear(1, 1)})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600)])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_saved_file_has_the_mode_open_gives(tmp_path, suffix: str, mask: int, expected: int) -> None:
    """Others can read the masks where the umask lets them (a temporary file's 0600 used to survive the
    rename); writing over a file keeps its mode, as open() does."""
    path = tmp_path / f"m{suffix}"
    with umask(mask):
        save_masks(small_masks(small_model()), path)
        assert mode(path) == expected == plain_open_mode(tmp_path)
        path.chmod(0o640)
        save_masks(small_masks(small_model()), path)
    assert mode(path) == 0o640


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_saved_file_is_on_disk_before_the_rename(tmp_path, monkeypatch, suffix: str) -> None:
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_size)), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("replace", dst)), replace(src, dst))[1])
    path = tmp_path / f"m{suffix}"
    save_masks(small_masks(small_model()), path)
    assert events[:2] == [("fsync", path.stat().st_size), ("replace", str(path))]  # the whole file, then the rename


@pytest.mark.parametrize("failing", ["serializer", "fsync", "rename"])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_interrupted_save_keeps_the_old_file(tmp_path, monkeypatch, suffix: str, failing: str) -> None:
    """A save that fails while serializing (torch.save after half the file), after writing (the flush to
    disk) or at the rename leaves the old file as it was and no temporary file."""
    path = tmp_path / f"m{suffix}"
    save_masks(small_masks(small_model()), path, metadata={"note": "old"})
    old = path.read_bytes()

    def fail(*args, **kwargs):
        if len(args) == 2 and hasattr(args[1], "write"):  # torch.save(obj, file)
            args[1].write(b"half a file")
        raise OSError("disk full")

    target = {
        "serializer": "torch.save" if suffix == ".pt" else "safetensors.torch.save",
        "fsync": "os.fsync",
        "rename": "os.replace",
    }[failing]
    monkeypatch.setattr(target, fail)
    with pytest.raises(OSError, match="disk full"):
        save_masks(small_masks(small_model()), path, metadata={"note": "new"})
    assert path.read_bytes() == old and os.listdir(tmp_path) == [path.name]  # no temporary file behind


def _bad_files(tmp_path) -> dict[str, bytes]:
    masks = small_masks(small_model(), metadata=SETTINGS)
    save_masks(masks, tmp_path / "good.pt")
    save_masks(masks, tmp_path / "good.safetensors")
    pt, st = (tmp_path / "good.pt").read_bytes(), (tmp_path / "good.safetensors").read_bytes()
    noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return {
        "empty": b"",
        "pt_half": pt[: len(pt) // 2],
        "pt_head": pt[:100],
        "st_half": st[: len(st) // 2],
        "st_data_cut": st[:-3],
        "st_header_cut": st[:20],
        "random": bytes(noise.tolist()),
        "random_pickle_start": b"\x80" + bytes(noise.tolist()),
        "random_zip_start": b"PK\x03\x04" + bytes(noise.tolist()),
        "text": b"hello, these are not masks\n",
    }


@pytest.mark.parametrize(
    "kind",
    [
        "empty",
        "pt_half",
        "pt_head",
        "st_half",
        "st_data_cut",
        "st_header_cut",
        "random",
        "random_pickle_start",
        "random_zip_start",
        "text",
    ],
)
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_corrupt_files_raise_value_error_naming_the_path(tmp_path, kind: str, suffix: str) -> None:
    data = _bad_files(tmp_path)[kind]
    path = tmp_path / f"bad_{kind}{suffix}"
    path.write_bytes(data)
    with pytest.raises(ValueError) as info:
        load_masks(path)
    assert type(info.value) is ValueError
    message = str(info.value)
    assert str(path) in message
    assert any(w in message for w in ("empty", "truncated or corrupt", "neither a safetensors file"))
    assert "weights_only" not in message


def test_pickled_objects_are_refused_without_unsafe_advice(tmp_path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"0.weight": torch.ones(2, dtype=torch.bool), "x": nn.Linear(1, 1)}, path)
    with pytest.raises(ValueError, match=r"evil\.pt.* holds objects other than tensors") as info:
        load_masks(path)
    assert "weights_only=False" not in str(info.value)


def test_non_mask_content_is_a_type_error_naming_the_path(tmp_path) -> None:
    torch.save([torch.ones(2, dtype=torch.bool)], tmp_path / "list.pt")
    with pytest.raises(TypeError, match=r"list\.pt.* does not hold masks"):
        load_masks(tmp_path / "list.pt")


# ----------------------------------------------------------------------------------------------
# apply_masks and save/load on masks from ntk_sap_prune
# ----------------------------------------------------------------------------------------------
def test_apply_masks_prune_convention_and_training_keeps_zeros():
    model = tiny_cnn(5)
    masks = ntk_sap_prune(model, 0.3, CNN_SHAPE, iterations=2, **FAST)
    originals = {k: p.detach().clone() for k, p in model.named_parameters()}
    out = apply_masks(model, masks)
    assert out is model
    modules = dict(model.named_modules())
    for name, m in masks.items():
        mod = modules[name.rpartition(".")[0]]
        assert isinstance(mod.weight_orig, nn.Parameter)
        assert "weight_orig" in dict(mod.named_parameters(recurse=False))
        assert "weight_mask" in dict(mod.named_buffers(recurse=False))
        assert "weight" not in dict(mod.named_parameters(recurse=False))
        assert torch.equal(mod.weight_orig.detach(), originals[name])
        assert torch.equal(mod.weight_mask, m.to(mod.weight_mask.dtype))
        assert torch.equal(mod.weight, mod.weight_orig * mod.weight_mask)
        assert bool((mod.weight[~m] == 0).all())

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, *CNN_SHAPE, generator=g)
    y = torch.randint(0, 5, (8,), generator=g)
    for _ in range(2):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    model(x)  # recompute weight = weight_orig * mask after the step
    changed = False
    for name, m in masks.items():
        mod = modules[name.rpartition(".")[0]]
        assert bool((mod.weight[~m] == 0).all()), f"{name}: a pruned entry became non-zero"
        assert torch.equal(mod.weight, mod.weight_orig * mod.weight_mask)
        changed |= not torch.equal(mod.weight_orig.detach(), originals[name])
    assert changed, "the training step changed nothing: the check above is vacuous"


def _pruned_modules(model):
    return [n for n, m in model.named_modules() if hasattr(m, "weight_orig") or hasattr(m, "weight_mask")]


def test_apply_masks_bad_masks_leave_model_unchanged():
    model = tiny_cnn(0)
    params = dict(model.named_parameters())
    good = {k: torch.rand(params[k].shape) < 0.5 for k in default_prunable_names(model)}
    # A good mask first so an implementation that prunes as it goes would be caught.
    cases = [
        (ValueError, dict(good, **{"nope.weight": torch.ones(2, 2, dtype=torch.bool)})),
        (ValueError, dict(good, **{"conv9.weight": torch.ones(4, 3, 3, 3, dtype=torch.bool)})),
        (ValueError, dict(good, **{"fc.weight": torch.ones(5, 9, dtype=torch.bool)})),
        (ValueError, dict(good, **{"conv2.weight": torch.ones(8, 4, 3, 3, dtype=torch.bool)})),
        (TypeError, dict(good, **{"fc.weight": torch.ones(params["fc.weight"].shape)})),
        (TypeError, dict(good, **{"fc.weight": torch.ones(params["fc.weight"].shape, dtype=torch.uint8)})),
    ]
    for exc, bad in cases:
        before = snapshot(model)
        keys_before = list(model.state_dict())
        with pytest.raises(exc):
            apply_masks(model, bad)
        assert _pruned_modules(model) == []
        assert list(model.state_dict()) == keys_before
        assert_same_snapshot(before, model)
    with pytest.raises(TypeError):
        apply_masks(model, [good])
    assert _pruned_modules(model) == []
    # the FIRST mask has the wrong shape (every case above misfits at a later one)
    assert next(iter(good)) == "conv1.weight"
    with pytest.raises(ValueError, match=r"masks\['conv1\.weight'\] has shape \(4, 3, 5, 5\)"):
        apply_masks(model, dict(good, **{"conv1.weight": torch.ones(4, 3, 5, 5, dtype=torch.bool)}))
    assert _pruned_modules(model) == []


# ----------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_load_round_trip(tmp_path, suffix):
    model = tiny_cnn(0)
    masks = ntk_sap_prune(model, 0.25, CNN_SHAPE, iterations=2, **FAST)
    path = tmp_path / f"masks{suffix}"
    save_masks(masks, path)
    assert path.is_file()
    loaded = load_masks(path)
    assert set(loaded) == set(masks)
    for k, v in masks.items():
        assert loaded[k].dtype == torch.bool
        assert loaded[k].shape == v.shape
        assert torch.equal(loaded[k], v.cpu())
    loaded_str = load_masks(str(path))
    assert all(torch.equal(loaded_str[k], loaded[k]) for k in masks)
    # The loaded masks are usable.
    apply_masks(model, loaded)
    assert sorted(_pruned_modules(model)) == sorted(k.rpartition(".")[0] for k in masks)


def test_load_masks_rejects_non_bool_and_missing(tmp_path):
    pt = tmp_path / "bad.pt"
    torch.save({"fc.weight": torch.ones(2, 3), "conv.weight": torch.ones(2, dtype=torch.bool)}, pt)
    with pytest.raises(TypeError):
        load_masks(pt)
    from safetensors.torch import save_file

    st = tmp_path / "bad.safetensors"
    save_file({"fc.weight": torch.ones(2, 3, dtype=torch.uint8)}, str(st))
    with pytest.raises(TypeError):
        load_masks(st)
    with pytest.raises(ValueError):
        load_masks(tmp_path / "missing.pt")
    with pytest.raises(ValueError):
        load_masks(tmp_path / "missing.safetensors")
    with pytest.raises(TypeError):
        save_masks({"fc.weight": torch.ones(2, 3)}, tmp_path / "x.pt")


def test_safetensors_header_size_starting_like_a_pickle_loads(tmp_path):
    """A header of 128 + 256 k bytes makes a safetensors file start with 0x80, a pickle's first byte:
    the file is still read as safetensors (its JSON header starts at byte 8)."""
    masks = {"fc.weight": torch.ones(2, 3, dtype=torch.bool)}
    path = tmp_path / "m.safetensors"
    for pad in range(0, 256, 8):
        save_masks(masks, path, metadata={"note": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    loaded = load_masks(path)
    assert torch.equal(loaded["fc.weight"], masks["fc.weight"]) and loaded.metadata["note"].startswith("x")
