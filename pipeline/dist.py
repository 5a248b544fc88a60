"""Process set-up shared by every stage (single process, or many through `accelerate launch`)."""

from __future__ import annotations

import os

import torch
from accelerate import PartialState


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
