# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

# Rebuilt when the build or the C++/CUDA sources change.
$(STAMP): setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	touch $(STAMP)

demo: install
	$(PY) -m ntksap_fast.demo

test: install ctest
	$(PY) -m pytest -q tests

# The C++ ops against libtorch with CMake, and their C++ test under ctest (CPU; see CMakeLists.txt).
.PHONY: ctest
ctest: install
	cmake -S . -B cmake-build -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build cmake-build -j 2
	cd cmake-build && ctest --output-on-failure

bench: install
	$(PY) -m pytest -q bench/bench_*.py -p no:cacheprovider --benchmark-columns=median,iqr,rounds --benchmark-sort=name

clean:
	rm -rf $(VENV) build *.egg-info
