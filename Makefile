# The README's two commands on a fresh machine:
#   make bench   the CPU benchmark table (shammie bench) on default sizes
#   make test    the test suite
# Both create $(VENV) with $(TORCH) and the build tools, then build shammie into it (incremental).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: bench test build
bench: build
	$(PY) -m shammie bench

test: build
	@$(PY) -m pytest tests -q; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests (exit 5): treated as a failure"; fi; \
	exit $$status

build: $(VENV)/.shammie-deps
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

$(VENV)/.shammie-deps:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q $(TORCH) numpy pybind11 cmake ninja pytest setuptools wheel \
		transformers peft safetensors tqdm mambapy scipy networkx
	$(VENV)/bin/pip install -q --no-deps timm  # ImageNet synset lists for Loki's WordNet data (timm itself unused)
	touch $@
