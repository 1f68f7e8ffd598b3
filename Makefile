# Developer entry points. `make test` is what CI runs (.ci/run).
PYTHON      ?= python3
VENV        ?= .venv
# Pinned so that a CPU machine installs the local CPU wheel instead of the multi-GB CUDA build (where pip
# finds one, as on this project's machines; elsewhere PyPI's torch is the CUDA build: pass
# TORCH_INDEX=https://download.pytorch.org/whl/cpu, as README.md says).
# GPU machines: `make install TORCH_INDEX=https://download.pytorch.org/whl/cu128 EXTRAS=gpu,service,plot,ray,geo,dev`.
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS      ?= cpu,service,plot,ray,geo,dev
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
STAMP       := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# Test files run on this many pytest-xdist workers (a file's tests stay together, so module fixtures are
# built once). Many tests wait on servers and subprocesses; 2 cut the suite from ~350 to ~280 s on 2 cores (~190 s since the
# test processes run torch on one thread each and the service tests share one World).
TEST_WORKERS ?= 2
# Then `make test` runs the tests marked cross_cpu again with other CPUs' kernels (scripts/cpu_profile.py
# other: an AMD EPYC Zen 2/3's on a CPU with AVX-512, else SSE4.2-only ones), so that a comparison which holds
# only with this machine's kernels fails here and not on the next machine. CROSS_CPU_PROFILE= skips it.
CROSS_CPU_PROFILE ?= other
# `make test-cpu-profiles`: the whole suite once per profile (haswell's differ from zen's in FAISS's BLAS only).
CPU_PROFILES ?= zen skylakex baseline
# `make demo`: where the synthetic region + index go, the port, extra scripts/demo.py options.
DEMO_DIR    ?= demo
DEMO_PORT   ?= 8000
DEMO_ARGS   ?=

.PHONY: install test test-all test-cpu-profiles bench demo demo-picture clean help

help:
	@echo "make install   create $(VENV) and install the project (torch: $(TORCH_SPEC), extras: $(EXTRAS))"
	@echo "make test      install if needed, then run the test suite (what CI runs)"
	@echo "make test-all  the suite including slow checks"
	@echo "make test-cpu-profiles  the suite once per CPU whose kernels scripts/cpu_profile.py imitates ($(CPU_PROFILES))"
	@echo "make bench     run the encoder benchmark, bench/encode.py (the others: bench/*.py --help; results go to bench/RESULTS.md by hand)"
	@echo "make demo      install if needed, make a synthetic region + its index in $(DEMO_DIR)/, serve the API on 127.0.0.1:$(DEMO_PORT)"
	@echo "make demo-picture  redraw docs/demo.png from a real query against the demo API"

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python 3.10+ is needed, $(PYTHON) is " + sys.version.split()[0] + "; run e.g. make demo PYTHON=python3.11")'
	@echo "install: creating the virtual environment $(VENV) ($(PYTHON) -m venv)"
	@$(PYTHON) -m venv $(VENV)

# One line before and one after each pip step (pip itself runs --quiet): the install is the
# longest silent part of a first `make demo`. SECONDS_SINCE prints the seconds since its argument.
SECONDS_SINCE = $$(( $$(date +%s) - $(1) ))
$(STAMP): pyproject.toml Makefile | $(PY)
	@echo "install: [1/3] $(PIP) install --upgrade pip ..."
	@t=$$(date +%s); $(PIP) install --upgrade --quiet pip && echo "install: [1/3] pip is up to date ($(call SECONDS_SINCE,$$t) s)"
	@echo "install: [2/3] $(PIP) install $(TORCH_SPEC)$(if $(TORCH_INDEX), --index-url $(TORCH_INDEX)) (the largest step: about a minute from pip's cache, longer when it downloads) ..."
	@t=$$(date +%s); $(PIP) install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)") && echo "install: [2/3] torch installed ($(call SECONDS_SINCE,$$t) s)"
	@echo "install: [3/3] $(PIP) install -e .[$(EXTRAS)] (the project and its dependencies) ..."
	@t=$$(date +%s); $(PIP) install --quiet -e ".[$(EXTRAS)]" && echo "install: [3/3] the project is installed ($(call SECONDS_SINCE,$$t) s); later runs skip the install until pyproject.toml or the Makefile change"
	@touch $@

install: $(STAMP)

# pytest's status 5 (PYTEST_ARGS selected no cross_cpu test) is not a failure of the second pass; a -m in
# PYTEST_ARGS replaces its -m (pytest keeps the last).
test: $(STAMP)
	@bash scripts/ensure-browser.sh || true
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)
ifneq ($(CROSS_CPU_PROFILE),)
	$(PY) scripts/cpu_profile.py $(CROSS_CPU_PROFILE) -- $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -q \
	  -m "cross_cpu and not slow" $(PYTEST_ARGS) || [ $$? -eq 5 ]
endif

# A profile this CPU can not imitate is skipped (status 77); none at all is a failure.
test-cpu-profiles: $(STAMP)
	@ran=0; for profile in $(CPU_PROFILES); do \
	  $(PY) scripts/cpu_profile.py --strict $$profile -- $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -q $(PYTEST_ARGS); \
	  status=$$?; if [ $$status -eq 0 ]; then ran=$$((ran + 1)); \
	  elif [ $$status -ne 77 ]; then echo "test-cpu-profiles: $$profile failed"; exit 1; fi; done; \
	[ $$ran -gt 0 ] || { echo "test-cpu-profiles: no profile in '$(CPU_PROFILES)' can run on this machine"; exit 1; }

test-all: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/encode.py

demo: $(STAMP)
	$(PY) scripts/demo.py --dir $(DEMO_DIR) --port $(DEMO_PORT) $(DEMO_ARGS)

demo-picture: $(STAMP)
	$(PY) scripts/demo.py --dir $(DEMO_DIR) --port $(DEMO_PORT) --picture docs/demo.png $(DEMO_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
