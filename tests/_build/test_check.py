"""The library check (ntksap_fast/_build/check.py): it knows every op the package calls, and its
known answers of the Philox normals are the PyTorch twin's. No compiled library needed: the check's
logic runs against ops written with the twin (the check of the built module itself is in
test_ext_loader.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from ntksap_fast._build import check
from ntksap_fast.engine import rng

ROOT = Path(__file__).resolve().parents[2]

# How the package names a compiled op: torch.ops.ntksap_fast.<name>, "ntksap_fast::<name>" (has_kernel,
# register_fake), has_op("<name>").
_CALLS = re.compile(r'torch\.ops\.ntksap_fast\.(\w+)|"ntksap_fast::(\w+)"|has_op\("(\w+)"\)')


def _ops_called() -> dict[str, set[str]]:
    """``{op name: files naming it}`` over the package's Python sources, the check itself left out."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "ntksap_fast").rglob("*.py"):
        if path == ROOT / "ntksap_fast" / "_build" / "check.py":
            continue
        for match in _CALLS.finditer(path.read_text()):
            name = next(g for g in match.groups() if g)
            found.setdefault(name, set()).add(path.relative_to(ROOT).as_posix())
    return found


def test_the_check_knows_every_op_the_package_calls():
    """SCHEMAS is the list of ops the code calls (derived here from the sources), so a library whose
    op changed or is missing is refused, and the check holds no op nobody calls."""
    called = _ops_called()
    assert {"masked_topk", "masked_topk_", "philox_normal", "philox_normal_at"} <= set(called), called
    assert set(check.SCHEMAS) == set(called), called


def test_schemas_are_the_ones_csrc_defines():
    """Each schema of the check is defined, as written, by the C++ sources (m.def)."""
    defined = {}
    for path in (ROOT / "csrc").rglob("*.c*"):
        for schema in re.findall(r'\bm\.def\(\s*"([^"]+)"', path.read_text()):
            defined[schema.split("(", 1)[0]] = f"ntksap_fast::{schema}"
    assert defined == check.SCHEMAS


def test_philox_known_answers_are_the_twins(monkeypatch):
    monkeypatch.setenv("NTKSAP_FAST_NO_EXT", "1")
    seed = check.PHILOX_KEY[0] + (check.PHILOX_KEY[1] << 32)
    for case, compute in (
        (
            check.PHILOX_NORMAL,
            lambda draw, stream, case: rng.normal(
                seed, check.PHILOX_ROUND, draw, stream, len(case["values"]), offset=case["offset"]
            ),
        ),
        (
            check.PHILOX_NORMAL_AT,
            lambda draw, stream, case: rng.normal_at(
                seed, check.PHILOX_ROUND, draw, stream, torch.tensor(case["index"])
            ),
        ),
    ):
        draw, stream = divmod(case["tag"], 4)
        torch.testing.assert_close(
            compute(draw, rng.Stream(stream), case), torch.tensor(case["values"]), rtol=0, atol=check.PHILOX_ATOL
        )


class _TwinOps:
    """``torch.ops.ntksap_fast``'s Philox ops as a correct library computes them (the PyTorch twin),
    or with the stream tag off by ``tag_shift``."""

    def __init__(self, tag_shift: int = 0) -> None:
        self.tag_shift = tag_shift

    def _counters(self, key0: int, key1: int, tag: int) -> tuple[int, int, rng.Stream]:
        if not 0 <= key0 < 2**32:
            raise ValueError(f"key0 must be in [0, 2**32), got {key0}")
        draw, stream = divmod(tag + self.tag_shift, 4)
        return key0 + (key1 << 32), draw, rng.Stream(stream)

    def philox_normal(self, key0: int, key1: int, round: int, tag: int, offset: int, numel: int) -> torch.Tensor:
        seed, draw, stream = self._counters(key0, key1, tag)
        return rng.normal(seed, round, draw, stream, numel, offset=offset)

    def philox_normal_at(self, key0: int, key1: int, round: int, tag: int, index: torch.Tensor) -> torch.Tensor:
        if index.dtype != torch.int64:
            raise TypeError(f"index must be int64, got {index.dtype}")
        seed, draw, stream = self._counters(key0, key1, tag)
        return rng.normal_at(seed, round, draw, stream, index)


def test_philox_check_passes_the_twin_and_refuses_other_numbers(monkeypatch):
    monkeypatch.setenv("NTKSAP_FAST_NO_EXT", "1")
    check._check_philox(_TwinOps())
    with pytest.raises(SystemExit, match="wrong result: philox_normal"):
        check._check_philox(_TwinOps(tag_shift=1))


@pytest.mark.ext
def test_the_check_refuses_the_built_module_with_other_known_answers(monkeypatch):
    """check_library on the built module, in this process (the module is loaded here already): it
    passes, and with the known normals shifted by a few ulps' worth too many it refuses the library."""
    from _requires_ext import ext_missing
    from ntksap_fast._build import loader as _ext

    if not (_ext.load() and _ext._state["lib"]):
        ext_missing(f"the compiled ops are missing or refused: {_ext.error()}")
    lib = _ext._state["lib"]
    check.check_library(lib)
    shifted = [v + 4 * check.PHILOX_ATOL for v in check.PHILOX_NORMAL["values"]]
    monkeypatch.setitem(check.PHILOX_NORMAL, "values", shifted)
    with pytest.raises(SystemExit, match="wrong result: philox_normal"):
        check.check_library(lib)
