# Two commands: `make demo` and `make test`. Both set up .venv on first use (Python is all they need).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU machines get the CPU wheel of torch (a plain `torch` requirement pulls a multi-GB CUDA build);
# on a GPU machine set TORCH= to let pip pick the CUDA build, or pin your own.
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "torch==2.13.0")
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo demo-fast test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@if [ -n "$(TORCH)" ] && ! $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "installing $(TORCH) (CPU build)"; $(BIN)/python -m pip install --quiet "$(TORCH)"; fi
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@# Prometheus for tests/dashboards/test_prometheus.py (Debian package); never fails setup.
	@command -v prometheus >/dev/null 2>&1 || \
		(DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus || \
		 (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus)) || \
		echo "warning: prometheus not installed (needs apt-get as root); the Prometheus scrape test will be skipped"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dimoe quickstart

demo-fast: $(STAMP)
	$(BIN)/dimoe quickstart --fast

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# pytest exits 5 when it collected nothing: that is a broken suite, not a pass.
test: $(STAMP) lint
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) artifacts .pytest_cache .ruff_cache
