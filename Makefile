# fpkern: `make train` and `make test` do all the set-up on a fresh machine.
#
# setup  creates .venv in the repo root, installs torch (a CPU build unless torch is
#        already there: override TORCH_SPEC to choose another), then fpkern with its
#        test extras, building the C++ extension fpkern._C. Idempotent: it re-runs only
#        when pyproject.toml, CMakeLists.txt, csrc/ or python/ change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.fpkern-setup
NATIVE_SOURCES := pyproject.toml CMakeLists.txt $(wildcard csrc/*) $(wildcard python/*)
TRAIN_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup test train bench clean

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) $(NATIVE_SOURCES)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -c "import fpkern._C"
	touch $(STAMP)

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

train: setup
	$(PY) -m fpkern.train --arch ncsnpp $(TRAIN_ARGS)

bench: setup
	$(PY) -m pytest benchmarks/ --benchmark-only $(PYTEST_ARGS)

clean:
	rm -rf build $(VENV) .pytest_cache .benchmarks
