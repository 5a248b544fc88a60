# RLHF pipeline: base -> sft -> rm -> ppo -> eval, each stage an artifact under data/runs/<run>/.
#
#   make demo                      set up, then run the whole pipeline on the embedded demo
#   make test                      the test suite
#   make sft RECIPE=my.yaml        one stage, on your own recipe
#   make sft NPROC=8               multi-process through accelerate launch (GPUs, or gloo on CPUs)
#   make sft ACCELERATE_CONFIG=ds.yaml   DeepSpeed / FSDP / multi-node: your accelerate config
#   make sft ARGS="sft.finetune=lora"    recipe overrides on the command line
#   make sft FORCE=1               re-run even if the artifact is up to date

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RECIPE ?= stages/recipes/demo.yaml
NPROC ?= 1
ACCELERATE_CONFIG ?=
ARGS ?=
FORCE ?=
TORCH_VERSION := 2.13.0

STAGE_ARGS = --recipe $(RECIPE) $(if $(FORCE),--force) $(ARGS)
ifneq ($(ACCELERATE_CONFIG),)
LAUNCH = $(BIN)/accelerate launch --config_file $(ACCELERATE_CONFIG) --num_processes $(NPROC)
else ifeq ($(NPROC),1)
LAUNCH = $(BIN)/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no
else
LAUNCH = $(BIN)/accelerate launch --multi_gpu --num_processes $(NPROC) --num_machines 1 --mixed_precision no --dynamo_backend no
endif

.PHONY: setup base sft rm ppo eval demo test clean

# The environment is rebuilt only when pyproject.toml changes. torch goes in first, pinned, so the
# project's torch range is already satisfied and pip pulls no CUDA packages on a CPU machine.
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

base: setup
	$(BIN)/python stages/base.py $(STAGE_ARGS)

sft: base
	$(LAUNCH) stages/sft.py $(STAGE_ARGS)

rm: sft
	$(LAUNCH) stages/rm.py $(STAGE_ARGS)

ppo: rm
	$(LAUNCH) stages/ppo.py $(STAGE_ARGS)

eval: ppo
	$(LAUNCH) stages/eval.py $(STAGE_ARGS)

demo: eval

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf data/runs data/models
