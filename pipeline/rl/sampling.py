"""Dynamic sampling (DAPO, Yu et al. 2025; verl's `filter_groups`): a batch made of groups that carry signal.

A group whose k scores are all equal has advantage 0 under the group estimators: its rollouts cost a
generation and an update and teach nothing (late in an RLVR run, every group can be all right or all
wrong). With `ppo.dynamic_sampling`, such groups are dropped and more prompts are drawn
(`Schedule.prompt_indices` with a round number: a fixed function of the seed, the iteration and the
round, so a resumed run draws the same) until every process holds `batch_size` rollouts of groups
with signal, at most `max_sampling_rounds` more generations an iteration. Every process generates
in every round (under ZeRO-3 a generation gathers the policy, a collective) and they decide
together whether another round is needed. A batch still short after the last round is completed
with dropped groups (they add no gradient), and the share is logged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.rl.algorithms import zero_variance
from pipeline.rl.iteration import Rewarded
from pipeline.rl.rollout import Rollout

Sample = Callable[[int], tuple[Rollout, Rewarded]]  # round -> a generation of prompts and its rewards


def with_signal(
    first: tuple[Rollout, Rewarded], sample: Sample, k: int, max_rounds: int, accelerator, pad_id: int
) -> tuple[Rollout, Rewarded, dict[str, float]]:
    """The batch of `first`'s size from groups with signal: `first`'s, then those of up to `max_rounds`
    more generations (`sample(round)`), then, if still short, `first`'s others. Returns the batch,
    its rewards, and the figures logged: extra rounds, the share of the groups generated that had no
    signal, and the share of the batch's groups that have none."""
    wanted = len(first[0]) // k
    rounds, kept, dropped = [first], [], []
    while True:
        rollout, rewarded = rounds[-1]
        flat = zero_variance(rewarded.scores, rewarded.valid, k)
        kept += [(len(rounds) - 1, g) for g in range(len(flat)) if not flat[g]]
        dropped += [(len(rounds) - 1, g) for g in range(len(flat)) if flat[g]]
        short = torch.tensor(float(max(0, wanted - len(kept))), device=rewarded.scores.device)
        if accelerator.num_processes > 1:  # one process short: every process generates once more
            short = accelerator.reduce(short, reduction="max")
        if short.item() == 0 or len(rounds) > max_rounds:
            break
        rounds.append(sample(len(rounds)))
    chosen = (kept + dropped)[:wanted]  # groups with signal first, in the order they were drawn
    parts = []
    for r, (rollout, rewarded) in enumerate(rounds):
        rows = [g * k + i for (rr, g) in chosen if rr == r for i in range(k)]
        if rows:
            parts.append((rollout.take(rows), rewarded.take(rows)))
    rewarded = Rewarded.cat([p[1] for p in parts])
    rewarded.logged_metrics = Rewarded.logged_by([r for _, r in rounds])  # every round's calls
    generated, flat = sum(len(rollout) for rollout, _ in rounds) // k, set(dropped)
    figures = {
        "sampling/extra_rounds": float(len(rounds) - 1),
        "sampling/dropped_groups": len(dropped) / generated,
        "sampling/groups_without_signal": sum(c in flat for c in chosen) / wanted,
    }
    return Rollout.cat([p[0] for p in parts], pad_id), rewarded, figures
