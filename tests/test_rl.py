"""The RL stage beyond PPO against a reward model: reward functions with the dataset's columns, judges,
critic-free estimators (GRPO, RLOO) on the demo, groups under two processes, the default unchanged."""

import json
import shutil

import pytest
import torch

import stages.ppo
from pipeline import plans
from pipeline.artifacts import read_manifest
from pipeline.demo import asked_aspect
from pipeline.demo import score as gold
from pipeline.recipe_loader import load_recipe
from pipeline.rl.run_setup import Schedule
from stages import eval as evaluate
from stages import ppo
from tests.conftest import REPO, launch, ppo_args, read_jsonl

pytestmark = pytest.mark.e2e  # whole stages, several processes

GRPO_RECIPE = str(REPO / "stages/recipes/demo-grpo.yaml")

ASPECT_REWARD = '''
def aspect_reward(prompts, completions, aspect, **kwargs):
    """1 if the response names the aspect the prompt asks about. `aspect` is the dataset's column."""
    out = []
    for prompt, completion, a in zip(prompts, completions, aspect):
        assert a in prompt[-1]["content"].split(), f"column misaligned: {a!r} for {prompt!r}"
        out.append(float(a in completion[-1]["content"].split()))
    return out
'''


def prompts_with_aspects(path):
    """The demo's training prompts with an extra `aspect` column, as a hub dataset would carry a solution."""
    with open(path, "w") as f:
        for row in read_jsonl(REPO / "data/demo/prompts_train.jsonl"):
            f.write(json.dumps({**row, "aspect": asked_aspect(row["prompt"])}) + "\n")


def test_a_reward_function_with_dataset_columns_is_optimised_without_a_reward_model(
    runs_with_sft, tmp_path, base_model, monkeypatch
):
    """No RM stage exists: PPO (gae, value model from SFT) optimises a function that reads the dataset's
    `aspect` column; the judge is watched. The function's rewards are exp.scores' raw values; editing its
    file makes the artifact out of date; eval reports the source and the judge with win rates."""
    reward_file = tmp_path / "my_rewards.py"
    reward_file.write_text(ASPECT_REWARD)
    prompts_with_aspects(tmp_path / "prompts.jsonl")
    seen = []
    real = stages.ppo.with_advantages
    monkeypatch.setattr(stages.ppo, "with_advantages", lambda exp, *a: seen.append(exp) or real(exp, *a))
    args = ppo_args(
        runs_with_sft,
        f"ppo.prompts={tmp_path / 'prompts.jsonl'}",
        f"ppo.rewards=[{{function: '{reward_file}:aspect_reward', name: aspect, weight: 2.0}}]",
        "ppo.learning_rate=1e-3",
        "ppo.missing_stop_penalty=0",
        f"sft.model={base_model}",
    )
    ppo.main(args)

    out = runs_with_sft / "demo" / "ppo"
    history = read_jsonl(out / "metrics.jsonl")
    for exp in seen:  # the function's rewards, weighted, are what PPO optimised
        expected = [2.0 * float(asked_aspect(p) in t.split()) for p, t in zip(exp.rollout.prompts, exp.rollout.texts)]
        assert exp.raw_scores.tolist() == expected and torch.equal(exp.scores, exp.raw_scores)
    for h in history:
        assert h["objective/reward_raw"] == pytest.approx(2.0 * h["rewards/aspect"], abs=1e-6)
        assert 0 <= h["rewards/aspect"] <= 1 and "judges/gold" in h and "objective/rm_score_raw" not in h
    assert not (runs_with_sft / "demo" / "rm").exists()
    rows = read_jsonl(out / "samples.jsonl")
    assert all(r["judges"]["gold"] == pytest.approx(gold(r["prompt"], r["response"]), abs=1e-4) for r in rows)
    assert read_manifest(out)["config"]["ppo"]["rewards"][0]["name"] == "aspect"

    recipe = load_recipe(args[1], args[2:])  # what `make ppo` asks pipeline.plans of the RL stage
    assert "is up to date" in plans.nothing_to_do(recipe, "ppo")
    reward_file.write_text(ASPECT_REWARD.replace("float(a in", "0.5 * float(a in"))
    assert plans.nothing_to_do(recipe, "ppo") is None  # the function changed: the artifact is out of date

    reward_file.write_text(ASPECT_REWARD)
    evaluate.main(
        [*args, "eval.max_new_tokens=16", f"eval.prompts={tmp_path / 'prompts.jsonl'}", "eval.prompts.limit=48"]
    )
    metrics = json.loads((runs_with_sft / "demo" / "eval" / "metrics.json").read_text())
    assert {"aspect_score", "gold_score"} <= set(metrics["ppo"]["sampled"])
    assert set(metrics["ppo"]["win_rate_vs_sft"]) == {"aspect", "gold"}
    rows = read_jsonl(runs_with_sft / "demo" / "eval" / "samples.jsonl")  # a function's floats, exactly
    assert rows and all(r["gold_score"] == gold(r["prompt"], r["response"]) for r in rows)
    report = (runs_with_sft / "demo" / "eval" / "report.md").read_text()
    assert "aspect_score" in report and "win rate vs sft (aspect)" in report


