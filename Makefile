# `make demo` and `make test` do all set-up on a fresh machine (a virtual environment in .venv).
PY     ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build that lies on this machine's disk; on a CUDA machine the same pin from PyPI is a CUDA build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: test test-fast demo bench eval-toy clean

$(STAMP): requirements.txt requirements-dev.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps open-clip-torch
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/bench_models.py

clean:
	rm -rf $(VENV) .pytest_cache
