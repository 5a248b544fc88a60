# RLHF pipeline: base -> sft -> rm -> ppo -> eval, each stage an artifact under data/runs/<run>/.
# `make help` lists the targets and variables.
#
#   make demo                      set up, then run the whole pipeline on the embedded demo
#   make test                      the test suite
#   make sft RECIPE=my.yaml        one stage, on your own recipe
#   make sft NPROC=8               8 processes (GPUs, or gloo on CPUs), data parallel
#   make ppo ACCELERATE_CONFIG=accelerate_configs/zero3.yaml   DeepSpeed / FSDP2 / multi-node (see that folder)
#   make sft ARGS="sft.finetune=lora"    recipe overrides on the command line
#   make ppo FORCE=1               re-run ppo even if up to date (then eval follows); upstream stages
#                                  re-run only if out of date. `make demo FORCE=1` re-runs them all.
#   make ppo RESUME=1              go on from an interrupted run's checkpoint under a changed recipe

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RECIPE ?= stages/recipes/demo.yaml
NPROC ?=
ACCELERATE_CONFIG ?=
NNODES ?=
NODE_RANK ?= 0
MAIN_ADDR ?=
MAIN_PORT ?= 29500
ARGS ?=
FORCE ?=
RESUME ?=
TORCH_VERSION := 2.13.0

# FORCE and RESUME apply to the stage named on the command line (every stage for `make demo`), not to
# the upstream stages run on the way: `make ppo FORCE=1` must not retrain the SFT model (pipeline.plans).
# Without a config, accelerate launch sets OMP_NUM_THREADS=1 (one process) and torch then uses a
# single core on a CPU machine: give each process its share of the cores instead.
# Precision is not the launcher's: each stage passes the recipe's (`dtype`: float32 trained weights
# under bf16/fp16 autocast) to accelerate itself, so `--mixed_precision no` here changes nothing.
CORES := $(shell nproc 2>/dev/null || echo 1)
PROCS = $(or $(NPROC),1)
THREADS = $(shell echo $$(( $(CORES) / $(PROCS) > 1 ? $(CORES) / $(PROCS) : 1 )))
LAUNCH_DEFAULTS = --num_machines 1 --mixed_precision no --dynamo_backend no --num_cpu_threads_per_process $(THREADS)
# Multi-node: the same command on every node, each with its NODE_RANK (see accelerate_configs/multi_node.yaml).
MULTI_NODE = $(if $(NNODES),--num_machines $(NNODES) --machine_rank $(NODE_RANK) --main_process_ip $(MAIN_ADDR) \
	--main_process_port $(MAIN_PORT))
# pipeline.launch is `accelerate launch` that returns only once the stage's processes have exited
# (after Ctrl-C they save a checkpoint first) and adds no launcher traceback to a stage's error.
ACCELERATE_LAUNCH = $(BIN)/python -m pipeline.launch
ifneq ($(ACCELERATE_CONFIG),)
ifeq ($(wildcard $(ACCELERATE_CONFIG)),)
$(error ACCELERATE_CONFIG=$(ACCELERATE_CONFIG) does not exist; the shipped configs are in accelerate_configs/)
endif
# The config file's process count, unless NPROC is given.
LAUNCH = $(ACCELERATE_LAUNCH) --config_file $(ACCELERATE_CONFIG) $(if $(NPROC),--num_processes $(NPROC)) $(MULTI_NODE)
else ifeq ($(PROCS),1)
LAUNCH = $(ACCELERATE_LAUNCH) --num_processes 1 $(LAUNCH_DEFAULTS)
else
LAUNCH = $(ACCELERATE_LAUNCH) --multi_gpu --num_processes $(NPROC) $(LAUNCH_DEFAULTS)
endif

.PHONY: help setup base sft rm ppo eval demo serve-rm bench test test-fast test-gpu lint format docs clean

