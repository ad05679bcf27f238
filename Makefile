# Set-up and every recurring job. `make test` and `make demo` work on a fresh clone: they create .venv,
# install the pinned torch and the project (building its C++/CUDA extensions), then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.14.1
export MAX_JOBS ?= 2
SOURCES := setup.py $(wildcard csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*/*.cuh)
BENCH_FLAGS := --benchmark-only --benchmark-min-rounds=5 --benchmark-max-time=2 -p no:cacheprovider

.PHONY: test test-install test-cuda-asan demo lint compile-check bench gpu-check profile clean

# The environment: torch first, pinned (the extensions build against it, without build isolation);
# installing the project builds the extensions, so the build stamp is fresh too.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_PIN)" "setuptools>=77" wheel ninja
	$(PY) -m pip install --quiet --no-build-isolation -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps "facenet-pytorch==2.6.0"  # MTCNN weights only; its pins are for old torch
	touch $@ $(VENV)/.built

# Rebuilds the extensions in place when their sources change (ninja: only what changed).
$(VENV)/.built: $(VENV)/.installed $(SOURCES)
	$(PY) setup.py --quiet build_ext --inplace
	touch $@

test: $(VENV)/.built
	$(PY) -m pytest tests

# The CUDA kernels' tests on their host emulation (tests/cuda_host) rebuilt with AddressSanitizer. Python is
# not instrumented, so the runtime (and the libstdc++ whose throws it intercepts) is preloaded; --capture=sys
# lets a report written to fd 2 reach the log when ASan ends the process.
ASAN_PRELOAD = $(shell $(CXX) -print-file-name=libasan.so) $(shell $(CXX) -print-file-name=libstdc++.so)
test-cuda-asan: $(VENV)/.built
	LLDIF_CUDA_EMULATION=asan ASAN_OPTIONS=detect_leaks=0 LD_PRELOAD="$(ASAN_PRELOAD)" \
		$(PY) -m pytest tests -k "cuda-emulated or emulator" --capture=sys -p no:cacheprovider

# `pip install -e .` and `pip install .` as written, in a new venv with the pinned torch (slow: a CI step).
test-install: $(VENV)/.installed
	TORCH_PIN="$(TORCH_PIN)" $(PY) -m pytest tests/test_install.py -m install

demo: $(VENV)/.built
	$(VENV)/bin/lldif demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# Compiles every Triton kernel for sm_90 and sm_80 without a GPU.
compile-check: $(VENV)/.installed
	env -u TRITON_INTERPRET $(PY) -m lldif_kernels.triton.compile_check

bench: $(VENV)/.built
	$(PY) -m pytest benchmarks $(BENCH_FLAGS) --benchmark-json=benchmarks/results/cpu.json
	$(PY) benchmarks/summarize.py benchmarks/results/cpu.json > benchmarks/results/cpu.md

# On a GPU machine with its own torch (no venv): build in place, CUDA tests, benchmarks, summary in $(OUT).
OUT ?= benchmarks/results/gpu
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --out "$(OUT)"

# On a GPU machine with Nsight Systems: one base-model stage-2 step (B=64, bf16) with its NVTX ranges, in $(OUT).
profile:
	mkdir -p "$(OUT)"
	nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop --trace=cuda,nvtx,cudnn,cublas \
		--force-overwrite=true --output="$(OUT)/lldif_stage2_step" $(PYTHON) benchmarks/profile_step.py

clean:
	rm -rf build $(VENV) lldif_kernels/*.so lldif_kernels/_build_info.json *.egg-info
