"""End-to-end PPO on the demo with tiny models: every variant the stage supports."""

import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import pipeline.rl.iteration
from pipeline.artifacts import read_manifest, require
from pipeline.errors import ConfigError, MissingArtifact
from pipeline.rl.run_setup import lr_schedule
from stages import base, ppo, rm
from tests.conftest import (
    DEMO_RECIPE,
    REPO,
    assert_learned,
    assert_scored_by,
    control_run,
    launch,
    ppo_args,
    quantized_layers,
    read_jsonl,
    rm_args,
)


def check_run(runs_dir, iterations=6, tolerance=1e-5):
    out = runs_dir / "demo" / "ppo"
    manifest = require(out, "ppo")
    history = read_jsonl(out / "metrics.jsonl")
    assert [h["iteration"] for h in history] == list(range(1, iterations + 1))
    for h in history:
        # the health check of a correct implementation: nothing has moved at the first minibatch
        assert h["first_minibatch"]["ratio"] == pytest.approx(1.0, abs=tolerance)
        assert h["first_minibatch"]["approxkl"] == pytest.approx(0.0, abs=tolerance / 10)
        assert h["first_minibatch"]["clipfrac"] == 0.0
        assert all(v == v for v in h.values() if isinstance(v, float))  # no NaN
        # k1 is unbiased but noisy per batch while the true KL is tiny: a small negative batch is noise,
        # a clearly negative one (padding, temperature or dropout mismatch) is a bug
        assert h["objective/kl"] > -0.5
    assert sum(h["objective/kl"] for h in history) > 0
    assert manifest["inputs"]["sft_manifest"]["stage"] == "sft" and manifest["inputs"]["rm_manifest"]["stage"] == "rm"
    assert read_jsonl(out / "samples.jsonl")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name in model.state_dict())
    return history


def test_ppo_full_raises_the_reward_with_bounded_kl(runs_with_rm, tmp_path):
    ppo.main(ppo_args(runs_with_rm, "ppo.total_episodes=320"))  # the demo's learning rate
    history = check_run(runs_with_rm, iterations=10)
    assert_learned(history, control_run(runs_with_rm, tmp_path / "control", "ppo.total_episodes=320"), margin=0.4)
    assert 0 < history[-1]["objective/kl"] < 10
    assert (runs_with_rm / "demo" / "ppo" / "value_model" / "config.json").is_file()
    assert read_manifest(runs_with_rm / "demo" / "ppo")["metrics"]["reward_model_tokenizer"] == "shared"


def test_the_stage_reads_its_prompts_a_batch_at_a_time(runs_with_rm, monkeypatch):
    """Each iteration takes its prompts (and the ids of those drawn for the first time) from the
    arrow-backed prompt column in one read each, never row by row (64 reads an iteration before)."""
    from datasets.arrow_dataset import Column

    reads, read = [], Column.__getitem__
    monkeypatch.setattr(Column, "__getitem__", lambda self, key: reads.append(key) or read(self, key))
    ppo.main(ppo_args(runs_with_rm, "ppo.total_episodes=64"))
    assert [len(key) for key in reads] == [32, 32, 32, 32]  # two iterations: prompts, new prompts' ids


def test_the_raw_score_and_the_missing_stop_penalty_are_logged_apart(runs_with_rm):
    """Responses cut at 3 tokens rarely stop: the penalty shows, and optimised = raw - penalty."""
    ppo.main(ppo_args(runs_with_rm, "ppo.total_episodes=64", "ppo.max_new_tokens=3", "ppo.missing_stop_penalty=2.0"))
    history = read_jsonl(runs_with_rm / "demo" / "ppo" / "metrics.jsonl")
    for h in history:
        assert 0 < h["objective/missing_stop_penalty"] <= 2.0
        assert h["objective/scores"] == pytest.approx(
            h["objective/rm_score_raw"] - h["objective/missing_stop_penalty"], abs=1e-5
        )


