# kpbench — `make help` lists the targets. Every target builds what it needs itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kpbench-installed
OUT ?= reports

.PHONY: help install build build-debug test bench report browser bench-kernel gate gate-aa baseline valgrind clean

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

test: build browser ## Run the tests (Cython kernels and their pure-Python twins side by side)
	KPB_REQUIRE_EXT=1 $(PY) -m pytest

bench: build ## Run the benchmark sweep; writes $(OUT)/results.jsonl, results.csv and PNGs
	KPB_REQUIRE_EXT=1 $(VENV)/bin/kpbench bench --out $(OUT)

report: install ## Turn $(OUT)/results.jsonl into $(OUT)/index.html, PNG figures and summary.md
	$(VENV)/bin/kpbench report --results $(OUT)/results.jsonl --out $(OUT)

browser: ## Install Debian's chromium for the report's browser test (needs root and apt; else the test skips)
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
	      || echo "browser: could not install chromium; the browser test will skip"; \
	  else echo "browser: chromium is missing and installing it needs root and apt-get; the browser test will skip"; fi; }

bench-kernel: build ## Real-kernel validation in network namespaces (root; installs iptables/nftables with apt when missing)
	$(PY) -m bench.realkernel.prereq --install
	KPB_REQUIRE_EXT=1 $(VENV)/bin/kpbench kernel --out $(OUT)

gate: build valgrind ## Regression gate vs reports/baseline (TIERS=1,2,4 for the deterministic ones; BASE=<git ref> for the CPU-time A/B); exit 1 = regression, 2 = could not measure
	KPB_REQUIRE_EXT=1 $(VENV)/bin/kpbench gate --out $(OUT) $(if $(TIERS),--tiers $(TIERS)) $(if $(BASE),--base $(BASE))

gate-aa: build valgrind ## The gate of the working tree against itself: writes $(OUT)/gate-aa.md/.json, the noise of every metric
	KPB_REQUIRE_EXT=1 $(VENV)/bin/kpbench gate --aa --out $(OUT)

baseline: build valgrind ## Record the gate's baseline on this machine into reports/baseline/ (commit it)
	KPB_REQUIRE_EXT=1 $(VENV)/bin/kpbench gate --record --baseline reports/baseline

valgrind: ## Install valgrind for the gate's instruction counts (needs root and apt; else tier 2 is skipped, saying so)
	@command -v valgrind >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q valgrind) \
	      || echo "valgrind: could not install it; the gate's tier 2 will be skipped"; \
	  else echo "valgrind: missing and installing it needs root and apt-get; the gate's tier 2 will be skipped"; fi; }

clean: ## Remove build products and generated reports (keeps committed baselines)
	rm -rf build *.egg-info kernels/*.c kernels/*.so kernels/*.html .pytest_cache .hypothesis
	find $(OUT) -mindepth 1 -maxdepth 1 ! -name .gitkeep ! -name baseline -exec rm -rf {} +
