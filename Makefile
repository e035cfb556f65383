# `make demo` and `make test` do all set-up themselves: virtual environment, install, run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pins the CPU build of torch that this project's machines carry (see constraints/cpu.txt).
# Elsewhere, e.g. with a GPU: `make demo CONSTRAINTS=` installs without it.
CONSTRAINTS ?= constraints/cpu.txt
STAMP := $(VENV)/.fedtrain-installed

.PHONY: install demo test bench lint format clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/fedtrain simulate --config examples/demo.toml

test: install
	$(BIN)/ruff check fedtrain tests
	$(BIN)/mypy
	scripts/loopback-only $(BIN)/python -m pytest -n 2 --dist loadfile --durations=25 -rfE

# Every benchmark with small settings, one table of verdicts (benchmarks/run.py); under 15 minutes on 2 cores.
bench: install
	$(BIN)/python benchmarks/run.py

lint: install
	$(BIN)/ruff check fedtrain tests
	$(BIN)/ruff format --check fedtrain tests
	$(BIN)/mypy

format: install
	$(BIN)/ruff format fedtrain tests
	$(BIN)/ruff check --fix fedtrain tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
