"""Resuming the Trainer stages (SFT, RM) after a crash, a kill or Ctrl-C; the stop request on Ctrl-C
that every training loop (the Trainer's, PPO's) shares.

The Trainer checkpoints into `<work dir>/checkpoints/` (only the latest is kept). The work directory
is stamped with the stage's fingerprint, so running the same stage again with the same recipe finds
them and the Trainer resumes (`resume_from_checkpoint`: weights, optimiser, scheduler, RNG states and
the position in the data), while a changed recipe starts clean (artifacts.StageDir.begin). The
checkpoints are removed before the artifact is committed: only the final model goes into it.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import torch
from transformers import TrainerCallback

from pipeline.artifacts import MAKE_TARGET
from pipeline.metrics import cut_jsonl

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


class StopRequest:
    """Ctrl-C / SIGTERM set a flag; the training loop asks at the end of each step (PPO: minibatch)
    whether any rank got one, all ranks together, so that all of them save and stop at the same point."""

    def __init__(self, device):
        self.device, self.flag = device, False
        self.previous = {sig: signal.signal(sig, self._set) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _set(self, *_):
        self.flag = True

    def restore(self):
        """After training: a stop request has no checkpoint to take any more (see cli.run)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        """True on every rank when any rank was asked to stop (a collective: all ranks must call it)."""
        flag = torch.tensor(float(self.flag), device=self.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag)
        return flag.item() > 0


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
