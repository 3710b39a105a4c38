#!/usr/bin/env bash
# GPU session (issues 7 and 26): build, test on CUDA, benchmark eager and compiled draws; everything
# lands under $OUT.
#
# The device tool allows 10 minutes per command, so the session is four commands (each builds
# first if the build is not already there; on a warm machine the build is kept and skipped):
#
#   run(command="bash bench/gpu_session.sh tests",    timeout_s=600)   # build + pytest -n 8 tests (CUDA)
#   run(command="bash bench/gpu_session.sh bench",    timeout_s=600)   # topk (CUDA groups), Triton kernels,
#                                                                      # paper settings CIFAR-10/100, Tiny-ImageNet,
#                                                                      # engine with compile off and on
#   run(command="bash bench/gpu_session.sh imagenet", timeout_s=600)   # paper setting ImageNet, first 4 of 40 draws,
#                                                                      # compile off and on
#   run(command="bash bench/gpu_session.sh e2e",      timeout_s=600)   # bench_gpu_e2e.py: fresh processes, cold and
#                                                                      # warm caches, compile off and on
#
# Knobs (prefix the command, e.g. "NTKSAP_BENCH_DRAWS=imagenet=8 bash bench/gpu_session.sh imagenet"):
#   PYTHON                    interpreter (default: python3 on PATH; .venv is not assumed)
#   NTKSAP_BENCH_DRAWS        draws timed per setting (imagenet mode default: imagenet=4; see
#                             bench/bench_paper_settings.py); the summary extrapolates the round
#   NTKSAP_BENCH_MICRO_BATCH  engine micro_batch, e.g. 128 if ResNet-50 x 256 runs out of memory
#   NTKSAP_BENCH_DRAW_BATCH   engine draw_batch values, e.g. "1,4"
#   NTKSAP_BENCH_COMPILE      engine compile values for the paper settings (default here "0,1": off and on)
#   NTKSAP_E2E_CASES          bench_gpu_e2e.py --cases (default all three; e.g. "cifar10-prune,imagenet-round")
#   NTKSAP_E2E_DTYPES         bench_gpu_e2e.py --dtypes (default "float32,bfloat16")
#   NTKSAP_TOPK_K             pytest -k for topk + kernels (default "cuda or bench_kernels";
#                             "" adds the CPU top-k groups, about a minute more)
#   SESSION_LIMIT_S           seconds this command may use in all (default 570); each step gets what is left
#   NTKSAP_BENCH_SMOKE=1      tiny settings (the CPU check of this script: "bash bench/gpu_session.sh smoke")
#
# Files under $OUT (at most 8 per command): env.txt (nvidia-smi, versions, git revision, the
# commands run), build.log, status.txt (each step's exit code and seconds), then per mode:
# tests.log | bench.log, topk-kernels.json, paper.json, paper-summary.txt | imagenet.log,
# imagenet.json, imagenet-summary.txt | e2e.log, e2e.json. The JSON files are pytest-benchmark's (machine_info and
# commit_info included): copy them to bench/results/<device>-<date>-*.json; the summary files hold
# the rows of a BENCHMARKS.md table (median, per draw, extrapolated round, ratio, peak memory).
set -euo pipefail

MODE="${1:-all}"
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-session-out}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
LIMIT="${SESSION_LIMIT_S:-570}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONDONTWRITEBYTECODE=1
FAILED=0
[ "$MODE" = smoke ] && export NTKSAP_BENCH_SMOKE=1

log() { printf '%s\n' "$*" | tee -a "$OUT/env.txt"; }

# step NAME LOGFILE CMD...: runs CMD with what is left of the time limit, output to LOGFILE (and
# the terminal), records its exit code; a failure does not stop the later steps.
step() {
  local name="$1" logfile="$2"; shift 2
  local left=$((LIMIT - SECONDS - 15))
  if [ "$left" -lt 20 ]; then
    echo "$name: skipped, no time left" | tee -a "$OUT/status.txt"; FAILED=1; return 0
  fi
  log "+ [$name, limit ${left}s] $*"
  local t0=$SECONDS rc=0
  set +e
  timeout --signal=INT --kill-after=10 "$left" "$@" 2>&1 | tee -a "$logfile"
  rc=${PIPESTATUS[0]}
  set -e
  echo "$name: rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT/status.txt"
  [ "$rc" -eq 0 ] || FAILED=1
}

environment() {
  log "# gpu_session.sh $MODE, $(date -u +%Y-%m-%dT%H:%M:%SZ), host $(hostname)"
  log "# git $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) changed paths"
  { nvidia-smi || echo "nvidia-smi unavailable"; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv || true; } >> "$OUT/env.txt" 2>&1
  { "$CUDA_HOME/bin/nvcc" --version || echo "nvcc not found under $CUDA_HOME"; } >> "$OUT/env.txt" 2>&1
  "$PY" - >> "$OUT/env.txt" 2>&1 <<'EOF' || true
import importlib, platform, sys, torch
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
      "available", torch.cuda.is_available(), "threads", torch.get_num_threads())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0))
for name in ("triton", "torchvision", "pytest", "pytest_benchmark", "safetensors", "numpy", "setuptools", "pip"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:
        print(name, "MISSING", type(exc).__name__)
EOF
}

