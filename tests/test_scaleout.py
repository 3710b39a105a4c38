"""Scale-out and long runs: draws shared over gloo ranks, checkpoint and resume, bounded memory."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ntksap_fast import ntk_sap_prune, ntk_sap_scores
from ntksap_fast.checkpoint import CheckpointError
from ntksap_fast.models import CifarResNet

from _dist_prune import KWARGS
from _tolerances import assert_float32_close

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process(tmp_path):
    out = tmp_path / "dist.pt"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(ROOT / "tests" / "_dist_prune.py"), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = torch.load(out, weights_only=True)
    assert result["world"] == 2
    model = CifarResNet(8)
    scores = ntk_sap_scores(model, **KWARGS)
    masks = ntk_sap_prune(model, 0.2, iterations=3, progress=False, **KWARGS)
    # Other float32 rounding only: the sum over draws runs in another order (rank partial sums, then
    # the all-reduce) and the workers run one thread each, which changes the convolutions' sums.
    flat = lambda d: torch.cat([v.reshape(-1) for v in d.values()])  # noqa: E731
    assert_float32_close(flat(result["scores"]), flat(scores))
    # Masks: the same count everywhere; at most a handful of near-tie entries may swap.
    differing = sum(int((result["masks"][n] != m).sum()) for n, m in masks.items())
    assert sum(int(m.sum()) for m in result["masks"].values()) == sum(int(m.sum()) for m in masks.values())
    assert differing <= 4, differing


def _prune(path, **overrides):
    kwargs = dict(input_shape=(3, 16, 16), iterations=4, draws=2, batch_size=4, seed=3, progress=False,
                  checkpoint=path) | overrides
    return ntk_sap_prune(CifarResNet(8), 0.1, **kwargs)


class _Interrupt(Exception):
    pass


def _interrupt_after(k):
    def hook(t, masks):
        if t == k:
            raise _Interrupt

    return hook


def test_interrupted_run_resumes_to_identical_masks(tmp_path):
    path = tmp_path / "ckpt.bin"
    uninterrupted = _prune(None)
    with pytest.raises(_Interrupt):
        _prune(path, on_round=_interrupt_after(2))
    rounds_run = []
    resumed = _prune(path, on_round=lambda t, m: rounds_run.append(t))
    assert rounds_run == [3, 4]  # rounds 1-2 came from the checkpoint
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name])
    # A finished checkpoint returns the masks without another round.
    again = _prune(path, on_round=lambda t, m: rounds_run.append(t))
    assert rounds_run == [3, 4] and all(torch.equal(again[n], uninterrupted[n]) for n in again)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.bin"]  # no temporary files left behind


def test_checkpoint_with_other_arguments_is_refused(tmp_path):
    path = tmp_path / "ckpt.bin"
    with pytest.raises(_Interrupt):
        _prune(path, on_round=_interrupt_after(1))
    with pytest.raises(CheckpointError, match="seed"):
        _prune(path, seed=4)
    with pytest.raises(ValueError, match="iterations"):
        _prune(path, iterations=5)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_corrupted_checkpoint_is_refused(tmp_path, damage):
    path = tmp_path / "ckpt.bin"
    with pytest.raises(_Interrupt):
        _prune(path, on_round=_interrupt_after(1))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-10] ^= 0xFF
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted|truncated"):
        _prune(path)


def test_checkpoint_argument_type(tmp_path):
    with pytest.raises(TypeError, match="checkpoint"):
        _prune(123)


_PEAK = """
import os, sys, threading, torch
from ntksap_fast import ntk_sap_scores
from ntksap_fast.models import resnet20
torch.set_num_threads(2)
model = resnet20()  # few weights, large activations at 64x64: the memory a micro-batch bounds
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
base, peak, done = rss(), [0], threading.Event()
def watch():  # sample the resident set every millisecond while scoring runs
    while not done.wait(0.001):
        peak[0] = max(peak[0], rss())
watcher = threading.Thread(target=watch)
watcher.start()
micro = None if sys.argv[1] == "none" else int(sys.argv[1])
scores = ntk_sap_scores(model, (3, 64, 64), draws=1, batch_size=64, seed=0, micro_batch=micro)
done.set()
watcher.join()
torch.save({"peak_growth": peak[0] - base, "scores": scores}, sys.argv[2])
"""


def test_micro_batches_bound_memory_and_match(tmp_path):
    results = {}
    for micro in ("none", "8"):
        out = tmp_path / f"{micro}.pt"
        done = subprocess.run([sys.executable, "-c", _PEAK, micro, str(out)], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        results[micro] = torch.load(out, weights_only=True)
    # Activations saved for the backward scale with the inputs per forward: 8 instead of 64 must
    # cut the growth of the peak (weights, sampling buffers and the allocator's slack stay) by half.
    peaks = {k: v["peak_growth"] for k, v in results.items()}
    assert peaks["8"] < 0.5 * peaks["none"], peaks
    whole = torch.cat([v.reshape(-1) for v in results["none"]["scores"].values()])
    micro = torch.cat([v.reshape(-1) for v in results["8"]["scores"].values()])
    assert_float32_close(micro, whole)


def test_default_micro_batch_from_free_memory():
    from ntksap_fast.engine import default_micro_batch

    gib = 2**30
    assert default_micro_batch(10 * gib, 0.1 * gib, 64) is None  # 64 x 0.1 GiB fits in 7 GiB
    assert default_micro_batch(10 * gib, 0.5 * gib, 64) == 14  # floor(7 / 0.5)
    assert default_micro_batch(gib, 2 * gib, 64) == 1  # never below one input
    assert default_micro_batch(gib, 0, 64) is None  # nothing measured: whole draws
