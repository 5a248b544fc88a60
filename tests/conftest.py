"""Shared fixtures: a tiny base model built once per session, and recipe overrides for tmp runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stages import base

REPO = Path(__file__).resolve().parent.parent
# tests/gpu needs a CUDA GPU: `make test-gpu` runs it (with the bf16 and device tests), `make test` does not
collect_ignore = [] if os.environ.get("GPU_TESTS") else ["gpu"]
DEMO_RECIPE = str(REPO / "stages/recipes/demo.yaml")
# Fixtures that run whole stages: a test that uses one (directly or through another) is end-to-end
E2E_FIXTURES = {"sft_run", "agent_sft", "encoders", "steps", "sft_rm_ddp"}


def pytest_collection_modifyitems(items):
    """`e2e` (end-to-end: whole stages, several processes; `make test-fast` leaves them out) on every test
    that uses a stage-running fixture, besides those marked by hand."""
    for item in items:
        if E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


def base_overrides(out: Path) -> list[str]:
    """A smaller cousin of the demo base model (same tokenizer recipe), built in seconds."""
    return [f"base.output={out}", f"sft.model={out}", "base.hidden_size=64", "base.num_layers=2"]


@pytest.fixture(scope="session")
def base_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "base"
    base.main(["--recipe", DEMO_RECIPE, *base_overrides(out)])
    return out


def sft_overrides(runs_dir: Path, model: Path, *extra: str) -> list[str]:
    """A quick SFT run of the demo recipe into `runs_dir`."""
    return [
        f"runs_dir={runs_dir}",
        f"sft.model={model}",
        "sft.dataset.limit=400",
        "sft.eval_dataset.limit=64",
        "sft.trainer.num_train_epochs=2",
        "sft.trainer.logging_steps=2",
        "sft.trainer.per_device_train_batch_size=8",
        *extra,
    ]


def sft_args(runs_dir: Path, model: Path, *extra: str) -> list[str]:
    return ["--recipe", DEMO_RECIPE, *sft_overrides(runs_dir, model, *extra)]


# The session's shared SFT run (fixture sft_run): longer than the default quick run.
SFT_RUN = ["sft.trainer.num_train_epochs=6", "sft.dataset.limit=2000", "sft.trainer.per_device_train_batch_size=32"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory, base_model) -> Path:
    """A runs directory holding a finished SFT artifact (run 'demo'), trained once per session."""
    from stages import sft

    runs = tmp_path_factory.mktemp("runs")
    sft.main(sft_args(runs, base_model, *SFT_RUN))
    return runs


@pytest.fixture
def runs_with_sft(tmp_path, sft_run) -> Path:
    """A private copy of the session's SFT run, for a test to add later stages to."""
    shutil.copytree(sft_run / "demo" / "sft", tmp_path / "demo" / "sft")
    return tmp_path


RM_RUN = [
    "rm.dataset.limit=3000",
    "rm.eval_dataset.limit=200",
    "rm.trainer.num_train_epochs=2",
    "rm.reference_limit=64",
    "rm.trainer.logging_steps=5",
]


def rm_args(runs_dir: Path, *extra: str) -> list[str]:
    return ["--recipe", DEMO_RECIPE, f"runs_dir={runs_dir}", *RM_RUN, *extra]


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


# A short PPO run: 6 iterations of 32 rollouts.
PPO_RUN = [
    "ppo.total_episodes=192",
    "ppo.batch_size=32",
    "ppo.mini_batch_size=8",
    "ppo.ppo_epochs=2",
    "ppo.max_new_tokens=16",
    "ppo.save_every=2",
    "ppo.sample_every=2",
    "ppo.forward_batch_size=8",
]  # scoring in several forwards (the demo's 32 would be one), under every engine


