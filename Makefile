# The two commands of the README: `make run` serves the model, `make test` passes the tests.
# Both create .venv on first use and install what they need into it; nothing else is assumed
# but python3 (3.10+), a C/C++ compiler and cmake (llama-cpp-python builds from source), and
# node/npm (the Node client test and buf).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NODE_DIR := tests/node
PYTEST_ARGS ?=

.PHONY: run test test-short test-full lint protos bench bench-e2e bench-spec bench-bulk gpu-stage clean llama-cpp

# llama.cpp is compiled by tools/llama_build.py, never taken from pip's cache (which keys a
# wheel by version alone, whatever flags built it). LLAMA_PROFILE=native|portable,
# LLAMA_CMAKE_ARGS, LLAMA_ALLOW_AMX: see that file and the README.
LLAMA_BUILD = $(PY) tools/llama_build.py install

# --- installs (stamp files so a second run installs nothing) -------------------------------

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# The server alone: what the Docker image installs.
$(VENV)/.server: pyproject.toml tools/llama_build.py | $(PY)
	$(LLAMA_BUILD)
	$(PY) -m pip install -e '.[server]'
	touch $@

# The server and the small demo model: what `make run` needs.
$(VENV)/.demo: pyproject.toml | $(VENV)/.server
	$(PY) -m pip install -e '.[server,demo]'
	touch $@

$(VENV)/.dev: pyproject.toml tools/llama_build.py | $(PY)
	$(LLAMA_BUILD)
	$(PY) -m pip install -e '.[dev]'
	touch $@ $(VENV)/.server $(VENV)/.demo

# Every run checks that the installed llama.cpp is the build its flags ask for (a no-op if so).
llama-cpp: | $(PY)
	$(LLAMA_BUILD)

$(NODE_DIR)/node_modules/.stamp: $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	npm install --prefix $(NODE_DIR) --no-audit --no-fund
	touch $@

# --- the service ----------------------------------------------------------------------------

# Serves Genstruct-7B (Q4_K_M) when it is in models/ or can be downloaded, else the small demo
# model with a warning. Extra flags: make run ARGS="--n-parallel 8".
run: $(VENV)/.demo llama-cpp
	$(VENV)/bin/genstruct-server --model genstruct-7b:Q4_K_M --fallback-to-demo --log-format text $(ARGS)

# --- tests ----------------------------------------------------------------------------------

# CI=1: a test skipped for a package the install above provides fails instead (tests/conftest.py).
test: $(VENV)/.dev llama-cpp $(NODE_DIR)/node_modules/.stamp lint
	CI=1 $(PY) -m pytest $(PYTEST_ARGS)

# The hardening suite at full scale (bad input, soak, faults, security); figures go to
# build/hardening-figures.json. `make test` runs its short form.
test-full: $(VENV)/.dev llama-cpp $(NODE_DIR)/node_modules/.stamp
	CI=1 GENSTRUCT_HARDENING=full $(PY) -m pytest tests/hardening $(PYTEST_ARGS)

lint: $(VENV)/.dev $(NODE_DIR)/node_modules/.stamp
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) protos/generate.py --image build/genstruct.binpb
	$(NODE_DIR)/node_modules/.bin/buf lint build/genstruct.binpb --config protos/buf.yaml \
		--path genstruct/v1/genstruct.proto

protos: $(VENV)/.dev
	$(PY) protos/generate.py

# --- benchmarks (not tests: they print ratio tables against llama.cpp's own server) -------

# The engine against a sequential llama_cpp.Llama loop and `llama-server --parallel`.
bench: $(VENV)/.dev llama-cpp
	$(PY) -m bench.throughput --out bench/results/throughput.json $(ARGS)

# The gRPC service end to end, from a client process, against the same peers.
bench-e2e: $(VENV)/.dev llama-cpp
	$(PY) -m bench.e2e --out bench/results/e2e.json --plot bench/results/e2e.png $(ARGS)

# Speculation on and off, against llama-server's ngram speculation, on real text.
bench-spec: $(VENV)/.dev llama-cpp
	$(PY) -m bench.speculation --out bench/results/speculation.json $(ARGS)

# The bulk client at corpus scale: documents/s with an instant engine, resume over 1M rows.
bench-bulk: $(VENV)/.dev
	$(PY) -m bench.bulk_scale $(ARGS)

# Everything the GPU check (bench/gpu_check.sh) needs on a machine with no network, in one
# folder to carry there (bench/.build/gpu-stage). ARGS="--cuda-arch 90" also builds the CUDA
# libraries and llama-server here (nvcc and cuBLAS needed, no GPU), so the GPU machine
# compiles nothing.
gpu-stage: $(VENV)/.dev
	$(PY) -m bench.gpu_stage $(ARGS)

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
