"""RL from the model you already have, what verifiable-reward runs need (defaults that fit the reward,
truncated completions without loss, clip-higher, dynamic sampling), and a run that notices when its
reward is being gamed (the divergence alert, the best policy kept, eval's verdict)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import stages.ppo
from pipeline.artifacts import read_manifest
from pipeline.errors import Diverged
from pipeline.recipe import PPOStage, RewardSource
from pipeline.recipe_loader import load_recipe
from pipeline.rl.algorithms import logprobs_of, policy_loss
from pipeline.rl.divergence import diverging
from pipeline.rl.iteration import (
    Experience,
    PolicyAndValue,
    Rewarded,
    batch_sum,
    disable_dropout,
    update,
    with_advantages,
)
from pipeline.rl.rollout import Rollout
from pipeline.rl.run_state import PPORun
from pipeline.rl.sampling import with_signal
from stages import eval as evaluate
from tests.conftest import DEMO_RECIPE, REPO, launch, ppo_args, read_jsonl
from tests.test_resume import crash_in_iteration, deterministic

GRPO_RECIPE = str(REPO / "stages/recipes/demo-grpo.yaml")
GRPO = ["ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=4", "ppo.kl_in=loss", "ppo.judges=[]"]


# ---- divergence: the optimised reward rising while a judge falls or stays flat ----

SERIES = json.loads((Path(__file__).parent / "divergence_series.json").read_text())


@pytest.mark.parametrize(
    "run, first_alert", [("ppo", None), ("grpo_rmjudge", None), ("gamed_length", 10), ("gamed_word", 11)]
)
def test_the_divergence_test_flags_gamed_runs_within_the_run_and_leaves_healthy_ones_alone(run, first_alert):
    """The demo's healthy PPO (against its reward model, gold judge) and GRPO (RM judge) runs: no
    alarm in any of their 23 windows, though PPO's reward creeps up 0.3 in its second half while the
    gold judge is flat. Runs optimising a function that pays for length, or for one word: an alarm
    from the first window in which the judge stopped following (iteration 10 of 32, 11)."""
    history, judge = SERIES[run]["iterations"], SERIES[run]["judge"]
    alerts = [h["iteration"] for i, h in enumerate(history) if diverging(history[: i + 1], judge)]
    if first_alert is None:
        assert alerts == []
    else:
        assert alerts[0] == first_alert and len(alerts) >= 8
        line = diverging(history[:first_alert], judge).line()
        assert line.startswith("the reward rose ") and f"while judge '{judge}' went" in line


# ---- defaults and switches for verifiable rewards ----


def test_the_missing_stop_penalty_defaults_to_the_reward_it_was_made_for():
    """1.0 for PPO against a reward model (which rewards rambling to the limit); 0 for critic-free
    estimators and reward functions, which judge the answer itself; an explicit value wins."""
    assert load_recipe(DEMO_RECIPE).ppo.stop_penalty == 1.0
    assert load_recipe(GRPO_RECIPE).ppo.stop_penalty == 0.0
    assert (
        load_recipe(DEMO_RECIPE, ["ppo.rewards=[{function: 'f.py:f'}]", "ppo.value_model=sft"]).ppo.stop_penalty == 0.0
    )
    assert load_recipe(GRPO_RECIPE, ["ppo.missing_stop_penalty=0.5"]).ppo.stop_penalty == 0.5


def test_clip_higher_moves_only_the_upper_clip():
    """A token whose ratio grew to 1.25 with a positive advantage: clipped at 1.2 (no gradient) by the
    symmetric clip, still learning under clip-higher 0.28; the lower side is 1 - 0.2 either way."""
    mask = torch.ones(1, 2)
    old = torch.zeros(1, 2)
    for clip_high, grows in ((None, False), (0.28, True)):
        logp = torch.tensor([[math.log(1.25), math.log(0.7)]], requires_grad=True)
        loss, stats = policy_loss(logp, old, torch.tensor([[1.0, -1.0]]), mask, 0.2, clip_high=clip_high)
        loss.backward()
        assert (logp.grad[0, 0].item() != 0) == grows
        assert logp.grad[0, 1].item() == 0.0  # ratio 0.7 < 0.8 with a negative advantage: clipped below, both times


def truncated_step(mask_truncated: bool, truncated_tokens: list[int]) -> torch.Tensor:
    """The policy's parameters after one GRPO step (plain SGD) on 2 groups of 2, whose second
    completions were cut at max_new_tokens and end in `truncated_tokens`."""
    set_seed(0)
    policy = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
    )
    model = PolicyAndValue(policy, None)
    disable_dropout(model)
    cfg = PPOStage(
        advantage_estimator="grpo",
        samples_per_prompt=2,
        batch_size=4,
        mini_batch_size=4,
        ppo_epochs=1,
        max_new_tokens=3,
        max_grad_norm=1e9,
        mask_truncated=mask_truncated,
        kl_in="loss",
        rewards=[RewardSource(function="f.py:f")],
    )
    acc = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer = acc.prepare(model, optimizer)
    prompts = torch.tensor([[5, 6], [5, 6], [7, 8], [7, 8]])
    responses = torch.tensor([[9, 10, 1], truncated_tokens, [11, 1, 0], truncated_tokens])
    has_stop = torch.tensor([True, False, True, False])
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1]])
    rollout = Rollout(
        prompts=[None] * 4,
        prompt_ids=prompts.tolist(),
        query_responses=torch.cat([prompts, responses], 1),
        attention_mask=torch.cat([torch.ones_like(prompts), mask], 1),
        responses=responses,
        response_mask=mask,
        has_stop=has_stop,
        texts=[""] * 4,
    )
    with torch.no_grad():
        logits, _ = model(rollout.query_responses, rollout.attention_mask, 3)
        old_logp = logprobs_of(logits, responses, cfg.temperature) * mask
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0])
    exp = Experience(
        rollout=rollout,
        mask=mask.float(),
        old_logp=old_logp,
        ref_logp=old_logp - 0.1 * mask,
        old_values=None,
        entropy=torch.zeros_like(old_logp),
        source_scores={},
        judge_scores={},
        rm_scores=None,
        raw_scores=scores,
        valid=torch.ones(4, dtype=torch.bool),
        scores=scores,
        logged_metrics={},
        extra_columns={},
    )
    update(with_advantages(exp, cfg, 0.1, batch_sum(acc)), model, optimizer, scheduler, acc, cfg, "the test step")
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_truncated_completions_carry_no_loss():
    """mask_truncated (trl's mask_truncated_completions): the step does not depend on what the cut
    completions said (they take no part in the policy and KL losses nor their normalisers); without
    it, it does. Their scores still count in their groups' statistics."""
    assert torch.equal(truncated_step(True, [12, 13, 14]), truncated_step(True, [20, 21, 22]))
    assert not torch.equal(truncated_step(False, [12, 13, 14]), truncated_step(False, [20, 21, 22]))


def batch(scores: list[list[float]], tag: int):
    """A fake generation of len(scores) groups: a rollout whose prompt ids name the round and the group."""
    n, k = len(scores), len(scores[0])
    rows = [[tag, g] for g in range(n) for _ in range(k)]
    flat = torch.tensor([s for group in scores for s in group])
    rollout = Rollout(
        prompts=rows,
        prompt_ids=rows,
        query_responses=torch.ones(n * k, 3 + tag, dtype=torch.long),
        attention_mask=torch.ones(n * k, 3 + tag, dtype=torch.long),
        responses=torch.ones(n * k, 2, dtype=torch.long),
        response_mask=torch.ones(n * k, 2, dtype=torch.long),
        has_stop=torch.ones(n * k, dtype=torch.bool),
        texts=[""] * (n * k),
    )
    rewarded = Rewarded(
        {}, {}, None, flat, torch.ones(n * k, dtype=torch.bool), flat, {"rewards/f/x": [float(tag)]}, {}
    )
    return rollout, rewarded


def test_dynamic_sampling_keeps_groups_with_signal_and_fills_the_batch():
    from types import SimpleNamespace

    one = SimpleNamespace(num_processes=1)
    first = batch([[1, 1], [0, 1], [0, 0], [1, 0]], tag=0)  # 2 of 4 groups with signal
    more = {1: batch([[1, 1], [1, 0], [0, 0], [0, 0]], tag=1), 2: batch([[0, 1], [1, 1], [1, 0], [0, 0]], tag=2)}
    rollout, rewarded, figures = with_signal(first, lambda r: more[r], 2, 3, one, pad_id=0)
    # round 0's groups 1 and 3, round 1's group 1, round 2's group 0: 4 groups, every one with signal
    assert [p for p in rollout.prompts[::2]] == [[0, 1], [0, 3], [1, 1], [2, 0]]
    assert rewarded.scores.tolist() == [0, 1, 1, 0, 1, 0, 0, 1]
    assert figures == {
        "sampling/extra_rounds": 2.0,
        "sampling/dropped_groups": 7 / 12,
        "sampling/groups_without_signal": 0.0,
    }
    assert (
        rollout.query_responses.shape == (8, 3 + 2) and rollout.attention_mask[:2, :2].sum() == 0
    )  # prompts left-padded
    assert rewarded.logged_metrics == {"rewards/f/x": [0.0, 1.0, 2.0]}  # every round's function calls
    # with at most one more round the batch is completed with the first group without signal (round 0's)
    rollout, rewarded, figures = with_signal(first, lambda r: more[r], 2, 1, one, pad_id=0)
    assert [p for p in rollout.prompts[::2]] == [[0, 1], [0, 3], [0, 0], [1, 1]]
    assert figures["sampling/groups_without_signal"] == 0.25 and figures["sampling/extra_rounds"] == 1.0


# ---- RL from any model ----


def test_rl_from_a_model_directory_runs_no_sft_and_eval_names_the_start(sft_run, tmp_path):
    """ppo.model: the RL stage starts from a model directory (here a finished SFT artifact, as if from
    the hub), in a run with no SFT of its own: nothing reads or builds one; the reference is that model
    (KL 0 before the first update); eval's rows are `start` and `ppo`, with KL and win rates from it."""
    start = tmp_path / "instruct"
    shutil.copytree(sft_run / "demo" / "sft", start)
    args = [
        "--recipe",
        GRPO_RECIPE,
        f"runs_dir={tmp_path}",
        f"ppo.model={start}",
        "ppo.total_episodes=96",
        "ppo.batch_size=32",
        "ppo.mini_batch_size=8",
        "eval.prompts.limit=16",
    ]
    run = tmp_path / "demo-grpo"
    stale = run / "sft"  # an earlier run's SFT artifact of this name, finished but unreadable: never read
    shutil.copytree(sft_run / "demo" / "sft", stale)
    (stale / "model.safetensors").write_bytes(b"not a model")
    stages.ppo.main(args)
    assert "sft_manifest" not in read_manifest(run / "ppo")["inputs"]
    history = read_jsonl(run / "ppo" / "metrics.jsonl")
    assert abs(history[0]["objective/kl"]) < 1e-4 and history[0]["first_minibatch"]["approxkl"] < 1e-6
    assert read_manifest(run / "ppo")["inputs"]["model"] == str(start)
    evaluate.main(args)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert {"start", "ppo"} <= set(metrics) and "sft" not in metrics and "base" not in metrics
    assert metrics["start"]["sampled"]["kl_from_start"] == 0.0 and metrics["ppo"]["sampled"]["kl_from_start"] > 0
    assert set(metrics["ppo"]["win_rate_vs_start"]) == {"gold"}
    assert "| start |" in (run / "eval" / "report.md").read_text()


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_rl_from_a_peft_adapter(base_model, tmp_path, finetune):
    """A local PEFT adapter directory (base + adapter) as ppo.model: under LoRA the policy goes on
    training that adapter, under full fine-tuning its merged weights; either way the reference is the
    start as given (base + adapter: KL 0 and ratio 1 before the first update), and the artifact loads."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_model),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)  # an adapter that changes the model
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)  # (no tokenizer: the base's is used)
    args = [
        "--recipe",
        GRPO_RECIPE,
        f"runs_dir={tmp_path}",
        f"ppo.model={adapter}",
        f"ppo.finetune={finetune}",
        "ppo.total_episodes=64",
        "ppo.batch_size=32",
        "ppo.mini_batch_size=8",
        "ppo.learning_rate=1e-3",
    ]
    stages.ppo.main(args)
    out = tmp_path / "demo-grpo" / "ppo"
    history = read_jsonl(out / "metrics.jsonl")
    assert abs(history[0]["objective/kl"]) < 1e-4 and abs(history[0]["first_minibatch"]["ratio"] - 1) < 1e-6
    assert history[-1]["objective/kl"] > 1e-4  # and it trained
    assert AutoModelForCausalLM.from_pretrained(out) is not None and not (out / "start-merged").exists()
    if finetune == "lora":
        trained = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert trained["r"] == 4  # the start's adapter, trained on (not a fresh one of ppo.lora's rank 16)


# ---- dynamic sampling in the stage ----

SOMETIMES = """
def great(completions, **kwargs):  # groups of 4 are often all 0 or all 1
    return [float("great" in c[-1]["content"]) for c in completions]
"""


def check_sampling(history: list[dict]) -> None:
    for h in history:
        # the batch trained on: groups with signal, but for what filled it after the last round
        assert h["objective/zero_variance_groups"] == pytest.approx(h["sampling/groups_without_signal"])
        assert 0 <= h["sampling/extra_rounds"] <= 2
    assert any(h["sampling/dropped_groups"] > 0 for h in history) and any(h["sampling/extra_rounds"] for h in history)


def test_dynamic_sampling_trains_on_groups_with_signal_and_resumes_exactly(runs_with_sft, tmp_path, monkeypatch):
    (tmp_path / "sometimes.py").write_text(SOMETIMES)
    args = lambda runs: ppo_args(
        runs,
        *GRPO,
        f"ppo.rewards=[{{function: '{tmp_path}/sometimes.py:great'}}]",  # noqa: E731
        "ppo.dynamic_sampling=true",
        "ppo.max_sampling_rounds=2",
    )
    other = tmp_path / "uninterrupted"
    shutil.copytree(runs_with_sft / "demo" / "sft", other / "demo" / "sft")
    stages.ppo.main(args(other))
    expected = read_jsonl(other / "demo" / "ppo" / "metrics.jsonl")
    check_sampling(expected)

    crash_in_iteration(4, args(runs_with_sft), monkeypatch)
    stages.ppo.main(args(runs_with_sft))
    resumed = read_jsonl(runs_with_sft / "demo" / "ppo" / "metrics.jsonl")
    assert deterministic(resumed) == deterministic(expected)  # the same prompts drawn, the same rounds


def test_dynamic_sampling_with_two_processes(runs_with_sft, tmp_path):
    (tmp_path / "sometimes.py").write_text(SOMETIMES)
    launch(
        2,
        "stages/ppo.py",
        *ppo_args(
            runs_with_sft,
            *GRPO,
            f"ppo.rewards=[{{function: '{tmp_path}/sometimes.py:great'}}]",
            "ppo.dynamic_sampling=true",
            "ppo.max_sampling_rounds=2",
            "ppo.total_episodes=256",
        ),
    )
    check_sampling(read_jsonl(runs_with_sft / "demo" / "ppo" / "metrics.jsonl"))


# ---- a gamed reward, in the run and in the report ----

LENGTH = """
def long_answers(completions, **kwargs):  # pays for length: easy to game
    return [float(len(c[-1]["content"].split())) for c in completions]
"""


def gamed_args(runs, tmp_path, *extra):
    (tmp_path / "gamed.py").write_text(LENGTH)
    return ppo_args(
        runs,
        *GRPO[:-1],
        f"ppo.rewards=[{{function: '{tmp_path}/gamed.py:long_answers'}}]",
        "ppo.judges=[{function: 'pipeline.demo:gold_reward', name: gold}]",
        "ppo.total_episodes=448",
        "ppo.save_every=100",
        "eval.prompts.limit=32",
        *extra,
    )


def test_a_gamed_reward_raises_the_alert_in_the_run_and_the_verdict_in_the_report(
    runs_with_sft, base_model, tmp_path, capsys
):
    args = gamed_args(runs_with_sft, tmp_path)
    stages.ppo.main(args)
    out = runs_with_sft / "demo" / "ppo"
    history = read_jsonl(out / "metrics.jsonl")
    flagged = [h["iteration"] for h in history if h["alerts/gold"]]
    assert flagged and flagged[0] <= 12, [(h["objective/reward_raw"], h["judges/gold"]) for h in history]
    assert capsys.readouterr().out.count("warning: ppo: the reward rose") >= 1
    alerts = read_manifest(out)["metrics"]["alerts"]
    assert alerts and alerts[0]["judge"] == "gold" and alerts[0]["iterations"][1] == flagged[0]
    best = read_manifest(out)["metrics"]["best"]
    assert best["judge"] == "gold" and best["iteration"] < flagged[0]  # kept from before the gaming
    evaluate.main(args + [f"sft.model={base_model}"])  # (the base row's model)
    report = (runs_with_sft / "demo" / "eval" / "report.md").read_text()
    assert report.splitlines()[2].startswith("**Verdict**: the reward (long_answers) improved, win rate ")
    assert "gold did not" in report and "| best |" in report


def test_on_divergence_stop_ends_the_stage_with_a_checkpoint_and_the_best_policy(runs_with_sft, tmp_path):
    with pytest.raises(Diverged) as e:
        stages.ppo.main(gamed_args(runs_with_sft, tmp_path, "ppo.on_divergence=stop"))
    partial = runs_with_sft / "demo" / "ppo.partial"
    stopped = json.loads((partial / "checkpoint" / "ppo_state.json").read_text())["iteration"]
    assert str(e.value).startswith("ppo: stopped (ppo.on_divergence: stop): the reward rose ")
    assert f"checkpoint saved at iteration {stopped}/14" in str(e.value)
    best = json.loads((partial / "best" / "best.json").read_text())
    assert f"the policy judge 'gold' scored best (iteration {best['iteration']}) is in {partial / 'best'}" in str(
        e.value
    )
    assert AutoModelForCausalLM.from_pretrained(partial / "best") is not None
    assert AutoTokenizer.from_pretrained(partial / "best") is not None  # a model of its own, tokenizer and all
    # as the message says: the same recipe with on_divergence: warn goes on from the checkpoint to the end
    assert "ppo.on_divergence=warn" in str(e.value)
    stages.ppo.main(gamed_args(runs_with_sft, tmp_path, "ppo.on_divergence=warn"))
    out = runs_with_sft / "demo" / "ppo"
    assert [h["iteration"] for h in read_jsonl(out / "metrics.jsonl")] == list(range(1, 15))
    assert read_manifest(out)["metrics"]["best"] == best  # the gaming went on: no later policy beat it


def test_a_resumed_run_gets_back_the_best_policy_its_checkpoint_knew(tmp_path):
    """keep_best moves the best a checkpoint covers to best.prev/ when a newer one is found; resuming
    from that checkpoint replays the iterations after it, so the newer best goes and the older returns."""

    def best(directory, iteration):
        directory.mkdir()
        (directory / "best.json").write_text(json.dumps({"iteration": iteration, "judge": "gold", "value": 0.1}))

    run = SimpleNamespace(out=tmp_path)
    best(tmp_path / "best", 9)
    best(tmp_path / "best.prev", 5)
    PPORun._restore_best(run, 8)
    assert json.loads((tmp_path / "best" / "best.json").read_text())["iteration"] == 5
    assert not (tmp_path / "best.prev").exists()
    PPORun._restore_best(run, 8)  # covered by the checkpoint: stays
    assert json.loads((tmp_path / "best" / "best.json").read_text())["iteration"] == 5
    (tmp_path / "best").rename(tmp_path / "best.prev")  # killed between keep_best's two renames
    PPORun._restore_best(run, 8)
    assert json.loads((tmp_path / "best" / "best.json").read_text())["iteration"] == 5
    shutil.rmtree(tmp_path / "best")
    best(tmp_path / "best", 9)  # a best the checkpoint never knew, and none before it
    PPORun._restore_best(run, 8)
    assert not (tmp_path / "best").exists()


def test_a_judge_stuck_at_one_value_under_a_rising_reward_diverges():
    history = [
        {
            "iteration": i + 1,
            "objective/reward_raw": 0.2 * i + 0.05 * (-1) ** i,
            "objective/reward_raw_std": 1.0,
            "judges/gold": 0.0,
        }
        for i in range(10)
    ]
    found = diverging(history, "gold")
    assert found is not None and found.judge_t == 0.0
    assert diverging([{**h, "judges/gold": 0.1 * h["iteration"]} for h in history], "gold") is None


# ---- the instruct-model recipe ----

INSTRUCT_RECIPE = str(REPO / "stages/recipes/grpo-instruct-lora-1gpu.yaml")


@pytest.mark.e2e
def test_the_instruct_model_recipe_runs_on_a_tiny_model_of_its_shape(tmp_path):
    """grpo-instruct-lora-1gpu.yaml as shipped, but for its sizes: a tiny Qwen2-shaped instruct model
    (ChatML template, tied embeddings) built from a config in place of the hub's, and rows in
    trl-lib/DeepMath-103K's schema (a conversational `prompt`, a `solution`) in place of the dataset.
    No SFT, LoRA with gradient checkpointing, GRPO with dynamic sampling, clip-higher and truncated
    completions masked; its reward function is found next to the recipe; eval reports start and ppo."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests.families import chatml_tokenizer

    tokenizer = chatml_tokenizer()
    torch.manual_seed(0)
    Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).save_pretrained(tmp_path / "instruct")
    tokenizer.save_pretrained(tmp_path / "instruct")
    rows = [
        {
            "prompt": [{"role": "user", "content": f"What is {a} + {b}? Put the final answer in \\boxed{{}}."}],
            "solution": str(a + b),
        }
        for a in range(8)
        for b in range(4)
    ]
    data = tmp_path / "deepmath.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [
        "--recipe",
        INSTRUCT_RECIPE,
        f"runs_dir={tmp_path}",
        f"ppo.model={tmp_path / 'instruct'}",
        f"ppo.prompts={data}",
        f"eval.prompts={data}",
        "eval.prompts.limit=8",
        "ppo.total_episodes=64",
        "ppo.batch_size=16",
        "ppo.mini_batch_size=8",
        "ppo.gradient_accumulation_steps=2",
        "ppo.forward_batch_size=8",
        "ppo.max_new_tokens=12",
        "ppo.max_sampling_rounds=1",
        "eval.max_new_tokens=12",
        "eval.batch_size=8",
        "ppo.save_every=2",
    ]
    stages.ppo.main(args)
    evaluate.main(args)
    run = tmp_path / "grpo-instruct"
    assert not (run / "sft").exists() and (run / "ppo" / "adapter" / "adapter_config.json").is_file()
    history = read_jsonl(run / "ppo" / "metrics.jsonl")
    assert len(history) == 4 and all("rewards/correct/answered" in h and "sampling/extra_rounds" in h for h in history)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert {"start", "ppo"} <= set(metrics) and "correct_score" in metrics["ppo"]["sampled"]
