"""A long run's rewards, end to end: a reward that fails mid-run loses no finished iteration, fixing it
deletes no checkpoint, functions written for trl run unchanged in the stage, a failing judge leaves
training going, and a hung function stops every process together."""

from __future__ import annotations

import json
import shutil

import pytest

import stages.ppo
from pipeline.artifacts import read_manifest
from pipeline.demo import gold_reward
from pipeline.errors import ConfigError, IterationFailed, RecipeChanged
from pipeline.rl.run_state import AFTER_EDITS
from tests.conftest import REPO, launch, ppo_args, read_jsonl
from tests.test_resume import deterministic
from tests.test_reward_server import fake_server, reply

pytestmark = pytest.mark.e2e  # whole stages, several processes

# GRPO on a reward source of the test's, no reward model: 6 iterations of 32 rollouts, 8 optimiser
# steps each (trainer_state.global_step 0, 8, 16, ... when an iteration is scored)
GRPO = ["ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=4", "ppo.kl_in=loss", "ppo.judges=[]"]


def grpo_args(runs, rewards: str, *extra: str) -> list[str]:
    return ppo_args(runs, *GRPO, f"ppo.rewards={rewards}", *extra)


def checkpoint_iteration(runs) -> int:
    return json.loads((runs / "demo" / "ppo.partial" / "checkpoint" / "ppo_state.json").read_text())["iteration"]


def test_a_reward_server_failing_mid_run_keeps_the_finished_iterations_and_the_run_resumes_exactly(
    runs_with_sft, tmp_path, capsys
):
    """The server answers 500 from the 3rd request (iteration 3 of 6) on, with save_every 100: the run
    saves iteration 2 before it stops; once the server is fixed, the same command goes on from
    iteration 2 and logs exactly what a run that never failed logs."""
    broken = {"from": 3}

    def gold(handler, body, calls):
        if len(calls) >= broken["from"]:
            reply(handler, 500, {"detail": "out of memory"})
        else:
            reply(handler, 200, {"rewards": gold_reward(body["prompts"], body["completions"])})

    uninterrupted = tmp_path / "uninterrupted"
    shutil.copytree(runs_with_sft / "demo" / "sft", uninterrupted / "demo" / "sft")
    with fake_server(gold) as (url, calls):
        rewards = f"[{{url: '{url}', timeout_s: 2}}]"
        broken["from"] = 10**9
        stages.ppo.main(grpo_args(uninterrupted, rewards, "ppo.save_every=100"))
        expected = read_jsonl(uninterrupted / "demo" / "ppo" / "metrics.jsonl")

        calls.clear()
        broken["from"] = 3
        with pytest.raises(IterationFailed) as e:
            stages.ppo.main(grpo_args(runs_with_sft, rewards, "ppo.save_every=100"))
        assert str(e.value).startswith(f"ppo: iteration 3 failed (reward server {url} failed ")
        assert str(e.value).endswith(
            '(last: HTTP 500: {"detail": "out of memory"}): see the server\'s log); saved '
            "a checkpoint at iteration 2/6: fix the cause and run again to go on from it" + AFTER_EDITS
        )
        assert checkpoint_iteration(runs_with_sft) == 2

        broken["from"] = 10**9  # fixed
        capsys.readouterr()
        stages.ppo.main(grpo_args(runs_with_sft, rewards, "ppo.save_every=100"))
    assert "resuming from the checkpoint at iteration 2/6" in capsys.readouterr().out
    resumed = read_jsonl(runs_with_sft / "demo" / "ppo" / "metrics.jsonl")
    assert [h["iteration"] for h in resumed] == [1, 2, 3, 4, 5, 6]
    assert deterministic(resumed) == deterministic(expected)


HANGS_AT_ITERATION_3 = """
import os
import time

def reward(completions, trainer_state, **kwargs):
    if trainer_state.global_step >= 16 and os.path.exists({marker!r}):  # iteration 3, until the marker goes
        time.sleep(600)
    return [{scale} * len(c[-1]["content"].split()) for c in completions]
"""


