# ngexp: `make train` sets up and trains the default run, `make test` sets up and runs the tests.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# --isolated: ignore local pip config/find-links so pip takes the registry's torch build
# (the CUDA build also runs on CPU and is the one torchvision's wheel links against).
PIP    := $(PY) -m pip --isolated --disable-pip-version-check
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data train test test-slow test-gpu lint bench clean setup-hydra14 test-hydra14

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml examples/ngexp_example/pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test]'
	$(PIP) install --quiet -e examples/ngexp_example  # the example plugin (tests/test_plugins.py)
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
	$(PY) -m ruff check ngexp tests scripts examples setup.py
	$(PY) -m pytest -q -n 2

test-slow: data
	$(PY) -m pytest -q -m slow

test-gpu: setup
	$(PY) -m pytest -q -m gpu

lint: setup
	$(PY) -m ruff check ngexp tests scripts examples setup.py

# Hydra 1.4 and omegaconf 2.4 (release candidates) in a second venv over the main one: its own
# site-packages (Hydra, omegaconf, Hydra's plugins, optuna) come first, then $(VENV)'s through a
# .pth file, so torch & co. are not installed twice. `make test-hydra14` runs
# tests/test_hydra_versions.py there (the normal suite runs it under the main venv's Hydra 1.3).
VENV14  ?= .venv-hydra14
PY14    := $(VENV14)/bin/python
HYDRA14 := 'hydra-core>=1.4.0rc3,<1.5' 'omegaconf>=2.4.1rc1,<2.5' \
           'hydra-optuna-sweeper>=1.4.0rc3,<1.5' 'hydra-joblib-launcher>=1.4.0rc3,<1.5' \
           'hydra-submitit-launcher>=1.4.0rc3,<1.5'

setup-hydra14: $(VENV14)/.installed

$(VENV14)/.installed: $(VENV)/.installed
	rm -rf $(VENV14)
	python3 -m venv $(VENV14)
	$(PY14) -m pip --isolated --disable-pip-version-check install --quiet --upgrade pip setuptools
	echo "import site; site.addsitedir('$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")')" \
	  > "$$($(PY14) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/zz_main_venv.pth"
	$(PY14) -m pip --isolated --disable-pip-version-check install --quiet --pre $(HYDRA14)
	$(PY14) -c "import hydra, omegaconf, torch; assert hydra.__version__ >= '1.4', hydra.__file__; print('hydra', hydra.__version__, '| omegaconf', omegaconf.__version__)"
	touch $@

test-hydra14: setup-hydra14 data
	$(PY14) -m pytest -q -p no:xdist tests/test_hydra_versions.py

bench: data
	$(PY) scripts/bench_engine.py
	$(PY) scripts/bench_optim.py

clean:
	rm -rf $(VENV) $(VENV14) build *.egg-info
