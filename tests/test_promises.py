"""What the README and docs/ promise and no other test checks: trackers, the benchmark and the time/memory
fields, the reward model's options, refusals in one line, a moved run directory, the recipe's
precision over the launcher's, LoRA's default targets, packing, and the recipe kept in each artifact."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from pipeline import process
from pipeline.artifacts import read_manifest
from pipeline.errors import ConfigError
from pipeline.recipe_loader import load_recipe
from stages import ppo, rm, sft
from tests.conftest import (
    DEMO_RECIPE,
    PPO_RUN,
    REPO,
    RM_RUN,
    SFT_RUN,
    ppo_args,
    read_jsonl,
    rm_args,
    sft_args,
    sft_overrides,
)

# ---- trackers, time and memory ----


def test_tensorboard_gets_the_metrics_and_a_tracker_not_installed_is_refused_before_loading(
    runs_with_rm, loaded_models
):
    with pytest.raises(ConfigError, match=r"report_to: wandb is not installed: `pip install wandb`"):
        ppo.main(ppo_args(runs_with_rm, "ppo.report_to=[wandb]"))
    assert loaded_models == [] and not (runs_with_rm / "demo" / "ppo.partial").exists()
    ppo.main(ppo_args(runs_with_rm, "ppo.report_to=[tensorboard]", "ppo.total_episodes=64"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((runs_with_rm / "demo" / "ppo").rglob("events.out.tfevents*"))
    assert events
    logged = EventAccumulator(str(events[0].parent)).Reload()
    kl = [e.value for e in logged.Scalars("objective/kl")]
    assert kl == pytest.approx([h["objective/kl"] for h in read_jsonl(runs_with_rm / "demo" / "ppo" / "metrics.jsonl")])


def test_time_and_memory_fields_and_make_bench(rm_run, tmp_path):
    """Each iteration's time split, throughput and peak memory in metrics.jsonl agree with each
    other; `make bench` (pipeline.bench) writes its JSON from a run it times itself."""
    for stage in ("sft", "rm"):
        shutil.copytree(rm_run / "demo" / stage, tmp_path / "benchrun" / stage)
    overrides = [f"runs_dir={tmp_path}", "run_name=benchrun", *PPO_RUN]
    bench = subprocess.run(
        [sys.executable, "-m", "pipeline.bench", "--recipe", DEMO_RECIPE, *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "BENCH_EPISODES": "64"},
    )
    assert bench.returncode == 0, bench.stdout[-2000:] + bench.stderr[-2000:]
    written = REPO / "data" / "bench" / "ppo-benchrun.json"
    try:
        result = json.loads(written.read_text())
    finally:
        written.unlink()
    assert result["episodes"] == 64 and result["iterations"] == 2
    split = result["time_split_s"]
    assert all(split[k] > 0 for k in ("startup", "generate", "score", "optimise"))
    assert sum(split.values()) <= result["wall_s"] + 1
    assert result["episodes_per_s"] == pytest.approx(
        64 / (split["generate"] + split["score"] + split["optimise"]), rel=0.05
    )
    assert result["peak_memory_mb"] > 100  # a process that has loaded torch and four models
    assert not (tmp_path / "benchrun" / "ppo").exists()  # the run's own PPO artifact is left alone

    shutil.copytree(rm_run / "demo", tmp_path / "direct" / "demo")
    ppo.main(ppo_args(tmp_path / "direct", "ppo.total_episodes=96"))
    history = read_jsonl(tmp_path / "direct" / "demo" / "ppo" / "metrics.jsonl")
    for h in history:
        elapsed = sum(h[f"time/{k}_s"] for k in ("generate", "score", "optimise"))
        assert h["episodes_per_s"] == pytest.approx(32 / elapsed, rel=1e-6)
        assert h["tokens_per_s"] == pytest.approx(h["response_length"] * 32 / elapsed, rel=1e-6)
    peaks = [h["peak_memory_mb"] for h in history]
    assert peaks == sorted(peaks) and peaks[0] > 100  # a running peak


# ---- the reward model's options ----


def test_margins_centering_and_too_long_pairs_reach_the_reward_trainer(runs_with_sft, tmp_path, monkeypatch):
    """The `margin` column and `center_rewards_coefficient` change the loss as trl documents them:
    -log sigmoid(r_chosen - r_rejected - margin) + c * mean((r_chosen + r_rejected)^2), recomputed here
    from the rewards of each batch; pairs longer than max_length are dropped and counted."""
    from trl import RewardTrainer

    pairs = read_jsonl(REPO / "data/demo/preferences_train.jsonl")[:200]
    rows = [{**r, "margin": 0.5 * (i % 3)} for i, r in enumerate(pairs)]
    long = [
        {**r, "chosen": [{"role": "assistant", "content": " ".join(["great"] * 80)}], "margin": 1.0} for r in pairs[:7]
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows + long))
    checked = []
    real = RewardTrainer.compute_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "margin" not in inputs:  # the evaluation pairs (the demo's test set) have none
            return real(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        margin = inputs["margin"].clone()
        loss, outputs = real(self, model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        chosen, rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
        expected = -torch.nn.functional.logsigmoid(chosen - rejected - margin).mean() + 0.25 * torch.mean(
            (chosen + rejected) ** 2
        )
        checked.append(torch.allclose(loss, expected, atol=1e-6) and margin.abs().sum().item() > 0)
        return (loss, outputs) if return_outputs else loss

    monkeypatch.setattr(RewardTrainer, "compute_loss", compute_loss)
    rm.main(
        rm_args(
            runs_with_sft,
            f"rm.dataset={data}",
            "rm.trainer.num_train_epochs=1",
            "rm.trainer.center_rewards_coefficient=0.25",
            "rm.trainer.max_length=64",
        )
    )
    metrics = read_manifest(runs_with_sft / "demo" / "rm")["metrics"]
    assert checked and all(checked)
    assert metrics["dropped"]["too_long"] == 7 and metrics["train_pairs"] == 200


# ---- refusals ----


def test_a_tokenizer_without_eos_is_refused_in_one_line(base_model, tmp_path):
    shutil.copytree(base_model, tmp_path / "no-eos")
    config = tmp_path / "no-eos" / "tokenizer_config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "eos_token"}))
    with pytest.raises(SystemExit) as e:  # as the script's __main__ runs it: one line, exit 1
        process.run(lambda: sft.main(sft_args(tmp_path / "runs", tmp_path / "no-eos")))
    assert "\n" not in e.value.code and "has no EOS token: set `eos_token` in its tokenizer_config.json" in e.value.code


def test_a_minibatch_the_accumulation_steps_do_not_divide_is_refused():
    with pytest.raises(ConfigError, match="mini_batch_size 8 is not a multiple of gradient_accumulation_steps 3"):
        load_recipe(DEMO_RECIPE, ["ppo.mini_batch_size=8", "ppo.batch_size=16", "ppo.gradient_accumulation_steps=3"])


@pytest.mark.e2e
def test_an_error_on_every_rank_is_one_line(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "stages/sft.py",
            "--recipe",
            DEMO_RECIPE,
            f"runs_dir={tmp_path}",
            "sft.model=data/models/x",
            "sft.dataset=missing.jsonl",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"},
    )
    output = run.stdout + run.stderr
    assert run.returncode == 1, output[-2000:]
    assert [line for line in output.splitlines() if line.startswith("error:")] == [
        "error: dataset file 'missing.jsonl' not found"
    ], output[-2000:]
    assert "Traceback" not in output


# ---- runs and artifacts ----


def test_a_moved_run_directory_is_still_up_to_date_and_the_check_loads_no_torch(rm_run, base_model, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(rm_run, moved)
    overrides = [*sft_overrides(moved, base_model, *SFT_RUN), *RM_RUN]
    for stage in ("sft", "rm"):
        check = subprocess.run(
            [sys.executable, "-m", "pipeline.plans", stage, "--check", "--recipe", DEMO_RECIPE, *overrides],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert check.returncode == 0 and "is up to date" in check.stdout, check.stdout + check.stderr
    probe = (
        "import sys\nfrom pipeline import plans\n"
        f"code = plans.main(['rm', '--check', '--recipe', {DEMO_RECIPE!r}] + {overrides!r})\n"
        "print(code, 'torch' in sys.modules)"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert loaded.stdout.strip().splitlines()[-1] == "0 False"  # answered from the manifests, in a fraction of a second


def test_every_artifact_keeps_the_recipe_it_was_built_with(rm_run, base_model):
    sft_kept, rm_kept = (load_recipe(str(rm_run / "demo" / stage / "recipe.yaml"), []) for stage in ("sft", "rm"))
    # the overrides each stage ran with, not the demo recipe's values
    assert sft_kept.sft.model == str(base_model) and sft_kept.sft.trainer["num_train_epochs"] == 6
    assert rm_kept.rm.reference_limit == 64 and rm_kept.rm.dataset.limit == 3000


def test_the_recipe_sets_the_precision_not_the_launcher(runs_with_rm, monkeypatch, linear_output_dtypes):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    ppo.main(ppo_args(runs_with_rm, "ppo.dtype=float32", "ppo.total_episodes=32"))
    assert linear_output_dtypes == {torch.float32}


def test_lora_targets_every_linear_layer_by_default(tmp_path, base_model):
    sft.main(
        sft_args(
            tmp_path,
            base_model,
            "sft.finetune=lora",
            "sft.dataset.limit=64",
            "sft.eval_dataset.limit=8",
            "sft.trainer.num_train_epochs=1",
        )
    )
    keys = safe_open(tmp_path / "demo" / "sft" / "adapter" / "adapter_model.safetensors", "pt").keys()
    targets = {k.split(".")[-3] for k in keys if "lora_A" in k}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.e2e
def test_sft_packing_trains_on_fewer_longer_rows(tmp_path, base_model):
    """400 rows of ~20 tokens, batches of 8 for 2 epochs: 100 steps unpacked, about a third packed
    into rows of max_length 64."""
    sft.main(sft_args(tmp_path, base_model, "sft.trainer.packing=true"))
    history = read_jsonl(tmp_path / "demo" / "sft" / "metrics.jsonl")
    steps = max(h["step"] for h in history)
    assert steps < 60, steps
    metrics = read_manifest(tmp_path / "demo" / "sft")["metrics"]
    assert metrics["eval_loss_after"] < 0.8 * metrics["eval_loss_before"]
