"""N processes behave as one process with N times the batch, and an optimiser step's gradient does
not depend on how its mini-batch is cut into micro-batches: batch-wide whitening and a loss normalised
by the whole mini-batch's token (or sequence) count, for every estimator, aggregation and place of the
KL (tests/split_invariance.py runs one step of each)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, launch

pytestmark = pytest.mark.e2e  # whole stages, several processes

SPLITS = {
    "one process, no accumulation": (1, 1),
    "one process, 4 micro-batches": (1, 4),
    "two processes": (2, 1),
    "two processes, 2 micro-batches each": (2, 2),
}


@pytest.fixture(scope="module")
def steps(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("split_invariance")
    for processes, accumulation in SPLITS.values():
        folder = str(out / f"{processes}x{accumulation}")
        if processes == 1:
            run = subprocess.run(
                [sys.executable, "tests/split_invariance.py", folder, str(accumulation)],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=600,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            assert run.returncode == 0, run.stderr[-3000:]
        else:
            launch(processes, "tests/split_invariance.py", folder, str(accumulation))
    return {name: out / f"{p}x{a}" for name, (p, a) in SPLITS.items()}


def test_a_step_is_the_same_however_its_batch_is_split(steps):
    reference = steps["one process, no accumulation"]
    combos = sorted(f.name for f in reference.iterdir())
    assert len(combos) == 7 * 3 * 2
    differ = []
    for combo in combos:
        want = torch.load(reference / combo)
        moved = max((want["after"][k] - want["before"][k]).abs().max().item() for k in want["after"])
        assert moved > 1e-3, f"{combo}: the step did not move the parameters"
        # the scale every split shares: autograd on the whole batch's losses, each its own mean
        gap = max((want["after"][k] - want["expected"][k]).abs().max().item() for k in want["expected"])
        if gap > 1e-5 * moved:
            differ.append(f"{combo}: off the whole batch's autograd step by {gap:.2e} (the step moved {moved:.2e})")
        for split, folder in steps.items():
            got = torch.load(folder / combo)
            gap = max((got["after"][k] - want["after"][k]).abs().max().item() for k in want["after"])
            if gap > 1e-5 * moved:
                differ.append(f"{combo} {split}: off by {gap:.2e} (the step moved {moved:.2e})")
    assert not differ, "\n".join(differ)