def ppo_args(runs_dir: Path, *extra: str) -> list[str]:
    return ["--recipe", DEMO_RECIPE, f"runs_dir={runs_dir}", *PPO_RUN, *extra]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each stage runs in a process of its own in real use; in-process tests run many, with other
    precisions: accelerate's process-wide state is reset so one test's settings never leak."""
    from accelerate.state import AcceleratorState

    from pipeline import artifacts

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    artifacts.release_locks()  # a stage run in-process holds its lock until its process exits


def control_run(runs_dir: Path, scratch: Path, *args: str) -> list[dict]:
    """The same PPO run (`args` as for ppo_args) with a learning rate of ~0, next to the run's SFT (and
    RM) artifacts: what sampling noise alone does to the logged scores. Same seed, so the same first
    rollouts as the trained run."""
    from stages import ppo

    for stage in ("sft", "rm"):
        if (runs_dir / "demo" / stage).is_dir():
            shutil.copytree(runs_dir / "demo" / stage, scratch / "demo" / stage)
    ppo.main(ppo_args(scratch, *args, "ppo.learning_rate=1e-12"))
    return read_jsonl(scratch / "demo" / "ppo" / "metrics.jsonl")


def assert_learned(
    history: list[dict], control: list[dict], margin: float, key: str = "objective/rm_score_raw", last: int = 4
) -> None:
    """PPO raised the reward: over the last `last` iterations, the trained run's mean score beats the
    untrained control's by `margin` (a mean of 4 x 32 rollouts has a noise of ~0.2 on the demo)."""
    trained, untrained = (sum(h[key] for h in hs[-last:]) / last for hs in (history, control))
    assert trained > untrained + margin, f"{key}: trained {trained:.3f} vs untrained control {untrained:.3f}"


@pytest.fixture
def loaded_models(monkeypatch):
    """Every model `from_pretrained` loads during the test, as loaded (the stage then trains it in
    place: peft wraps its layers), to inspect what the stage really trained."""
    from transformers import modeling_utils

    seen = []
    real = modeling_utils.PreTrainedModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(real(cls, *args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(modeling_utils.PreTrainedModel, "from_pretrained", classmethod(spy))
    return seen


@pytest.fixture
def linear_output_dtypes():
    """The dtypes every nn.Linear forward produced during the test (bf16 under bf16 autocast)."""
    import torch

    seen = set()
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, output: seen.add(output.dtype) if isinstance(module, torch.nn.Linear) else None
    )
    yield seen
    handle.remove()


def quantized_layers(model) -> dict[str, int]:
    """How many of the model's linear layers are bitsandbytes 4-bit and 8-bit ones."""
    import bitsandbytes as bnb

    return {
        "4bit": sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()),
        "8bit": sum(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules()),
    }


def assert_scored_by(samples: list[dict], reward_model, key: str) -> None:
    """Each sample's logged score `key` is what the reward model gives its (prompt, response) through
    its own tokenizer, read directly from its directory (one pair at a time: no padding involved)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.scoring import RewardScorer

    scorer = RewardScorer(
        AutoModelForSequenceClassification.from_pretrained(reward_model).eval(),
        AutoTokenizer.from_pretrained(reward_model),
    )
    assert samples
    for row in samples:
        expected = scorer([row["prompt"]], [row["response"]])[0].item()
        assert row[key] == pytest.approx(expected, abs=1e-4), row
        assert torch.isfinite(torch.tensor(row[key]))


def launch(
    n: int, script: str, *args: str, engine: str | None = None, probe: tuple[str, ...] = (), expect: int = 0
) -> subprocess.CompletedProcess:
    """`accelerate launch` with n gloo processes; `engine` switches accelerate to FSDP2 / DeepSpeed
    through tests/engines.py (test-only: accelerate never picks them on CPU by itself); `probe`: the
    options of tests/probe.py (planted faults, reports). A run expected to exit with its own code
    (130: stopped with a checkpoint) goes through pipeline.launch, as make's does, which returns it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    target = [*(["tests/engines.py", engine] if engine else []), *(["tests/probe.py", *probe] if probe else []), script]
    launcher = "accelerate.commands.launch" if expect == 0 else "pipeline.launch"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            launcher,
            "--multi_gpu",
            "--num_processes",
            str(n),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            *target,
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert run.returncode == expect, run.stdout[-2000:] + run.stderr[-3000:]
    return run
