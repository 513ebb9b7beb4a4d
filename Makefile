# One command each: `make demo` (set up + main job), `make test` (set up + tests).
# Each creates or reuses the virtual environment $(VENV).
PYTHON ?= python3
VENV ?= .venv
REQUIREMENTS ?= requirements.txt
PY := $(VENV)/bin/python
CUDA_HOME ?= /usr/local/cuda
CUDA_VENV ?= .venv-cuda-build
SOURCES := setup.py $(shell find csrc -type f)

.PHONY: setup build test fuzz demo bench gpu-check-dry-run rehearsal triton-check cuda-usage cmake-check cuda-check clean

setup: $(VENV)/.installed
$(VENV)/.installed: $(REQUIREMENTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r $(REQUIREMENTS)
	touch $@

# Editable install; ninja rebuilds only what changed.
build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.installed $(SOURCES)
	$(PY) -m pip install --no-build-isolation --no-deps -v -e . > $(VENV)/build.log 2>&1 \
	  || { tail -60 $(VENV)/build.log; exit 1; }
	grep -h "pyattn build:" $(VENV)/build.log | head -1
	$(PY) -c "import pyattn"
	touch $@

# Property-based tests run with the CI-sized hypothesis profile; the statistics
# say how many cases each one tried. `make fuzz` runs them with the long profile.
test: build
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest tests -q -m "not slow" --hypothesis-show-statistics

fuzz: build
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest tests -m fuzz -q --hypothesis-show-statistics

# The main job: every seed study at the quick setting -> reports/REPORT.md, on the
# data shipped in data/ (GPT on Grimms' Fairy Tales, GCN on Cora).
demo: build
	$(PY) -m pyattn.reproduce --out reports

# pytest-benchmark's tables, then bench-report/report.json and its Markdown
# summary bench-report/results.md (paired speedups, rates against the roofline).
bench: build
	mkdir -p bench-report
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-columns=min,median,mean,rounds \
	  --benchmark-json=bench-report/report.json
	$(PY) benchmarks/summarize.py bench-report/report.json --output bench-report/results.md
	@echo "summary: bench-report/results.md"

# benchmarks/gpu_check.sh without a GPU: every step that needs none (budget
# check, build, collecting the CUDA tests and headline benchmarks, the summary).
gpu-check-dry-run: build
	OUT=$$(mktemp -d) PYTHON=$(PY) bash benchmarks/gpu_check.sh --dry-run

# The lent GPU machine's software (Python 3.12, torch 2.11.0, triton 3.6.0) on
# this CPU machine, in its own venv: build, then the CPU test suite (Triton
# kernels in the interpreter). Not in CI: PyPI has only the CUDA build of torch
# 2.11.0, ~3 GB with its nvidia-* wheels (16 min to set up here, 5 GB on disk).
REHEARSAL_VENV ?= .venv-rehearsal
REHEARSAL_PYTHON ?= $(firstword $(foreach p,python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12),\
  $(shell $(p) -c "" >/dev/null 2>&1 && echo $(p))))
rehearsal:
	@test -n "$(REHEARSAL_PYTHON)" || { echo "rehearsal: no working python3.12 (set REHEARSAL_PYTHON)"; exit 1; }
	PYATTN_WITH_CUDA=0 $(MAKE) test VENV=$(REHEARSAL_VENV) PYTHON=$(REHEARSAL_PYTHON) REQUIREMENTS=requirements-rehearsal.txt
	$(REHEARSAL_VENV)/bin/python -c "import sys, torch, triton; print('rehearsal: Python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"

# The same extension through CMakeLists.txt, loaded and checked against F.conv2d.
cmake-check: setup
	$(VENV)/bin/cmake -S . -B build-cmake -G Ninja -DPython3_EXECUTABLE=$(abspath $(PY)) \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	$(VENV)/bin/cmake --build build-cmake
	$(PY) .ci/check_extension.py build-cmake/_C*.so

# Compile every .cu file for sm_80/sm_90 with nvcc against a CUDA build of torch,
# via CMake, and load the result (no GPU needed).
cuda-check:
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q -r requirements-cuda-build.txt
	site=$$($(CUDA_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	export CUDA_HOME=$(CUDA_HOME) PATH=$(CUDA_HOME)/bin:$$PATH CPATH=$$site/nvidia/cu13/include; \
	$(CUDA_VENV)/bin/cmake -S . -B build-cuda -G Ninja -DPython3_EXECUTABLE=$(abspath $(CUDA_VENV))/bin/python \
	  -DCMAKE_PREFIX_PATH="$$($(CUDA_VENV)/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
	  -DCUDA_nvrtc_LIBRARY=$$site/nvidia/cu13/lib/libnvrtc.so.13 -DPYATTN_WITH_CUDA=ON && \
	$(CUDA_VENV)/bin/cmake --build build-cuda
	$(CUDA_VENV)/bin/python .ci/check_extension.py build-cuda/_C*.so --cuda

# Compile every Triton kernel configuration for Hopper (sm_90) without a GPU and
# check: it compiles, shared memory <= 227 KB, no register spills, wgmma for the
# fp16/bf16 dots at head_dim 64/128 (tools/triton_hopper_check.py; --all for the
# full product). TRITON_CHECK_PYTHON: a python with another triton, e.g. 3.6.0.
TRITON_CHECK_PYTHON ?= $(PY)
TRITON_CHECK_JOBS ?= $(shell nproc)
triton-check:
	$(TRITON_CHECK_PYTHON) tools/triton_hopper_check.py --jobs $(TRITON_CHECK_JOBS)

# Registers, shared memory and spills per CUDA kernel, from the cubins that
# `make cuda-check` built (cuobjdump --dump-resource-usage).
cuda-usage:
	sh tools/cuda_resource_usage.sh build-cuda padded_conv
	sh tools/cuda_resource_usage.sh build-cuda spmm

clean:
	rm -rf build build-cmake build-cuda pyattn/_C*.so *.egg-info $(VENV)/.built
