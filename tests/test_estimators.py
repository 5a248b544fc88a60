"""Critic-free estimators and loss aggregation, checked against advantages computed by hand; the
settings that do not fit together, refused when the recipe is read; the schedule of k samples."""

import math
from types import SimpleNamespace

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.recipe_loader import load_recipe
from pipeline.rl.algorithms import (
    aggregate,
    baseline_subtracted,
    discounted_returns,
    group_advantages,
    kl_per_token,
    policy_loss,
    reinforce_pp_advantages,
    zero_variance_share,
)
from pipeline.rl.iteration import with_advantages
from pipeline.rl.run_setup import Schedule, optimizer_and_schedule
from tests.conftest import DEMO_RECIPE

# two groups of k = 4: one with signal, one whose rewards are all equal
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
ALL = torch.ones(8, dtype=torch.bool)
STD = math.sqrt((4 * 0.25) / 3)  # unbiased std of [1, 0, 0, 1]


@pytest.mark.parametrize(
    "estimator, first_group",
    [
        ("grpo", [0.5 / STD, -0.5 / STD, -0.5 / STD, 0.5 / STD]),  # (r - mean) / std = +-0.866
        ("dr_grpo", [0.5, -0.5, -0.5, 0.5]),  # r - mean
        ("rloo", [1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3]),  # r - mean of the other three
    ],
)
def test_group_advantages_by_hand(estimator, first_group):
    adv = group_advantages(REWARDS, ALL, 4, estimator)
    assert adv[:4].tolist() == pytest.approx(first_group, abs=1e-5)
    assert adv[4:].tolist() == [0.0, 0.0, 0.0, 0.0]  # a group with no signal
    assert zero_variance_share(REWARDS, ALL, 4).item() == 0.5


@pytest.mark.parametrize(
    "estimator, expected",
    [
        ("grpo", [0.5 / math.sqrt(0.5), -0.5 / math.sqrt(0.5)]),  # std of [1, 0] is sqrt(1/2)
        ("dr_grpo", [0.5, -0.5]),
        ("rloo", [1.0, -1.0]),  # the other sample is the baseline
    ],
)
def test_group_advantages_with_two_samples(estimator, expected):
    adv = group_advantages(torch.tensor([1.0, 0.0, 3.0, 3.0]), torch.ones(4, dtype=torch.bool), 2, estimator)
    assert adv.tolist() == pytest.approx(expected + [0.0, 0.0], abs=1e-5)


def test_a_group_of_equal_rewards_is_exactly_zero_whatever_its_size():
    """A float32 mean of k equal rewards can miss them by 1e-7 (k not a power of 2); over a std of ~0 that
    was an advantage of 0.1-0.3 for these values."""
    for k, value in ((3, -3.98), (5, -3.99), (6, -3.98), (7, -3.98)):
        rewards = torch.full((k,), value)
        for estimator in ("grpo", "dr_grpo", "rloo"):
            assert group_advantages(rewards, torch.ones(k, dtype=torch.bool), k, estimator).abs().max().item() == 0.0
        assert zero_variance_share(rewards, torch.ones(k, dtype=torch.bool), k).item() == 1.0
    three_of_four = torch.tensor([-3.98, -3.98, float("nan"), -3.98])
    valid = torch.tensor([True, True, False, True])
    assert group_advantages(three_of_four, valid, 4, "grpo").abs().max().item() == 0.0


def test_a_completion_without_a_reward_gets_advantage_zero_and_leaves_its_group_statistics():
    rewards = torch.tensor([1.0, float("nan"), 0.0, 1.0])
    valid = torch.tensor([True, False, True, True])
    # the group is [1, 0, 1]: mean 2/3
    assert group_advantages(rewards, valid, 4, "dr_grpo").tolist() == pytest.approx([1 / 3, 0, -2 / 3, 1 / 3])
    # leave-one-out over the three rewarded: 1 - mean(0, 1) = 0.5, 0 - mean(1, 1) = -1
    assert group_advantages(rewards, valid, 4, "rloo").tolist() == pytest.approx([0.5, 0, -1.0, 0.5])
    assert baseline_subtracted(rewards, valid, 4).tolist() == pytest.approx([1 / 3, 0, -2 / 3, 1 / 3])


