# Developer entry points. `make test` is what CI runs (.ci/run).
PYTHON      ?= python3
VENV        ?= .venv
# Pinned so that a CPU machine installs the local CPU wheel instead of the multi-GB CUDA build.
# Override for GPU machines, e.g. `make install TORCH_SPEC="torch==2.13.0 --index-url ..."`.
TORCH_SPEC  ?= torch==2.13.0
EXTRAS      ?= cpu,service,plot,dev
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
STAMP       := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install test test-all bench clean help

help:
	@echo "make install   create $(VENV) and install the project (torch: $(TORCH_SPEC), extras: $(EXTRAS))"
	@echo "make test      install if needed, then run the test suite (what CI runs)"
	@echo "make test-all  the suite including slow checks"
	@echo "make bench     run the benchmarks in bench/ (results go to bench/RESULTS.md by hand)"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PIP) install --upgrade --quiet pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[$(EXTRAS)]"
	@touch $@

install: $(STAMP)

test: $(STAMP)
	@bash scripts/ensure-browser.sh || true
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -m "" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/encode.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
