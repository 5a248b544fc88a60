"""The RL run's state across iterations (`PPORun`): checkpoints and resume, metrics and samples, the
time split, the policy a judge scored best, failures every process agrees on, and the final artifact.
What the run is set up with is in pipeline/rl/run_setup.py, one iteration's phases in pipeline/rl/iteration.py.
"""

from __future__ import annotations

import json
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
from transformers import AutoModelForCausalLM

from pipeline import engine, models
from pipeline.artifacts import write_json_atomic
from pipeline.errors import IterationFailed, UserError
from pipeline.metrics import append_jsonl, cut_jsonl, peak_memory_mb
from pipeline.recipe_loader import to_dict
from pipeline.rl.algorithms import KLController
from pipeline.rl.divergence import Divergence, diverging
from pipeline.rl.iteration import judge_mean
from pipeline.rl.rewards import RewardError
from pipeline.rl.run_setup import Start

AFTER_EDITS = " (RESUME=1 if the fix changes the recipe or a reward's code)"
KL = "objective/kl"  # (absent without a KL term: `PPOStage.uses_kl`)
BEST_RECORD = "best.json"  # in best/: {"iteration", "judge", "value"} of the policy there


def _best_iteration(directory: Path) -> int:
    """The iteration whose policy `directory` (best/ or best.prev/) holds; 0: none there."""
    record = directory / BEST_RECORD
    return json.loads(record.read_text())["iteration"] if record.is_file() else 0


class _Agreed(Exception):
    """A failure every process knows of (`PPORun.agree`), with each failing process's cause."""

    def __init__(self, failed: list[tuple[int, str]]):
        super().__init__(failed[0][1])
        self.failed = failed


