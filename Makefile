# make serve: bring the service up (trains a DEMO model on sample data if the store has none)
# make test:  run the whole test suite
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export BENTOML_DO_NOT_TRACK := True

.PHONY: setup test lint serve demo build bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

demo: setup
	$(PY) -m training demo --if-missing

serve: demo
	$(VENV)/bin/bentoml serve service:AgeGender --port 3000

build: demo
	$(VENV)/bin/bentoml build

clean:
	rm -rf .cache runs lightning_logs test-artifacts .pytest_cache

bench: setup
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.train_speed
