# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install everything they need. torch==2.13.0 is installed first,
# on its own, so that no other requirement can pull a multi-GB CUDA build of torch.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# cpu (onnxruntime) or gpu (onnxruntime-gpu); never both.
ORT    ?= cpu

.PHONY: install test demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[$(ORT),test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
