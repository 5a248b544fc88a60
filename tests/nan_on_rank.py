"""Test-only: run a stage script with the value loss NaN on one process (RANK given as the first
argument) from its first optimiser step: a fault the other processes do not see.

    accelerate launch --multi_gpu --num_processes 2 tests/nan_on_rank.py 1 stages/ppo.py ARGS
"""

from __future__ import annotations

import os
import runpy
import sys

import torch

import pipeline.rl.ppo

rank, script = sys.argv[1], sys.argv[2]
if os.environ.get("RANK") == rank:
    real = pipeline.rl.ppo.value_loss
    pipeline.rl.ppo.value_loss = lambda *a: (torch.tensor(float("nan")), real(*a)[1])
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