def test_reinforce_pp_by_hand():
    """Scores [1, 0] on responses of 2 and 1 tokens, KL [0.5, 0.2] and [0.3], beta 0.1, gamma 1:
    token rewards [-0.05, 1 - 0.02] and [-0.03]; returns-to-go [0.93, 0.98] and [-0.03]; then
    whitened over the three valid tokens of the batch."""
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    kl = torch.tensor([[0.5, 0.2, 0.0], [0.3, 0.0, 0.0]])
    adv = reinforce_pp_advantages(torch.tensor([1.0, 0.0]), kl, mask, beta=0.1, gamma=1.0)
    returns = torch.tensor([0.93, 0.98, -0.03])
    whitened = (returns - returns.mean()) / returns.std()
    assert adv[mask.bool()].tolist() == pytest.approx(whitened.tolist(), abs=1e-4)
    assert adv[~mask.bool()].tolist() == [0.0, 0.0, 0.0]


def test_reinforce_pp_discounts_over_the_model_s_tokens_only():
    """An exchange whose tokens 1-2 a tool wrote: with gamma 0.5 the score 1 on token 3 reaches token 0
    discounted once (0.5), as if the tool's tokens were not there (not 0.125), and the tool's tokens
    get no advantage. Two rows, so the whitening has a spread: returns [0.5, 1] and [0.5, 1]."""
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    adv = reinforce_pp_advantages(torch.tensor([1.0, 1.0]), torch.zeros(2, 4), mask, beta=0.0, gamma=0.5)
    assert adv[0, [0, 3]].tolist() == pytest.approx(adv[1, [0, 1]].tolist()) and adv[0, 0] < 0 < adv[0, 3]
    assert adv[0, [1, 2]].tolist() == [0.0, 0.0]


def test_discounted_returns_match_the_loop():
    rewards = torch.randn(3, 7)
    for gamma in (1.0, 0.9, 0.0):
        expected, running = torch.zeros_like(rewards), torch.zeros(3)
        for t in reversed(range(7)):
            running = rewards[:, t] + gamma * running
            expected[:, t] = running
        assert torch.allclose(discounted_returns(rewards, gamma), expected, atol=1e-5), gamma


def test_loss_aggregation_on_sequences_of_one_and_three_tokens():
    per_token = torch.tensor([[4.0, 9.0, 9.0], [1.0, 2.0, 3.0]])  # the 9s are padding
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert aggregate(per_token, mask, "token_mean").item() == pytest.approx((4 + 1 + 2 + 3) / 4)
    assert aggregate(per_token, mask, "seq_mean_token_mean").item() == pytest.approx((4 + 2) / 2)
    assert aggregate(per_token, mask, "seq_mean_token_sum_norm", horizon=3).item() == pytest.approx((4 / 3 + 6 / 3) / 2)
    # a sequence advantage (B, 1) applies to every token: at ratio 1 the policy loss is -A per token
    old = torch.zeros(2, 3)
    loss, _ = policy_loss(old, old, torch.tensor([[2.0], [-1.0]]), mask, 0.2, "seq_mean_token_mean")
    assert loss.item() == pytest.approx((-2.0 + 1.0) / 2)


