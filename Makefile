# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamp files record which extras are installed, so re-runs are fast.
$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e ".[demo]"
	touch $@

# torch is pinned first: the extras' range alone could pull a multi-GB CUDA build.
$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[dev,torch,demo,hf,dask]"
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/pkd demo

test: $(VENV)/.test-installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench: $(VENV)/.demo-installed
	$(BIN)/pkd bench

clean:
	rm -rf $(VENV) pkd-demo .pytest_cache
