# Everything a fresh machine with Python 3.11 needs: `make demo` and `make test` create .venv themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch from the local wheel; a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,onnx]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/slimfx demo

test: $(BIN)/.installed
	$(BIN)/ruff check slimfx tests bench examples
	$(BIN)/python -m pytest -n 2 -q -p no:logging

lint: $(BIN)/.installed
	$(BIN)/ruff check slimfx tests bench examples

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
