#!/usr/bin/env bash
# Wheels of what ngexp needs beyond torch, torchvision, tensorboard, rich, numpy, PyYAML and
# pytest, for a GPU machine that can install nothing (Python 3.12, x86-64): hydra-core,
# omegaconf and antlr4 (pure Python). scripts/gpu_check.sh installs them from .whl/ there.
#
#   scripts/gpu_wheels.sh            # here, where pip reaches a package index; then carry .whl
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PYTHON:-.venv/bin/python}
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl && mkdir -p .whl  # one version of each: two would stop the install there
# the versions this checkout is tested with; antlr4 ships a source distribution: built here
"$PY" -m pip --isolated download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation py --abi none --platform any -d .whl \
  "hydra-core==$(version hydra-core)" "omegaconf==$(version omegaconf)"
"$PY" -m pip --isolated wheel --quiet --no-deps -w .whl \
  "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
ls -l .whl
