"""End to end, as users meet it: a fresh process, a second call, a call after other GPU work.

For each case and dtype a child process (``--child``) imports the package, builds the model (seeded)
and times, with a device sync after each:

* ``first``: the first call in the process (set-up, kernel compiles or loads, memory probe, graph
  captures included);
* ``second``: the same call again (a new scorer: set-up again, kernels already compiled);
* ``after_work``: the call again after other GPU work that leaves the caching allocator holding
  most of the memory (a large temporary tensor);
* ``kept``: the same work on a scorer kept from an earlier call (``scorer.prune`` /
  ``scorer.scores``), what a user scoring one model repeatedly pays.

Each child runs twice: with an empty Triton cache (``cold``: every kernel compiles) and with the
cache the cold run filled (``warm``: what every later process meets). The child reports the seconds,
the kernels compiled in the cold run (compiled binaries in its cache folder) and the scorer's
decisions (micro-batch, graphs). The paper's code, measured on an H100 in the same conditions
(shared/measurements, 2026-11-23), is the anchor of the ratios.

Cases (the paper's settings):
* ``cifar10-prune``: ResNet-20, ``ntk_sap_prune`` density 0.05, T=20, 5 draws x 100.
* ``imagenet-round``: torchvision ResNet-50, one ``ntk_sap_scores`` round, 39 x 256 + 16 inputs.
* ``resnet50-8x256``: torchvision ResNet-50, ``ntk_sap_prune`` of one round of 8 draws x 256.

``--compile false,true`` runs every case with ``compile=False`` and again with ``compile=True`` (the
compiled draw step, ntksap_fast.engine.compiled; the cold run then also starts from an empty inductor
cache, ``TORCHINDUCTOR_CACHE_DIR``).

Usage: ``python bench/bench_gpu_e2e.py [--cases a,b] [--dtypes float32,bfloat16] [--compile false,true]
[--out results.json]``;
``--smoke`` runs tiny settings on whatever device there is (a CPU check that the script works).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: The paper's public code on an H100 (shared/measurements/h100-2026-11-23.md), seconds.
PAPER_SECONDS = {"cifar10-prune": 5.0, "imagenet-round": 24.3, "resnet50-8x256": 8 * 0.66}
CASES = ("cifar10-prune", "imagenet-round", "resnet50-8x256")


def _child(case: str, dtype_name: str, compile: bool, smoke: bool) -> dict:
    import torch

    import ntksap_fast
    from ntksap_fast.cli.sources import build_model
    from ntksap_fast.presets import PRESETS

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, dtype_name)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    preset = PRESETS["cifar10" if case == "cifar10-prune" else "imagenet"]
    torch.manual_seed(0)
    model = build_model(preset.model, preset.num_classes).to(device)
    kwargs = dict(
        input_shape=preset.input_shape,
        draws=preset.options.draws,
        batch_size=preset.options.batch_size,
        device=device,
        dtype=dtype,
        compile=compile,
    )
    iterations = preset.iterations
    if case == "resnet50-8x256":
        kwargs.update(draws=8, batch_size=256)
        iterations = 1
    if smoke:
        kwargs.update(input_shape=(3, 32, 32), draws=2, batch_size=4)
        iterations = min(iterations, 2)
    scorer_box: list = []

    def call() -> None:
        if case == "imagenet-round":
            ntksap_fast.ntk_sap_scores(model, **kwargs)
        else:
            ntksap_fast.ntk_sap_prune(model, 0.05, iterations=iterations, progress=False, **kwargs)

    def kept() -> None:
        if not scorer_box:
            scorer_box.append(ntksap_fast.NtkSapScorer(model, **kwargs))
        if case == "imagenet-round":
            scorer_box[0].scores()
        else:
            scorer_box[0].prune(0.05, iterations, progress=False)

    times = {}
    for name, fn in (("first", call), ("second", call)):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times[name] = time.perf_counter() - start
    if device.type == "cuda":  # other GPU work: the allocator keeps 60% of the free memory cached
        free = torch.cuda.mem_get_info(device)[0]
        block = torch.empty(int(0.6 * free), dtype=torch.uint8, device=device)
        block.fill_(1)
        del block
    sync()
    start = time.perf_counter()
    call()
    sync()
    times["after_work"] = time.perf_counter() - start
    kept()  # set-up of the kept scorer, not timed
    sync()
    start = time.perf_counter()
    kept()
    sync()
    times["kept"] = time.perf_counter() - start
    scorer = scorer_box[0]
    return {
        "case": case,
        "dtype": dtype_name,
        "compile": scorer.settings()["compile"],
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "micro_batch": scorer.config.micro_batch,
        "graphs": scorer.settings()["graphs"],
        "scorer": repr(scorer),
        **times,
    }


def _run_child(case: str, dtype: str, compile: str, smoke: bool, cache: str) -> dict:
    env = dict(os.environ, TRITON_CACHE_DIR=cache, TORCHINDUCTOR_CACHE_DIR=cache, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, __file__, "--child", case, dtype, compile] + (["--smoke"] if smoke else [])
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if res.returncode != 0:
        return {"case": case, "dtype": dtype, "error": res.stderr.strip().splitlines()[-1:] or ["?"]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--compile", default="false", help="comma list of compile= values: false, true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out")
    parser.add_argument("--child", nargs=3, metavar=("CASE", "DTYPE", "COMPILE"))
    opts = parser.parse_args()
    if opts.child:
        print(json.dumps(_child(opts.child[0], opts.child[1], opts.child[2] == "true", opts.smoke)))
        return 0
    rows = []
    for case, dtype, compile in itertools.product(
        opts.cases.split(","), opts.dtypes.split(","), opts.compile.split(",")
    ):
        if compile not in ("false", "true"):
            parser.error(f"--compile takes false and/or true, got {compile!r}")
        with tempfile.TemporaryDirectory(prefix="triton-cache-") as cache:  # Triton's and inductor's
            cold = _run_child(case, dtype, compile, opts.smoke, cache)
            compiled = sum(1 for _ in Path(cache).rglob("*.cubin"))
            warm = _run_child(case, dtype, compile, opts.smoke, cache)
        for label, row in (("cold", cold), ("warm", warm)):
            row.update(cache=label, kernels_compiled=compiled if label == "cold" else 0)
            rows.append(row)
            if "error" in row:
                print(f"{case:<15} {dtype:<9} compile={compile:<5} {label:<5} ERROR {row['error']}", flush=True)
                continue
            paper = PAPER_SECONDS[case]
            print(
                f"{case:<15} {dtype:<9} compile={compile:<5} {label:<5} first {row['first']:7.2f} s "
                f"(x{paper / row['first']:5.2f} vs paper {paper} s)  second {row['second']:7.2f} s  "
                f"after work {row['after_work']:7.2f} s  "
                f"kept scorer {row['kept']:7.2f} s  compiled {row['kernels_compiled']:2d}  "
                f"micro_batch {row['micro_batch']}  graphs {row['graphs']}",
                flush=True,
            )
    if opts.out:
        Path(opts.out).write_text(json.dumps(rows, indent=1))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
