"""PPO's phases for a language-model policy, in the order `stages/ppo.py` runs them each iteration:

    rollout     = generate(...)                       pipeline/rl/rollout.py
    experience  = score(rollout, models, ...)         old log-probs, values, reference log-probs, scores
    experience  = with_advantages(experience, ...)    KL-penalised rewards, GAE, whitening
    stats       = update(experience, models, ...)     PPO epochs over shuffled minibatches
    metrics     = iteration_metrics(...)              gathered over processes

The math lives in `pipeline/rl/ppo_math.py` (pure functions); this module runs it on models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from peft import PeftModel

from pipeline import engine
from pipeline.config import PPOStage
from pipeline.rl.ppo_math import (explained_variance, gae, kl_per_token, logprobs_of, entropy_of, masked_mean,
                               masked_whiten, policy_loss, token_rewards, value_loss)
from pipeline.rl.rollout import Rollout, response_logits, response_logprobs
from pipeline.scoring import RewardScorer, position_ids


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (LoRA layers are injected into it in place)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def disable_dropout(model: nn.Module) -> None:
    """Dropout off, in train mode too: with dropout the first PPO step's ratio is not 1. The models
    then train in train mode (which gradient checkpointing needs) with the outputs of eval mode.
    trl's `disable_dropout_in_model` covers nn.Dropout; attention dropout is a float on the
    attention modules of most transformers models, so it is zeroed as well."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def token_values(model, input_ids, attention_mask) -> torch.Tensor:
    """A sequence-classification model's score head applied at every position: (B, L)."""
    model = hf_model(model)
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                      use_cache=False).last_hidden_state
    return model.score(hidden).squeeze(-1)


class PolicyAndValue(nn.Module):
    """The trainable modules as one, so one optimiser and one engine wrapper cover both."""

    def __init__(self, policy: nn.Module, value_model: nn.Module | None):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        hidden = policy.config.get_text_config().hidden_size
        # float32 like every trained weight (autocast supplies the compute dtype)
        self.value_head = nn.Linear(hidden, 1, dtype=torch.float32) if value_model is None else None

    def forward(self, input_ids, attention_mask, response_len: int):
        """Logits for the response tokens only (B, R, V), and per-token values (B, R)."""
        if self.value_head is None:
            logits = response_logits(self.policy, input_ids, attention_mask, response_len)
            values = token_values(self.value_model, input_ids, attention_mask)
        else:
            out = self.policy(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids(attention_mask), use_cache=False,
                              logits_to_keep=response_len + 1, output_hidden_states=True)
            logits = out.logits[:, :-1]
            hidden = out.hidden_states[-1]
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        return logits, values[:, -response_len - 1:-1]

    # trl's unwrap_model_for_generation switches gradient checkpointing off around generation. It is
    # only active in train mode, and rollouts are generated in eval mode: nothing to switch.
    is_gradient_checkpointing = False

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in backward; only active in train mode (see `disable_dropout`)."""
        for m in (self.policy, self.value_model):
            if m is not None:
                hf_model(m).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@dataclass
class Experience:
    """A rollout with everything PPO's update needs, all (B, R) unless noted."""

    rollout: Rollout
    mask: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    old_values: torch.Tensor
    entropy: torch.Tensor
    raw_scores: torch.Tensor
    """(B,) the reward model's score as it was trained (RewardScorer)."""
    scores: torch.Tensor
    """(B,) the score PPO optimises: normalised if asked, minus the missing-stop penalty."""
    kl: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None


@torch.no_grad()  # not inference_mode: ZeRO-3 / FSDP2 gather parameters here that backward uses later
def score(rollout: Rollout, model, reference, scorer: RewardScorer, cfg: PPOStage,
          score_norm: tuple[float, float], forward_batch_size: int) -> Experience:
    """Old log-probs and values, reference log-probs and reward-model scores, each forward in
    micro-batches of `forward_batch_size` rollouts (activation memory stays bounded).

    `model` is the (engine-wrapped) PolicyAndValue; `reference` a frozen model, or a peft policy
    whose disabled adapter makes it the reference (LoRA)."""
    R, mask = rollout.responses.shape[1], rollout.response_mask.float()
    old_logp, old_values, entropy = [], [], []
    for i in range(0, len(rollout), forward_batch_size):
        s = slice(i, i + forward_batch_size)
        logits, values = model(rollout.query_responses[s], rollout.attention_mask[s], R)
        old_logp.append(logprobs_of(logits, rollout.responses[s], cfg.temperature))
        entropy.append(entropy_of(logits, cfg.temperature))
        old_values.append(values.float())
        del logits
    if isinstance(reference, PeftModel):  # LoRA: with its adapter disabled the policy is the SFT model
        with reference.disable_adapter():
            ref_logp = response_logprobs(reference, rollout, cfg.temperature, forward_batch_size)
    else:
        ref_logp = response_logprobs(reference, rollout, cfg.temperature, forward_batch_size)
    raw_scores = scorer(rollout.prompts, rollout.texts)
    scores = (raw_scores - score_norm[0]) / score_norm[1] if cfg.normalize_scores else raw_scores.clone()
    scores = torch.where(rollout.has_stop, scores, scores - cfg.missing_stop_penalty)
    return Experience(rollout=rollout, mask=mask, old_logp=torch.cat(old_logp) * mask, ref_logp=ref_logp * mask,
                      old_values=torch.cat(old_values) * mask, entropy=torch.cat(entropy), raw_scores=raw_scores,
                      scores=scores)