def rng_states() -> dict:
    """The generators accelerate's `save_state` saves, as they are now."""
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


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
        complete = [
            d
            for d in (self.checkpoint, self.out / "checkpoint.tmp", self.out / "checkpoint.old")
            if (d / "ppo_state.json").is_file()
        ]
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
                (tmp / "ppo_state.json").write_text(
                    json.dumps({"iteration": iteration, "kl_controller": self.kl_ctl.state_dict()})
                )
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
            then = (
                f"saved a checkpoint at iteration {iteration}/{iterations}: fix the cause and run again to go on "
                f"from it{AFTER_EDITS}"
            )
        elif iteration:
            then = (
                f"its checkpoint at iteration {iteration}/{iterations} is kept: fix the cause and run again to go on "
                f"from it{AFTER_EDITS}"
            )
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
        cause = (
            None
            if error is None
            else str(error)
            if isinstance(error, UserError)
            else f"{type(error).__name__}: {' '.join(str(error).split())}"
        )
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
                policy = {k[len("policy.") :]: v for k, v in state.items() if k.startswith("policy.")}
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
        a rank (see pipeline.process.run_and_exit)."""
        for tracker in self.acc.trackers:
            tracker.finish()

    def log(self, iteration: int, metrics: dict, episodes: int, exp, sample: bool) -> None:
        """One line of metrics.jsonl (and the tracker), with throughput and memory; a few samples with
        the score optimised, each source's and judge's own (and the reward model's, as `rm_score_raw`)."""
        metrics.update({f"time/{k}_s": self.last.pop(k) for k in ("generate", "score", "optimise")})
        elapsed = sum(metrics[f"time/{k}_s"] for k in ("generate", "score", "optimise"))
        metrics.update(
            {
                "episodes_per_s": episodes / elapsed,
                "tokens_per_s": metrics["response_length"] * episodes / elapsed,
                "peak_memory_mb": peak_memory_mb(),
            }
        )
        self.history.append(metrics)
        if self.acc.is_main_process:
            append_jsonl(self.out / "metrics.jsonl", metrics)
            if sample:
                value = lambda x: None if x != x else x  # noqa: E731  (NaN: no reward)
                for i, (prompt, response) in enumerate(zip(exp.rollout.prompts[:4], exp.rollout.texts)):
                    row = {
                        "iteration": iteration,
                        "prompt": prompt,
                        "response": response,
                        "score": exp.scores[i].item(),
                    }
                    if exp.rollout.agent is not None:  # the exchange as messages: calls, results, answer
                        row["exchange"] = exp.rollout.agent.exchanges[i]
                    if exp.rm_scores is not None:
                        row["rm_score_raw"] = exp.rm_scores[i].item()
                    row["rewards"] = {k: value(v[i].item()) for k, v in exp.source_scores.items()}
                    row["judges"] = {k: value(v[i].item()) for k, v in exp.judge_scores.items()}
                    if exp.extra_columns:  # what reward functions logged with log_extra
                        row["extra"] = {
                            k: value(v[i]) if isinstance(v[i], float) else v[i] for k, v in exp.extra_columns.items()
                        }
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
                part = lambda prefix: {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731
                policy = unwrapped.policy
                if cfg.finetune == "full":
                    policy.save_pretrained(out, state_dict=part("policy."))
                    engine.mark_float32(out)  # (under DeepSpeed in bf16 the module it is saved from is bf16)
                else:
                    policy.save_pretrained(out / "adapter", state_dict=part("policy."))
                    models.merge_adapter(
                        AutoModelForCausalLM, str(start.merge_base), out / "adapter", tokenizer, cfg.finetune, cfg.dtype
                    ).save_pretrained(out)
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
                        models.merge_adapter(
                            AutoModelForCausalLM,
                            str(start.merge_base),
                            out / "best-adapter",
                            tokenizer,
                            cfg.finetune,
                            cfg.dtype,
                        ).save_pretrained(out / "best")
                    else:
                        engine.mark_float32(out / "best")
                    tokenizer.save_pretrained(out / "best")
                (out / "recipe.yaml").write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
        if acc.is_main_process:
            summary = {**self.summary(unwrapped), **extra}
            for leftover in (
                "checkpoint",
                "checkpoint.tmp",
                "checkpoint.old",
                "start-merged",
                "best-adapter",
                "best.tmp",
                "best.prev",
            ):
                shutil.rmtree(out / leftover, ignore_errors=True)
            plan.stage.commit(plan.fingerprint, plan.config, plan.inputs, summary, self.started)
            print(
                f"ppo: {summary['iterations']} iterations, {summary['episodes']} episodes in "
                f"{time.time() - self.started:.0f}s ({summary['episodes_per_s_median']:.1f} episodes/s), score "
                f"{summary['score_first']:.2f} -> {summary['objective/scores']:.2f}"
                f"{f', KL {summary[KL]:.2f}' if KL in summary else ''} -> {plan.stage.final}"
            )
        acc.wait_for_everyone()

    def summary(self, unwrapped) -> dict:
        history = self.history  # (a resumed run's too: `resume` reads the lines logged before it)
        median = lambda key: sorted(h[key] for h in history)[len(history) // 2]  # noqa: E731
        summary = {
            k: history[-1][k]
            for k in (
                "objective/scores",
                "objective/reward_raw",
                "objective/rm_score_raw",
                "objective/kl",
                "objective/rlhf_reward",
                "response_length",
                "episodes",
                "lr",
                *(k for k in history[-1] if k.startswith(("rewards/", "judges/"))),
            )
            if k in history[-1]
        }
        judges = [k[len("alerts/") :] for k in history[-1] if k.startswith("alerts/")]
        summary.update(
            {
                "alerts": [
                    diverging(history[: i + 1], j).record()
                    for j in judges
                    for i, h in enumerate(history)
                    if h.get(f"alerts/{j}") and not (i and history[i - 1].get(f"alerts/{j}"))
                ],
                **({"best": self.best} if self.best else {}),
                "score_first": history[0]["objective/scores"],
                "iterations": len(history),
                "lr_middle": history[len(history) // 2]["lr"],
                "processes": self.acc.num_processes,
                "episodes_per_s_median": median("episodes_per_s"),
                "tokens_per_s_median": median("tokens_per_s"),
                "time_split_s": {
                    "startup": round(self.seconds["startup"], 2),
                    "saving": round(self.seconds["saving"], 2),
                    **{k: round(sum(h[f"time/{k}_s"] for h in history), 2) for k in ("generate", "score", "optimise")},
                },
                "peak_memory_mb": round(max(h["peak_memory_mb"] for h in history), 1),
                "trainable_parameters": sum(models.numel(p) for p in unwrapped.parameters() if p.requires_grad),
                "parameters": sum(models.numel(p) for p in unwrapped.parameters()),
            }
        )
        return summary
