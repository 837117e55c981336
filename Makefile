# The two commands of the README's quickstart: `make run` and `make test`. Both install what is missing first.
# `make test ARGS="-m 'not slow'"` is the quick loop (the README's Tests section); `make lint` runs ruff.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
# CPU build of torch on machines without a GPU; on a GPU machine install your CUDA build first and set TORCH_SPEC=
TORCH_SPEC ?= torch==2.13.0
# The workflow `make run` runs: the LLaVA-1.5 quickstart, or QUICKSTART=workflows/quickstart-onevision.yaml
QUICKSTART ?= workflows/quickstart.yaml

.PHONY: install run test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/python -m pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/llava-ray run $(QUICKSTART) $(ARGS)

test: install
	$(BIN)/python -m pytest tests $(ARGS)

lint: install
	$(BIN)/python -m ruff check . $(ARGS)

clean:
	rm -rf runs data/quickstart data/quickstart-onevision
