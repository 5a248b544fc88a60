"""Everything around PPO's iteration in `stages/ppo.py`: models, prompts, schedule, checkpoints,
logging and the final artifact. The iteration's phases themselves are in pipeline/rl/ppo.py.
"""

from __future__ import annotations

import functools
import json
import math
import random
import shutil
import time
import traceback
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from pipeline import artifacts, engine, models
from pipeline.config import ConfigError, PPOStage, UserError, to_dict
from pipeline.artifacts import write_json_atomic
from pipeline.dist import on_main
from pipeline.metrics import append_jsonl, cut_jsonl, peak_memory_mb
from pipeline.rl.divergence import Divergence, diverging
from pipeline.rl.ppo import PolicyAndValue, disable_dropout, judge_mean
from pipeline.rl import unpadded
from pipeline.rl.ppo_math import KLController
from pipeline.rl.rollout import chunks_head
from pipeline.rl.rewards import RewardError, Rewards, TrainerState, load_sources

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
    load = lambda specs: load_sources(specs, model_path, dtype, acc.device, cfg.forward_batch,  # noqa: E731
                                      lambda m: engine.prepare_frozen(m, acc))
    rewards = Rewards(load(cfg.rewards), acc.device, rm_label=next((s.label for s in cfg.rewards if s.model == "rm"), None))
    judges = Rewards(load(cfg.judges), acc.device, watched=True)  # a judge that fails never stops training
    for reward_model in rewards.models() + judges.models():  # one with the policy's tokenizer reads its ids
        if same_tokenizer(tokenizer, reward_model.scorer.tokenizer):
            reward_model.reads_policy_ids()
    value_model = None
    if cfg.critic == "reward":
        reward_model = rewards.models()[0]
        if tokenizer.get_vocab() != reward_model.scorer.tokenizer.get_vocab():  # it reads the policy's ids
            raise ConfigError("the reward model has its own tokenizer, so it cannot initialise the value model: "
                              "set ppo.value_model=sft or ppo.value_model=head")
    if cfg.critic in ("reward", "sft"):
        source = reward_model.path if cfg.critic == "reward" else start.dir
        value_model = models.load_trained(AutoModelForSequenceClassification, source, cfg.finetune, cfg.dtype,
                                          num_labels=1)
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
        return TrainerState(global_step=iteration * self.optimizer_steps // self.iterations, max_steps=self.optimizer_steps,
                            epoch=iteration * drawn / self.n_prompts, num_train_epochs=self.iterations * drawn / self.n_prompts,
                            is_world_process_zero=acc.is_main_process, is_local_process_zero=acc.is_local_main_process)

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
            chosen = torch.randint(self.n_prompts, (b * self.world,), generator=draw)[rank * b:(rank + 1) * b]
            return [i for i in chosen.tolist() for _ in range(k)]
        out = []
        for j in range(iteration * b * self.world + rank * b, iteration * b * self.world + (rank + 1) * b):
            epoch, i = divmod(j, self.n_prompts)
            out += [self.order(epoch)[i]] * k
        return out

    @functools.lru_cache(maxsize=2)  # an iteration's prompts span two epochs at most, unless there are fewer
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
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  eps=1e-5, weight_decay=cfg.weight_decay, fused=True)
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
    artifact = policy + 4 * sum(models.numel(p) for m in value for p in m.parameters()
                                if cfg.finetune == "full" or p.requires_grad)
    best = 2 * policy if cfg.keep_best and cfg.judges else 0
    return models.disk_need(checkpoint, artifact) + best


AFTER_EDITS = " (RESUME=1 if the fix changes the recipe or a reward's code)"
KL = "objective/kl"  # (absent without a KL term: `PPOStage.uses_kl`)
BEST_RECORD = "best.json"  # in best/: {"iteration", "judge", "value"} of the policy there


def _best_iteration(directory: Path) -> int:
    """The iteration whose policy `directory` (best/ or best.prev/) holds; 0: none there."""
    record = directory / BEST_RECORD
    return json.loads(record.read_text())["iteration"] if record.is_file() else 0


class Diverged(UserError, RuntimeError):
    """A judge diverged from the reward and the recipe says to stop (ppo.on_divergence: stop)."""


class _Agreed(Exception):
    """A failure every process knows of (`PPORun.agree`), with each failing process's cause."""

    def __init__(self, failed: list[tuple[int, str]]):
        super().__init__(failed[0][1])
        self.failed = failed


