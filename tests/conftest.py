"""Shared fixtures: a tiny base model built once per session, and recipe overrides for tmp runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from stages import base

REPO = Path(__file__).resolve().parent.parent
DEMO_RECIPE = str(REPO / "stages/recipes/demo.yaml")


@pytest.fixture(scope="session")
def base_model(tmp_path_factory) -> Path:
    """A smaller cousin of the demo base model (same tokenizer recipe), built in seconds."""
    out = tmp_path_factory.mktemp("models") / "base"
    base.main(["--recipe", DEMO_RECIPE, f"base.output={out}", f"sft.model={out}",
               "base.hidden_size=64", "base.num_layers=2"])
    return out


def sft_args(runs_dir: Path, model: Path, *extra: str) -> list[str]:
    """A quick SFT run of the demo recipe into `runs_dir`."""
    return ["--recipe", DEMO_RECIPE, f"runs_dir={runs_dir}", f"sft.model={model}",
            "sft.dataset.limit=400", "sft.eval_dataset.limit=64", "sft.trainer.num_train_epochs=2",
            "sft.trainer.logging_steps=2", "sft.trainer.per_device_train_batch_size=8", *extra]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory, base_model) -> Path:
    """A runs directory holding a finished SFT artifact (run 'demo'), trained once per session."""
    from stages import sft
    runs = tmp_path_factory.mktemp("runs")
    sft.main(sft_args(runs, base_model, "sft.trainer.num_train_epochs=6", "sft.dataset.limit=2000",
             "sft.trainer.per_device_train_batch_size=32"))
    return runs


@pytest.fixture
def runs_with_sft(tmp_path, sft_run) -> Path:
    """A private copy of the session's SFT run, for a test to add later stages to."""
    shutil.copytree(sft_run / "demo" / "sft", tmp_path / "demo" / "sft")
    return tmp_path


def rm_args(runs_dir: Path, *extra: str) -> list[str]:
    return ["--recipe", DEMO_RECIPE, f"runs_dir={runs_dir}", "rm.dataset.limit=3000",
            "rm.eval_dataset.limit=200", "rm.trainer.num_train_epochs=2", "rm.reference_limit=64",
            "rm.trainer.logging_steps=5", *extra]


@pytest.fixture(scope="session")
def rm_run(tmp_path_factory, sft_run) -> Path:
    """A runs directory holding finished SFT and RM artifacts (run 'demo')."""
    from stages import rm
    runs = tmp_path_factory.mktemp("runs_rm")
    shutil.copytree(sft_run / "demo" / "sft", runs / "demo" / "sft")
    rm.main(rm_args(runs))
    return runs


@pytest.fixture
def runs_with_rm(tmp_path, rm_run) -> Path:
    for stage in ("sft", "rm"):
        shutil.copytree(rm_run / "demo" / stage, tmp_path / "demo" / stage)
    return tmp_path


def ppo_args(runs_dir: Path, *extra: str) -> list[str]:
    """A short PPO run: 6 iterations of 32 rollouts."""
    return ["--recipe", DEMO_RECIPE, f"runs_dir={runs_dir}", "ppo.total_episodes=192", "ppo.batch_size=32",
            "ppo.mini_batch_size=8", "ppo.ppo_epochs=2", "ppo.max_new_tokens=16", "ppo.save_every=2",
            "ppo.sample_every=2", *extra]
