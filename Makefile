# rlprm: one command each on a fresh machine.
#   make test    set up .venv if needed, then run the test suite (CPU, minutes)
#   make demo    set up .venv if needed, then run the process-vs-outcome demo end to end (SEEDS=3 for 3 seeds)
#   make setup   only the set-up (idempotent: re-runs only when pyproject.toml or this file change)
#   make rehearsal  every real-size recipe, 1-2 iterations, small Qwen2 models on the real Qwen tokenizer and ../shared/data

VENV          ?= .venv
PYTHON        ?= python3
TORCH_VERSION ?= 2.13.0
# Extra pip arguments for the CPU build of torch on machines whose index would
# otherwise hand out the multi-GB CUDA build (e.g. an --extra-index-url).
TORCH_CPU_PIP_ARGS ?=
PYTEST_ARGS   ?=
DEMO_OUT      ?= runs/demo
SEEDS         ?=
LANES         ?=
DEMO_ARGS     ?=

BIN   := $(VENV)/bin
STAMP := $(VENV)/.rlprm-setup

export DS_ACCELERATOR ?= cpu

.PHONY: setup test test-slow rehearsal demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing torch $(TORCH_VERSION) (CUDA build)"; \
		$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)"; \
	else \
		echo "no GPU: installing torch $(TORCH_VERSION) (CPU build)"; \
		$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)+cpu" $(TORCH_CPU_PIP_ARGS) \
		|| $(BIN)/pip install --quiet "torch==$(TORCH_VERSION)" $(TORCH_CPU_PIP_ARGS); \
	fi
	# deepspeed is an sdist whose build imports torch: build it without isolation, after torch
	$(BIN)/pip install --quiet --no-build-isolation "deepspeed>=0.19.8,<0.20"
	$(BIN)/pip install --quiet -e ".[dev]"
	@touch $(STAMP)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

# The real-scale path rehearsed on CPU (tests/test_rehearsal.py, also part of test-slow): each recipe's wall seconds
# and peak memory go to $(REHEARSAL_DIR)/timings.json, printed at the end
REHEARSAL_DIR ?= runs/rehearsal
rehearsal: setup
	RLPRM_REHEARSAL_DIR=$(abspath $(REHEARSAL_DIR)) $(BIN)/python -m pytest -m slow tests/test_rehearsal.py $(PYTEST_ARGS); \
	status=$$?; cat $(REHEARSAL_DIR)/timings.json 2>/dev/null; exit $$status

# make demo [SEEDS=3] [LANES=2] [DEMO_OUT=runs/demo] [DEMO_ARGS="--force rl"]: see rlprm/experiments/demo.py
demo: setup
	$(BIN)/rlprm demo --out $(DEMO_OUT) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(LANES),--lanes $(LANES)) $(DEMO_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
