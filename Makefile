# Two commands on a fresh machine with Python 3.11:  make serve  |  make test
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# llama-cpp-python compiles llama.cpp for this CPU (-march=native). x86 builds leave out its
# AMX kernels: (1) GCC 12 miscompiles them (its _tile_loadconfig declares an 8-byte read of
# the 64-byte tile configuration, the optimizer drops the other stores, and every batch of
# 2+ tokens faults in ldtilecfg); (2) built right (-fno-tree-dse -fno-dse -fno-tree-sra)
# they are fast but give results that depend on how tokens were batched, so the same
# prompt answers differently alone, batched or from the prefix cache. docs/performance.md
# has the figures and the command to build with AMX anyway.
ifeq ($(shell uname -m),x86_64)
export CFLAGS += -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
export CXXFLAGS += -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
endif
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)
# The SafeTensors backend needs torch: installed first and pinned, so that resolving the
# extras never pulls another multi-GB build (on the project's machines this is the CPU
# wheel). Choose another build with  make test TORCH='torch==X.Y.Z'
TORCH ?= torch==2.13.0

.PHONY: serve test bench clean

# Serving the GGUF demo model needs neither torch nor the test tools: `make serve` installs
# only what serving needs (the SafeTensors extra is one pip command away, and `make test`
# installs everything).
SERVE_STAMP := $(VENV)/.installed-serve

$(SERVE_STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e '.[demo]'
	touch $(SERVE_STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet '$(TORCH)'
	$(BIN)/python -m pip install --quiet -e '.[demo,test,safetensors]'
	touch $(STAMP)

serve: $(SERVE_STAMP)
	$(BIN)/shimmy serve

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/serve_bench.py

clean:
	rm -rf $(VENV) build *.egg-info
