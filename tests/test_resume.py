"""Crashes lose nothing: every stage resumes from its last checkpoint when run again with the same
recipe, and a resumed PPO run is the run that was never stopped."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import stages.ppo
from pipeline.artifacts import read_manifest
from pipeline.errors import RecipeChanged
from tests.conftest import REPO, ppo_args, read_jsonl, rm_args, sft_args

pytestmark = pytest.mark.e2e  # whole stages, several processes

# what differs between two runs of the same recipe on the same machine: wall-clock time and memory
TIMING = ("time/", "episodes_per_s", "tokens_per_s", "peak_memory_mb")


def crash_in_iteration(iteration: int, args: list[str], monkeypatch) -> None:
    """Run the RL stage with `args` until its update of `iteration` raises, as a crash would."""
    real_update = stages.ppo.update

    def crashing(exp, model, optimizer, scheduler, acc, cfg, where, stop):
        if where == f"iteration {iteration}":
            raise RuntimeError("simulated crash")
        return real_update(exp, model, optimizer, scheduler, acc, cfg, where, stop)

    monkeypatch.setattr(stages.ppo, "update", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        stages.ppo.main(args)
    monkeypatch.setattr(stages.ppo, "update", real_update)


def deterministic(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if not k.startswith(TIMING)} for h in history]


def start(script: str, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, f"stages/{script}.py", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    """SIGKILL `proc` as soon as `ready()` holds (no chance to save anything)."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"finished before it could be killed:\n{proc.communicate()[0][-3000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_a_resumed_ppo_run_gives_the_metrics_of_the_uninterrupted_one(runs_with_rm, tmp_path, monkeypatch, capsys):
    """Same seed, same recipe, one process, same threads: a run that crashes in iteration 3 (after the
    checkpoint of iteration 2) and is run again logs exactly what the uninterrupted run logs:
    iterations 1-2 show the run is deterministic, 3-6 that resuming restores model, optimiser,
    schedule, KL controller and RNG states. Samples too."""
    other = tmp_path / "uninterrupted"
    for stage in ("sft", "rm"):
        shutil.copytree(runs_with_rm / "demo" / stage, other / "demo" / stage)
    stages.ppo.main(ppo_args(other))
    expected = read_jsonl(other / "demo" / "ppo" / "metrics.jsonl")

    crash_in_iteration(3, ppo_args(runs_with_rm), monkeypatch)
    capsys.readouterr()
    stages.ppo.main(ppo_args(runs_with_rm))
    assert "resuming from the checkpoint at iteration 2/6" in capsys.readouterr().out

    resumed = read_jsonl(runs_with_rm / "demo" / "ppo" / "metrics.jsonl")
    assert [h["iteration"] for h in resumed] == [1, 2, 3, 4, 5, 6]
    assert deterministic(resumed) == deterministic(expected)
    assert read_jsonl(runs_with_rm / "demo" / "ppo" / "samples.jsonl") == read_jsonl(
        other / "demo" / "ppo" / "samples.jsonl"
    )


def test_ppo_killed_before_its_first_checkpoint_starts_over_with_clean_logs(runs_with_rm):
    """The old run's metrics and samples lines are dropped: the artifact logs each iteration once."""
    args = ppo_args(runs_with_rm, "ppo.save_every=100", "ppo.sample_every=1")
    metrics = runs_with_rm / "demo" / "ppo.partial" / "metrics.jsonl"
    kill_when(start("ppo", args), lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2)
    rerun = start("ppo", args)
    output = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, output[-3000:]
    assert "resuming" not in output
    out = runs_with_rm / "demo" / "ppo"
    assert [h["iteration"] for h in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert read_manifest(out)["metrics"]["iterations"] == 6
    samples = [s["iteration"] for s in read_jsonl(out / "samples.jsonl")]
    assert samples == sorted(samples) and all(samples.count(i) == 4 for i in range(1, 7))


def test_ppo_killed_after_a_checkpoint_resumes_from_it(runs_with_rm):
    args = ppo_args(runs_with_rm, "ppo.sample_every=1")  # checkpoint every 2 iterations
    state = runs_with_rm / "demo" / "ppo.partial" / "checkpoint" / "ppo_state.json"
    kill_when(start("ppo", args), state.is_file)
    iteration = json.loads(state.read_text())["iteration"]
    # as a kill between save_checkpoint's two renames leaves it: the new one complete under its tmp name
    state.parent.rename(state.parent.with_name("checkpoint.tmp"))
    rerun = start("ppo", args)
    output = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, output[-3000:]
    assert f"resuming from the checkpoint at iteration {iteration}/6" in output
    out = runs_with_rm / "demo" / "ppo"
    assert [h["iteration"] for h in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    samples = [s["iteration"] for s in read_jsonl(out / "samples.jsonl")]
    assert samples == sorted(samples) and all(samples.count(i) == 4 for i in range(1, 7))
    assert not (out / "checkpoint").exists() and not os.path.exists(str(out) + ".partial")


def trainer_run(stage: str, runs, base_model, *extra: str) -> list[str]:
    """A quick SFT (~100 steps) or RM (~60 steps) run, logging every 2 steps."""
    if stage == "sft":
        return sft_args(runs, base_model, *extra)
    return rm_args(runs, "rm.dataset.limit=1000", "rm.trainer.num_train_epochs=2", "rm.trainer.logging_steps=2", *extra)


def complete_checkpoints(out) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in out.glob("checkpoints/checkpoint-*/trainer_state.json"))


def check_trainer_artifact(stage: str, out) -> None:
    """Complete, loadable, no checkpoints inside, and every logged step once."""
    manifest = read_manifest(out)
    assert manifest is not None and not (out / "checkpoints").exists()
    history = read_jsonl(out / "metrics.jsonl")
    steps = [h["step"] for h in history if "loss" in h]
    assert steps == sorted(set(steps)) and steps, steps
    evals = [h["step"] for h in history if "eval_loss" in h][:-1]  # the last: the evaluation after training
    assert evals == sorted(set(evals)), evals
    assert len([h for h in history if "train_runtime" in h]) == 1  # an interrupted run's summary is dropped
    model_class = AutoModelForCausalLM if stage == "sft" else AutoModelForSequenceClassification
    model_class.from_pretrained(out)
    if stage == "sft":
        metrics = manifest["metrics"]
        assert metrics["eval_loss_after"] < metrics["eval_loss_before"]  # the loss before: from the first run


@pytest.mark.parametrize("stage", ["sft", "rm"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_trainer_stage_killed_resumes_from_its_last_checkpoint(stage, when, runs_with_sft, base_model):
    """SIGKILL before the first checkpoint: the re-run starts at step 0 with clean logs; after one:
    the re-run resumes from the latest complete checkpoint and says so."""
    args = trainer_run(
        stage, runs_with_sft, base_model, f"{stage}.trainer.save_steps={10 if when == 'after' else 1000}"
    )
    partial = runs_with_sft / "demo" / f"{stage}.partial"
    metrics = partial / "metrics.jsonl"
    if stage == "sft":
        shutil.rmtree(runs_with_sft / "demo" / "sft")  # the SFT stage itself is under test
    if when == "after":
        ready = lambda: complete_checkpoints(partial)  # noqa: E731
    else:
        ready = lambda: metrics.is_file() and '"loss"' in metrics.read_text()  # noqa: E731
    kill_when(start(stage, args), ready)
    saved = complete_checkpoints(partial)
    assert bool(saved) == (when == "after")
    rerun = start(stage, args)
    output = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, output[-3000:]
    if saved:
        assert f"{stage}: resuming from the checkpoint at step {saved[-1]}" in output
    else:
        assert "resuming" not in output
    check_trainer_artifact(stage, runs_with_sft / "demo" / stage)


def test_ctrl_c_during_sft_saves_a_checkpoint_and_the_rerun_resumes_there(tmp_path, base_model):
    args = sft_args(tmp_path, base_model)  # checkpoints only every 500 steps: Ctrl-C makes one
    metrics = tmp_path / "demo" / "sft.partial" / "metrics.jsonl"
    proc = start("sft", args)
    deadline = time.time() + 300
    while not (metrics.is_file() and '"loss"' in metrics.read_text()):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output[-3000:]
    step = int(re.search(r"sft: interrupted; checkpoint saved at step (\d+)\. Run `make sft` again", output)[1])
    assert complete_checkpoints(tmp_path / "demo" / "sft.partial") == [step] and "Traceback" not in output
    rerun = start("sft", args)
    output = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0 and f"sft: resuming from the checkpoint at step {step}" in output
    check_trainer_artifact("sft", tmp_path / "demo" / "sft")


def test_a_changed_recipe_never_costs_a_trainer_stage_its_checkpoints(runs_with_sft, capsys):
    """A killed RM run's checkpoints survive a re-run with another learning rate (refused in one line:
    RESUME=1 or FORCE=1), and a re-run that changes only how often it logs resumes from them."""
    from stages import rm

    partial = runs_with_sft / "demo" / "rm.partial"
    args = trainer_run("rm", runs_with_sft, None, "rm.trainer.save_steps=10")
    kill_when(start("rm", args), lambda: complete_checkpoints(partial))
    saved = complete_checkpoints(partial)[-1]
    with pytest.raises(
        RecipeChanged,
        match=r"^rm: the recipe changed since the interrupted run's last checkpoint "
        r"\(rm.trainer.learning_rate 0.001 -> 0.0001\): `make rm RESUME=1`",
    ):
        rm.main([*args, "rm.trainer.learning_rate=1e-4"])
    assert complete_checkpoints(partial)[-1] == saved
    capsys.readouterr()
    rm.main([*args, "rm.trainer.logging_steps=4"])
    out = capsys.readouterr().out
    assert "rm: resuming across recipe changes that do not alter the run: rm.trainer.logging_steps 2 -> 4" in out
    assert f"rm: resuming from the checkpoint at step {saved}" in out
    check_trainer_artifact("rm", runs_with_sft / "demo" / "rm")
    steps = [h["step"] for h in read_jsonl(runs_with_sft / "demo" / "rm" / "metrics.jsonl") if "loss" in h]
    assert [s for s in steps if s <= saved] == list(range(2, saved + 1, 2))  # the old run's, every 2 steps
    assert all(s % 4 == 0 for s in steps if s > saved)  # the resumed run's, every 4
