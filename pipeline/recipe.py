"""The recipe's schema: every setting of every stage as a typed, documented dataclass field, with its
default and its range. This file is the reference a user reads (docs/recipe-reference.md is generated
from it). A YAML file gives the values and `key.path=value` arguments override them; reading, merging
(`extends:`), overrides and the type and range checks are pipeline/recipe_loader.py. An unknown key or
a value of the wrong type is an error that names the key (and the closest valid one), never a silent
default. The trainer sections (`sft.trainer`, `rm.trainer`) are checked against trl's own `SFTConfig` /
`RewardConfig` when the stage builds them (`recipe_loader.trl_args`).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------

Finetune = Literal["full", "lora", "qlora-4bit", "qlora-8bit"]
# accelerate's trackers and the package each needs
TRACKERS = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "comet_ml": "comet_ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}
Dtype = Literal["auto", "float32", "bfloat16", "float16"]

# Ranges, checked when the recipe is read (`build`): a rule per field, in the notation of the error.
RULES = {
    "> 0": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "in [0, 1)": lambda v: 0 <= v < 1,
}


def ranged(default, rule: str):
    """A field whose value (when not None) must satisfy `rule`, one of RULES."""
    assert rule in RULES, rule
    return field(default=default, metadata={"range": rule})


# The trainer sections' keys that transformers / trl do not range-check themselves (a negative
# learning rate trains "backwards"; a batch size of 0 fails deep inside the DataLoader).
TRAINER_RULES = {
    "learning_rate": "> 0",
    "num_train_epochs": "> 0",
    "per_device_train_batch_size": ">= 1",
    "per_device_eval_batch_size": ">= 1",
    "gradient_accumulation_steps": ">= 1",
    "max_length": ">= 1",
    "weight_decay": ">= 0",
    "max_grad_norm": ">= 0",
    "warmup_ratio": "in [0, 1]",
    "save_steps": "> 0",
    "save_total_limit": ">= 1",
    "center_rewards_coefficient": ">= 0",
}


def check_range(value, rule: str, key: str) -> None:
    if value is not None and isinstance(value, (int, float)) and not isinstance(value, bool) and not RULES[rule](value):
        raise ConfigError(f"'{key}': {value!r} is out of range: it must be {rule}")


@dataclass
class DatasetSpec:
    """Where a dataset comes from. A plain string in the recipe is shorthand for `path`."""

    path: str
    """A local file (.jsonl/.json/.parquet/.csv), a local dataset directory, or a hub dataset id."""
    name: str | None = None
    """Hub dataset configuration name, if the dataset has several."""
    split: str = "train"
    """Split to load (hub datasets and directories; `train` for single files)."""
    limit: int | None = ranged(None, ">= 1")
    """Keep only the first N rows (quick experiments)."""
    columns: dict[str, str] | None = None
    """This pipeline's column names -> the dataset's, for datasets that spell them otherwise, e.g.
    {chosen: pos, rejected: neg, prompt: question}."""


@dataclass
class LoraSettings:
    """LoRA adapter settings (used when `finetune` is lora or qlora-*)."""

    r: int = ranged(16, ">= 1")
    """Adapter rank."""
    alpha: int = ranged(32, ">= 1")
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = ranged(0.0, "in [0, 1)")
    """Dropout on the adapter input (keep 0 for PPO: dropout breaks ratio == 1 at the first step)."""
    target_modules: str | list[str] = "all-linear"
    """Which modules get adapters: "all-linear" or a list of module names."""


# What a reward function is called with besides the prompt dataset's columns (trl's contract):
# a `kwargs` entry of one of these names would be overwritten, so it is refused.
FUNCTION_ARGUMENTS = (
    "prompts",
    "completions",
    "completion_ids",
    "trainer_state",
    "log_metric",
    "log_extra",
    "environments",
)
FUNCTION_TIMEOUT_S = 300.0  # a reward function's call, by default
SERVER_TIMEOUT_S = 180.0  # a reward server's request, its retries included, by default
SERVER_STARTUP_WAIT_S = 600.0  # the first request's wait for a server still loading its model, by default


@dataclass
class RewardSource:
    """One term of the reward the RL stage optimises, or a judge it only watches: exactly one of
    `model`, `function`, `url` (pipeline/rl/rewards.py)."""

    model: str | None = None
    """A sequence classifier with one output: `rm` (this run's RM stage, or `ppo.reward_model` if set),
    a local directory or a hub id."""
    function: str | None = None
    """A Python function with trl's reward-function contract, as `package.module:name` or
    `path/to/file.py:name` (relative to the recipe's directory, then the working directory): called by
    keyword with prompts, completions, completion_ids, every other column of the prompt dataset,
    trainer_state, log_metric and log_extra, plus `kwargs`; returns one float, bool or None per
    completion."""
    url: str | None = None
    """A reward server (`make serve-rm`, or any server of the same JSON contract): POST
    {prompts, completions} -> {rewards}."""
    weight: float = 1.0
    """The source's weight in the reward (the reward is the weighted sum of the sources)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for `function` (a name the function already receives is refused)."""
    timeout_s: float | None = ranged(None, "> 0")
    """A function: seconds one call may take (default 300). A server: the deadline of one request,
    retries included (default 180). Then the run stops with one line, after saving its last iteration."""
    startup_wait_s: float | None = ranged(None, ">= 0")
    """A server: how long the run's first request waits for a server that does not accept connections
    yet, e.g. one still loading its model (default 600)."""
    api_key_env: str | None = None
    """A server: the environment variable that holds its API key, sent as `Authorization: Bearer <key>`
    (the key itself never goes into a recipe)."""
    name: str | None = None
    """Name in metrics and reports (`rewards/<name>`); default: `rm`, the function's name, the model's
    folder name or `remote`."""
    base_dir: str | None = field(default=None, init=False, repr=False, compare=False, metadata={"internal": True})
    """The recipe file's directory, where a relative `function` file is looked for first (set by
    `load_recipe`; not a setting)."""

    def __post_init__(self):
        given = [k for k in ("model", "function", "url") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of model, function, url (got {given or 'none'})")
        if self.kwargs and not self.function:
            raise ValueError("kwargs are passed to a reward function: give `function`, or drop `kwargs`")
        reserved = set(FUNCTION_ARGUMENTS) & set(self.kwargs)
        if reserved:
            raise ValueError(f"kwargs {sorted(reserved)}: the function receives these itself; rename them")
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url '{self.url}' must start with http:// or https://")
        if self.function and ":" not in self.function:
            raise ValueError(f"function '{self.function}' must be of the form package.module:name or file.py:name")
        if self.model and self.timeout_s is not None:
            raise ValueError("timeout_s is for functions and servers: remove it from the model source")
        for key in ("startup_wait_s", "api_key_env"):
            if getattr(self, key) is not None and not self.url:
                raise ValueError(f"{key} is for reward servers (url): remove it")
        if self.api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            raise ValueError(
                f"api_key_env '{self.api_key_env}' must be the name of an environment variable that "
                f"holds the key (e.g. RM_API_KEY), not the key itself"
            )

    @property
    def deadline_s(self) -> float:
        """Seconds a function's call, or a server's request with its retries, may take."""
        if self.timeout_s is not None:
            return self.timeout_s
        return FUNCTION_TIMEOUT_S if self.function else SERVER_TIMEOUT_S

    @property
    def startup_wait(self) -> float:
        """Seconds a server's first request waits for it to accept connections."""
        return self.startup_wait_s if self.startup_wait_s is not None else SERVER_STARTUP_WAIT_S

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.function:
            return self.function.rpartition(":")[2]
        if self.url:
            return "remote"
        return "rm" if self.model == "rm" else Path(self.model.rstrip("/")).name


Estimator = Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")  # need k >= 2 samples per prompt


def _check_sources(sources: list[RewardSource], what: str) -> None:
    labels = [s.label for s in sources]
    for label in labels:
        if labels.count(label) > 1:
            raise ValueError(f"{what}: two sources are named '{label}': give each a distinct `name`")


@dataclass
class TrainStage:
    """Settings shared by the stages that fine-tune a model with a trl trainer."""

    model: str | None = None
    """Starting model: hub id or local path. None means the previous stage's artifact."""
    dataset: DatasetSpec | None = None
    """Training data."""
    eval_dataset: DatasetSpec | None = None
    """Evaluation data. If None, `eval_fraction` of the training data is held out."""
    eval_fraction: float = ranged(0.05, "in [0, 1)")
    """Share of the training data held out for evaluation when no eval_dataset is given."""
    finetune: Finetune = "full"
    """full: all weights; lora: adapters on the model; qlora-4bit/8bit: adapters on a quantized model."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings (finetune = lora / qlora-*)."""
    dtype: Dtype = "auto"
    """Compute dtype (mixed precision): auto = bfloat16 where the GPU supports it, float32 otherwise.
    Trained weights stay float32 under autocast; a LoRA/QLoRA base is stored in it (pipeline/models.py)."""
    trainer: dict[str, Any] = field(default_factory=dict, metadata={"entry_ranges": TRAINER_RULES})
    """Keyword arguments for the trl config class (SFTConfig / RewardConfig), e.g. learning_rate. Their
    types are checked against that class when the stage builds it (`trl_args`: importing trl here would
    slow every `make` check), the ranges of TRAINER_RULES when the recipe is read."""


@dataclass
class SFTStage(TrainStage):
    """`make sft`: supervised fine-tuning with trl's SFTTrainer."""


@dataclass
class RMStage(TrainStage):
    """`make rm`: a scalar reward model trained on preference pairs with trl's RewardTrainer."""

    reference_dataset: DatasetSpec | None = None
    """Responses whose reward mean/std are recorded for PPO's score normalisation (default: sft.dataset)."""
    reference_limit: int = ranged(512, ">= 1")
    """How many reference responses to score."""


@dataclass
class PPOStage:
    """`make ppo`: the RL stage, from this run's SFT policy or any model, against its rewards."""

    model: str | None = None
    """Where the RL stage starts: a hub id, a model directory, or a PEFT adapter directory (its base and
    the adapter). Unset: this run's SFT artifact. When set, no SFT runs for `make ppo` / `make eval`,
    the reference is this model, and `make rm` starts from it unless `rm.model` says otherwise."""
    prompts: DatasetSpec | None = None
    """Prompt-only (or any format with a `prompt` column) dataset the policy answers."""
    finetune: Finetune = "full"
    """full, lora or qlora-*: with adapters the reference is the policy with its adapter disabled. From
    an adapter directory (`model`): full trains its base with the adapter merged in; lora / qlora-*
    go on training that adapter (the reference is then the start, merged, apart)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings for the policy (finetune = lora / qlora-*)."""
    dtype: Dtype = "auto"
    """Compute dtype (mixed precision): trained weights (policy, value model or head, adapters) stay
    float32 under autocast; frozen ones (reward model, a LoRA/QLoRA base, the reference's linear layers) are
    stored in it. Eval loads every policy in it."""
    reward_model: str | None = None
    """An already trained reward model (a hub id or a directory of any sequence classifier with one
    output) that `{model: rm}` names instead of this run's RM stage (so the default rewards optimise
    it, and eval scores with it too)."""
    rewards: list[RewardSource] = field(default_factory=lambda: [RewardSource(model="rm")])
    """What the policy optimises: the weighted sum of these sources (reward models, Python functions,
    reward servers). Default: this run's reward model."""
    judges: list[RewardSource] = field(default_factory=list)
    """Watched, never optimised: scored on every rollout (`judges/<name>` in metrics.jsonl) and by
    eval, next to the optimised reward. A plain string is a function: `pkg.module:name`. The run flags
    a judge that falls or stays flat while the reward keeps rising (`on_divergence`,
    pipeline/rl/divergence.py) and keeps the policy the first judge scored best (`keep_best`)."""
    on_divergence: Literal["warn", "stop"] = "warn"
    """When a judge diverges from the reward: warn (one line, `alerts/<judge>` in metrics.jsonl, the
    manifest's `alerts`), or stop (also: save a checkpoint and end the stage with the warning)."""
    keep_best: bool = True
    """With judges: keep the policy whose rollouts the first judge scored best, as ppo/best/ (eval
    reports it as its own row). Each new best writes the policy (under LoRA its adapter)."""
    advantage_estimator: Estimator = "gae"
    """gae: PPO with a value model (or head); the rest are critic-free: grpo (group mean and std),
    dr_grpo (group mean), rloo (leave-one-out mean), reinforce_pp (token returns whitened over the
    batch), reinforce_pp_baseline (the group mean subtracted first). See pipeline/rl/algorithms.py."""
    samples_per_prompt: int = ranged(1, ">= 1")
    """Responses sampled per prompt (k); the group estimators need k >= 2. Divides batch_size; a
    prompt's k samples are generated and scored on one process."""
    kl_in: Literal["reward", "loss"] = "reward"
    """Where the KL to the reference enters: reward (-kl_coef * KL per token, added to the reward; for
    the group estimators the sequence's KL is subtracted from its reward) or loss (kl_coef times the
    k3 estimate, in the loss, as GRPO does)."""
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] | None = None
    """How per-token policy losses become one, over each optimiser step's whole mini-batch (every
    micro-batch, every process): token_mean, the mean over its valid tokens (trl's default `dapo`,
    verl's `token-mean`); seq_mean_token_mean, the mean over sequences of each one's token mean
    (GRPO's paper, length-biased); seq_mean_token_sum_norm, each sequence's token sum over
    max_new_tokens, averaged (Dr. GRPO's). Default: seq_mean_token_sum_norm for dr_grpo (which is
    defined with it, as trl sets them together), token_mean for the others."""
    value_model: Literal["reward", "sft", "head"] | None = None
    """gae only. reward: separate network initialised from the (first) reward model; sft: from the
    SFT policy; head: a value head on the policy (cheapest: no fourth network). Default: reward when a
    reward model is among the rewards, else sft."""
    total_episodes: int = ranged(2048, ">= 1")
    """Rollouts in the whole run (summed over processes)."""
    batch_size: int = ranged(64, ">= 1")
    """Rollouts per process per iteration."""
    mini_batch_size: int = ranged(16, ">= 1")
    """Rollouts per process per optimiser step (divides batch_size)."""
    gradient_accumulation_steps: int = ranged(1, ">= 1")
    """Micro-batches per optimiser step (the mini-batch is split into this many)."""
    forward_batch_size: int | None = ranged(None, ">= 1")
    """Rollouts per forward pass when scoring a batch (old log-probs, values, reference, reward);
    None: the optimiser's micro-batch. Lower it to bound activation memory on large models."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (policy and value model): less memory, ~30% slower."""
    remove_padding: bool = True
    """The policy, value and reference forwards (scoring and update) read the real tokens only, not the
    batch's padding: the same outputs to float rounding, the padding's share of the compute saved
    (pipeline/rl/unpadded.py). Applies to models with SDPA attention (transformers' default); others,
    and reward models, run padded."""
    ppo_epochs: int = ranged(4, ">= 1")
    """Passes over each rollout batch, re-shuffled every pass."""
    learning_rate: float = ranged(1.0e-5, "> 0")
    """AdamW learning rate (policy and value)."""
    weight_decay: float = ranged(0.01, ">= 0")
    """AdamW's decoupled weight decay on every trained weight (0.01, torch's default, which runs before
    this key existed used; trl's and OpenRLHF's default is 0)."""
    lr_schedule: Literal["linear", "constant"] = "linear"
    """Learning-rate schedule over the run."""
    max_grad_norm: float = ranged(1.0, "> 0")
    """Gradient clipping."""
    max_new_tokens: int = ranged(24, ">= 1")
    """Longest response."""
    temperature: float = ranged(0.7, "> 0")
    """Sampling temperature (top_k = 0, top_p = 1: the distribution the log-probs are taken from)."""
    stop_token: str | list[str] | None = None
    """Token(s) that end a response, in PPO and eval. Default: where the assistant's turn ends as SFT
    trained it: the chat template's turn-end token, the tokenizer's EOS and the EOS ids the model's
    generation config lists (pipeline/models.py, `stop_token_ids`)."""
    missing_stop_penalty: float | None = ranged(None, ">= 0")
    """Subtracted from the score of a response that never emits the stop token. Default: 1.0 for PPO
    (gae) against a reward model, which would otherwise reward rambling to the length limit; 0 for
    critic-free estimators and reward functions, which judge the answer itself (trl, verl and DAPO
    add no such penalty)."""
    tools: list[str] = field(default_factory=list)
    """Tools the policy may call in its rollouts (an agent): Python functions named as reward functions
    are (`package.module:name` or `path/to/file.py:name`), with type hints and a docstring that describes
    each argument, passed to the chat template as transformers and trl take them. With tools or an
    environment, each rollout is a multi-turn exchange whose tool results are context, not loss
    (pipeline/rl/agent.py); reward functions get it as messages."""
    environment: str | None = None
    """A class, named as tools are, instantiated for each rollout: `reset(**row)` gets the prompt's dataset
    row (a string it returns is appended to the prompt), its public methods are that rollout's tools, and
    reward functions get the instances as `environments` (trl's environment_factory contract)."""
    max_tool_turns: int = ranged(4, ">= 1")
    """Most tool-calling turns an exchange has; calls in the turn after them are not run."""
    tool_timeout_s: float = ranged(30.0, "> 0")
    """Seconds one tool call may take; past them the model reads an error as the call's result."""
    max_exchange_tokens: int | None = ranged(None, ">= 1")
    """Most tokens an exchange has after its prompt, the model's and the tools' together (default:
    max_new_tokens x (max_tool_turns + 1)); max_new_tokens bounds each of the model's turns."""
    base_dir: str | None = field(default=None, init=False, repr=False, compare=False, metadata={"internal": True})
    dynamic_sampling: bool = False
    """Group estimators: groups whose scores are all equal (no gradient) are dropped and more prompts are
    sampled until the batch is full of groups with signal (DAPO's dynamic sampling, verl's
    filter_groups), at most `max_sampling_rounds` more generations an iteration (pipeline/rl/sampling.py)."""
    max_sampling_rounds: int = ranged(3, ">= 0")
    """Dynamic sampling's extra generations per iteration; a batch still short after them is completed
    with groups without signal (logged as sampling/groups_without_signal)."""
    mask_truncated: bool = False
    """Responses cut by max_new_tokens (no stop token) carry no loss (trl's mask_truncated_completions);
    they still count in their group's statistics."""
    kl_coef: float = ranged(0.05, ">= 0")
    """Initial KL coefficient beta."""
    kl_target: float | None = ranged(None, "> 0")
    """Target per-sequence KL (nats) for the adaptive controller; None keeps beta fixed."""
    kl_horizon: int = ranged(10000, ">= 1")
    """Horizon of the adaptive KL controller, in episodes."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimator added to the reward."""
    gamma: float = ranged(1.0, "in [0, 1]")
    """Discount."""
    lam: float = ranged(0.95, "in [0, 1]")
    """GAE lambda."""
    cliprange: float = ranged(0.2, "> 0")
    """Policy ratio clip: the ratio is kept in [1 - cliprange, 1 + cliprange_high]."""
    cliprange_high: float | None = ranged(None, "> 0")
    """The upper side of the ratio clip (DAPO's clip-higher, trl's epsilon_high, e.g. 0.28): a larger one
    lets unlikely tokens grow, against entropy collapse. Default: cliprange."""
    cliprange_value: float = ranged(0.2, "> 0")
    """Value clip around the rollout-time values."""
    vf_coef: float = ranged(0.1, ">= 0")
    """Value loss coefficient."""
    normalize_scores: bool = False
    """Normalise reward-model scores with the mean/std the RM stage measured on reference responses."""
    whiten_rewards: bool = False
    """Scale per-token rewards to unit variance (needs batches of 8 or more)."""
    save_every: int = ranged(10, ">= 1")
    """Checkpoint every N iterations (and on Ctrl-C / SIGTERM)."""
    sample_every: int = ranged(5, ">= 1")
    """Log sample completions every N iterations."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers through accelerate, e.g. [tensorboard] or [wandb] (the package installed)."""

    def __post_init__(self):
        # accelerate only warns about a tracker it cannot use, and the run then logs nowhere: refused here,
        # when the recipe is read (find_spec imports nothing)
        for tracker in self.report_to:
            if tracker not in TRACKERS:
                raise ValueError(f"report_to: unknown tracker '{tracker}' (use {sorted(TRACKERS)})")
            if importlib.util.find_spec(TRACKERS[tracker]) is None:
                raise ValueError(
                    f"report_to: {tracker} is not installed: `pip install {TRACKERS[tracker]}`, or "
                    f"remove it from ppo.report_to"
                )
        # Checked when the recipe is read, before any process loads a model: every process takes
        # batch_size rollouts, splits them into minibatches, and each of those into micro-batches.
        if self.batch_size % self.mini_batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of mini_batch_size {self.mini_batch_size}"
            )
        if self.mini_batch_size % self.gradient_accumulation_steps:
            raise ValueError(
                f"mini_batch_size {self.mini_batch_size} is not a multiple of gradient_accumulation_steps "
                f"{self.gradient_accumulation_steps}"
            )
        # the estimator's needs, before any model loads
        if not self.rewards:
            raise ValueError("rewards is empty: give at least one source, e.g. [{model: rm}]")
        _check_sources(self.rewards, "rewards")
        _check_sources(self.judges, "judges")
        _check_sources(self.rewards + self.judges, "rewards and judges")  # one name, one score in every report
        if self.batch_size % self.samples_per_prompt:
            raise ValueError(
                f"samples_per_prompt {self.samples_per_prompt} does not divide batch_size {self.batch_size}"
            )
        if self.advantage_estimator in GROUP_ESTIMATORS and self.samples_per_prompt < 2:
            raise ValueError(
                f"advantage_estimator {self.advantage_estimator} compares the k responses to a prompt: "
                f"set samples_per_prompt to 2 or more"
            )
        if self.on_divergence == "stop" and not self.judges:
            raise ValueError(
                "on_divergence: stop watches the judges against the reward: add ppo.judges, or set on_divergence: warn"
            )
        if self.dynamic_sampling and self.advantage_estimator not in GROUP_ESTIMATORS:
            raise ValueError(
                f"dynamic_sampling keeps groups whose k scores differ: it is for the group estimators "
                f"{list(GROUP_ESTIMATORS)}, not {self.advantage_estimator}"
            )
        if self.advantage_estimator != "gae":
            if self.value_model is not None:
                raise ValueError(
                    f"advantage_estimator {self.advantage_estimator} needs no value model: "
                    f"remove value_model (it is for gae)"
                )
            if self.whiten_rewards:
                raise ValueError("whiten_rewards is for gae's token rewards: remove it")
        if self.uses_tools and any(s.model or s.url for s in self.rewards + self.judges):
            raise ValueError(
                "with tools, rewards and judges must be reward functions (they get each exchange as "
                "messages: calls, results, answer); a reward model or server reads one reply"
            )
        for spec in self.tools + [self.environment] * bool(self.environment):
            if ":" not in spec:
                raise ValueError(
                    f"tool or environment '{spec}': name it as 'package.module:name' or 'path/to/file.py:name'"
                )
        if self.value_model == "reward" and not any(s.model for s in self.rewards):
            raise ValueError(
                "value_model reward is initialised from a reward model, and rewards has none: "
                "set value_model to sft or head"
            )

    @property
    def critic(self) -> str | None:
        """The value function gae trains (reward / sft / head); None for the critic-free estimators."""
        if self.advantage_estimator != "gae":
            return None
        return self.value_model or ("reward" if any(s.model for s in self.rewards) else "sft")

    @property
    def uses_tools(self) -> bool:
        """Whether rollouts are multi-turn exchanges with tools (`tools`, `environment`)."""
        return bool(self.tools or self.environment)

    @property
    def exchange_tokens(self) -> int:
        """`max_exchange_tokens`, or its default."""
        return self.max_exchange_tokens or self.max_new_tokens * (self.max_tool_turns + 1)

    @property
    def horizon(self) -> int:
        """The most tokens of its own a response has (seq_mean_token_sum_norm divides by it): max_new_tokens,
        or an exchange's budget with tools."""
        return self.exchange_tokens if self.uses_tools else self.max_new_tokens

    @property
    def stop_penalty(self) -> float:
        """`missing_stop_penalty`, or its default for this estimator and these rewards."""
        if self.missing_stop_penalty is not None:
            return self.missing_stop_penalty
        return 1.0 if self.advantage_estimator == "gae" and any(s.model for s in self.rewards) else 0.0

    @property
    def uses_kl(self) -> bool:
        """Whether the run has a KL term (kl_coef > 0, or an adaptive one): without, no reference model
        is loaded and no reference forward runs (GRPO as trl, DAPO and Dr. GRPO run it, beta = 0); the
        KL metrics are then absent, and eval measures the policy's KL from its start."""
        return self.kl_coef > 0 or self.kl_target is not None

    @property
    def single_pass(self) -> bool:
        """Each batch is one optimiser step (one epoch of one mini-batch) of a critic-free estimator
        whose advantages read no log-probs: the old log-probs are then the update's own, detached (the
        ratio is 1; trl's num_iterations = 1), and the scoring forward before the update is skipped."""
        return (
            self.ppo_epochs == 1
            and self.mini_batch_size == self.batch_size
            and self.advantage_estimator != "gae"
            and (self.kl_in == "loss" or not self.uses_kl)
        )

    @property
    def aggregation(self) -> str:
        """`loss_aggregation`, or the estimator's own."""
        if self.loss_aggregation is not None:
            return self.loss_aggregation
        return "seq_mean_token_sum_norm" if self.advantage_estimator == "dr_grpo" else "token_mean"

    @property
    def scoring_deadline_s(self) -> float:
        """The longest one process may spend in its reward functions and servers (and judges) on a
        batch: each one's deadline, a server's first request its start-up wait as well."""
        return sum(s.deadline_s + (s.startup_wait if s.url else 0.0) for s in self.rewards + self.judges if not s.model)

    @property
    def forward_batch(self) -> int:
        """Rollouts per scoring forward: `forward_batch_size`, else the optimiser's micro-batch."""
        return self.forward_batch_size or self.mini_batch_size // self.gradient_accumulation_steps


@dataclass
class EvalStage:
    """`make eval`: compare the base, SFT and PPO policies on held-out prompts."""

    prompts: DatasetSpec | None = None
    """Held-out prompts (a `prompt` column)."""
    max_new_tokens: int = ranged(24, ">= 1")
    """Longest response."""
    temperature: float = ranged(0.7, "> 0")
    """Sampling temperature (top_k = 0, top_p = 1); greedy decoding is reported too."""
    batch_size: int = ranged(64, ">= 1")
    """Prompts per generation batch."""
    samples_in_report: int = ranged(8, ">= 0")
    """Rows of the side-by-side sample table."""
    judges: list[RewardSource] = field(default_factory=list)
    """Reward functions (or models, servers) that score every policy's responses, with a win rate over
    SFT, besides the RL stage's rewards and judges (which eval reports too)."""

    def __post_init__(self):
        _check_sources(self.judges, "judges")


@dataclass
class BaseModelSettings:
    """`make base`: the demo's tiny decoder-only model, built offline (only used by the demo)."""

    corpus: list[str] = field(
        default_factory=lambda: ["data/demo/sft_train.jsonl", "data/demo/preferences_train.jsonl"]
    )
    """Files whose text trains the word-level tokenizer."""
    output: str = "data/models/demo-base"
    """Where the model and tokenizer are saved."""
    hidden_size: int = ranged(128, ">= 1")
    """Width of the transformer."""
    num_layers: int = ranged(2, ">= 1")
    """Number of decoder layers."""
    num_heads: int = ranged(4, ">= 1")
    """Attention heads."""
    max_positions: int = ranged(128, ">= 1")
    """Maximum sequence length."""


@dataclass
class Recipe:
    """One run of the pipeline."""

    run_name: str = "demo"
    """Artifacts go to <runs_dir>/<run_name>/<stage>/."""
    runs_dir: str = "data/runs"
    """Root directory of all runs."""
    seed: int = ranged(0, ">= 0")
    """Global seed; each process adds a rank-dependent offset where sampling must differ."""
    judge: str | None = None
    """Gold judge 'module:function' taking (prompt, response) -> float, if the task has one."""
    base: BaseModelSettings = field(default_factory=BaseModelSettings)
    """The demo base model (`make base`)."""
    sft: SFTStage = field(default_factory=SFTStage)
    """Supervised fine-tuning."""
    rm: RMStage = field(default_factory=RMStage)
    """Reward model."""
    ppo: PPOStage = field(default_factory=PPOStage)
    """PPO."""
    eval: EvalStage = field(default_factory=EvalStage)
    """Evaluation."""

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.run_name
