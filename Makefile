# From a fresh clone:   make demo   (set up, train the CPU recipe, print samples)
#                       make test   (set up, lint, run the fast and the slow tier of tests)
#
# Set-up makes a virtual environment in .venv (once; again when pyproject.toml changes) with
# PyTorch installed first, so that pip never swaps it for another build. Choose the build with
# TORCH_INDEX, e.g.
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu     (CPU-only wheels, small)
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cu128   (CUDA 12.8)
# and the version with TORCH (default: the version the tests are run with).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
# Extra arguments for the demo's training run, e.g. make demo FIT_ARGS="--trainer.max_steps 200"
FIT_ARGS ?=
BIN := $(VENV)/bin

.PHONY: demo test setup clean-venv

demo: $(VENV)/.core
	$(BIN)/shakespeare-gpt fit --config configs/cpu.yaml $(FIT_ARGS)
	$(BIN)/shakespeare-gpt predict --config configs/predict.yaml --ckpt_path lightning_logs/cpu

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest
	$(BIN)/pytest -m slow

setup: $(VENV)/.installed

# The package alone, all that training and sampling need (make demo). A command starts about 3 s
# sooner than once the extras are installed too (make test): torchmetrics imports transformers and
# scipy wherever it finds them.
$(VENV)/.core: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
		{ echo "error: shakespeare-gpt needs Python 3.10 or newer; run make PYTHON=python3.11 (or another)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e .
	touch $@

# With the extras (pretrained models, the study's engine and report) and the test tools.
$(VENV)/.installed: $(VENV)/.core
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

clean-venv:
	rm -rf $(VENV)
