"""Resuming the Trainer stages (SFT, RM) after a crash, a kill or Ctrl-C.

The Trainer checkpoints into `<work dir>/checkpoints/` (only the latest is kept). The work directory
is stamped with the stage's fingerprint, so running the same stage again with the same recipe finds
them and the Trainer resumes (`resume_from_checkpoint`: weights, optimiser, scheduler, RNG states and
the position in the data), while a changed recipe starts clean (artifacts.StageDir.begin). The
checkpoints are removed before the artifact is committed: only the final model goes into it.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import torch
from transformers import TrainerCallback

from pipeline.artifacts import MAKE_TARGET

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
    metrics = out / "metrics.jsonl"
    if is_main_process and metrics.exists():
        # (an interrupted run's own end-of-training summary goes too: the finished run logs one)
        kept = [line for line in metrics.read_text().splitlines()
                if last and _step(line) <= step and '"train_runtime"' not in line]
        metrics.write_text("".join(line + "\n" for line in kept))
    if last and is_main_process:
        print(f"{stage}: resuming from the checkpoint at step {step}")
    return str(last) if last else None


def _step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):  # a line torn by a kill mid-write
        return float("inf")


class StopOnSignal(TrainerCallback):
    """Ctrl-C / SIGTERM: the Trainer saves a checkpoint at the end of the current step and stops.
    The ranks agree first (one all-reduce per step), so all of them save and stop at the same step."""

    def __init__(self):
        self.flag, self.stopped_at = False, None
        self.previous = {sig: signal.signal(sig, self._set) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _set(self, *_):
        self.flag = True

    def on_step_end(self, args, state, control, **kwargs):
        flag = torch.tensor(float(self.flag), device=args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag)
        if flag.item() > 0:
            control.should_save, control.should_training_stop = True, True
            self.stopped_at = state.global_step
        return control


def train(trainer, resume: str | None, stop: StopOnSignal, stage: str):
    """`trainer.train`, resumed if there is a checkpoint; after a stop request: exit 130 saying how
    to go on."""
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    finally:
        stop.restore()
    if stop.stopped_at is not None:
        if trainer.is_world_process_zero():
            print(f"{stage}: interrupted; checkpoint saved at step {stop.stopped_at}. Run `{MAKE_TARGET[stage]}` "
                  f"again (same recipe) to resume.", flush=True)
        raise SystemExit(130)
    return result


def discard(out: Path) -> None:
    """The finished stage's checkpoints: not part of the artifact."""
    shutil.rmtree(out / DIR, ignore_errors=True)