check_build() {
  "$PY" - <<'EOF'
import torch, ntksap_fast, ntksap_fast.kernels as k
from ntksap_fast._build import loader as _ext
ok = _ext.load()
print("extension loaded:", ok, _ext.error() or "")
print("masked_topk CUDA kernel:", _ext.has_kernel("ntksap_fast::masked_topk", "CUDA"))
print("triton kernels available:", k.available())
print("ntksap_fast from", ntksap_fast.__file__)
raise SystemExit(0 if ok and (not torch.cuda.is_available() or _ext.has_kernel("ntksap_fast::masked_topk", "CUDA")) else 1)
EOF
}

build() {
  if [ -f build/.gpu_session_built ] && check_build >> "$OUT/build.log" 2>&1; then
    log "# build: already there (build/.gpu_session_built), skipped"; return 0
  fi
  # In place, against the torch already installed; no downloads (--no-deps, no build isolation).
  local rc=0
  step build-ext "$OUT/build.log" "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . || rc=$?
  if [ "$rc" != 0 ] || ! check_build >> "$OUT/build.log" 2>&1; then
    log "# build failed (rc $rc): see build.log; the ops' tests will fail"; FAILED=1
  fi
  mkdir -p build && touch build/.gpu_session_built
  check_build 2>&1 | tee -a "$OUT/env.txt" || true
}

BENCH_OPTS=(-p no:cacheprovider --benchmark-columns=median,iqr,min,rounds --benchmark-sort=name)

run_tests() {
  step tests "$OUT/tests.log" "$PY" -m pytest -q -n 8 tests -p no:cacheprovider -rfEs --durations=20
}

run_bench() {
  step bench-topk-kernels "$OUT/bench.log" "$PY" -m pytest bench/bench_topk.py bench/bench_kernels.py \
    -k "${NTKSAP_TOPK_K-cuda or bench_kernels}" "${BENCH_OPTS[@]}" --benchmark-json="$OUT/topk-kernels.json"
  NTKSAP_BENCH_SETTINGS="${NTKSAP_BENCH_SETTINGS:-cifar10,cifar100,tiny-imagenet}" \
  NTKSAP_BENCH_COMPILE="${NTKSAP_BENCH_COMPILE:-0,1}" NTKSAP_BENCH_SUMMARY="$OUT/paper-summary.txt" \
    step bench-paper "$OUT/bench.log" "$PY" -m pytest bench/bench_paper_settings.py -rs \
      "${BENCH_OPTS[@]}" --benchmark-json="$OUT/paper.json"
}

run_imagenet() {
  NTKSAP_BENCH_SETTINGS=imagenet NTKSAP_BENCH_DRAWS="${NTKSAP_BENCH_DRAWS:-imagenet=4}" \
  NTKSAP_BENCH_COMPILE="${NTKSAP_BENCH_COMPILE:-0,1}" NTKSAP_BENCH_SUMMARY="$OUT/imagenet-summary.txt" \
    step bench-imagenet "$OUT/imagenet.log" "$PY" -m pytest bench/bench_paper_settings.py -rs \
      "${BENCH_OPTS[@]}" --benchmark-json="$OUT/imagenet.json"
}

run_e2e() {
  step e2e "$OUT/e2e.log" "$PY" bench/bench_gpu_e2e.py --cases "${NTKSAP_E2E_CASES:-cifar10-prune,imagenet-round,resnet50-8x256}" \
    --dtypes "${NTKSAP_E2E_DTYPES:-float32,bfloat16}" --compile false,true --out "$OUT/e2e.json"
}

environment
log "# env: NTKSAP_BENCH_DRAWS=${NTKSAP_BENCH_DRAWS-} NTKSAP_BENCH_MICRO_BATCH=${NTKSAP_BENCH_MICRO_BATCH-} NTKSAP_BENCH_DRAW_BATCH=${NTKSAP_BENCH_DRAW_BATCH-} NTKSAP_BENCH_SMOKE=${NTKSAP_BENCH_SMOKE-} NTKSAP_BENCH_DEVICE=${NTKSAP_BENCH_DEVICE-}"
case "$MODE" in
  tests) build; run_tests ;;
  bench) build; run_bench ;;
  imagenet) build; run_imagenet ;;
  e2e) build; run_e2e ;;
  all) build; run_tests; run_bench; run_imagenet; run_e2e ;;
  smoke)  # CPU check of this script: the paper settings shrunk, topk/kernels only collected
    check_build 2>&1 | tee -a "$OUT/env.txt" || FAILED=1
    step collect-tests "$OUT/tests.log" "$PY" -m pytest -q --collect-only tests -p no:cacheprovider
    step collect-topk-kernels "$OUT/bench.log" "$PY" -m pytest -q --collect-only bench/bench_topk.py bench/bench_kernels.py -p no:cacheprovider
    NTKSAP_BENCH_SUMMARY="$OUT/paper-summary.txt" \
      step bench-paper "$OUT/bench.log" "$PY" -m pytest bench/bench_paper_settings.py -rs \
        "${BENCH_OPTS[@]}" --benchmark-json="$OUT/paper.json"
    step e2e-smoke "$OUT/e2e.log" "$PY" bench/bench_gpu_e2e.py --smoke --cases cifar10-prune --dtypes float32 \
      --compile false,true --out "$OUT/e2e.json"
    ;;
  *) echo "usage: $0 [tests|bench|imagenet|e2e|all|smoke]" >&2; exit 2 ;;
esac
log "# done in ${SECONDS}s, failed=$FAILED"
ls -l "$OUT" | tee -a "$OUT/env.txt"
exit "$FAILED"
