"""Test-only: one PPO optimiser step on a fixed batch of 8 rollouts (4 prompts x 2 samples), for
every advantage estimator, loss aggregation and place of the KL, however the batch is split: over
the processes of the launch (each takes its share of the rows) and into ACCUMULATION micro-batches.
Writes the parameters before and after each step to OUT/<estimator>-<aggregation>-<kl_in>.pt
(process 0), for tests/test_split_invariance.py to compare across splits; one process without
accumulation adds the step that autograd gives for the whole batch's losses (`expected`), which pins
the scale that every split shares.

    python tests/split_invariance.py OUT ACCUMULATION
    accelerate launch --multi_gpu --num_processes 2 ... tests/split_invariance.py OUT ACCUMULATION

The optimiser is plain SGD with a learning rate of 1 and no clipping, so the parameters after the
step are the initial ones minus the gradient itself (AdamW's first step would show only its signs).
"""

from __future__ import annotations

import copy
import itertools
import sys
from pathlib import Path

import torch
from accelerate.utils import set_seed
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline import dist, engine
from pipeline.recipe import GROUP_ESTIMATORS, PPOStage, RewardSource
from pipeline.rl.algorithms import AGGREGATIONS, aggregate, kl_per_token, logprobs_of, policy_loss, value_loss
from pipeline.rl.iteration import Experience, PolicyAndValue, batch_sum, disable_dropout, update, with_advantages
from pipeline.rl.rollout import Rollout

ESTIMATORS = ("gae", "gae+whiten_rewards", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
B, PROMPT, RESPONSE, K = 8, 3, 6, 2
LENGTHS = [6, 1, 4, 2, 6, 3, 1, 5]  # very unequal: a token's weight must not depend on its neighbours
SCORES = [1.0, 0.0, 0.9, 0.9, 0.0, 0.1, 1.0, 0.2]  # the third group's rewards are equal: no variance
VALID = [True, True, True, True, True, False, True, True]  # one response no source rewarded


def rows(rank: int, world: int) -> dict:
    """This process's share of the fixed batch (whole groups of K)."""
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 32, (B, PROMPT), generator=g)
    responses = torch.randint(3, 32, (B, RESPONSE), generator=g)
    mask = (torch.arange(RESPONSE)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    share = slice(rank * B // world, (rank + 1) * B // world)
    return {
        "prompts": prompts[share],
        "responses": (responses * mask)[share],
        "mask": mask[share],
        "scores": torch.tensor(SCORES)[share],
        "valid": torch.tensor(VALID)[share],
        "ref_shift": torch.randn(B, RESPONSE, generator=g)[share] * 0.3,
    }


def one_step(acc, variant: str, aggregation: str, kl_in: str) -> dict:
    rank, world, A = acc.process_index, acc.num_processes, acc.gradient_accumulation_steps
    local = B // world
    estimator, _, whiten = variant.partition("+")
    cfg = PPOStage(
        advantage_estimator=estimator,
        samples_per_prompt=K if estimator in GROUP_ESTIMATORS else 1,
        loss_aggregation=aggregation,
        kl_in=kl_in,
        kl_coef=0.1,
        batch_size=local,
        mini_batch_size=local,
        gradient_accumulation_steps=A,
        ppo_epochs=1,
        max_new_tokens=RESPONSE,
        max_grad_norm=1e9,
        value_model="head" if estimator == "gae" else None,
        whiten_rewards=bool(whiten),
        rewards=[RewardSource(function="f.py:f")],
    )
    set_seed(0)  # the same initial model on every process and in every launch
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
    model = PolicyAndValue(policy, None, value_head=estimator == "gae")
    disable_dropout(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer = acc.prepare(model, optimizer)
    before = {k: v.detach().clone() for k, v in engine.unwrap(acc, model).state_dict().items()}

    d = rows(rank, world)
    mask = d["mask"]
    rollout = Rollout(
        prompts=[None] * local,
        prompt_ids=d["prompts"].tolist(),
        query_responses=torch.cat([d["prompts"], d["responses"]], 1),
        attention_mask=torch.cat([torch.ones_like(d["prompts"]), mask], 1),
        responses=d["responses"],
        response_mask=mask,
        has_stop=torch.ones(local, dtype=torch.bool),
        texts=[""] * local,
    )
    with torch.no_grad():
        logits, values = model(rollout.query_responses, rollout.attention_mask, RESPONSE)
        old_logp = logprobs_of(logits, rollout.responses, cfg.temperature) * mask
    exp = Experience(
        rollout=rollout,
        mask=mask.float(),
        old_logp=old_logp,
        ref_logp=(old_logp - d["ref_shift"]) * mask,
        old_values=values.float() * mask if values is not None else None,
        entropy=torch.zeros_like(old_logp),
        source_scores={},
        judge_scores={},
        rm_scores=None,
        raw_scores=d["scores"],
        valid=d["valid"],
        scores=d["scores"],
        logged_metrics={},
        extra_columns={},
    )
    exp = with_advantages(exp, cfg, 0.1, batch_sum(acc))
    expected = autograd_step(model, exp, cfg) if world == 1 and A == 1 else None
    update(exp, model, optimizer, scheduler, acc, cfg, "the test step")
    after = {k: v.detach().clone() for k, v in engine.unwrap(acc, model).state_dict().items()}
    return {"before": before, "after": after, **({"expected": expected} if expected is not None else {})}


def autograd_step(model, exp: Experience, cfg: PPOStage) -> dict:
    """The parameters after SGD (lr 1) on the whole batch's losses, each with its own normaliser."""
    twin = copy.deepcopy(model)
    rollout = exp.rollout
    logits, values = twin(rollout.query_responses, rollout.attention_mask, RESPONSE)
    logp = logprobs_of(logits, rollout.responses, cfg.temperature)
    loss = policy_loss(logp, exp.old_logp, exp.advantages, exp.mask, cfg.cliprange, cfg.aggregation, RESPONSE)[0]
    if values is not None:
        loss = (
            loss
            + cfg.vf_coef
            * value_loss(values.float(), exp.old_values, exp.returns, exp.rewarded, cfg.cliprange_value)[0]
        )
    if cfg.kl_in == "loss":
        loss = loss + exp.kl_coef * aggregate(
            kl_per_token(logp, exp.ref_logp, exp.mask, "k3"), exp.mask, cfg.aggregation, RESPONSE
        )
    loss.backward()
    return {k: (p - p.grad if p.grad is not None else p).detach().clone() for k, p in twin.named_parameters()}


def main(out: Path, accumulation: int) -> None:
    dist.process_state()
    acc = engine.accelerator("no", accumulation)
    for estimator, aggregation, kl_in in itertools.product(ESTIMATORS, AGGREGATIONS, ("reward", "loss")):
        params = one_step(acc, estimator, aggregation, kl_in)
        if acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            torch.save(params, out / f"{estimator}-{aggregation}-{kl_in}.pt")
        acc.free_memory()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