def with_advantages(exp: Experience, cfg: PPOStage, kl_coef: float) -> Experience:
    """Per-token rewards (-beta * KL, plus the score on the last token), GAE and whitened advantages."""
    exp.kl = kl_per_token(exp.old_logp, exp.ref_logp, exp.mask, cfg.kl_estimator)
    exp.rewards = token_rewards(exp.scores, exp.kl, exp.mask, kl_coef)
    if cfg.whiten_rewards:
        exp.rewards = masked_whiten(exp.rewards, exp.mask, shift_mean=False)
    advantages, exp.returns = gae(exp.old_values, exp.rewards, exp.mask, cfg.gamma, cfg.lam)
    exp.advantages = masked_whiten(advantages, exp.mask)
    return exp


class NonFiniteLoss(FloatingPointError):
    """A loss went NaN or infinite: the run stops rather than train on garbage."""


def update(exp: Experience, model, optimizer, scheduler, accelerator, cfg: PPOStage, where: str,
           stop=lambda: False) -> dict:
    """`ppo_epochs` passes of clipped policy and value losses over shuffled minibatches.

    Returns per-minibatch statistics, `first`, the health check of the very first minibatch (ratio 1,
    approx-KL 0, clip fraction 0: nothing has moved yet), and `interrupted`: `stop()` (a collective,
    see checkpoints.StopRequest) is asked after every optimiser step, so a stop request is answered within
    one minibatch, well inside the ~30 s a launcher gives between SIGTERM and SIGKILL."""
    rollout, B, R = exp.rollout, len(exp.rollout), exp.rollout.responses.shape[1]
    micro = cfg.mini_batch_size // cfg.gradient_accumulation_steps
    stats = {k: [] for k in ("pg_loss", "vf_loss", "pg_clipfrac", "vf_clipfrac", "approxkl", "ratio")}
    first, interrupted = None, False
    model.train()  # dropout is off (disable_dropout); train mode lets gradient checkpointing work
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(B, device=exp.mask.device)
        for start in range(0, B, micro):
            idx = order[start:start + micro]
            with accelerator.accumulate(model):
                logits, values = model(rollout.query_responses[idx], rollout.attention_mask[idx], R)
                logp = logprobs_of(logits, rollout.responses[idx], cfg.temperature)
                del logits
                pg_loss, pg_stats = policy_loss(logp, exp.old_logp[idx], exp.advantages[idx], exp.mask[idx],
                                                cfg.cliprange)
                vf_loss, vf_stats = value_loss(values.float(), exp.old_values[idx], exp.returns[idx], exp.mask[idx],
                                               cfg.cliprange_value)
                for name, value in (("loss/policy", pg_loss), ("loss/value", vf_loss)):
                    if not torch.isfinite(value):
                        raise NonFiniteLoss(f"ppo: {name} is {value.item()} at {where}, epoch {epoch + 1}; stopping.")
                accelerator.backward(pg_loss + cfg.vf_coef * vf_loss)
                if accelerator.sync_gradients:
                    engine.clip_gradients(accelerator, model, cfg.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()  # not prepared by accelerate: once per optimiser step, whatever the world size
                optimizer.zero_grad()
            for k, v in (("pg_loss", pg_loss), ("vf_loss", vf_loss), ("pg_clipfrac", pg_stats["clipfrac"]),
                         ("vf_clipfrac", vf_stats["clipfrac"]), ("approxkl", pg_stats["approxkl"]),
                         ("ratio", pg_stats["ratio"])):
                stats[k].append(v.detach())
            if first is None:
                first = {"ratio": pg_stats["ratio"].item(), "approxkl": pg_stats["approxkl"].item(),
                         "clipfrac": pg_stats["clipfrac"].item()}
            if accelerator.sync_gradients and stop():
                interrupted = True
                break
        if interrupted:
            break
    model.eval()
    return {"first": first, "interrupted": interrupted, **{k: torch.stack(v).mean() for k, v in stats.items()}}


def iteration_metrics(exp: Experience, stats: dict, kl_coef: float, cfg: PPOStage, accelerator) -> dict:
    """TRL's metric names, averaged over processes. `objective/scores` is the score PPO optimises
    (normalised if asked, minus the missing-stop penalty); `objective/rm_score_raw` is the reward
    model's own score, the same quantity eval reports as `rm_score`; `objective/missing_stop_penalty`
    the mean penalty subtracted (unnormalised: scores = rm_score_raw - missing_stop_penalty)."""
    seq_kl, mask = exp.kl.sum(1), exp.mask
    local = {
        "objective/kl": seq_kl.mean(), "objective/entropy": masked_mean(exp.entropy, mask),
        "objective/non_score_reward": (-kl_coef * exp.kl).sum(1).mean(),
        "objective/rlhf_reward": (exp.scores - kl_coef * seq_kl).mean(), "objective/scores": exp.scores.mean(),
        "objective/rm_score_raw": exp.raw_scores.mean(),
        "objective/missing_stop_penalty": cfg.missing_stop_penalty * (~exp.rollout.has_stop).float().mean(),
        "policy/approxkl_avg": stats["approxkl"], "policy/clipfrac_avg": stats["pg_clipfrac"],
        "loss/policy_avg": stats["pg_loss"], "loss/value_avg": stats["vf_loss"],
        "val/clipfrac_avg": stats["vf_clipfrac"], "val/ratio": stats["ratio"],
        "val/explained_variance": explained_variance(exp.old_values, exp.returns, mask),
        "val/num_eos_tokens": exp.rollout.has_stop.float().sum(), "response_length": mask.sum(1).mean(),
    }
    metrics = {k: v.item() for k, v in accelerator.reduce({k: v.detach().float() for k, v in local.items()},
                                                           reduction="mean").items()}
    metrics["val/num_eos_tokens"] *= accelerator.num_processes  # a count: summed, not averaged
    metrics["first_minibatch"] = stats["first"]
    return metrics