def test_fixing_a_reward_after_it_failed_never_deletes_the_checkpoints(runs_with_sft, tmp_path, capsys):
    """A function hangs in iteration 3 and is stopped by its timeout (iteration 2 is saved). Then:
    editing its code is refused in one line naming the change, the checkpoint intact; RESUME=1 goes
    on from it under the new code; a changed timeout_s alone resumes, naming the key; FORCE=1 starts
    over with the old checkpoints moved aside."""
    marker, rewards_file = tmp_path / "hang", tmp_path / "lengths.py"
    marker.write_text("")
    rewards_file.write_text(HANGS_AT_ITERATION_3.format(marker=str(marker), scale=1.0))
    args = lambda timeout: grpo_args(
        runs_with_sft,
        f"[{{function: '{rewards_file}:reward', timeout_s: {timeout}}}]",  # noqa: E731
        "ppo.save_every=100",
    )
    who = f"reward function '{rewards_file}:reward'"

    with pytest.raises(IterationFailed) as e:
        stages.ppo.main(args(1))
    assert str(e.value) == (
        f"ppo: iteration 3 failed ({who} did not return within timeout_s = 1 s: make it faster, "
        f"or raise its timeout_s); saved a checkpoint at iteration 2/6: fix the cause and run again "
        f"to go on from it{AFTER_EDITS}"
    )
    assert checkpoint_iteration(runs_with_sft) == 2

    rewards_file.write_text(HANGS_AT_ITERATION_3.format(marker=str(marker), scale=2.0))  # the fix
    with pytest.raises(RecipeChanged) as e:
        stages.ppo.main(args(1))
    assert str(e.value) == (
        "ppo: the recipe changed since the interrupted run's last checkpoint (the code of "
        "ppo.rewards 'reward'): `make ppo RESUME=1` (--resume) goes on from that checkpoint under "
        "the new recipe; `make ppo FORCE=1` starts over, moving the checkpoints aside"
    )
    assert checkpoint_iteration(runs_with_sft) == 2

    capsys.readouterr()
    with pytest.raises(IterationFailed, match=r"its checkpoint at iteration 2/6 is kept"):
        stages.ppo.main(args(1.5) + ["--resume"])
    out = capsys.readouterr().out
    assert (
        "ppo: resuming under the changed recipe, as asked (RESUME=1): ppo.rewards[0].timeout_s 1.0 -> 1.5, the "
        "code of ppo.rewards 'reward'"
    ) in out and "resuming from the checkpoint at iteration 2/6" in out

    with pytest.raises(IterationFailed, match="timeout_s = 2 s"):
        stages.ppo.main(args(2))
    out = capsys.readouterr().out
    assert "ppo: resuming across recipe changes that do not alter the run: ppo.rewards[0].timeout_s 1.5 -> 2.0" in out
    assert "resuming from the checkpoint at iteration 2/6" in out

    with pytest.raises(
        ConfigError, match="FORCE=1 starts over and RESUME=1 goes on from the last checkpoint: give one"
    ):
        stages.ppo.main(args(2) + ["--force", "--resume"])
    with pytest.raises(IterationFailed, match="saved a checkpoint at iteration 2/6"):
        stages.ppo.main(args(2) + ["--force"])
    aside = [d for d in (runs_with_sft / "demo").iterdir() if d.name.startswith("ppo.set-aside-")]
    assert len(aside) == 1 and f"checkpoints were moved to {aside[0]}" in capsys.readouterr().out
    assert json.loads((aside[0] / "checkpoint" / "ppo_state.json").read_text())["iteration"] == 2


TRL_FUNCTIONS = '''
import asyncio
import re

def keyword(completions, solution, trainer_state, log_metric, log_extra, **kwargs):
    """Accuracy on the dataset's `solution` column as bools, with trl's logging and a curriculum."""
    texts = [c[-1]["content"] for c in completions]
    hits = [s in t for t, s in zip(texts, solution)]
    log_metric("hit_share", sum(hits) / len(hits))
    log_metric("global_step", trainer_state.global_step)
    log_extra("hit", hits)
    return hits

def formatted(completions, **kwargs):  # NaN: no reward, as None
    return [1.0 if re.search(r"[.!?]$", c[-1]["content"]) else float("nan") for c in completions]

limit = asyncio.Semaphore(2)

async def polite(completions, **kwargs):
    async def one(c):
        async with limit:
            await asyncio.sleep(0.001)
            return 0.5 if "great" in c[-1]["content"] else 0.0
    return list(await asyncio.gather(*(one(c) for c in completions)))

def flaky_judge(completions, trainer_state, **kwargs):
    if trainer_state.global_step == 8:
        raise ConnectionError("judge service down")
    return [float(len(c[-1]["content"])) for c in completions]
'''