class IterationFailed(UserError, RuntimeError):
    """An iteration's generation or scoring failed on some process (after its last iteration was saved)."""


def rng_states() -> dict:
    """The generators accelerate's `save_state` saves, as they are now."""
    return {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(states: dict) -> None:
    random.setstate(states["random"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None:
        torch.cuda.set_rng_state_all(states["cuda"])


class PPORun:
    """The run's files in its work directory: checkpoint and resume, metrics and samples, the time
    split, and the final artifact."""

    def __init__(self, out: Path, acc, model, scheduler, kl_ctl: KLController, started: float):
        self.out, self.acc, self.model, self.kl_ctl, self.started = out, acc, model, kl_ctl, started
        self.checkpoint = out / "checkpoint"
        self.seconds = defaultdict(float)  # startup, generate, score, optimise, saving: the whole run
        self.last = {}  # the same, for the latest iteration
        self.saved_at = 0  # the iteration of the newest checkpoint (0: none)
        self.history: list[dict] = []  # metrics.jsonl's lines, on every process (divergence is judged on them)
        self.best: dict = {}  # the policy the first judge scored best: {"iteration", "judge", "value"} (best.json)
        acc.register_for_checkpointing(scheduler)  # not prepared (see optimizer_and_schedule): saved all the same

    @contextmanager
    def timed(self, phase: str):
        """The block's seconds, added to the phase's (in the run and in the iteration: `log` starts the next)."""
        t0 = time.time()
        yield
        self.last[phase] = self.last.get(phase, 0.0) + time.time() - t0
        self.seconds[phase] += time.time() - t0

    def resume(self, iterations: int) -> int:
        """The iteration to start from: the checkpoint's (model, optimiser, scheduler, KL controller and
        every process's RNG states restored, so the run goes on exactly as if never stopped), else 0.
        Metrics and samples logged after that point (by a run killed before its next checkpoint) are
        cut off, so every iteration appears once."""
        start = 0
        # save_checkpoint swaps checkpoint.tmp in through checkpoint.old: a kill in between leaves
        # the newest complete one (ppo_state.json is written last) under one of these names
        complete = [d for d in (self.checkpoint, self.out / "checkpoint.tmp", self.out / "checkpoint.old")
                    if (d / "ppo_state.json").is_file()]
        if complete:
            states = {d: json.loads((d / "ppo_state.json").read_text()) for d in complete}
            newest = max(complete, key=lambda d: states[d]["iteration"])
            self.acc.load_state(str(newest))
            self.kl_ctl.load_state_dict(states[newest]["kl_controller"])
            start = self.saved_at = states[newest]["iteration"]
            self.acc.print(f"ppo: resuming from the checkpoint at iteration {start}/{iterations}")
        if self.acc.is_main_process:
            for name in ("metrics.jsonl", "samples.jsonl"):
                cut_jsonl(self.out / name, "iteration", start)
            self._restore_best(start)
        self.acc.wait_for_everyone()
        metrics = self.out / "metrics.jsonl"
        self.history = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        record = self.out / "best" / BEST_RECORD
        self.best = json.loads(record.read_text()) if record.is_file() else {}
        return start

    def _restore_best(self, start: int) -> None:
        """best/ as it was at iteration `start`: a best found later is met again (if at all) when its
        iteration runs again, and the one it replaced, kept as best.prev/ until a checkpoint covered the
        new one, comes back."""
        best, prev = self.out / "best", self.out / "best.prev"
        if _best_iteration(best) > start:
            shutil.rmtree(best)
        if not best.is_dir() and 0 < _best_iteration(prev) <= start:
            prev.rename(best)
        for leftover in (prev, self.out / "best.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)

    def save_checkpoint(self, iteration: int) -> None:
        """Every rank takes part (sharded engines save their shards); rank 0 then swaps it in."""
        with self.timed("saving"):
            tmp, old = self.out / "checkpoint.tmp", self.out / "checkpoint.old"
            if self.acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)  # a part written before a kill
            self.acc.wait_for_everyone()
            self.acc.save_state(str(tmp))
            self.acc.wait_for_everyone()  # every rank has written its part (its RNG state at least)
            if self.acc.is_main_process:  # ppo_state.json last: it marks a checkpoint complete
                (tmp / "ppo_state.json").write_text(json.dumps({"iteration": iteration,
                                                                "kl_controller": self.kl_ctl.state_dict()}))
                if self.checkpoint.exists():
                    shutil.rmtree(old, ignore_errors=True)
                    self.checkpoint.rename(old)
                tmp.rename(self.checkpoint)
                shutil.rmtree(old, ignore_errors=True)
                shutil.rmtree(self.out / "best.prev", ignore_errors=True)  # best/ is the checkpoint's now
            self.acc.wait_for_everyone()
        self.saved_at = iteration

    @contextmanager
    def saved_on_failure(self, iteration: int, iterations: int):
        """Around an iteration's generation and scoring (`iteration` counts the completed ones): when
        they fail, every process saves the last completed iteration, unless its checkpoint exists, and
        stops with the cause in one line; running the stage again goes on from there. Nothing has been
        updated since that iteration ended, so its state is whole; the RNG states are put back as it
        left them, so the resumed run is the uninterrupted one. (A loss that is not finite stops the
        update without a save: that state may be broken.)

        One process: any failure. Several: a reward source's, which `agree` makes every process's
        before any of them goes on to a collective; anything else (out of memory in a forward, which is
        a collective under sharded engines and DDP's buffer broadcast) ends that process at once, and
        the launcher stops the others."""
        rng = rng_states()
        try:
            yield
            return
        except _Agreed as agreed:
            failed, error = agreed.failed, agreed.__cause__
        except Exception as e:  # a tokenizer, memory, a bug: anything before the update
            if self.acc.num_processes > 1:
                raise
            failed, error = self._failures(e), e
        if error is not None and not isinstance(error, UserError):
            traceback.print_exception(error)  # a bug: its traceback, above the line every process says
        rank, cause = failed[0]
        where = f" on process {rank}" if self.acc.num_processes > 1 else ""
        if iteration > self.saved_at:
            set_rng_states(rng)
            self.save_checkpoint(iteration)
            then = (f"saved a checkpoint at iteration {iteration}/{iterations}: fix the cause and run again to go on "
                    f"from it{AFTER_EDITS}")
        elif iteration:
            then = (f"its checkpoint at iteration {iteration}/{iterations} is kept: fix the cause and run again to go on "
                    f"from it{AFTER_EDITS}")
        else:
            then = "no iteration had completed: nothing to save"
        raise IterationFailed(f"ppo: iteration {iteration + 1} failed{where} ({cause}); {then}") from error

    def agree(self, run):
        """`run()` (a batch's rewards), once every process's has succeeded: a reward source's failure on
        any process is every process's (raised to `saved_on_failure`) before any of them goes on to a
        collective (one all-reduce a call with several processes)."""
        try:
            result, error = run(), None
        except RewardError as e:
            result, error = None, e
        except Exception as e:
            if self.acc.num_processes > 1:
                raise
            result, error = None, e
        failed = self._failures(error)
        if failed:
            raise _Agreed(failed) from error
        return result

    def _failures(self, error: Exception | None) -> list[tuple[int, str]]:
        """[(process, cause)] of every process whose iteration failed, the same on every process (a
        collective: every process calls it each iteration; a flag, then the causes only on a failure)."""
        cause = None if error is None else str(error) if isinstance(error, UserError) else \
            f"{type(error).__name__}: {' '.join(str(error).split())}"
        if self.acc.num_processes == 1:
            return [] if cause is None else [(0, cause)]
        flag = torch.tensor([0.0 if cause is None else 1.0], device=self.acc.device)
        if self.acc.reduce(flag, reduction="sum").item() == 0:
            return []
        causes = [None] * self.acc.num_processes
        torch.distributed.all_gather_object(causes, cause)
        return [(rank, c) for rank, c in enumerate(causes) if c is not None]

    def watch(self, metrics: dict, judges: list[str]) -> list[Divergence]:
        """The judges diverging from the reward over the iterations up to this one (`metrics`, not yet
        logged): `alerts/<judge>` is 1 while one holds, and a warning line says when it begins."""
        found = []
        for judge in judges:
            divergence = diverging(self.history + [metrics], judge)
            metrics[f"alerts/{judge}"] = float(divergence is not None)
            if divergence is not None:
                found.append(divergence)
                if not (self.history and self.history[-1].get(f"alerts/{judge}")):
                    self.acc.print(f"warning: ppo: {divergence.line()}")
        return found

    def keep_best(self, iteration: int, exp, judge: str, tokenizer) -> None:
        """Before iteration `iteration`'s update, when `judge` scored its rollouts best so far: the policy
        that sampled them (the one now) is written to best/ (under LoRA its adapter; `save_artifact`
        makes it a model). Every process takes part."""
        value = judge_mean(exp, judge, self.acc)
        if self.best.get("judge") != judge:  # (resumed with another first judge: its own best from here)
            self.best = {}
        if value is None or (self.best and value <= self.best["value"]):
            return
        self.best = {"iteration": iteration, "judge": judge, "value": value}
        with self.timed("saving"), engine.saving(self.acc):
            state = engine.full_state_dict(self.acc, self.model)  # (every rank takes part)
            if self.acc.is_main_process:
                policy = {k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.")}
                tmp, best, prev = self.out / "best.tmp", self.out / "best", self.out / "best.prev"
                shutil.rmtree(tmp, ignore_errors=True)
                engine.unwrap(self.acc, self.model).policy.save_pretrained(tmp, state_dict=policy)
                tokenizer.save_pretrained(tmp)
                write_json_atomic(tmp / BEST_RECORD, self.best)  # in the directory: renamed with it
                # the best a checkpoint covers stays (as best.prev/) until the next checkpoint covers
                # this one: a run resumed from that checkpoint gets it back (`_restore_best`)
                if 0 < _best_iteration(best) <= self.saved_at:
                    shutil.rmtree(prev, ignore_errors=True)
                    best.rename(prev)
                shutil.rmtree(best, ignore_errors=True)
                tmp.rename(best)
        self.acc.wait_for_everyone()

    def end_trackers(self) -> None:
        """accelerate's trackers finish (their last writes flushed). Not `acc.end_training()`, which
        also tears the process group down: freeing it later, with the models that hold it, can hang
        a rank (see pipeline.cli.run_and_exit)."""
        for tracker in self.acc.trackers:
            tracker.finish()

    def log(self, iteration: int, metrics: dict, episodes: int, exp, sample: bool) -> None:
        """One line of metrics.jsonl (and the tracker), with throughput and memory; a few samples with
        the score optimised, each source's and judge's own (and the reward model's, as `rm_score_raw`)."""
        metrics.update({f"time/{k}_s": self.last.pop(k) for k in ("generate", "score", "optimise")})
        elapsed = sum(metrics[f"time/{k}_s"] for k in ("generate", "score", "optimise"))
        metrics.update({"episodes_per_s": episodes / elapsed,
                        "tokens_per_s": metrics["response_length"] * episodes / elapsed,
                        "peak_memory_mb": peak_memory_mb()})
        self.history.append(metrics)
        if self.acc.is_main_process:
            append_jsonl(self.out / "metrics.jsonl", metrics)
            if sample:
                value = lambda x: None if x != x else x  # noqa: E731  (NaN: no reward)
                for i, (prompt, response) in enumerate(zip(exp.rollout.prompts[:4], exp.rollout.texts)):
                    row = {"iteration": iteration, "prompt": prompt, "response": response, "score": exp.scores[i].item()}
                    if exp.rollout.agent is not None:  # the exchange as messages: calls, results, answer
                        row["exchange"] = exp.rollout.agent.exchanges[i]
                    if exp.rm_scores is not None:
                        row["rm_score_raw"] = exp.rm_scores[i].item()
                    row["rewards"] = {k: value(v[i].item()) for k, v in exp.source_scores.items()}
                    row["judges"] = {k: value(v[i].item()) for k, v in exp.judge_scores.items()}
                    if exp.extra_columns:  # what reward functions logged with log_extra
                        row["extra"] = {k: value(v[i]) if isinstance(v[i], float) else v[i]
                                        for k, v in exp.extra_columns.items()}
                    append_jsonl(self.out / "samples.jsonl", row)
        self.acc.log({k: v for k, v in metrics.items() if isinstance(v, float)}, step=iteration)

    def save_artifact(self, recipe, plan, tokenizer, start: Start, extra: dict) -> None:
        """The policy (adapters merged) with its tokenizer, the value model, the recipe and the manifest.
        Under ZeRO-3 / FSDP2 the weights are consolidated first, with every rank taking part."""
        cfg, acc, out = recipe.ppo, self.acc, self.out
        with self.timed("saving"), engine.saving(acc):
            state = engine.full_state_dict(acc, self.model)  # on rank 0, float32; every rank takes part
            if acc.is_main_process:
                unwrapped = engine.unwrap(acc, self.model)
                part = lambda prefix: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731
                policy = unwrapped.policy
                if cfg.finetune == "full":
                    policy.save_pretrained(out, state_dict=part("policy."))
                    engine.mark_float32(out)  # (under DeepSpeed in bf16 the module it is saved from is bf16)
                else:
                    policy.save_pretrained(out / "adapter", state_dict=part("policy."))
                    models.merge_adapter(AutoModelForCausalLM, str(start.merge_base), out / "adapter", tokenizer,
                                         cfg.finetune, cfg.dtype).save_pretrained(out)
                tokenizer.save_pretrained(out)
                if unwrapped.value_model is not None:
                    unwrapped.value_model.save_pretrained(out / "value_model", state_dict=part("value_model."))
                    if cfg.finetune == "full":
                        engine.mark_float32(out / "value_model")
                elif unwrapped.value_head is not None:
                    torch.save(part("value_head."), out / "value_head.pt")
                if (out / "best").is_dir():  # the policy the first judge scored best, as a model of its own
                    if cfg.finetune != "full":
                        shutil.move(out / "best", out / "best-adapter")
                        models.merge_adapter(AutoModelForCausalLM, str(start.merge_base), out / "best-adapter",
                                             tokenizer, cfg.finetune, cfg.dtype).save_pretrained(out / "best")
                    else:
                        engine.mark_float32(out / "best")
                    tokenizer.save_pretrained(out / "best")
                (out / "recipe.yaml").write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
        if acc.is_main_process:
            summary = {**self.summary(unwrapped), **extra}
            for leftover in ("checkpoint", "checkpoint.tmp", "checkpoint.old", "start-merged", "best-adapter", "best.tmp",
                             "best.prev"):
                shutil.rmtree(out / leftover, ignore_errors=True)
            plan.stage.commit(plan.fingerprint, plan.config, plan.inputs, summary, self.started)
            print(f"ppo: {summary['iterations']} iterations, {summary['episodes']} episodes in "
                  f"{time.time() - self.started:.0f}s ({summary['episodes_per_s_median']:.1f} episodes/s), score "
                  f"{summary['score_first']:.2f} -> {summary['objective/scores']:.2f}"
                  f"{f', KL {summary[KL]:.2f}' if KL in summary else ''} -> {plan.stage.final}")
        acc.wait_for_everyone()

    def summary(self, unwrapped) -> dict:
        history = self.history  # (a resumed run's too: `resume` reads the lines logged before it)
        median = lambda key: sorted(h[key] for h in history)[len(history) // 2]  # noqa: E731
        summary = {k: history[-1][k] for k in ("objective/scores", "objective/reward_raw", "objective/rm_score_raw",
                                               "objective/kl", "objective/rlhf_reward", "response_length", "episodes",
                                               "lr", *(k for k in history[-1] if k.startswith(("rewards/", "judges/"))))
                   if k in history[-1]}
        judges = [k[len("alerts/"):] for k in history[-1] if k.startswith("alerts/")]
        summary.update({
            "alerts": [diverging(history[:i + 1], j).record() for j in judges for i, h in enumerate(history)
                       if h.get(f"alerts/{j}") and not (i and history[i - 1].get(f"alerts/{j}"))],
            **({"best": self.best} if self.best else {}),
            "score_first": history[0]["objective/scores"], "iterations": len(history),
            "lr_middle": history[len(history) // 2]["lr"], "processes": self.acc.num_processes,
            "episodes_per_s_median": median("episodes_per_s"), "tokens_per_s_median": median("tokens_per_s"),
            "time_split_s": {"startup": round(self.seconds["startup"], 2), "saving": round(self.seconds["saving"], 2),
                             **{k: round(sum(h[f"time/{k}_s"] for h in history), 2)
                                for k in ("generate", "score", "optimise")}},
            "peak_memory_mb": round(max(h["peak_memory_mb"] for h in history), 1),
            "trainable_parameters": sum(models.numel(p) for p in unwrapped.parameters() if p.requires_grad),
            "parameters": sum(models.numel(p) for p in unwrapped.parameters())})
        return summary
