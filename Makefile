# The README's two commands on a fresh machine:
#   make bench   the CPU benchmark table (shammie bench) on default sizes
#   make test    the test suite
# Both create $(VENV) with $(TORCH) and the build tools, then build shammie into it (incremental).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: bench test build ws-peers test-cuda-emulated
bench: build
	$(PY) -m shammie bench

test: build
	@$(PY) -m pytest tests -q; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests (exit 5): treated as a failure"; fi; \
	exit $$status

# The CUDA kernels' tests on the CPU emulation of CUDA (tests/cuda_emulation; no GPU needed; slow: the
# emulated threads switch at every barrier). EMULATED_TESTS picks the files, PYTEST_ARGS narrows them.
EMULATED_TESTS ?= tests/test_causal_conv1d.py tests/test_selective_state_update.py tests/test_tree_frechet.py \
	tests/test_monarch.py tests/test_selective_scan.py tests/test_mamba2_scan.py tests/test_frechet.py
test-cuda-emulated: build
	SHAMMIE_EMULATE_CUDA=1 $(PY) -m pytest -q $(EMULATED_TESTS) $(PYTEST_ARGS)

build: $(VENV)/.shammie-deps
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

$(VENV)/.shammie-deps:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q $(TORCH) numpy pybind11 cmake ninja pytest setuptools wheel \
		transformers peft safetensors tqdm mambapy scipy networkx
	$(VENV)/bin/pip install -q --no-deps timm  # ImageNet synset lists for Loki's WordNet data (timm itself unused)
	touch $@

# The weak-supervision peers for examples/ws_metric.py (snorkel, flyingsquid), in their own venv: flyingsquid
# needs pgmpy 0.1.x (MarkovModel, pkg_resources) and numpy < 2. Not shammie dependencies.
WS_PEERS ?= .venv-ws-peers
ws-peers: build
	$(PYTHON) -m venv $(WS_PEERS)
	$(WS_PEERS)/bin/pip install -q $(TORCH) snorkel==0.10.0 flyingsquid pgmpy==0.1.17 "setuptools<70" \
		"numpy<2" "pandas<2.3" "scipy<1.15" "scikit-learn<1.6" "statsmodels<0.15" tqdm
	PYTHONPATH=$(CURDIR) $(WS_PEERS)/bin/python examples/ws_metric.py
