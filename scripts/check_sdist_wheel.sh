#!/usr/bin/env bash
# Packaging check, outside the checkout (issue 19), in a temporary directory:
#  1. sdist from a clean clone -> wheel built FROM the sdist (C++ ops only, NTKSAP_FAST_NO_CUDA=1)
#     -> installed into a fresh target directory -> imported and used from there: the compiled
#     ops load from the installed location, the wheel ships the license.
#  2. without a C++ compiler (CC/CXX pointing nowhere): `pip wheel` still succeeds, the package
#     installs without the compiled ops, prunes, and warns once at first use.
# Uses the project's venv (torch from there, --no-build-isolation); the source is a clone of
# the committed HEAD (or of $1, a git repository). Takes ~3-4 minutes on 2 cores (one C++ build).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
SRC="${1:-$ROOT}"
WORK="$(mktemp -d /tmp/ntksap_fast_pkg.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
export NTKSAP_FAST_CACHE_DIR="$WORK/cache"   # the verdict cache of the run-time check
unset NTKSAP_FAST_REQUIRE_EXT NTKSAP_FAST_NO_EXT NTKSAP_FAST_ALLOW_NO_EXT

# A fresh venv that sees the project venv's packages (torch, ...) through a .pth line but not its
# editable install of ntksap_fast (whose import hook would find the checkout's modules).
# Prints its site-packages directory.
fresh_venv() {
  local base site
  base="$("$PY" -c 'import sys; print(sys._base_executable)')"
  "$base" -m venv --without-pip "$1"
  site="$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  "$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$site/_project_venv.pth"
  echo "$site"
}

echo "== clean clone of $SRC"
git clone --quiet "$SRC" "$WORK/clone"

echo "== sdist"
(cd "$WORK/clone" && NTKSAP_FAST_NO_EXT_BUILD=1 "$PY" setup.py -q sdist --dist-dir "$WORK/sdist" >/dev/null)
SDIST="$(ls "$WORK"/sdist/ntksap_fast-*.tar.gz)"
echo "   $(basename "$SDIST"): $(tar -tzf "$SDIST" | grep -c -v '/$') files"

echo "== wheel from the sdist (C++ ops; NTKSAP_FAST_NO_CUDA=1)"
start=$(date +%s)
NTKSAP_FAST_NO_CUDA=1 MAX_JOBS=2 "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/wheel" "$SDIST"
WHEEL="$(ls "$WORK"/wheel/ntksap_fast-*.whl)"
echo "   $(basename "$WHEEL") in $(( $(date +%s) - start )) s"
"$PY" - "$WHEEL" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
lic = [n for n in names if n.endswith("LICENSE")]
so = [n for n in names if n.startswith("ntksap_fast/_C") and n.endswith(".so")]
typed = [n for n in names if n == "ntksap_fast/py.typed"]
assert lic and so and typed, f"license {lic}, compiled module {so}, py.typed {typed}"
print(f"   wheel ships {lic[0]}, {so[0]} and {typed[0]}")
PY

echo "== install the wheel in a fresh venv, use it from outside the checkout"
SITE="$(fresh_venv "$WORK/venv")"
"$PY" -m pip install -q --no-deps --target "$SITE" "$WHEEL"
(cd "$WORK" && "$WORK/venv/bin/python" - "$SITE" <<'PY'
import importlib.metadata, os, sys, warnings
site = sys.argv[1]
warnings.simplefilter("error", RuntimeWarning)  # a fallback to PyTorch would be an error here
import torch
import ntksap_fast
from ntksap_fast._build import loader as _ext
from ntksap_fast.select import topk
from ntksap_fast.models import resnet20
assert ntksap_fast.__file__.startswith(site), ntksap_fast.__file__
assert ntksap_fast.__version__ == importlib.metadata.version("ntksap_fast") != "0+unknown", ntksap_fast.__version__
assert topk.extension_available(), topk.extension_error()
assert _ext._state["lib"].startswith(site), _ext._state["lib"]
masks = ntksap_fast.ntk_sap_prune(resnet20(), density=0.1, input_shape=(3, 32, 32), iterations=2,
                                  draws=1, batch_size=4, seed=0)
density = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
print(f"   imported from {os.path.dirname(ntksap_fast.__file__)}; compiled ops from {_ext._state['lib']}")
print(f"   pruned ResNet-20 to density {density:.4f}")
PY
)

echo "== wheel without a C++ compiler (CC=/nonexistent/cc CXX=/nonexistent/c++ NTKSAP_FAST_NO_CUDA=1)"
(cd "$WORK/clone" && CC=/nonexistent/cc CXX=/nonexistent/c++ NTKSAP_FAST_NO_CUDA=1 \
  "$PY" -m pip wheel -v --no-build-isolation --no-deps -w "$WORK/nocc" . > "$WORK/nocc.log" 2>&1) \
  || { tail -30 "$WORK/nocc.log"; echo "FAILED: pip wheel without a compiler"; exit 1; }
grep -o "ntksap_fast: WARNING: installing WITHOUT the compiled ops.*" "$WORK/nocc.log" | head -1 | cut -c1-200
NOCC="$(ls "$WORK"/nocc/ntksap_fast-*.whl)"
echo "   $(basename "$NOCC")"
SITE="$(fresh_venv "$WORK/nocc_venv")"
"$PY" -m pip install -q --no-deps --target "$SITE" "$NOCC"
(cd "$WORK" && "$WORK/nocc_venv/bin/python" - "$SITE" <<'PY'
import sys, warnings
site = sys.argv[1]
import ntksap_fast
from ntksap_fast.models import resnet20
from ntksap_fast._build import loader as _ext
assert ntksap_fast.__file__.startswith(site), ntksap_fast.__file__
assert _ext._state["lib"] is None, _ext._state["lib"]
with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    masks = ntksap_fast.ntk_sap_prune(resnet20(), density=0.1, input_shape=(3, 32, 32), iterations=2,
                                      draws=1, batch_size=4, seed=0)
msgs = [str(w.message) for w in rec if "compiled extension unavailable" in str(w.message)]
assert len(msgs) == 1 and "NTKSAP_FAST_REQUIRE_EXT=1" in msgs[0], [str(w.message) for w in rec]
print(f"   pruned ({len(masks)} masks), one warning: {msgs[0][:160]}...")
PY
)
echo "== all packaging checks passed"
