# Two commands for a fresh machine with only Python: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  := torch==2.13.0

.PHONY: demo test lint bench bench-all clean

# torch first, pinned: an unpinned torch would pull a CUDA build of several GB.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[dev]'
	@$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/gradwatch lab

# The report's browser test needs Debian's chromium and chromium-driver (CI runs as root).
test: $(VENV)/.installed
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests bench

# The benchmarks' peers (wandb, TensorBoard, Lightning, transformers) and psutil: none asks for
# another torch. `make bench`: the overhead table; `make bench-all`: also the soak and the store's scale.
$(VENV)/.bench-installed: $(VENV)/.installed
	$(PIP) install -q -e '.[bench]'
	touch $@

bench: $(VENV)/.bench-installed
	$(PY) bench/overhead.py

bench-all: bench
	$(PY) bench/soak.py
	$(PY) bench/store_scale.py

clean:
	rm -rf $(VENV) gradwatch-runs .pytest_cache
