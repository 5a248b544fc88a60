"""Test-only: run a stage script with faults planted or its engine-side state reported, in each process.

    accelerate launch ... tests/probe.py [--nan-on-rank R] [--slow-exit-on-rank R] [--busy-gloo-at-exit-on-rank R]
        [--abort-at-exit-on-rank R] [--stop-after N] [--report DIR]
        stages/ppo.py ARGS
    accelerate launch ... tests/engines.py zero3 tests/probe.py --report DIR stages/sft.py ARGS

--nan-on-rank R   the value loss is NaN on process R only, from its first optimiser step (a fault the
                  other processes do not see)
--slow-exit-on-rank R
                  process R takes 3 s more to exit, in its atexit handlers, after its stage has returned
                  or failed (as flushing and libraries' exit hooks can on a busy machine), with SIGTERM's
                  default action (a kill) unless the process ignores it
--busy-gloo-at-exit-on-rank R
                  when process R's stage has failed (its locks are released), an all-reduce the other
                  processes never join is left in gloo's worker thread, which holds its tensor until the
                  others have exited: a worker that has not yet let go of the last collective's tensor
                  when the process group is torn down, as on a busy machine (tearing it down joins that
                  thread with the GIL held, and the thread needs the GIL to let go: a deadlock)
--abort-at-exit-on-rank R
                  process R aborts (SIGABRT) in the interpreter's shutdown, after its stage has succeeded
--stop-after N    every process asks its stage to stop (as Ctrl-C does) once PPO iteration N / Trainer
                  step N is done: the stage saves a checkpoint there and exits 130
--report DIR      DIR/rank<R>.jsonl gets a line for each model `from_pretrained` loads (is it partitioned
                  over the processes: ZeRO-3's zero.Init), for each PPO rollout (which of the policy's and
                  the value network's parameters are whole while the policy generates, and whether decoding
                  was asked to be synced over the processes), and one at exit naming which of the
                  libraries only some runs need (peft, bitsandbytes, deepspeed, matplotlib, trl) were imported
                  and whether the process group is still up
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import runpy
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

parser = argparse.ArgumentParser()
parser.add_argument("--nan-on-rank")
parser.add_argument("--slow-exit-on-rank")
parser.add_argument("--busy-gloo-at-exit-on-rank")
parser.add_argument("--abort-at-exit-on-rank")
parser.add_argument("--stop-after", type=int)
parser.add_argument("--report", type=Path)
args, rest = parser.parse_known_args()
rank = os.environ.get("RANK", "0")


def report(**row) -> None:
    args.report.mkdir(parents=True, exist_ok=True)
    with open(args.report / f"rank{rank}.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def whole(p: torch.Tensor) -> bool:
    """The parameter's full values are on this process: not an empty ZeRO-3 shard, not an FSDP2
    DTensor shard."""
    from torch.distributed.tensor import DTensor

    return not isinstance(p, DTensor) and p.numel() == getattr(p, "ds_numel", p.numel())


if args.nan_on_rank == rank:
    import pipeline.rl.iteration

    real_value_loss = pipeline.rl.iteration.value_loss
    pipeline.rl.iteration.value_loss = lambda *a: (torch.tensor(float("nan")), real_value_loss(*a)[1])


def slow_exit():
    """Sleeps with SIGTERM's default action (a kill), as a process whose stage restored its own
    handler on the way out has it, unless the process ignores SIGTERM."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(3)


if args.slow_exit_on_rank == rank:
    atexit.register(slow_exit)  # before the stage's own handlers: run after them (last in, first out)


if args.busy_gloo_at_exit_on_rank == rank:
    import pipeline.artifacts

    real_release_locks = pipeline.artifacts.release_locks

    def release_locks():
        real_release_locks()
        torch.distributed.all_reduce(torch.ones(1), async_op=True)  # neither the work nor the tensor is kept here

    pipeline.artifacts.release_locks = release_locks


class AbortAtExit:
    """Aborts the process when the interpreter clears this module, as a C++ object destroyed in the
    teardown can (gloo: "terminate called without an active exception")."""

    def __del__(self, abort=os.abort):
        abort()


if args.abort_at_exit_on_rank == rank:
    abort_at_exit = AbortAtExit()

if args.stop_after is not None:
    from pipeline.rl.run_state import PPORun
    from pipeline.trainer_stage import StopOnSignal

    real_log, real_step_end = PPORun.log, StopOnSignal.on_step_end

    def log(self, iteration, *a, **kw):
        real_log(self, iteration, *a, **kw)
        if iteration == args.stop_after:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_step_end(self, targs, state, control, **kw):
        if state.global_step == args.stop_after:
            self.request.flag = True
        return real_step_end(self, targs, state, control, **kw)

    PPORun.log, StopOnSignal.on_step_end = log, on_step_end

if args.report is not None:
    from transformers import modeling_utils

    OPTIONAL = ("peft", "bitsandbytes", "deepspeed", "matplotlib", "trl")
    atexit.register(
        lambda: report(
            event="exit",
            imported=[m for m in OPTIONAL if m in sys.modules],
            process_group_up=torch.distributed.is_initialized(),
        )
    )

    import pipeline.engine

    real_load = modeling_utils.PreTrainedModel.from_pretrained.__func__

    def from_pretrained(cls, *a, **kw):
        model = real_load(cls, *a, **kw)
        report(event="load", cls=cls.__name__, partitioned=not all(whole(p) for p in model.parameters()))
        return model

    modeling_utils.PreTrainedModel.from_pretrained = classmethod(from_pretrained)
    real_for_generation = pipeline.engine.for_generation

    @contextmanager
    def for_generation(model, acc):
        with real_for_generation(model, acc) as unwrapped:
            value = unwrapped.value_model
            report(
                event="generate",
                policy_whole=all(whole(p) for p in unwrapped.policy.parameters()),
                value_whole=None if value is None else [whole(p) for p in value.parameters()],
            )
            yield unwrapped

    pipeline.engine.for_generation = for_generation
    from transformers.generation.utils import GenerationMixin

    real_generate = GenerationMixin.generate

    def generate(self, *a, **kw):  # what decoding was asked for: synced (every rank as long as the slowest)?
        report(event="decode", synced_gpus=kw.get("synced_gpus"))
        return real_generate(self, *a, **kw)

    GenerationMixin.generate = generate

sys.argv = rest
runpy.run_path(rest[0], run_name="__main__")
