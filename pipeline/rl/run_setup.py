"""What the RL stage sets up before its first iteration: where the policy starts, the models (policy,
value, reference, reward models), the schedule of prompts and optimiser steps, the optimiser and its
learning-rate schedule, and the disk the run will need.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from pipeline import artifacts, engine, models
from pipeline.dist import on_main
from pipeline.errors import ConfigError, UserError
from pipeline.recipe import PPOStage
from pipeline.rl import unpadded
from pipeline.rl.iteration import PolicyAndValue, disable_dropout
from pipeline.rl.rewards import Rewards, TrainerState, load_sources
from pipeline.rl.rollout import chunks_head

RANK_SEED_STRIDE = 100003  # ranks sample different rollouts from the same global seed


def same_tokenizer(a, b) -> bool:
    """Two tokenizers render a conversation to the same ids: the same vocabulary and merges, normalizer,
    pre-tokenizer and added tokens, the same chat template, and the same special tokens where the template
    writes them (a reward model may pad with another token, or name another EOS its template ignores)."""

    def rendering(t):
        template = t.chat_template or ""
        if isinstance(template, dict):  # named templates ("default", "tool_use")
            template = json.dumps(template, sort_keys=True)
        named = {k: v for k, v in t.special_tokens_map.items() if k in template}
        if not t.is_fast:
            return t.get_vocab(), template, named
        backend = json.loads(t.backend_tokenizer.to_str())
        for key in ("padding", "truncation", "post_processor"):  # none of them touches a rendering
            backend.pop(key, None)
        return backend, template, named

    return rendering(a) == rendering(b)


class Start:
    """Where the policy starts (`plans.policy_start`: this run's SFT artifact, or `ppo.model`).

    A PEFT adapter directory is merged into its base once, into the work directory (`merged/`, kept
    for a resumed run): that model is the reference, and the policy under full fine-tuning. Under
    LoRA / QLoRA the policy goes on training that adapter on its base (`adapter`), and its artifact
    merges into that base (`merge_base`)."""

    def __init__(self, source: str, out: Path, cfg: PPOStage, acc):
        self.dir, self.adapter, self.merge_base = source, None, source
        base = artifacts.adapter_base(source)
        if base is None:
            return
        merged = out / "start-merged"

        def merge():
            if (merged / "config.json").is_file():  # (a resumed run's)
                return
            tokenizer = models.load_tokenizer(models.own_or_base(source, "tokenizer_config.json"))
            model = models.merge_adapter(AutoModelForCausalLM, base, Path(source), tokenizer, "full", cfg.dtype)
            model.save_pretrained(merged.with_name("start-merged.tmp"))
            tokenizer.save_pretrained(merged.with_name("start-merged.tmp"))
            merged.with_name("start-merged.tmp").rename(merged)

        on_main(acc.state, merge, UserError)  # a failure reaches every process: none waits at a barrier
        acc.wait_for_everyone()
        self.dir = str(merged)
        if cfg.finetune != "full":
            self.adapter, self.merge_base = source, base


def load_models(cfg: PPOStage, start: Start, model_path, tokenizer, acc):
    """Policy + value function (one trainable module), the frozen reference (None under LoRA), the
    reward sources and the judges, each in its precision (pipeline/models.py); frozen models prepared
    for the engine. `model_path` resolves a reward source's `model` ('rm': this run's RM).

    Full fine-tuning: float32 policy and value model, a frozen reference in the compute dtype (none
    when the run has no KL term: `cfg.uses_kl`). LoRA /
    QLoRA: a fresh adapter on the start's weights, so with the adapter disabled the policy IS the
    reference; the value model then gets its own adapter (its score head trained in full), so a
    LoRA run never trains a whole second network. From an adapter (`start.adapter`): that adapter
    trains on its base, and the start, merged, is a reference of its own. The critic-free estimators
    train the policy alone.
    """
    dtype = models.resolve_dtype(cfg.dtype)
    reference = None
    if cfg.finetune == "full":  # in the policy's arithmetic: KL 0 before the first update
        policy = models.load_trained(AutoModelForCausalLM, start.dir, cfg.finetune, cfg.dtype)
        reference = models.load_reference(start.dir, dtype) if cfg.uses_kl else None  # (no KL: none)
    elif start.adapter is not None:
        from peft import PeftModel

        policy = models.load_trained(AutoModelForCausalLM, start.merge_base, cfg.finetune, cfg.dtype)
        policy = PeftModel.from_pretrained(policy, start.adapter, is_trainable=True)
        reference = models.load_reference(start.dir, dtype) if cfg.uses_kl else None
    else:
        from peft import get_peft_model  # (imports bitsandbytes: only runs with adapters pay for it)

        policy = models.load_trained(AutoModelForCausalLM, start.dir, cfg.finetune, cfg.dtype)
        policy = get_peft_model(policy, models.lora_config(cfg.finetune, cfg.lora, "CAUSAL_LM"))
    load = lambda specs: load_sources(
        specs,
        model_path,
        dtype,
        acc.device,
        cfg.forward_batch,  # noqa: E731
        lambda m: engine.prepare_frozen(m, acc),
    )
    rewards = Rewards(
        load(cfg.rewards), acc.device, rm_label=next((s.label for s in cfg.rewards if s.model == "rm"), None)
    )
    judges = Rewards(load(cfg.judges), acc.device, watched=True)  # a judge that fails never stops training
    for reward_model in rewards.models() + judges.models():  # one with the policy's tokenizer reads its ids
        if same_tokenizer(tokenizer, reward_model.scorer.tokenizer):
            reward_model.reads_policy_ids()
    value_model = None
    if cfg.critic == "reward":
        reward_model = rewards.models()[0]
        if tokenizer.get_vocab() != reward_model.scorer.tokenizer.get_vocab():  # it reads the policy's ids
            raise ConfigError(
                "the reward model has its own tokenizer, so it cannot initialise the value model: "
                "set ppo.value_model=sft or ppo.value_model=head"
            )
    if cfg.critic in ("reward", "sft"):
        source = reward_model.path if cfg.critic == "reward" else start.dir
        value_model = models.load_trained(
            AutoModelForSequenceClassification, source, cfg.finetune, cfg.dtype, num_labels=1
        )
        value_model.config.pad_token_id = tokenizer.pad_token_id
        if cfg.finetune != "full":
            from peft import get_peft_model

            value_model = get_peft_model(value_model, models.lora_config(cfg.finetune, cfg.lora, "SEQ_CLS"))
    if cfg.remove_padding:  # all of them or none (a forward's layout serves the policy and value model)
        unpadded.enable(*(models.hf_model(m) for m in (policy, value_model, reference) if m is not None))
    model = PolicyAndValue(policy, value_model, value_head=cfg.critic == "head")
    # the LM head in chunks where the logits are large, and the head may run on its own (not sharded)
    model.chunked = chunks_head(policy) and model.value_head is None and not engine.is_sharded(acc)
    if reference is not None:
        reference = engine.prepare_frozen(reference, acc)
    models.upcast_trainable(model)
    disable_dropout(model)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model.eval(), reference, rewards, judges


class Schedule:
    """How many iterations and optimiser steps the run has, and which prompts each rank takes."""

    def __init__(self, cfg: PPOStage, world: int, n_prompts: int, seed: int):
        self.cfg, self.world, self.n_prompts, self.seed = cfg, world, n_prompts, seed
        self.iterations = math.ceil(cfg.total_episodes / (cfg.batch_size * world))
        self.optimizer_steps = self.iterations * cfg.ppo_epochs * (cfg.batch_size // cfg.mini_batch_size)

    def trainer_state(self, iteration: int, acc) -> TrainerState:
        """The run's progress when `iteration` iterations are done, as reward functions read it."""
        drawn = self.cfg.batch_size // self.cfg.samples_per_prompt * self.world  # prompts per iteration
        return TrainerState(
            global_step=iteration * self.optimizer_steps // self.iterations,
            max_steps=self.optimizer_steps,
            epoch=iteration * drawn / self.n_prompts,
            num_train_epochs=self.iterations * drawn / self.n_prompts,
            is_world_process_zero=acc.is_main_process,
            is_local_process_zero=acc.is_local_main_process,
        )

    def prompt_indices(self, iteration: int, rank: int, round_: int = 0) -> list[int]:
        """The prompts of one process in one iteration, each repeated `samples_per_prompt` times in a
        row (a prompt's group stays whole, on one process): a deterministic function of the
        iteration, so a resumed run sees exactly the prompts the uninterrupted run would have, and N
        processes together take the prompts one process with N times the batch would. `round_` > 0:
        dynamic sampling's extra prompts (pipeline/rl/sampling.py), drawn at random from the seed,
        the iteration and the round alone."""
        k = self.cfg.samples_per_prompt
        b = self.cfg.batch_size // k  # distinct prompts per process
        if round_:
            draw = torch.Generator().manual_seed((self.seed * 1_000_003 + iteration) * 1009 + round_)
            chosen = torch.randint(self.n_prompts, (b * self.world,), generator=draw)[rank * b : (rank + 1) * b]
            return [i for i in chosen.tolist() for _ in range(k)]
        out = []
        for j in range(iteration * b * self.world + rank * b, iteration * b * self.world + (rank + 1) * b):
            epoch, i = divmod(j, self.n_prompts)
            out += [self.order(epoch)[i]] * k
        return out

    @functools.lru_cache(maxsize=2)  # noqa: B019 (the schedule lives as long as the run)
    # an iteration's prompts span two epochs at most, unless there are fewer
    # prompts than one iteration takes (then it is drawn again: same order)
    def order(self, epoch: int) -> list[int]:
        """The prompts' order in one pass over them: drawn once per epoch, from the seed alone."""
        return torch.randperm(self.n_prompts, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()


def optimizer_and_schedule(model, cfg: PPOStage, optimizer_steps: int):
    """AdamW (fused: one kernel for all parameters, 5% of the demo's update time) and the learning-rate
    schedule over the run's optimiser steps.

    The scheduler is NOT passed to `accelerator.prepare`: accelerate's wrapper steps it once per
    process on every call (it assumes the Trainer's per-process dataloader length), so with N
    processes the rate would reach zero after 1/N of the run. Stepped once per optimiser step
    here, it is the same schedule with 1 and N processes."""
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.learning_rate,
        eps=1e-5,
        weight_decay=cfg.weight_decay,
        fused=True,
    )
    return optimizer, lr_schedule(cfg.lr_schedule, optimizer, optimizer_steps)


