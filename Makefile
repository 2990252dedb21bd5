# The README's two commands: `make test` and `make bench`. Each creates what it needs.
#
# faiss-cpu is installed only when no faiss (CPU or GPU build) is importable: the two provide
# the same module and must never share an environment.
# PYTHON: the interpreter to use. Default: .venv/bin/python, created on first use, with the CPU
# wheel torch==2.13.0 installed only when no torch is importable there. To keep an existing
# (CUDA) torch, point PYTHON at that environment: `make test PYTHON=python`.
PYTHON ?= .venv/bin/python
# The GPU machine's Triton (torch 2.11 + triton 3.6 there): installed bare beside the environment
# so that tests/test_triton_compile.py also compiles every kernel with it (no GPU needed). A failed
# download only skips that pass.
GPU_TRITON ?= 3.6.0
STAMP := $(dir $(PYTHON)).pyssl-installed
SOURCES := $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h) setup.py pyproject.toml

.PHONY: test bench install env clean gpu-wheels

test: $(STAMP)
	$(PYTHON) -m pytest -q --timeout 900 tests

bench: $(STAMP)
	$(PYTHON) -m bench

install env: $(STAMP)

.venv/bin/python:
	python3 -m venv .venv

$(STAMP): $(if $(filter .venv/bin/python,$(PYTHON)),.venv/bin/python) $(SOURCES)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -c "import triton" 2>/dev/null || $(PYTHON) -m pip install -q triton==3.7.1
	$(PYTHON) -c "import faiss" 2>/dev/null || $(PYTHON) -m pip install -q faiss-cpu
	$(PYTHON) -m pip install -q numpy scipy tqdm pytest pytest-timeout ninja setuptools wheel scikit-learn
	$(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	test -d .venv-triton-gpu/triton || $(PYTHON) -m pip install -q --no-deps --target .venv-triton-gpu \
		triton==$(GPU_TRITON) || echo "warning: triton==$(GPU_TRITON) not installed: its compile pass is skipped"
	touch $(STAMP)

clean:
	rm -rf build *.egg-info pyssl/_C*.so $(STAMP)

# Wheels of the GPU peers for bench/gpu_check.sh (the GPU machine has no network).
gpu-wheels:
	mkdir -p bench/.wheels
	$(PYTHON) -m pip download --no-deps --only-binary=:all: -d bench/.wheels liger-kernel==0.8.5 cut-cross-entropy==25.1.1
