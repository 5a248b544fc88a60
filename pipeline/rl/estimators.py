"""Critic-free advantage estimators and loss aggregation, as small pure tensor functions.

Shapes as in ppo_math: B sequences, T response tokens, `mask` 1 on real response tokens. Group
estimators see the batch as B / k groups of k consecutive responses to one prompt (the schedule keeps a
prompt's k samples together, on one process). `valid` (B,) marks responses that got a reward from at
least one source: the others get advantage 0 and take no part in their group's statistics.

    grpo                   A_i = (r_i - mean) / (std + eps), std unbiased         (Shao et al. 2024)
    dr_grpo                A_i = r_i - mean                                        (Liu et al. 2025)
    rloo                   A_i = r_i - mean of the other k-1 = k/(k-1) (r_i - mean)  (Ahmadian et al. 2024)
    reinforce_pp           token rewards, returns-to-go, whitened over the batch  (Hu 2025)
    reinforce_pp_baseline  the same after subtracting the group mean from r

A sequence advantage applies to every token of its response.
"""

from __future__ import annotations

import torch

from pipeline.rl.ppo_math import Reduce, discounted_returns, masked_whiten, over_model_tokens, token_rewards

GROUP_EPS = 1e-6  # verl's; trl uses 1e-4. Only matters for a group whose rewards barely differ


def _groups(rewards: torch.Tensor, valid: torch.Tensor, k: int):
    """(B,) rewards -> (B/k, k) rewards with invalid ones zeroed, the validity, the count and the mean
    of each group over its valid members, in float64: a group of equal float32 rewards then has a mean
    equal to each of them, so it centres to exactly 0 (in float32, 3 x -2.998 / 3 is off by 1e-7, which
    GRPO's division by a std of ~0 would blow up to an advantage of 0.2)."""
    v = valid.reshape(-1, k).double()
    r = torch.where(v.bool(), rewards.reshape(-1, k).double(), torch.zeros_like(v))
    n = v.sum(1, keepdim=True)
    return r, v, n, r.sum(1, keepdim=True) / n.clamp(min=1)


def group_advantages(rewards: torch.Tensor, valid: torch.Tensor, k: int, estimator: str) -> torch.Tensor:
    """Sequence advantages (B,) of grpo / dr_grpo / rloo. A group whose (valid) rewards are all equal
    gets 0 everywhere: it carries no signal."""
    r, v, n, mean = _groups(rewards, valid, k)
    centred = (r - mean) * v
    if estimator == "grpo":
        std = ((centred ** 2).sum(1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
        adv = centred / (std + GROUP_EPS)
    elif estimator == "dr_grpo":
        adv = centred
    elif estimator == "rloo":  # a group with one valid member has no "others": no baseline, no signal
        adv = centred * n / (n - 1).clamp(min=1)
    else:
        raise ValueError(f"unknown group estimator '{estimator}'")
    return adv.reshape(-1).to(rewards.dtype)


def zero_variance(rewards: torch.Tensor, valid: torch.Tensor, k: int) -> list[bool]:
    """For each group, whether its valid rewards are all equal (also a group with under two rewards):
    it carries no signal."""
    r, v, n, mean = _groups(rewards, valid, k)
    return (((r - mean).abs() * v).amax(1) == 0).tolist()


def zero_variance_share(rewards: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """Share of groups whose valid rewards are all equal (`zero_variance`)."""
    flat = zero_variance(rewards, valid, k)
    return torch.tensor(sum(flat) / len(flat), device=rewards.device)


def baseline_subtracted(rewards: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """r_i minus its group's mean (REINFORCE++-baseline's first step); invalid rewards become 0."""
    r, v, _, mean = _groups(rewards, valid, k)
    return ((r - mean) * v).reshape(-1).to(rewards.dtype)


def reinforce_pp_advantages(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float,
                            gamma: float, reduce: Reduce | None = None) -> torch.Tensor:
    """REINFORCE++: per-token rewards (-beta * KL, plus the score on the last token), returns-to-go,
    whitened over every valid token of the whole batch, on every process (`reduce`; not per group:
    OpenRLHF #830). (B, T). The whitening shifts every token by the batch's mean, so after
    `baseline_subtracted` a group whose rewards are all equal still gets -mean/std on its tokens (as
    in OpenRLHF's reinforce_baseline and verl's reinforce_plus_plus_baseline). With gamma < 1, an
    exchange's tool tokens (holes in `mask`) are skipped, not discounted over (`over_model_tokens`)."""
    returns = over_model_tokens(lambda r: discounted_returns(r, gamma), mask, token_rewards(scores, kl, mask, beta))
    return masked_whiten(returns, mask, reduce=reduce)
