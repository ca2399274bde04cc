# Spherical KV — every target creates the shared environment if it is missing.
SHELL := /bin/bash
ENV_HASH := $(shell cat requirements.txt requirements-nodeps.txt | sha256sum | cut -c1-12)
VENV ?= $(HOME)/.cache/sphkv/venv-$(ENV_HASH)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sphkv-ready
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: env test serve model quality-quick quality serving-quick load-quick develop

$(STAMP): requirements.txt requirements-nodeps.txt
	@echo "[sphkv] building environment at $(VENV) (one time, ~4 min)"
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

env: $(STAMP)
	@$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e . >/dev/null

test: env
	$(PY) -m pytest -q tests

model: env
	$(PY) -m sphkv_hf.prepare_model

serve: env
	bash scripts/serve.sh

quality-quick: env
	$(PY) -m benchmarks.quality.run --quick

quality: env
	$(PY) -m benchmarks.quality.run

serving-quick: env
	$(PY) -m benchmarks.serving.run --quick

load-quick: env
	$(PY) -m benchmarks.serving.load --quick

bench-decode-smoke: env
	TRITON_INTERPRET=1 $(PY) benchmarks/kernels/bench_decode.py --smoke