def test_functions_written_for_trl_train_in_the_stage_and_a_failing_judge_does_not_stop_it(
    runs_with_sft, tmp_path, capsys
):
    prompts = tmp_path / "prompts.jsonl"
    demo_prompts = (REPO / "data/demo/prompts_train.jsonl").read_text().splitlines()
    prompts.write_text("".join(json.dumps({**json.loads(line), "solution": "great"}) + "\n" for line in demo_prompts))
    (tmp_path / "trl_style.py").write_text(TRL_FUNCTIONS)
    f = f"{tmp_path}/trl_style.py"
    rewards = f"[{{function: '{f}:keyword'}}, {{function: '{f}:formatted'}}, {{function: '{f}:polite'}}]"
    settings = [
        f"ppo.prompts={prompts}",
        "ppo.total_episodes=96",
        "ppo.sample_every=1",
        f"ppo.judges=[{{function: '{f}:flaky_judge'}}]",
    ]
    clashing = f"[{{function: '{f}:keyword', kwargs: {{solution: x}}}}]"  # hides the dataset's column
    with pytest.raises(ConfigError, match=r"ppo.rewards 'keyword': kwargs \['solution'\] are also columns"):
        stages.ppo.main(grpo_args(runs_with_sft, clashing, *settings))

    capsys.readouterr()
    stages.ppo.main(grpo_args(runs_with_sft, rewards, *settings))
    out = runs_with_sft / "demo" / "ppo"
    assert read_manifest(out) is not None  # the run finished
    history = read_jsonl(out / "metrics.jsonl")
    assert [h["rewards/keyword/global_step"] for h in history] == [0.0, 8.0, 16.0]
    assert all(0 <= h["loss/kl_clamped"] <= 1 for h in history)  # (GRPO's KL in the loss: the clamped share)
    assert all(0 <= h["rewards/keyword/hit_share"] <= 1 for h in history)
    assert [h["judges/flaky_judge"] is None for h in history] == [False, True, True]  # failed, then rested
    err = capsys.readouterr().err
    assert (
        f"warning: reward function '{f}:flaky_judge' raised ConnectionError: judge service down (a judge: its "
        f"score is NaN for this batch and the next 1; training goes on)"
    ) in err
    samples = read_jsonl(out / "samples.jsonl")
    assert samples and all(row["extra"]["hit"] == ("great" in row["response"]) for row in samples)
    assert all(row["rewards"]["keyword"] == float(row["extra"]["hit"]) for row in samples)


RANK_1_HANGS = """
import os
import time

def reward(completions, trainer_state, **kwargs):
    if os.environ.get("RANK") == "1" and trainer_state.global_step >= 8:  # iteration 2, process 1 only
        time.sleep(600)
    return [float(len(c[-1]["content"].split())) for c in completions]
"""


def test_a_function_hung_on_one_process_stops_every_process_together(runs_with_sft, tmp_path):
    """Process 1's function hangs in iteration 2: its timeout stops it, both processes save iteration 1
    and stop, and process 0 says what happened on process 1, in one line."""
    (tmp_path / "rank_hangs.py").write_text(RANK_1_HANGS)
    run = launch(
        2,
        "stages/ppo.py",
        *grpo_args(
            runs_with_sft, f"[{{function: '{tmp_path}/rank_hangs.py:reward', timeout_s: 3}}]", "ppo.total_episodes=256"
        ),
        expect=1,
    )
    lines = run.stderr.strip().splitlines()
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert lines[-1] == (
        f"error: ppo: iteration 2 failed on process 1 (reward function '{tmp_path}/rank_hangs.py:reward' "
        f"did not return within timeout_s = 3 s: make it faster, or raise its timeout_s); saved a "
        f"checkpoint at iteration 1/4: fix the cause and run again to go on from it{AFTER_EDITS}"
    ), lines[-3:]
    assert checkpoint_iteration(runs_with_sft) == 1