@pytest.mark.parametrize("finetune", ["lora", "qlora-4bit", "qlora-8bit"])
def test_ppo_with_adapters_uses_the_disabled_adapter_as_reference(runs_with_rm, finetune, loaded_models):
    ppo.main(ppo_args(runs_with_rm, f"ppo.finetune={finetune}", "ppo.learning_rate=1e-2", "ppo.lora.r=8"))
    # LLM.int8 picks its outlier columns per batch, so an 8-bit forward depends on the batch it is in:
    # the first minibatch's ratio is 1 only to ~1e-3 there (bitsandbytes, not this pipeline)
    check_run(runs_with_rm, tolerance=1e-3 if finetune == "qlora-8bit" else 1e-5)
    policy = loaded_models[0]  # the policy PPO trained: its base quantized under QLoRA, adapters trained
    bits = quantized_layers(policy)
    assert bits == {"4bit": 14 if finetune == "qlora-4bit" else 0, "8bit": 14 if finetune == "qlora-8bit" else 0}
    trained = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    assert 0 < trained < 0.3 * sum(p.numel() for p in policy.parameters())
    assert (runs_with_rm / "demo" / "ppo" / "adapter" / "adapter_config.json").is_file()


def test_ppo_with_a_value_head_on_the_policy(runs_with_rm, monkeypatch):
    """The value head, and the options that change the reward: k3 KL, whitened rewards, normalised
    scores and the adaptive KL controller, each checked against its formula on what the run used."""
    seen = []  # each iteration's experience and the beta it was penalised with

    def with_advantages(exp, cfg, beta, reduce=None):
        seen.append((pipeline.rl.iteration.with_advantages(exp, cfg, beta, reduce), beta))
        return seen[-1][0]

    monkeypatch.setattr(ppo, "with_advantages", with_advantages)
    ppo.main(
        ppo_args(
            runs_with_rm,
            "ppo.value_model=head",
            "ppo.learning_rate=1e-3",
            "ppo.kl_estimator=k3",
            "ppo.kl_target=2.0",
            "ppo.whiten_rewards=true",
            "ppo.normalize_scores=true",
        )
    )
    history = check_run(runs_with_rm)
    assert (runs_with_rm / "demo" / "ppo" / "value_head.pt").is_file()
    reference = read_manifest(runs_with_rm / "demo" / "rm")["metrics"]["reference"]
    beta = 0.05  # the recipe's kl_coef, adapted after every iteration towards the target KL
    for h, (exp, used) in zip(history, seen):
        assert used == pytest.approx(beta, rel=1e-9)
        # k3 = (r - 1) - log r, r = p_ref / p, on every response token: never negative
        log_ratio = exp.old_logp - exp.ref_logp
        assert torch.allclose(exp.kl, (torch.expm1(-log_ratio) + log_ratio) * exp.mask, atol=1e-6)
        assert (exp.kl >= 0).all()
        # whitened per-token rewards: unit variance over response tokens, the mean kept
        raw = -beta * exp.kl
        last = exp.mask.sum(1).long() - 1
        raw[torch.arange(len(last)), last] += exp.scores
        n = exp.mask.sum()
        mean = (raw * exp.mask).sum() / n
        var = ((raw - mean) ** 2 * exp.mask).sum() / (n - 1)
        assert torch.allclose(exp.rewards, ((raw - mean) / torch.sqrt(var + 1e-8) + mean) * exp.mask, atol=1e-5)
        # scores normalised by the RM stage's reference statistics, before the missing-stop penalty
        normalised = (h["objective/rm_score_raw"] - reference["mean"]) / reference["std"]
        assert h["objective/scores"] == pytest.approx(normalised - h["objective/missing_stop_penalty"], abs=1e-4)
        error = min(max(h["objective/kl"] / 2.0 - 1, -0.2), 0.2)
        beta *= 1 + error * 32 / 10000  # 32 episodes an iteration, the default horizon
        assert h["objective/kl_coef"] == pytest.approx(beta, rel=1e-6)
    assert len(seen) == len(history) == 6
    assert abs(history[0]["objective/scores"]) < 1.0  # the SFT policy's answers score like the reference set


