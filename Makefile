# Two commands on a fresh machine with Python 3.11:  make serve  |  make test
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# llama-cpp-python compiles llama.cpp for this CPU (-march=native), with its AMX kernels
# where the CPU has AMX. GCC 12's _tile_loadconfig tells the compiler that it reads 8 of
# the tile configuration's 64 bytes, so the optimizer drops the other stores and every
# batch of 2+ tokens faults in ldtilecfg. Keeping dead stores and aggregates fixes that
# build (prompts then run ~3.5x faster than without AMX; docs/performance.md).
ifneq ($(shell grep -m1 -ow amx_int8 /proc/cpuinfo 2>/dev/null),)
export CFLAGS += -fno-tree-dse -fno-dse -fno-tree-sra
export CXXFLAGS += -fno-tree-dse -fno-dse -fno-tree-sra
endif
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)
# The SafeTensors backend needs torch: installed first and pinned, so that resolving the
# extras never pulls another multi-GB build (on the project's machines this is the CPU
# wheel). Choose another build with  make test TORCH='torch==X.Y.Z'
TORCH ?= torch==2.13.0

.PHONY: serve test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet '$(TORCH)'
	$(BIN)/python -m pip install --quiet -e '.[demo,test,safetensors]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/shimmy serve

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/serve_bench.py

clean:
	rm -rf $(VENV) build *.egg-info
