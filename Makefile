# `make demo` and `make test` do all set-up on a fresh machine (a virtual environment in .venv).
PY     ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build that lies on this machine's disk; on a CUDA machine the same pin from PyPI is a CUDA build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: test test-fast demo bench eval-toy table1 toy-model clean

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

# the main job, offline: edit the bundled example scene with the bundled toy model (CPU, < 1 min)
demo: $(STAMP)
	$(BIN)/python instdiffedit.py --image assets/examples/scene.png --edit "$(DEMO_EDIT)" --model toy \
		--out out/demo --save-attention --overwrite

DEMO_EDIT ?= a blue circle

bench: $(STAMP)
	$(BIN)/python bench/bench_models.py
	$(BIN)/python bench/bench_mask.py

# edit-quality benchmark on held-out synthetic scenes (exact GT masks); writes runs/eval-toy/
eval-toy: $(STAMP)
	$(BIN)/python -m toy.benchmark

# toy Table 1: every registered method (methods/) on the same 16 toy scenes: s/edit, UNet evals/edit, IoU, C_m, C_non
table1: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m toy.benchmark --table1 --methods-n 16 --out runs/table1-toy

# retrain the bundled toy model from its seed (estimated 2 h 20 min on one CPU thread; assets/TRAINING.md)
toy-model: $(STAMP)
	$(BIN)/python -m toy.train --out assets --seed 0

clean:
	rm -rf $(VENV) .pytest_cache