help:
	@echo "Targets (each stage runs its upstream stages first when they are out of date):"
	@echo "  demo       set up, then base -> sft -> rm -> ppo -> eval on the embedded demo, with the headline"
	@echo "  setup      the virtual environment in $(VENV) (CPU torch $(TORCH_VERSION) first)"
	@echo "  base       the demo's tiny base model (only for recipes without a hub/local sft.model)"
	@echo "  sft        supervised fine-tuning             -> data/runs/<run>/sft"
	@echo "  rm         reward model from preference pairs -> data/runs/<run>/rm"
	@echo "  ppo        PPO of the SFT policy on the RM    -> data/runs/<run>/ppo"
	@echo "  eval       base / sft / ppo compared           -> data/runs/<run>/eval"
	@echo "  serve-rm   a reward model over HTTP for ppo.rewards: [{url: ...}] (RM, SERVE_HOST, SERVE_PORT, API_KEY_ENV)"
	@echo "  bench      PPO throughput, time split, peak memory -> data/bench/"
	@echo "  test       the test suite (CPU)"
	@echo "  test-fast  the pure and single-process tests (under two minutes)"
	@echo "  lint       ruff: the formatter's check and the linter (make format applies them)"
	@echo "  test-gpu   the GPU checks (a CUDA machine)"
	@echo "  clean      delete data/runs and data/models"
	@echo "Variables:"
	@echo "  RECIPE=path.yaml            the recipe (default $(RECIPE))"
	@echo "  ARGS=\"k=v ...\"              recipe overrides, e.g. ARGS=\"ppo.finetune=lora ppo.kl_target=6\""
	@echo "  DRY_RUN=1                   print the stage commands a target would launch, launching none"
	@echo "  FORCE=1                     re-run the named stages even if up to date (checkpoints are moved aside)"
	@echo "  RESUME=1                    go on from an interrupted run's checkpoint under a changed recipe"
	@echo "  NPROC=N                     N processes (data parallel), or override a config's count"
	@echo "  ACCELERATE_CONFIG=file      an accelerate config: accelerate_configs/{multi_gpu,zero2,zero3,zero3_offload,fsdp2,multi_node}.yaml"
	@echo "  NNODES, NODE_RANK, MAIN_ADDR, MAIN_PORT   multi-node: the same target on every node"
	@echo "  BENCH_EPISODES=N            the episode budget of make bench"
	@echo "  SHAPE=smollm2-135m          make bench on a real model's shape (or qwen2.5-0.5b; BENCH_LAYERS=N)"
	@echo "  RM, SERVE_HOST, SERVE_PORT, API_KEY_ENV"
	@echo "                              make serve-rm: the model (default the run's RM), the address (127.0.0.1),"
	@echo "                              the port (8000), the variable holding its API key (needed off loopback)"

# The environment is rebuilt only when pyproject.toml changes. torch goes in first, pinned, so the
# project's torch range is already satisfied and pip pulls no CUDA packages on a CPU machine.
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# Each stage target is one process, pipeline.plans: it walks the chain of stages the target reads (the
# recipe decides which: pipeline/plans.py's `upstream`, the graph's one definition), says which are up
# to date, and launches the others, each after what it reads. Up-to-date answers take a fraction of a
# second from the recipe and the manifests; launching a stage would spend seconds on imports first.
# DRY_RUN=1 prints the launch commands instead of running them.
DRY_RUN ?=
chain = $(BIN)/python -m pipeline.plans $(1) --launch "$(LAUNCH)" $(if $(filter-out 0,$(DRY_RUN)),--dry-run) --recipe $(RECIPE) \
	$(if $(FORCE),--force) $(if $(RESUME),--resume) $(ARGS)

base sft rm ppo eval: setup
	@$(call chain,$@)

# The whole chain, FORCE and RESUME reaching every stage, then the headline (even when nothing ran)
demo: setup
	@$(call chain,eval --all --report)

# A reward model over HTTP (pipeline/rl/reward_server.py): the run's RM artifact, or RM=path/hub-id.
# Bound to 127.0.0.1 unless SERVE_HOST is given; off loopback it needs an API key, read from the
# environment variable API_KEY_ENV names (never from a command line). Not HOST or PORT: shells and
# containers export those for their own use. RM is also make's built-in `rm -f`: only a value given
# on the command line or in the environment names a model.
SERVE_HOST ?= 127.0.0.1
SERVE_PORT ?= 8000
API_KEY_ENV ?=
serve-rm: setup
	$(BIN)/python -m pipeline.rl.reward_server --recipe $(RECIPE) $(if $(filter-out default,$(origin RM)),--model $(RM)) \
		--host $(SERVE_HOST) --port $(SERVE_PORT) $(if $(API_KEY_ENV),--api-key-env $(API_KEY_ENV)) $(ARGS)

# PPO throughput, time split and peak memory on the recipe, for a fixed budget (BENCH_EPISODES, default
# the recipe's): data/bench/ppo-<run>.json. The run's own PPO artifact is left alone. SHAPE=smollm2-135m
# (or qwen2.5-0.5b; BENCH_LAYERS=N to cut its layers): GRPO on a model of that real shape instead
# (RECIPE=stages/recipes/bench-ppo.yaml: PPO against a reward model of that shape).
bench: setup
	$(if $(SHAPE),,@$(call chain,ppo --upstream-only))
	OMP_NUM_THREADS=$(CORES) SHAPE=$(SHAPE) $(BIN)/python -m pipeline.bench \
		$(if $(SHAPE),--recipe $(if $(filter command line environment,$(origin RECIPE)),$(RECIPE),stages/recipes/bench-grpo.yaml) $(ARGS),--recipe $(RECIPE) $(if $(FORCE),--force) $(ARGS))

test: setup
	$(BIN)/python -m pytest -q

# The pure and single-process tests (the RL math, configs, data, rewards, tools): under two minutes.
# `make test` runs these and the end-to-end ones (marked e2e: whole stages, several processes).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not e2e"

# The formatter's check, then the linter (settings in pyproject.toml); `make format` applies both.
lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# docs/recipe-reference.md from the recipe's schema (pipeline/recipe.py); a test checks it is current
docs: setup
	$(BIN)/python -m pipeline.recipe_reference

# On a CUDA machine: the chain on the GPU in bf16 with every forward checked for host tensors, and the
# precision tests (which then run on the GPU). Not part of `make test`.
test-gpu: setup
	GPU_TESTS=1 $(BIN)/python -m pytest -q -s tests/gpu tests/test_precision_and_memory.py

clean:
	rm -rf data/runs data/models