def test_kl_in_the_loss_and_its_gradient_are_zero_when_the_policy_is_the_reference():
    logp = torch.log(torch.tensor([[0.2, 0.5, 0.9]])).requires_grad_()
    mask = torch.ones(1, 3)
    kl = aggregate(kl_per_token(logp, logp.detach(), mask, "k3"), mask)
    kl.backward()
    assert kl.item() == 0.0 and logp.grad.abs().max().item() == 0.0
    moved = logp.detach().clone().requires_grad_()
    kl = aggregate(kl_per_token(moved, moved.detach() - 0.3, mask, "k3"), mask)
    kl.backward()  # away from the reference: positive, and the gradient pulls back
    assert kl.item() > 0 and (moved.grad > 0).all()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["ppo.advantage_estimator=grpo"], "set samples_per_prompt to 2 or more"),
        (
            ["ppo.advantage_estimator=rloo", "ppo.samples_per_prompt=4", "ppo.value_model=reward"],
            "needs no value model",
        ),
        (["ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=4", "ppo.whiten_rewards=true"], "whiten_rewards"),
        (["ppo.samples_per_prompt=3"], "does not divide batch_size 64"),
        (["ppo.advantage_estimator=ppo"], "is not one of"),
        (["ppo.loss_aggregation=sum"], "is not one of"),
        (["ppo.rewards=[]"], "rewards is empty"),
        (["ppo.rewards=[{model: rm, function: 'a:b'}]"], "exactly one of model, function, url"),
        (["ppo.rewards=[{url: 'localhost:8000'}]"], "must start with http"),
        (["ppo.rewards=[{model: rm}, {model: rm, weight: 2}]"], "two sources are named 'rm'"),
        (["ppo.judges=[not_a_function]"], "package.module:name"),
        (["ppo.rewards=[pipeline.demo:gold_reward]", "ppo.value_model=reward"], "rewards has none"),
        (["ppo.rewards=[{function: 'pipeline.demo:gold_reward', kwargs: {prompts: 1}}]"], "receives these itself"),
        (["ppo.rewards=[{function: 'pipeline.demo:gold_reward', name: gold}]"], "rewards and judges: two sources"),
    ],
)
def test_settings_that_do_not_fit_are_refused_when_the_recipe_is_read(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(DEMO_RECIPE, overrides)


def test_the_critic_follows_the_estimator_and_the_rewards():
    assert load_recipe(DEMO_RECIPE).ppo.critic == "reward"
    assert load_recipe(DEMO_RECIPE, ["ppo.value_model=null"]).ppo.critic == "reward"
    functions_only = ["ppo.value_model=null", "ppo.rewards=[pipeline.demo:gold_reward]"]
    assert load_recipe(DEMO_RECIPE, functions_only).ppo.critic == "sft"
    assert (
        load_recipe(
            DEMO_RECIPE, [*functions_only, "ppo.advantage_estimator=rloo", "ppo.samples_per_prompt=2"]
        ).ppo.critic
        is None
    )


def test_k_samples_per_prompt_stay_together_and_n_processes_take_one_process_batch():
    cfg = load_recipe(DEMO_RECIPE, ["ppo.batch_size=8", "ppo.mini_batch_size=4", "ppo.samples_per_prompt=4"]).ppo
    wide = load_recipe(DEMO_RECIPE, ["ppo.batch_size=16", "ppo.mini_batch_size=4", "ppo.samples_per_prompt=4"]).ppo
    two, one = Schedule(cfg, 2, 10, seed=0), Schedule(wide, 1, 10, seed=0)
    for iteration in range(4):  # across epochs of the 10 prompts too
        ranks = [two.prompt_indices(iteration, r) for r in range(2)]
        for indices in ranks:
            assert len(indices) == 8 and all(len(set(indices[i : i + 4])) == 1 for i in range(0, 8, 4))
        assert ranks[0] + ranks[1] == one.prompt_indices(iteration, 0)
    # k = 1 is the schedule of every earlier run: one prompt after another of a seeded permutation
    plain = Schedule(load_recipe(DEMO_RECIPE, ["ppo.batch_size=4", "ppo.mini_batch_size=4"]).ppo, 1, 10, seed=0)
    assert plain.prompt_indices(0, 0) == torch.randperm(10, generator=torch.Generator().manual_seed(0))[:4].tolist()


def test_the_prompt_order_is_drawn_once_per_epoch(monkeypatch):
    """Not once per prompt: an iteration of 64 prompts from a set of 100 spans two epochs at most."""
    cfg = load_recipe(DEMO_RECIPE, ["ppo.batch_size=64", "ppo.mini_batch_size=8"]).ppo
    expected = [Schedule(cfg, 1, 100, seed=3).prompt_indices(i, 0) for i in range(4)]
    draws = []
    real = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: draws.append(a) or real(*a, **k))
    schedule = Schedule(cfg, 1, 100, seed=3)
    assert [schedule.prompt_indices(i, 0) for i in range(4)] == expected  # iterations 0-3: epochs 0, 0-1, 1, 1-2
    assert len(draws) == 3