def test_reward_model_with_its_own_tokenizer(runs_with_rm, tmp_path):
    """An RM built on a differently trained tokenizer: PPO detects it and scores decoded text."""
    other = tmp_path / "other-base"
    base.main(
        [
            "--recipe",
            DEMO_RECIPE,
            f"base.output={other}",
            f"sft.model={other}",
            "base.corpus=[data/demo/prompts_train.jsonl, data/demo/preferences_train.jsonl]",
            "base.hidden_size=32",
            "base.num_layers=1",
        ]
    )
    assert (
        AutoTokenizer.from_pretrained(other).get_vocab()
        != AutoTokenizer.from_pretrained(runs_with_rm / "demo" / "sft").get_vocab()
    )
    rm.main(rm_args(runs_with_rm, f"rm.model={other}", "--force"))
    with pytest.raises(ConfigError, match="value_model=sft or ppo.value_model=head"):
        ppo.main(ppo_args(runs_with_rm))
    ppo.main(ppo_args(runs_with_rm, "ppo.value_model=sft"))
    check_run(runs_with_rm)
    assert read_manifest(runs_with_rm / "demo" / "ppo")["metrics"]["reward_model_tokenizer"] == "own"
    assert_scored_by(
        read_jsonl(runs_with_rm / "demo" / "ppo" / "samples.jsonl"), runs_with_rm / "demo" / "rm", "rm_score_raw"
    )


def test_non_finite_loss_stops_with_step_and_metric(runs_with_rm, monkeypatch):
    real = pipeline.rl.iteration.value_loss
    monkeypatch.setattr(pipeline.rl.iteration, "value_loss", lambda *a: (torch.tensor(float("nan")), real(*a)[1]))
    with pytest.raises(FloatingPointError, match=r"loss/value is not finite at iteration 1, epoch 1 \(on process 0\)"):
        ppo.main(ppo_args(runs_with_rm))
    assert read_manifest(runs_with_rm / "demo" / "ppo") is None


def test_missing_upstream_names_the_target(tmp_path, runs_with_rm):
    with pytest.raises(MissingArtifact, match="run `make sft` first"):
        ppo.main(ppo_args(tmp_path / "empty"))
    (runs_with_rm / "demo" / "rm" / "manifest.json").unlink()
    with pytest.raises(MissingArtifact, match=r"rm artifact .* is incomplete .*run `make rm` first"):
        ppo.main(ppo_args(runs_with_rm))


