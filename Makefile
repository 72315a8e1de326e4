# make serve:     bring the service up (trains a DEMO model on sample data if the store has none)
# make test:      run the whole test suite (lint and type check first)
# make test-fast: the tests that need no trained model, server or generated data set: the edit loop
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export BENTOML_DO_NOT_TRACK := True

.PHONY: setup setup-train test test-fast browser lint serve demo build build-gpu bench soak clean utkface bench-utkface

# serving, training and building (make serve, make utkface, make build); `setup` adds the test and lint tools
setup-train: $(VENV)/.installed-train
setup: $(VENV)/.installed

$(VENV)/.installed-train: pyproject.toml requirements/serve.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[train]'
	touch $@

$(VENV)/.installed: $(VENV)/.installed-train
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

test: setup browser
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

# the UI test drives Debian's Chromium; where it cannot be installed, pytest reports the skip and why
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
		|| echo "NOTE: could not install Chromium (apt-get as root): the browser test will be skipped"

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

demo: setup-train
	$(PY) -m training demo --if-missing

# another port: make serve PORT=3001. A port in use stops here: a `bentoml serve` that fails to bind has
# already emptied the running service's /metrics (README, "Sizing")
PORT ?= 3000
serve: demo
	@$(PY) -c "import socket, sys; sys.exit(socket.socket().connect_ex(('127.0.0.1', $(PORT))) == 0)" \
		|| { echo "port $(PORT) is in use (a service already running?): stop it, or run make serve PORT=<another>"; exit 1; }
	$(VENV)/bin/bentoml serve service:AgeGender --port $(PORT)

# the CPU Bento (ONNX Runtime, no torch) and the GPU Bento (torch on CUDA), from the same service code
build: demo
	$(VENV)/bin/bentoml build -f bentofile.yaml

build-gpu: demo
	$(VENV)/bin/bentoml build -f bentofile.gpu.yaml

# container images from the newest Bentos (Docker if it answers, else podman + buildah: deploy/image.sh)
.PHONY: image image-gpu test-image
image:
	deploy/image.sh build cpu

image-gpu:
	deploy/image.sh build gpu

test-image:
	deploy/image.sh test cpu

# 10 minutes of mixed load: errors, latency and every process's memory over time (BENCHMARKS.md)
soak: setup
	$(PY) -m benchmarks.soak --minutes 10

# A real model: UTKFace's aligned & cropped chips (not downloadable by code: README "Training on UTKFace")
# under $(UTKFACE) -> metadata -> the one-hour CPU recipe -> the model store; then the real-face benchmark
UTKFACE ?= data/utkface
utkface: setup-train
	$(PY) -m training metadata --data-dir $(UTKFACE) --out data/utkface/metadata.csv --no-balance
	$(PY) -m training fit --config configs/utkface_cpu.yaml --export

bench-utkface: setup
	$(PY) -m benchmarks.utkface --metadata data/utkface/metadata.csv

# runs/ is kept: it holds training checkpoints (`rm -rf runs` deletes them on purpose)
clean:
	rm -rf .cache lightning_logs test-artifacts .pytest_cache .mypy_cache

bench: setup
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.train_speed
	$(PY) -m benchmarks.memory
	$(PY) -m benchmarks.small_faces
	$(PY) -m benchmarks.bounds
	$(PY) -m benchmarks.heap
	$(PY) -m benchmarks.batch
	$(PY) -m benchmarks.int8
