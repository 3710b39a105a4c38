# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
# For development: `make test-fast` (the edit loop, under 2 minutes) and `make lint` (ruff).
#
# CPU-only machine: `make install TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# NTKSAP_FAST_NO_CUDA=1` takes the CPU wheel of torch (no CUDA libraries to download) and builds
# the C++ ops only. Without TORCH_INDEX_URL pip takes torch from its default index (on Linux the
# CUDA build, which also runs on CPU).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_INDEX_URL ?=
PIP := $(PY) -m pip install --progress-bar off

.PHONY: install demo test test-fast lint bench clean

install: $(STAMP)

# Rebuilt when the build (its configuration: ntksap_fast/_build/config.py) or the C++/CUDA
# sources change.
$(STAMP): setup.py pyproject.toml ntksap_fast/_build/config.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
	@echo "== [1/4] virtual environment $(VENV)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "== [2/4] pip, setuptools, wheel"
	$(PIP) --upgrade pip setuptools wheel
	@echo "== [3/4] torch and torchvision$(if $(TORCH_INDEX_URL), from $(TORCH_INDEX_URL)) (large download the first time)"
	$(PIP) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) torch==2.14.1 torchvision==0.29.1
	@echo "== [4/4] ntksap_fast, editable, with the test and example extras; compiles the C++$(if $(NTKSAP_FAST_NO_CUDA),,/CUDA) ops and checks them (a few minutes)"
	$(PIP) --no-build-isolation -e '.[test,examples]'
	touch $(STAMP)

demo: install
	$(PY) -m ntksap_fast.cli.demo

# ruff's lint rules and its formatting, as configured in pyproject.toml ([tool.ruff]); `make test`
# (so CI) runs it first. `ruff check --fix .` and `ruff format .` make the changes it asks for.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The compiled ops must be there: the build fails without them (NTKSAP_FAST_REQUIRE_EXT, which
# make passes on to the install and ctest steps as well) and their tests fail (not skip).
test: export NTKSAP_FAST_REQUIRE_EXT = 1
test: lint ctest
	$(PY) -m pytest -q tests

# The edit loop: the suite less the tests marked slow (end-to-end runs, the oracle on real
# architectures, the README blocks, subprocesses; pyproject.toml registers the markers) and cuda,
# on two workers (pytest-xdist). `make test` still runs everything.
test-fast: export NTKSAP_FAST_REQUIRE_EXT = 1
test-fast: install
	$(PY) -m pytest -q -n 2 -m "not slow and not cuda" tests

# The C++ ops against libtorch with CMake, and their C++ test under ctest (CPU; see CMakeLists.txt).
.PHONY: ctest
ctest: install
	@echo "== C++ test of the ops against libtorch (CMake)"
	cmake -S . -B cmake-build -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE=$(abspath $(PY)) \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build cmake-build -j 2
	cd cmake-build && ctest --output-on-failure

# On a GPU the paper's full settings; on a CPU a cut of them (bench/_machine.py decides and the summary
# says what was cut): NTKSAP_BENCH_FULL=1 runs the full settings there too (hours on 2 cores).
bench: install
	$(PY) -m pytest -q bench/bench_*.py -p no:cacheprovider --benchmark-columns=median,iqr,rounds --benchmark-sort=name

clean:
	rm -rf $(VENV) build *.egg-info