def run_ppo(args, **kw):
    return subprocess.Popen(
        [sys.executable, "stages/ppo.py", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def test_interrupted_run_resumes_to_the_same_number_of_steps(runs_with_rm):
    args = ppo_args(runs_with_rm, "ppo.total_episodes=320")  # 10 iterations, checkpoint every 2
    proc = run_ppo(args)
    state = runs_with_rm / "demo" / "ppo.partial" / "checkpoint" / "ppo_state.json"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: save a checkpoint, then exit
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, output[-3000:]
    assert "checkpoint saved at iteration" in output
    assert read_manifest(runs_with_rm / "demo" / "ppo") is None  # not complete yet
    resumed = run_ppo(args)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert "resuming from the checkpoint at iteration" in output
    check_run(runs_with_rm, iterations=10)


@pytest.mark.parametrize("name", ["linear", "constant"])
def test_the_learning_rate_schedules_are_transformers(name):
    """Written with torch's LambdaLR (transformers.optimization would import peft and bitsandbytes):
    the learning rate at every optimiser step is what transformers' get_scheduler gives."""
    from transformers import get_scheduler

    ours, theirs = [torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3) for _ in range(2)]
    schedules = lr_schedule(name, ours, 7), get_scheduler(name, theirs, num_warmup_steps=0, num_training_steps=7)
    rates = [], []
    for _ in range(9):
        for optimizer, schedule, seen in zip((ours, theirs), schedules, rates):
            seen.append(schedule.get_last_lr()[0])
            optimizer.step()
            schedule.step()
    assert rates[0] == rates[1] and rates[0][0] == 0.3 and (rates[0][-1] == 0.0) == (name == "linear")


def test_two_processes_follow_the_single_process_schedule(runs_with_rm, tmp_path):
    """Same global batch (32 rollouts, minibatches of 16) on 1 and on 2 processes: the same learning
    rate at every step (accelerate's prepared scheduler used to step once per process, reaching zero
    halfway), and both runs raise the score."""
    single = tmp_path / "single"
    for stage in ("sft", "rm"):
        shutil.copytree(runs_with_rm / "demo" / stage, single / "demo" / stage)
    common = ["ppo.total_episodes=256", "ppo.learning_rate=1e-3"]
    ppo.main(ppo_args(single, *common, "ppo.batch_size=32", "ppo.mini_batch_size=16"))
    launch(2, "stages/ppo.py", *ppo_args(runs_with_rm, *common, "ppo.batch_size=16", "ppo.mini_batch_size=8"))
    one, two = check_run(single, iterations=8), check_run(runs_with_rm, iterations=8)
    assert [h["lr"] for h in one] == pytest.approx([h["lr"] for h in two], rel=1e-6)
    # linear decay over 8 iterations x 4 optimiser steps: half the rate after iteration 4, zero after the last
    assert two[3]["lr"] == pytest.approx(0.5e-3) and two[-2]["lr"] == pytest.approx(0.125e-3)
    assert two[-1]["episodes"] == 256 and two[0]["val/num_eos_tokens"] <= 32
    # the same recipe learns alike on 1 and 2 processes (other samples: equal only within the noise)
    late = [sum(h["objective/rm_score_raw"] for h in history[-4:]) / 4 for history in (one, two)]
    assert late[0] > one[0]["objective/rm_score_raw"] + 0.3 and late[1] > two[0]["objective/rm_score_raw"] + 0.3
    assert late[0] == pytest.approx(late[1], abs=0.35)
    assert one[-1]["objective/kl"] == pytest.approx(two[-1]["objective/kl"], rel=0.5, abs=0.5)
    manifest = read_manifest(runs_with_rm / "demo" / "ppo")["metrics"]
    assert manifest["engine"] == "ddp" and manifest["processes"] == 2
    for n, h in ((1, one), (2, two)):
        print(
            f"{n} process(es): lr middle {h[3]['lr']:.3g} last {h[-1]['lr']:.3g}, score "
            f"{h[0]['objective/scores']:.3f} -> {h[-1]['objective/scores']:.3f}, KL {h[-1]['objective/kl']:.3f}"
        )


def test_an_already_trained_reward_model_without_the_rm_stage(runs_with_sft, rm_run, base_model, tmp_path):
    """How most users start: `ppo.reward_model` names a trained sequence classifier; no RM stage runs,
    PPO optimises it and eval reports it."""
    from stages import eval as evaluate

    trained = rm_run / "demo" / "rm"
    ppo.main(ppo_args(runs_with_sft, f"ppo.reward_model={trained}", "ppo.learning_rate=1e-3"))
    assert not (runs_with_sft / "demo" / "rm").exists()
    manifest = read_manifest(runs_with_sft / "demo" / "ppo")
    assert manifest["inputs"]["ppo.rewards:rm"]["model"] == str(trained) and "rm_manifest" not in manifest["inputs"]
    history = read_jsonl(runs_with_sft / "demo" / "ppo" / "metrics.jsonl")
    assert_learned(history, control_run(runs_with_sft, tmp_path / "control", f"ppo.reward_model={trained}"), margin=0.3)
    evaluate.main(
        [
            "--recipe",
            DEMO_RECIPE,
            f"runs_dir={runs_with_sft}",
            f"sft.model={base_model}",
            f"ppo.reward_model={trained}",
            "eval.prompts.limit=16",
            "eval.max_new_tokens=8",
        ]
    )
    assert (runs_with_sft / "demo" / "eval" / "manifest.json").is_file()

    with pytest.raises(ConfigError, match="normalize_scores uses the RM stage's reference statistics"):
        ppo.main(ppo_args(runs_with_sft, f"ppo.reward_model={trained}", "ppo.normalize_scores=true"))
    two = tmp_path / "two_labels"
    AutoModelForSequenceClassification.from_pretrained(
        trained, num_labels=2, ignore_mismatched_sizes=True
    ).save_pretrained(two)
    AutoTokenizer.from_pretrained(trained).save_pretrained(two)
    with pytest.raises(ConfigError, match="has 2 outputs; a reward model gives one score"):
        ppo.main(ppo_args(runs_with_sft, f"ppo.reward_model={two}", "ppo.value_model=sft", "--force"))
