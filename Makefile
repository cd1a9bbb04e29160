# `make demo` and `make test` do all set-up on a fresh machine (a virtual environment in .venv).
PY     ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build that lies on this machine's disk; on a CUDA machine the same pin from PyPI is a CUDA build.
TORCH  ?= torch==2.13.0
# two stamps: requirements.txt (what `make demo` and `pip install .` need), then requirements-dev.txt (tests)
RUNTIME := $(VENV)/.installed-runtime
DEV     := $(VENV)/.installed-dev
# the optional web page's Gradio (requirements-page.txt)
PAGE    := $(VENV)/.installed-page

.PHONY: test test-fast demo page page-setup bench bench-gpu eval-toy table1 toy-model wheel clean

$(RUNTIME): requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(DEV): $(RUNTIME) requirements-dev.txt
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps open-clip-torch
	touch $@

test: $(DEV)
	$(BIN)/python -m pytest -q

test-fast: $(DEV)
	$(BIN)/python -m pytest -q -m "not slow"

# a wheel in dist/ (pip install dist/instdiffedit-*.whl; the README's "Installing")
wheel: $(RUNTIME)
	$(BIN)/pip wheel --no-deps --no-build-isolation -w dist .

# the main job, offline: edit the bundled example scene with the bundled toy model (CPU, < 1 min)
demo: $(RUNTIME)
	$(BIN)/python instdiffedit.py --image assets/examples/scene.png --edit "$(DEMO_EDIT)" --model toy \
		--out out/demo --save-attention --save-steps --overwrite

DEMO_EDIT ?= a blue circle

# the optional web page (page.py) on http://127.0.0.1:7860, toy model by default; e.g. PAGE_ARGS="--model ./sd14"
page: $(PAGE)
	$(BIN)/python page.py $(PAGE_ARGS)

# Gradio pins pillow<13 but runs with the core's pillow, which stays: gradio without its dependencies, then
# the others it lists (none is torch or torchvision)
page-setup: $(PAGE)
$(PAGE): $(RUNTIME) requirements-page.txt
	$(BIN)/pip install -q --no-deps -r requirements-page.txt
	$(BIN)/python -c "from importlib.metadata import requires; print('\n'.join(r for r in requires('gradio') \
		if 'extra ==' not in r and not r.lower().startswith('pillow')))" > $(VENV)/page-requirements.txt
	$(BIN)/pip install -q -r $(VENV)/page-requirements.txt
	touch $@

bench: $(DEV)
	$(BIN)/python bench/bench_models.py
	$(BIN)/python bench/bench_mask.py

# one call on a CUDA machine, budgeted to 6 min on an H100/H200-class GPU: random SD v1.4-size weights built on
# the device (no downloads); writes runs/bench-gpu/gpu.json. `bench/gpu.py --tiny` is the CPU dry run CI makes.
bench-gpu: $(DEV)
	$(BIN)/python bench/gpu.py

# edit-quality benchmark on held-out synthetic scenes (exact GT masks); writes runs/eval-toy/
eval-toy: $(RUNTIME)
	$(BIN)/python -m toy.benchmark

# toy Table 1: every registered method (methods/) on the same 16 toy scenes: s/edit, UNet evals/edit, IoU, C_m, C_non
table1: $(RUNTIME)
	OMP_NUM_THREADS=1 $(BIN)/python -m toy.benchmark --table1 --methods-n 16 --out runs/table1-toy

# retrain the bundled toy model from its seed: the recipe, then two continuations of the inpainting UNet,
# with the loss on the cells it keeps weighted 4x, then also on background masks that reach into the
# objects, then one of the grown UNet with hard-negative colour edits (estimated 5 h on one CPU thread;
# assets/TRAINING.md)
TOY_CONTINUE = --out assets --vae-from assets/toy-sd --unet-from assets/toy-sd --scenes 6000 --inpaint-examples 6000
TOY_INPAINT_CONTINUE = $(TOY_CONTINUE) --grow-steps 0 --inpaint-resume assets/toy-sd-inpaint --inpaint-lr 2e-4 \
	--inpaint-keep-weight 4
toy-model: $(RUNTIME)
	$(BIN)/python -m toy.train --out assets --seed 0
	$(BIN)/python -m toy.train $(TOY_INPAINT_CONTINUE) --seed 0 --inpaint-steps 2996
	$(BIN)/python -m toy.train $(TOY_INPAINT_CONTINUE) --seed 1 --inpaint-steps 1496 --inpaint-bg-dilate 8
	$(BIN)/python -m toy.train $(TOY_CONTINUE) --seed 1 --inpaint-from assets/toy-sd-inpaint --grow-resume \
		--grow-steps 1682 --grow-lr 3e-4 --edit-phrases 0.4 --confusable-colours 1.0

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info