def test_dr_grpo_takes_its_own_aggregation_unless_one_is_given():
    """Dr. GRPO is defined with the constant-length sum (trl sets both together); an explicit setting wins."""
    dr = load_recipe(DEMO_RECIPE, ["ppo.advantage_estimator=dr_grpo", "ppo.samples_per_prompt=4"]).ppo
    assert dr.aggregation == "seq_mean_token_sum_norm"
    assert (
        load_recipe(
            DEMO_RECIPE,
            ["ppo.advantage_estimator=dr_grpo", "ppo.samples_per_prompt=4", "ppo.loss_aggregation=token_mean"],
        ).ppo.aggregation
        == "token_mean"
    )
    assert (
        load_recipe(DEMO_RECIPE, ["ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=4"]).ppo.aggregation
        == "token_mean"
    )


def test_zero_variance_groups_are_measured_on_the_scores_not_the_kl_penalised_rewards():
    """With the KL in the reward every response's reward differs a little; a group whose scores are
    all equal still carries no signal from the reward, and is counted as such."""
    cfg = load_recipe(DEMO_RECIPE, ["ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=2", "ppo.kl_in=reward"]).ppo
    mask = torch.ones(4, 3)
    logp = torch.log(torch.tensor([[0.5, 0.4, 0.3], [0.2, 0.6, 0.3], [0.5, 0.5, 0.5], [0.1, 0.2, 0.3]]))
    exp = SimpleNamespace(
        old_logp=logp,
        ref_logp=torch.log(torch.full((4, 3), 0.4)),
        mask=mask,
        valid=torch.ones(4, dtype=torch.bool),
        scores=torch.tensor([1.0, 1.0, 0.0, 2.0]),
    )
    exp = with_advantages(exp, cfg, kl_coef=0.1)
    assert exp.zero_variance_groups.item() == 0.5  # the first group: equal scores, unequal KL


def test_adamw_weight_decay_is_a_recipe_key():
    model = torch.nn.Linear(2, 2)
    for overrides, decay in (([], 0.01), (["ppo.weight_decay=0.0"], 0.0)):
        cfg = load_recipe(DEMO_RECIPE, overrides).ppo
        optimizer, _ = optimizer_and_schedule(model, cfg, 10)
        assert optimizer.param_groups[0]["weight_decay"] == decay


def test_each_mini_batch_s_losses_are_normalised_by_its_count_over_micro_batches_and_processes():
    """Lengths 5, 1, 2, 3 shuffled into mini-batches {3, 0} and {1, 2}, 2 micro-batches each, on 2
    processes holding as many tokens: each micro-batch's loss sum is divided by the mini-batch's count
    over both processes, over 2 x 2 (accelerate's 1 / accumulation and the processes' averaging)."""
    from pipeline.rl.iteration import loss_masks, loss_normalizers

    mask = (torch.arange(5)[None, :] < torch.tensor([5, 1, 2, 3])[:, None]).float()
    rewarded = mask * torch.tensor([1.0, 1.0, 0.0, 1.0])[:, None]  # response 2 got no reward
    exp = SimpleNamespace(
        mask=mask, rewarded=rewarded, rollout=SimpleNamespace(has_stop=torch.ones(4, dtype=torch.bool))
    )
    accelerator = SimpleNamespace(num_processes=2, reduce=lambda t, reduction: t * 2)  # the other process alike
    order = torch.tensor([3, 0, 1, 2])
    for aggregation, policy in (
        ("token_mean", [(3 + 5) * 2 / 4, (1 + 2) * 2 / 4]),
        ("seq_mean_token_mean", [1.0, 1.0]),
    ):
        cfg = SimpleNamespace(
            aggregation=aggregation, mini_batch_size=2, gradient_accumulation_steps=2, mask_truncated=False
        )
        assert loss_normalizers(loss_masks(exp, cfg), order, cfg, accelerator) == [
            (policy[0], (3 + 5) * 2 / 4),
            (policy[1], 1 * 2 / 4),
        ]