def lr_schedule(name: str, optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate over the run's optimiser steps as transformers' `get_scheduler` gives it
    without warm-up: linear to 0 at the last step, or constant. Not imported from there:
    transformers.optimization imports the Trainer's utilities, and they import peft and bitsandbytes
    (~2 s, ~55 MB in each process), which a full fine-tuning run never needs."""
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, (steps - step) / max(1, steps)))


def disk_need(model, cfg: PPOStage) -> int:
    """Peak bytes of the run (models.disk_need): a checkpoint is accelerate's save_state (every weight
    in its stored dtype, AdamW's moments); the artifact the float32 policy (adapters merged) and the
    value model (under LoRA: its adapter and head, which is what is saved). With judges and keep_best,
    two more float32 policies at most: best/ and the best.prev/ a checkpoint still covers (under LoRA
    adapters until the end, when best/ is merged: counted in full all the same)."""
    trainable = sum(models.numel(p) for p in model.parameters() if p.requires_grad)
    checkpoint = sum(models.numel(p) * p.element_size() for p in model.parameters()) + 8 * trainable
    value = [m for m in (model.value_model, model.value_head) if m is not None]
    policy = 4 * sum(models.numel(p) for p in model.policy.parameters())
    artifact = policy + 4 * sum(
        models.numel(p) for m in value for p in m.parameters() if cfg.finetune == "full" or p.requires_grad
    )
    best = 2 * policy if cfg.keep_best and cfg.judges else 0
    return models.disk_need(checkpoint, artifact) + best
