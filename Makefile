PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test demo

# CPU build of torch first: a bare `torch` requirement would pull several GB of CUDA packages.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[cpu,test]"

install: $(BIN)/python

test: install
	$(BIN)/python -m pytest

# Index the embedded corpus with the shipped model, persist and reload it, answer questions from it.
demo: install
	$(BIN)/knnmem demo --model model --out indexes/demo
