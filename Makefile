# `make demo` and `make test` each set up a fresh machine (venv, installs) idempotently.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sparsify-installed

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch lies on disk; pinning it first keeps pip from pulling CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) examples/finetune_minilm.py

test: setup
	# headless Chromium for tests/test_html.py (Debian's package); without it those tests skip and say why
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium) >/dev/null 2>&1 \
		|| echo "chromium could not be installed: the browser tests will skip"
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -n 2 --dist loadfile

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/compile.py
	$(PY) benchmarks/prune.py

clean:
	rm -rf $(VENV) build *.egg-info
