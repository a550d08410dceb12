# kpbench — `make help` lists the targets. Every target builds what it needs itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kpbench-installed
OUT ?= reports

.PHONY: help install build build-debug test bench clean

help: ## List the targets (this text)
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install: $(STAMP) ## Create .venv and install kpbench with its dev tools

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 'setuptools>=68' wheel 'Cython>=3,<4' 'numpy>=2'
	$(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $(STAMP)

build: install ## Compile the Cython kernels in place and check that they load
	$(PY) setup.py -q build_ext --inplace
	KPB_REQUIRE_EXT=1 $(PY) -c 'import kernels; kernels.require_compiled(); print("kernels: compiled and loaded")'

build-debug: install ## Compile bounds-checked kernels (KPB_CYTHON_DEBUG=1) for hunting memory errors
	KPB_CYTHON_DEBUG=1 $(PY) setup.py -q build_ext --inplace --force

test: build ## Run the tests (Cython kernels and their pure-Python twins side by side)
	KPB_REQUIRE_EXT=1 $(PY) -m pytest

bench: build ## Run the benchmark sweep; writes $(OUT)/results.jsonl, results.csv and PNGs
	KPB_REQUIRE_EXT=1 $(VENV)/bin/kpbench bench --out $(OUT)

clean: ## Remove build products and generated reports (keeps committed baselines)
	rm -rf build *.egg-info kernels/*.c kernels/*.so kernels/*.html .pytest_cache .hypothesis
	find $(OUT) -mindepth 1 -maxdepth 1 ! -name .gitkeep ! -name baseline -exec rm -rf {} +
