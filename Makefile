# Tether: `make demo` trains the Lunabotics rover with the live dashboard; `make test` runs the tests.
# Both create/update .venv first. Override the torch build for a GPU machine, e.g.
#   make demo TORCH_SPEC=torch==2.13.0 TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= dev
STAMP := $(VENV)/.tether-$(EXTRAS).stamp
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast bench lint browser-deps tflite-env clean

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	@# The CPU build of torch goes in first, so no dependency can pull a multi-GB CUDA build.
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q --disable-pip-version-check $(TORCH_INDEX) "$(TORCH_SPEC)"
	@$(BIN)/pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	@touch $@

setup: $(STAMP)

# Headless Chromium for the dashboard's browser test (Debian packages; needs root or sudo).
browser-deps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; else \
	    echo "note: chromium/chromium-driver missing and no root: the browser test will be skipped"; exit 0; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }

# The TFLite converter (litert-torch) in its own environment, where `tether export --format tflite`
# finds it (docs/export.md); about 2 GB. CI builds it so the TFLite tests run instead of skipping.
TFLITE_VENV := $(HOME)/.cache/tether/tflite-venv
tflite-env:
	@$(TFLITE_VENV)/bin/python -c "import litert_torch" 2>/dev/null || { \
	  $(PYTHON) -m venv $(TFLITE_VENV) && \
	  $(TFLITE_VENV)/bin/pip install -q --disable-pip-version-check $(TORCH_INDEX) "$(TORCH_SPEC)" litert-torch; }

demo: setup
	$(BIN)/tether train lunabotics --serve

test: setup browser-deps
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not learning and not browser"

# Speed benchmarks (minutes). The learning benchmarks are long and run one case at a time:
#   .venv/bin/python benchmarks/bench_learning.py --help
bench: setup
	@for f in benchmarks/bench_*.py; do [ $$f = benchmarks/bench_learning.py ] && continue; \
	  echo "== $$f"; $(BIN)/python $$f || exit 1; done

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .mypy_cache
