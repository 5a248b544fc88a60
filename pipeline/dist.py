"""Process set-up shared by every stage (single process, or many through `accelerate launch`)."""

from __future__ import annotations

import os
import signal
import uuid
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from pipeline import artifacts, cli, plans
from pipeline.engine import PROCESS_GROUP_TIMEOUT, check_supported, launched
from pipeline.errors import ConfigError, RecipeChanged, StageBusy, UserError


def process_state(timeout: timedelta = PROCESS_GROUP_TIMEOUT) -> PartialState:
    """The accelerate process state, distributed over gloo when launched on CPUs.

    Without `cpu=True`, accelerate treats N CPU processes as N independent single-process runs
    (no gradient sync, every rank writing files). TrainingArguments re-creates the state from
    ACCELERATE_USE_CPU, so that is set too. The process group is created here, so its timeout
    (pipeline.engine.PROCESS_GROUP_TIMEOUT) is set here.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
        return PartialState(cpu=True, timeout=timeout)
    return PartialState(timeout=timeout)


def check_shared(state: PartialState, run_dir: Path) -> None:
    """Multi-node runs need one run directory seen by every rank (a shared filesystem): the main
    process writes a token there and every rank must read it back."""
    if state.num_processes == 1:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    token_file = run_dir / ".shared-check"
    token = [uuid.uuid4().hex if state.is_main_process else None]
    if state.is_main_process:
        token_file.write_text(token[0])
    broadcast_object_list(token)
    seen = token_file.is_file() and token_file.read_text() == token[0]
    everyone = [None] * state.num_processes
    torch.distributed.all_gather_object(everyone, seen)
    state.wait_for_everyone()
    if state.is_main_process:
        token_file.unlink(missing_ok=True)
    if not all(everyone):
        missing = [rank for rank, ok in enumerate(everyone) if not ok]
        raise ConfigError(
            f"ranks {missing} do not see the run directory {run_dir} of rank 0: multi-node runs need "
            f"runs_dir on a filesystem shared by every node"
        )


def on_main(state: PartialState, action, refusal: type[Exception]) -> None:
    """`action()` on the main process only; if it raises `refusal`, every process raises it, with its
    line; if it raises anything else, the main process raises that and the others stop too (none is
    left waiting for the main process in a collective)."""
    said, failure = [None], None  # said: (refused?, line)
    if state.is_main_process:
        try:
            action()
        except refusal as e:
            said[0] = (True, str(e))
        except Exception as e:
            failure, said[0] = e, (False, f"the main process failed ({type(e).__name__}: {e})")
    if state.num_processes > 1:
        broadcast_object_list(said)
    if failure is not None:
        raise failure
    if said[0] is not None:
        refused, line = said[0]
        raise (refusal if refused else UserError)(line)


def lock(state: PartialState, run_dir: Path, stage: str) -> None:
    """The main process takes the stage's lock (artifacts.lock_stage); if it is held, every rank stops."""
    on_main(state, lambda: artifacts.lock_stage(run_dir, stage), StageBusy)


def open_stage(name: str, doc: str, argv: list[str] | None, resume: bool = False):
    """The start every stage shares: its recipe, the process state, its plan (what it builds from
    what, pipeline/plans.py) and its work directory, which is None when the artifact is up to date.

    `resume`: the stage checkpoints, and an interrupted run's work directory is resumed, moved aside
    or refused as artifacts.StageDir.begin says (`--force`: moved aside; `--resume`: resumed across any
    recipe change). The main process prepares it; a refusal stops every process with its line."""
    recipe, args = cli.parse(doc.splitlines()[0], argv)
    if args.force and args.resume:
        raise ConfigError("FORCE=1 starts over and RESUME=1 goes on from the last checkpoint: give one of them")
    check_supported(launched(), quantized=str(getattr(getattr(recipe, name, None), "finetune", "")).startswith("qlora"))
    artifacts.check_writable(recipe.run_dir)
    # a process scoring its batch may keep the others waiting in the next collective for as long as its
    # reward functions and servers may take: the process group waits at least that long, and 10 minutes more
    scoring = timedelta(seconds=recipe.ppo.scoring_deadline_s + 600) if name == "ppo" else timedelta(0)
    state = process_state(max(PROCESS_GROUP_TIMEOUT, scoring))
    check_shared(state, recipe.run_dir)
    lock(state, recipe.run_dir, name)
    plan = plans.PLANS[name](recipe)
    if not args.force and plan.stage.is_current(plan.fingerprint):  # forced: a corrupt manifest is not even read
        state.print(f"{name}: {plan.stage.final} is up to date (FORCE=1 to re-run)")
        artifacts.release_locks()
        return recipe, state, plan, None
    policy = artifacts.Resume(plan.safe, changed=args.resume, force=args.force) if resume else None
    on_main(state, lambda: plan.stage.begin(plan.fingerprint, plan.record, policy), RecipeChanged)
    state.wait_for_everyone()
    return recipe, state, plan, plan.stage.partial


class StopRequest:
    """Ctrl-C / SIGTERM set a flag; the training loop asks at the end of each step (PPO: minibatch)
    whether any rank got one, all ranks together, so that all of them save and stop at the same point."""

    def __init__(self, device):
        self.device, self.flag = device, False
        self.previous = {sig: signal.signal(sig, self._set) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _set(self, *_):
        self.flag = True

    def restore(self):
        """After training: a stop request has no checkpoint to take any more (see process.run)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        """True on every rank when any rank was asked to stop (a collective: all ranks must call it)."""
        flag = torch.tensor(float(self.flag), device=self.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag)
        return flag.item() > 0
