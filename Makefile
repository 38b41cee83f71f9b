# The two commands a newcomer needs: `make demo` runs the product, `make test` runs the tests.
# Both do all set-up from a fresh clone: virtualenv, install, model preparation.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
VLLM_VENV := .venv-vllm
MODEL := var/models/SmolLM2-135M-Instruct
STAMP := $(VENV)/.installed

.PHONY: demo test install model vllm-env lint bench clean

demo: model
	$(BIN)/chatloop demo

test: model vllm-env
	$(BIN)/pytest

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade 'pip>=25'
	$(BIN)/pip install -q 'torch==2.13.0'
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

model: install
	$(BIN)/chatloop model prepare

# vLLM (CPU build) in its own virtual environment, as production keeps it in its own container.
vllm-env: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: requirements-vllm.txt
	rm -rf $(VLLM_VENV).tmp
	$(PY) -m venv $(VLLM_VENV).tmp
	$(VLLM_VENV).tmp/bin/pip install -q --upgrade 'pip>=25'
	$(VLLM_VENV).tmp/bin/pip install -q 'torch==2.13.0'
	$(VLLM_VENV).tmp/bin/pip install -q -r requirements-vllm.txt
	# PyPI's torchvision/torchaudio/torchcodec break beside the CPU torch
	$(VLLM_VENV).tmp/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
	rm -rf $(VLLM_VENV) && mv $(VLLM_VENV).tmp $(VLLM_VENV)
	# a venv's scripts carry its path: rebuild the shebangs for the final location
	sed -i 's#$(CURDIR)/$(VLLM_VENV).tmp#$(CURDIR)/$(VLLM_VENV)#g' $(VLLM_VENV)/bin/* 2>/dev/null || true
	touch $@

lint: install
	$(BIN)/ruff check .

bench: model vllm-env
	$(BIN)/python benchmarks/core_overhead.py
	$(BIN)/python benchmarks/inference_path.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) var