@pytest.mark.parametrize("overrides", [[], ["ppo.advantage_estimator=rloo"]], ids=["grpo-from-ppo.model", "rloo"])
def test_critic_free_estimators_raise_the_held_out_gold_score(sft_run, base_model, tmp_path, overrides):
    """demo-grpo.yaml as shipped (GRPO, k = 4, KL in the loss), starting from the demo's SFT artifact
    given as `ppo.model` (a run with no SFT stage), and with RLOO from the run's own SFT: on held-out
    prompts the gold judge's score rises by 0.8 or more over the start at a KL of at most 8 nats; no
    value model, no RM."""
    if overrides:
        shutil.copytree(sft_run / "demo" / "sft", tmp_path / "demo-grpo" / "sft")
        start = "sft"
    else:
        overrides, start = [f"ppo.model={sft_run / 'demo' / 'sft'}"], "start"
    args = ["--recipe", GRPO_RECIPE, f"runs_dir={tmp_path}", f"sft.model={base_model}", *overrides]
    ppo.main(args)
    evaluate.main(args)
    run = tmp_path / "demo-grpo"
    history = read_jsonl(run / "ppo" / "metrics.jsonl")
    assert "loss/value_avg" not in history[0] and "loss/kl_avg" in history[0]
    assert all(0 <= h["objective/zero_variance_groups"] <= 1 for h in history)
    assert abs(history[0]["loss/kl_avg"]) < 1e-6 or history[0]["first_minibatch"]["approxkl"] < 1e-6
    assert not (run / "ppo" / "value_model").exists() and not (run / "ppo" / "value_head.pt").exists()
    assert not (run / "rm").exists()
    manifest = read_manifest(run / "ppo")
    assert manifest["metrics"]["advantage_estimator"] == ("rloo" if start == "sft" else "grpo")
    assert manifest["metrics"]["trainable_parameters"] == manifest["metrics"]["parameters"]  # the policy alone
    assert (run / "sft").exists() == (start == "sft")
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    gain = metrics["ppo"]["sampled"]["gold_score"]["mean"] - metrics[start]["sampled"]["gold_score"]["mean"]
    print(f"{overrides}: gold gain {gain:.3f}, KL {metrics['ppo']['sampled'][f'kl_from_{start}']:.3f}")
    assert gain >= 0.8 and metrics["ppo"]["sampled"][f"kl_from_{start}"] <= 8


GROUP_LOG = """
import json, os

def logged(prompts, completions, log, **kwargs):
    with open(f"{log}.{os.environ.get('RANK', '0')}", "a") as f:
        f.write(json.dumps([p[-1]["content"] for p in prompts]) + "\\n")
    return [float(len(c[-1]["content"].split()) < 6) for c in completions]
"""


def test_two_processes_keep_groups_whole_and_follow_the_one_process_schedule(runs_with_sft, tmp_path):
    reward_file = tmp_path / "log_rewards.py"
    reward_file.write_text(GROUP_LOG)
    log = tmp_path / "calls"
    launch(
        2,
        "stages/ppo.py",
        "--recipe",
        GRPO_RECIPE,
        f"runs_dir={runs_with_sft}",
        "run_name=demo",
        f"ppo.rewards=[{{function: '{reward_file}:logged', kwargs: {{log: '{log}'}}}}]",
        "ppo.batch_size=8",
        "ppo.mini_batch_size=4",
        "ppo.total_episodes=48",
        "ppo.max_new_tokens=8",
    )
    ranks = [[json.loads(line) for line in open(f"{log}.{r}")] for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # 48 episodes / (8 x 2 processes)
    prompts = [row["prompt"][-1]["content"] for row in read_jsonl(REPO / "data/demo/prompts_train.jsonl")]
    one = Schedule(load_recipe(GRPO_RECIPE, ["ppo.batch_size=16", "ppo.mini_batch_size=4"]).ppo, 1, len(prompts), 0)
    for iteration in range(3):
        for calls in ranks:
            batch = calls[iteration]
            assert all(len(set(batch[i : i + 4])) == 1 for i in range(0, 8, 4))  # groups of k = 4, whole
        assert ranks[0][iteration] + ranks[1][iteration] == [prompts[i] for i in one.prompt_indices(iteration, 0)]
    history = read_jsonl(runs_with_sft / "demo" / "ppo" / "metrics.jsonl")
    assert [h["iteration"] for h in history] == [1, 2, 3] and history[-1]["episodes"] == 48


def test_the_default_rewards_and_estimator_spelled_out_change_no_metric(runs_with_rm, tmp_path):
    """The default recipe is PPO with GAE against this run's reward model: spelled out, every metric
    is the same, bit for bit (same seed, same threads)."""
    shutil.copytree(runs_with_rm / "demo", tmp_path / "explicit" / "demo")
    ppo.main(ppo_args(runs_with_rm))
    ppo.main(
        ppo_args(
            tmp_path / "explicit",
            "ppo.rewards=[{model: rm, weight: 1.0}]",
            "ppo.advantage_estimator=gae",
            "ppo.samples_per_prompt=1",
            "ppo.kl_in=reward",
            "ppo.loss_aggregation=token_mean",
            "ppo.value_model=reward",
        )
    )
    default, explicit = (
        read_jsonl(r / "demo" / "ppo" / "metrics.jsonl") for r in (runs_with_rm, tmp_path / "explicit")
    )
    noisy = ("time/", "episodes_per_s", "tokens_per_s", "peak_memory_mb")
    for a, b in zip(default, explicit):
        assert {k: v for k, v in a.items() if not k.startswith(noisy)} == {
            k: v for k, v in b.items() if not k.startswith(noisy)
        }
    assert default[-1]["objective/rm_score_raw"] == default[-1]["objective/reward_raw"]
    assert default[-1]["rewards/rm"] == pytest.approx(default[-1]["objective/rm_score_raw"], abs=1e-5)
    assert "judges/gold" in default[-1] and "objective/zero_variance_groups" not in default[-1]
    assert (runs_with_rm / "demo" / "ppo" / "value_model" / "config.json").is_file()
