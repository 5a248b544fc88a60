"""The Trainer stages' (SFT, RM) own pieces: resuming after a crash, a kill or Ctrl-C, the Trainer's
side of `dist.StopRequest` (PPO's loop asks it directly), and their metrics.jsonl. Apart from the
rest, because importing transformers' Trainer callbacks imports peft and bitsandbytes.

The Trainer checkpoints into `<work dir>/checkpoints/` (only the latest is kept). The work directory
is stamped with the stage's fingerprint, so running the same stage again with the same recipe finds
them and the Trainer resumes (`resume_from_checkpoint`: weights, optimiser, scheduler, RNG states and
the position in the data), while a changed recipe starts clean (artifacts.StageDir.begin). The
checkpoints are removed before the artifact is committed: only the final model goes into it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers import TrainerCallback

from pipeline.artifacts import MAKE_TARGET
from pipeline.dist import StopRequest
from pipeline.metrics import append_jsonl, cut_jsonl

DIR = "checkpoints"


def trainer_args(out: Path) -> dict:
    """Checkpoint settings for the Trainer; the recipe's trainer section may override any of them
    (e.g. `sft.trainer.save_steps=200`; the Trainer's default is every 500 steps)."""
    return {"output_dir": str(out / DIR), "save_strategy": "steps", "save_total_limit": 1}


def resume_point(out: Path, stage: str, is_main_process: bool) -> str | None:
    """The latest checkpoint of an interrupted run of this stage (None: start from step 0), with the
    metrics logged after it cut off, so every step appears once in metrics.jsonl."""
    # The Trainer writes trainer_state.json last, and removes the older checkpoint only after it: a
    # checkpoint without it was cut short by the kill (transformers' get_last_checkpoint would take it).
    complete = sorted((int(p.name.rsplit("-", 1)[1]), p) for p in (out / DIR).glob("checkpoint-*")
                      if (p / "trainer_state.json").is_file())
    step, last = complete[-1] if complete else (0, None)
    if is_main_process:  # (an interrupted run's own end-of-training summary goes too: the finished run logs one)
        cut_jsonl(out / "metrics.jsonl", "step", step if last else -1, drop='"train_runtime"')
    if last and is_main_process:
        print(f"{stage}: resuming from the checkpoint at step {step}")
    return str(last) if last else None


class StopOnSignal(TrainerCallback):
    """A StopRequest for the Trainer: it saves a checkpoint at the end of the current step and stops."""

    def __init__(self, device):
        self.request, self.stopped_at = StopRequest(device), None

    def on_step_end(self, args, state, control, **kwargs):
        if self.request.requested():
            control.should_save, control.should_training_stop = True, True
            self.stopped_at = state.global_step
        return control


def train(trainer, resume: str | None, stop: StopOnSignal, stage: str):
    """`trainer.train`, resumed if there is a checkpoint; after a stop request: exit 130 saying how
    to go on."""
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    finally:
        stop.request.restore()
    if stop.stopped_at is not None:
        if trainer.is_world_process_zero():
            print(f"{stage}: interrupted; checkpoint saved at step {stop.stopped_at}. Run `{MAKE_TARGET[stage]}` "
                  f"again (same recipe) to resume.", flush=True)
        raise SystemExit(130)
    return result


def discard(out: Path) -> None:
    """The finished stage's checkpoints: not part of the artifact."""
    shutil.rmtree(out / DIR, ignore_errors=True)


class RecipeCadence(TrainerCallback):
    """A resumed Trainer takes its logging, evaluation and save intervals from the checkpoint's state
    (it only warns that the arguments differ); the recipe's, which may have changed since
    (plans.RESUMABLE_ACROSS), apply from the resumed step on."""

    def on_train_begin(self, args, state, control, **kwargs):
        state.compute_steps(args, state.max_steps)


def callbacks(out: Path, stop: StopOnSignal) -> list[TrainerCallback]:
    """What the Trainer stages add to the Trainer: metrics.jsonl, the recipe's cadence, the stop request."""
    return [JsonlLogger(out / "metrics.jsonl"), RecipeCadence(), stop]


class JsonlLogger(TrainerCallback):
    """Every Trainer log (losses, learning rate, eval metrics) also goes to metrics.jsonl."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            append_jsonl(self.path, {"step": state.global_step, "epoch": state.epoch, **logs})
