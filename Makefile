# ngexp: `make train` sets up and trains the default run, `make test` sets up and runs the tests.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# --isolated: ignore local pip config/find-links so pip takes the registry's torch build
# (the CUDA build also runs on CPU and is the one torchvision's wheel links against).
PIP    := $(PY) -m pip --isolated --disable-pip-version-check
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data train test test-slow test-gpu lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test]'
	$(PY) -c "import torch, torchvision, hydra; print('torch', torch.__version__, '| torchvision', torchvision.__version__)"
	touch $@

# Real Fashion-MNIST: Debian's package where apt is there, otherwise torchvision's download to ./data.
data: setup
	@if [ -f $(FMNIST) ] || [ -f data/FashionMNIST/raw/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST: found"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	elif command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
	  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  $(PY) -m ngexp.data.fetch fashion_mnist data; \
	fi

train: data
	$(VENV)/bin/ngexp train

test: data
	$(PY) -m ruff check ngexp tests scripts setup.py
	$(PY) -m pytest -q -n 2

test-slow: data
	$(PY) -m pytest -q -m slow

test-gpu: setup
	$(PY) -m pytest -q -m gpu

lint: setup
	$(PY) -m ruff check ngexp tests scripts setup.py

bench: data
	$(PY) scripts/bench_engine.py
	$(PY) scripts/bench_optim.py

clean:
	rm -rf $(VENV) build *.egg-info
