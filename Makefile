# posttrain — every target sets up .venv itself on first use.
PYTHON ?= python3
# A CPU build on these machines; on a GPU machine: make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-slow bench bench-eval reproduce-table reproduce-smoke clean-runs

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Fast unit tests + tiny end-to-end CLI runs (< 15 min on 2 cores).
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Slower end-to-end checks (minutes each).
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# Speed and memory of the chunked LM head vs dense cross-entropy, then grading throughput.
bench: $(STAMP)
	$(BIN)/python bench/head_bench.py
	$(BIN)/python bench/grading_bench.py
