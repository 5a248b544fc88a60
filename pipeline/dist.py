"""Process set-up shared by every stage (single process, or many through `accelerate launch`)."""

from __future__ import annotations

import os

import torch
from accelerate import PartialState

from pipeline import cli, plans


def process_state() -> PartialState:
    """The accelerate process state, distributed over gloo when launched on CPUs.

    Without `cpu=True`, accelerate treats N CPU processes as N independent single-process runs
    (no gradient sync, every rank writing files). TrainingArguments re-creates the state from
    ACCELERATE_USE_CPU, so that is set too.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
        return PartialState(cpu=True)
    return PartialState()


def open_stage(name: str, doc: str, argv: list[str] | None, resume: bool = False):
    """The start every stage shares: its recipe, the process state, its plan (what it builds from
    what, pipeline/plans.py) and its work directory, which is None when the artifact is up to date.
    `resume` keeps an interrupted run's partial directory with the same fingerprint (not with --force)."""
    recipe, args = cli.parse(doc.splitlines()[0], argv)
    state = process_state()
    plan = plans.PLANS[name](recipe)
    out = plan.stage.open(state, plan.fingerprint, args.force, keep_partial=resume and not args.force)
    return recipe, state, plan, out
