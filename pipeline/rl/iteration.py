"""PPO's phases for a language-model policy, in the order `stages/ppo.py` runs them each iteration:

    rollout     = generate(...)                       pipeline/rl/rollout.py
    rewarded    = reward(rollout, sources, ...)       every reward source's and judge's scores
                  (dynamic sampling: groups without signal out, more rollouts in: pipeline/rl/sampling.py)
    experience  = score(rollout, rewarded, models)    old log-probs, values, reference log-probs
    experience  = with_advantages(experience, ...)    GAE on KL-penalised rewards, or a critic-free estimator
    stats       = update(experience, models, ...)     PPO epochs over shuffled minibatches
    metrics     = iteration_metrics(...)              gathered over processes

The math lives in `pipeline/rl/algorithms.py` and `pipeline/rl/algorithms.py` (pure functions); this
module runs it on models.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
from accelerate.utils import gather_object

from pipeline import engine
from pipeline.errors import NonFiniteLoss
from pipeline.models import hf_model, is_peft
from pipeline.recipe import GROUP_ESTIMATORS, PPOStage
from pipeline.rl import unpadded
from pipeline.rl.algorithms import (
    Reduce,
    aggregate,
    baseline_subtracted,
    explained_variance,
    gae,
    group_advantages,
    k3_clamped,
    kl_per_token,
    logprobs_and_entropy,
    logprobs_of,
    masked_mean,
    masked_moments,
    masked_whiten,
    policy_loss,
    reinforce_pp_advantages,
    token_rewards,
    value_loss,
    zero_variance_share,
)
from pipeline.rl.rewards import RewardError, Rewards, TrainerState
from pipeline.rl.rollout import Rollout, chunked_response_logprobs, response_hidden, response_logits, response_logprobs
from pipeline.rl.unpadded import Layout
from pipeline.scoring import position_ids


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


def response_values(model, input_ids, attention_mask, response_len: int, layout: Layout | None = None) -> torch.Tensor:
    """A sequence-classification model's score head applied at the positions that predict the
    response tokens (where the policy's logits are read): (B, R)."""
    return hf_model(model).score(response_hidden(model, input_ids, attention_mask, response_len, layout)).squeeze(-1)


class PolicyAndValue(nn.Module):
    """The trainable modules as one, so one optimiser and one engine wrapper cover both: the policy
    and gae's value function (a separate network, or a head on the policy), or the policy alone for
    the critic-free estimators."""

    def __init__(self, policy: nn.Module, value_model: nn.Module | None, value_head: bool = False):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        hidden = policy.config.get_text_config().hidden_size
        # float32 like every trained weight (autocast supplies the compute dtype)
        self.value_head = nn.Linear(hidden, 1, dtype=torch.float32) if value_head else None
        self.chunked = False
        """Whether `forward(tokens=...)` runs the LM head in chunks (`rollout.chunks_head`): set by the RL
        stage, which knows whether the engine will shard the parameters."""

    @property
    def has_critic(self) -> bool:
        return self.value_model is not None or self.value_head is not None

    def forward(
        self,
        input_ids,
        attention_mask,
        response_len: int,
        tokens: torch.Tensor | None = None,
        temperature: float = 1.0,
        entropy: bool = False,
    ):
        """Logits for the response tokens only (B, R, V), and per-token values (B, R) (None without a
        value function). Unpadded (pipeline/rl/unpadded.py) where the models were enabled for it.

        With `tokens` (the responses, (B, R)): their log-probs at `temperature` (float32, with
        gradient) instead of the logits, and the entropy (no gradient; None unless `entropy`):
        `((logp, entropy), values)`. `chunked`: without ever holding the (B, R, V) logits."""
        layout = Layout(input_ids, attention_mask, response_len) if unpadded.enabled(self.policy) else None
        if tokens is not None and self.chunked:
            (logp, ent), hidden = chunked_response_logprobs(
                self.policy, input_ids, attention_mask, tokens, temperature, layout, entropy
            )
            if self.value_head is not None:
                values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
            else:
                values = (
                    response_values(self.value_model, input_ids, attention_mask, response_len, layout)
                    if self.value_model is not None
                    else None
                )
            return (logp, ent), values
        logits, values = self._logits_and_values(input_ids, attention_mask, response_len, layout)
        if tokens is None:
            return logits, values
        if entropy and not torch.is_grad_enabled():  # (scoring: both from one log-softmax)
            return logprobs_and_entropy(logits, tokens, temperature), values
        logp = logprobs_of(logits, tokens, temperature)
        ent = logprobs_and_entropy(logits.detach(), tokens, temperature)[1] if entropy else None
        return (logp, ent), values

    def _logits_and_values(self, input_ids, attention_mask, response_len: int, layout: Layout | None):
        if self.value_head is None:
            logits = response_logits(self.policy, input_ids, attention_mask, response_len, layout)
            values = (
                response_values(self.value_model, input_ids, attention_mask, response_len, layout)
                if self.value_model is not None
                else None
            )
            return logits, values
        if layout is not None:
            out = layout.forward(
                self.policy, use_cache=False, logits_to_keep=layout.predictors.flatten(), output_hidden_states=True
            )
            logits, hidden = out.logits.view(*layout.predictors.shape, -1), out.hidden_states[-1][0, layout.predictors]
        else:
            out = self.policy(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids(attention_mask),
                use_cache=False,
                logits_to_keep=response_len + 1,
                output_hidden_states=True,
            )
            logits, hidden = out.logits[:, :-1], out.hidden_states[-1][:, -response_len - 1 : -1]
        return logits, self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in backward; only active in train mode (see `disable_dropout`)."""
        for m in (self.policy, self.value_model):
            if m is not None:
                hf_model(m).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@dataclass
class Rewarded:
    """A rollout's rewards: every source's and judge's scores, their weighted sum, the score optimised
    and what reward functions logged, row by row as the rollout (`take` and `cat` as `Rollout`'s)."""

    source_scores: dict[str, torch.Tensor]
    """(B,) each reward source's own score (a reward model's as it was trained), NaN where none."""
    judge_scores: dict[str, torch.Tensor]
    """(B,) each judge's score, NaN where none: watched, never optimised."""
    rm_scores: torch.Tensor | None
    """(B,) the score of this run's reward model (`{model: rm}`), if it is a source."""
    raw_scores: torch.Tensor
    """(B,) the weighted sum of the sources' scores (0 where no source gave one)."""
    valid: torch.Tensor
    """(B,) whether any source gave the completion a reward (the others get advantage 0)."""
    scores: torch.Tensor
    """(B,) the reward optimised: the weighted sum with the RM normalised if asked, minus the
    missing-stop penalty."""
    logged_metrics: dict[str, list[float]]
    """'<rewards|judges>/<source>/<name>' -> what reward functions logged with `log_metric`."""
    extra_columns: dict[str, list]
    """column -> one value per rollout, logged by reward functions with `log_extra` (for samples.jsonl)."""

    def take(self, rows: list[int]) -> Rewarded:
        index = torch.tensor(rows, dtype=torch.long, device=self.scores.device)
        tensors = lambda d: {k: v[index] for k, v in d.items()}  # noqa: E731
        return Rewarded(
            tensors(self.source_scores),
            tensors(self.judge_scores),
            self.rm_scores[index] if self.rm_scores is not None else None,
            self.raw_scores[index],
            self.valid[index],
            self.scores[index],
            self.logged_metrics,
            {k: [v[i] for i in rows] for k, v in self.extra_columns.items()},
        )

    @staticmethod
    def cat(parts: list[Rewarded]) -> Rewarded:
        """Batches' rewards as one; what their functions logged, all of it (a metric's values, a column's
        rows where every batch logged it)."""
        tensors = lambda key: {k: torch.cat([getattr(p, key)[k] for p in parts]) for k in getattr(parts[0], key)}  # noqa: E731
        extra = {
            k: [x for p in parts for x in p.extra_columns[k]]
            for k in parts[0].extra_columns
            if all(k in p.extra_columns for p in parts)
        }
        return Rewarded(
            tensors("source_scores"),
            tensors("judge_scores"),
            torch.cat([p.rm_scores for p in parts]) if parts[0].rm_scores is not None else None,
            *(torch.cat([getattr(p, key) for p in parts]) for key in ("raw_scores", "valid", "scores")),
            Rewarded.logged_by(parts),
            extra,
        )

    @staticmethod
    def logged_by(parts: list[Rewarded]) -> dict[str, list[float]]:
        """What the reward functions logged over all of `parts`' calls, each metric's values in order."""
        metrics = {}
        for p in parts:
            for k, v in p.logged_metrics.items():
                metrics.setdefault(k, []).extend(v)
        return metrics


@dataclass
class Experience(Rewarded):
    """A rewarded rollout with everything PPO's update needs, all (B, R) unless noted."""

    rollout: Rollout
    mask: torch.Tensor
    old_logp: torch.Tensor | None
    """None until the update under `single_pass` (its own log-probs, detached, are the old ones)."""
    ref_logp: torch.Tensor | None
    """None without a KL term (`uses_kl`)."""
    old_values: torch.Tensor | None
    """None for the critic-free estimators."""
    entropy: torch.Tensor | None
    """None until the update under `single_pass`."""
    kl: torch.Tensor | None = None
    """(B, R) the KL estimate per token; None without a reference (and under `single_pass` until the update)."""
    rewarded: torch.Tensor | None = None
    """(B, R) the mask on the completions some source rewarded."""
    kl_coef: float = 0.0
    zero_variance_groups: torch.Tensor | None = None
    sampling: dict[str, float] = field(default_factory=dict)
    """Dynamic sampling's figures for the iteration (pipeline/rl/sampling.py), if it ran."""
    watched: Rewarded | None = None
    """Under dynamic sampling, the first generation's rewards: what the policy earns on the prompts
    drawn, where the batch trained on keeps only groups that disagree (the reward's and judges'
    metrics, the best policy and the divergence test read these)."""
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None


def reward(
    rollout: Rollout,
    columns: dict,
    rewards: Rewards,
    judges: Rewards,
    cfg: PPOStage,
    score_norm: tuple[float, float] | None,
    state: TrainerState | None = None,
) -> Rewarded:
    """Every reward source's and judge's scores of a rollout (`columns`: the prompt dataset's other
    columns, one value per rollout; `state`: the run's progress, for reward functions), the score
    optimised, and what the reward functions logged."""
    agent = rollout.agent
    if agent is not None and any(env is not None for env in agent.environments):  # as trl passes them
        columns = {**columns, "environments": agent.environments}
    batch = (rollout.prompts, rollout.texts, rollout.responses, rollout.response_mask, columns, rollout.prompt_ids)
    exchanges = agent.exchanges if agent is not None else None
    try:
        sources, failure = rewards.score(*batch, state=state, exchanges=exchanges), None
    except RewardError as e:  # the judges score all the same: every process runs the same forwards
        failure = e
    judged = judges.score(*batch, state=state, exchanges=exchanges)
    if failure is not None:
        raise failure
    raw_scores, valid = rewards.total(sources)
    rm = rewards.rm_label
    if cfg.normalize_scores:  # the RM stage's reward model, by the statistics it measured on reference responses
        scores, _ = rewards.total({**sources, rm: (sources[rm] - score_norm[0]) / score_norm[1]})
    else:
        scores = raw_scores.clone()
    scores = torch.where(rollout.has_stop, scores, scores - cfg.stop_penalty)
    logs = (rewards.take_log(), judges.take_log())
    return Rewarded(
        sources,
        judged,
        sources[rm] if rm else None,
        raw_scores,
        valid,
        scores,
        logged_metrics={k: v for log in logs for k, v in log.metrics.items()},
        extra_columns={k: v for log in logs for k, v in log.extra.items()},
    )


@torch.no_grad()  # not inference_mode: ZeRO-3 / FSDP2 gather parameters here that backward uses later
def score(rollout: Rollout, rewarded: Rewarded, model, reference, cfg: PPOStage, forward_batch_size: int) -> Experience:
    """Old log-probs and values, reference log-probs, each forward in micro-batches of
    `forward_batch_size` rollouts (activation memory stays bounded), with the rollout's rewards.

    `model` is the (engine-wrapped) PolicyAndValue; `reference` a frozen model, or a peft policy
    whose disabled adapter makes it the reference (LoRA), or None without a KL term. Under
    `cfg.single_pass` the policy's forward waits for the update, which reads its own log-probs."""
    R, mask = rollout.responses.shape[1], rollout.loss_mask.float()  # (an agent's: its own tokens)
    old_logp, old_values, entropy = [], [], []
    for i in range(0, len(rollout), forward_batch_size) if not cfg.single_pass else ():
        s = slice(i, i + forward_batch_size)
        (logp, ent), values = model(
            rollout.query_responses[s],
            rollout.attention_mask[s],
            R,
            tokens=rollout.responses[s],
            temperature=cfg.temperature,
            entropy=True,
        )
        old_logp.append(logp)  # (through the update's own path: the LM head in chunks where it runs so)
        entropy.append(ent)
        if values is not None:
            old_values.append(values.float())
    ref_logp = None
    if is_peft(reference):  # LoRA: with its adapter disabled the policy is the start
        with reference.disable_adapter():
            ref_logp = response_logprobs(reference, rollout, cfg.temperature, forward_batch_size) * mask
    elif reference is not None:
        ref_logp = response_logprobs(reference, rollout, cfg.temperature, forward_batch_size) * mask
    return Experience(
        rollout=rollout,
        mask=mask,
        old_logp=torch.cat(old_logp) * mask if old_logp else None,
        ref_logp=ref_logp,
        old_values=torch.cat(old_values) * mask if old_values else None,
        entropy=torch.cat(entropy) if entropy else None,
        **{f.name: getattr(rewarded, f.name) for f in fields(Rewarded)},
    )


def batch_sum(accelerator) -> Reduce:
    """Sums a tensor over every process (one all-reduce); the identity on one process."""
    if accelerator.num_processes == 1:
        return lambda t: t
    return lambda t: accelerator.reduce(t, reduction="sum")


def judge_mean(exp: Experience, judge: str, accelerator) -> float | None:
    """A judge's mean over the batch of every process (None: it scored nothing)."""
    scores = (exp.watched or exp).judge_scores[judge].double()
    total, n = batch_sum(accelerator)(torch.stack([scores.nansum(), (~scores.isnan()).sum().double()])).tolist()
    return total / n if n else None


def with_advantages(exp: Experience, cfg: PPOStage, kl_coef: float, reduce: Reduce | None = None) -> Experience:
    """Advantages (B, T) by `cfg.advantage_estimator`:

    gae: per-token rewards (-beta * KL, plus the score on the last token), GAE, whitened;
    grpo / dr_grpo / rloo: one advantage per sequence from its group of k (the sequence reward minus
        beta times its KL, with the KL in the reward), on every token;
    reinforce_pp(_baseline): per-token rewards, returns-to-go, whitened over the batch.

    Whitening is over the whole batch of every process (`reduce`: `batch_sum`); a group's statistics
    are its own (its k samples are on one process). With `kl_in: loss` beta is 0 here and `update`
    adds the KL term to the loss. Completions without a reward from any source get advantage 0 and
    take no part in the statistics. `zero_variance_groups` is measured on the scores."""
    if exp.old_logp is not None and exp.ref_logp is not None:  # (else no KL term, or not yet: single_pass)
        exp.kl = kl_per_token(exp.old_logp, exp.ref_logp, exp.mask, cfg.kl_estimator)
    kl = exp.kl if exp.kl is not None else torch.zeros_like(exp.mask)  # (its coefficient is then 0 here)
    exp.kl_coef = kl_coef
    beta = kl_coef if cfg.kl_in == "reward" else 0.0
    # a completion no source rewarded: advantage 0, no part in any statistic, no value target
    exp.rewarded = rewarded = exp.mask * exp.valid.unsqueeze(1).to(exp.mask.dtype)
    k, estimator = cfg.samples_per_prompt, cfg.advantage_estimator
    if estimator == "gae":
        exp.rewards = token_rewards(exp.scores, kl, exp.mask, beta)
        if cfg.whiten_rewards:
            exp.rewards = masked_whiten(exp.rewards, rewarded, shift_mean=False, reduce=reduce)
        advantages, exp.returns = gae(exp.old_values, exp.rewards, exp.mask, cfg.gamma, cfg.lam)
        exp.advantages = masked_whiten(advantages, rewarded, reduce=reduce)
        return exp
    if estimator in GROUP_ESTIMATORS:
        exp.zero_variance_groups = zero_variance_share(exp.scores, exp.valid, k)
    if estimator in ("grpo", "dr_grpo", "rloo"):
        sequence_rewards = exp.scores - beta * kl.sum(1)
        exp.advantages = group_advantages(sequence_rewards, exp.valid, k, estimator).unsqueeze(1) * exp.mask
    else:  # reinforce_pp, reinforce_pp_baseline
        scores = exp.scores
        if estimator == "reinforce_pp_baseline":
            scores = baseline_subtracted(scores, exp.valid, k)
        exp.advantages = reinforce_pp_advantages(scores, kl, rewarded, beta, cfg.gamma, reduce)
    return exp


LOSS_LABELS = {"pg_loss": "loss/policy", "vf_loss": "loss/value", "kl_loss": "loss/kl"}


def agree(losses: dict[str, torch.Tensor], stop_flag: bool, accelerator) -> tuple[dict[str, int], bool]:
    """Every process's verdict before backward: for each loss, the lowest process on which it is not
    finite (absent: finite everywhere), and whether any process was asked to stop. One all-reduce and
    one host sync per micro-batch for both: a NaN on one process stops all of them at once (alone, it
    would leave the others waiting in backward's gradient all-reduce until the process-group timeout)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    device = next(iter(losses.values())).device
    verdict = torch.stack(
        [
            torch.where(torch.isfinite(losses[name].detach()), world, rank).to(device, torch.float32)
            if name in losses
            else torch.tensor(float(world), device=device)
            for name in LOSS_LABELS
        ]
        + [torch.tensor(0.0 if stop_flag else 1.0, device=device)]
    )
    if world > 1:
        torch.distributed.all_reduce(verdict, op=torch.distributed.ReduceOp.MIN)
    *bad, go_on = verdict.tolist()
    return {name: int(r) for name, r in zip(LOSS_LABELS, bad) if r < world}, go_on == 0.0


def loss_masks(exp: Experience, cfg: PPOStage) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens the policy (and KL) loss and the value loss are over: the responses' (the value
    loss: of rewarded responses), without those cut by max_new_tokens under `mask_truncated`."""
    keep = exp.rollout.has_stop.unsqueeze(1).to(exp.mask.dtype) if cfg.mask_truncated else 1.0
    return exp.mask * keep, exp.rewarded * keep


def loss_normalizers(
    masks: tuple[torch.Tensor, torch.Tensor], order: torch.Tensor, cfg: PPOStage, accelerator
) -> list[tuple[float, float]]:
    """For each mini-batch of an epoch (in `order`): the divisors of its micro-batches' policy and value
    losses, so that the gradient is the mini-batch's mean over every process's tokens (or sequences,
    `loss_units`), however it is cut. Each micro-batch's loss is its sum over that count, times the
    accumulation steps and the processes, which `accelerator.backward` (1 / steps) and the engine's
    gradient averaging (1 / processes) divide out again. One all-reduce an epoch. `masks`: `loss_masks`."""
    policy_mask, value_mask = masks
    units = (
        policy_mask.sum(1) if cfg.aggregation == "token_mean" else torch.ones_like(policy_mask[:, 0])
    )  # (`loss_units`)
    per_sequence = torch.stack([units, value_mask.sum(1)], 1).double()
    counts = per_sequence[order].view(-1, cfg.mini_batch_size, 2).sum(1)  # (mini-batches, 2)
    counts = batch_sum(accelerator)(counts) / (cfg.gradient_accumulation_steps * accelerator.num_processes)
    return [(policy, value) for policy, value in counts.clamp(min=1e-8).tolist()]


def update(exp: Experience, model, optimizer, scheduler, accelerator, cfg: PPOStage, where: str, stop=None) -> dict:
    """`ppo_epochs` passes of the clipped policy loss (plus the value loss with a critic, the KL term
    with `kl_in: loss`) over shuffled minibatches, each an optimiser step whose losses are normalised
    by the whole mini-batch (`loss_normalizers`): the step does not depend on how it is cut into
    micro-batches or spread over processes.

    Returns per-minibatch statistics, `first`, the health check of the very first minibatch (ratio 1,
    approx-KL 0, clip fraction 0: nothing has moved yet), and `interrupted`: `stop` (a
    dist.StopRequest) is read with the loss check of every micro-batch (`agree`, all processes
    together) and answered after that optimiser step, so within one minibatch, well inside the ~30 s a
    launcher gives between SIGTERM and SIGKILL."""
    rollout, B, R = exp.rollout, len(exp.rollout), exp.rollout.responses.shape[1]
    micro = cfg.mini_batch_size // cfg.gradient_accumulation_steps
    how = cfg.aggregation
    stats = {
        k: []
        for k in ("pg_loss", "vf_loss", "pg_clipfrac", "vf_clipfrac", "approxkl", "ratio", "kl_loss", "kl_clamped")
    }
    first, interrupted = None, False
    policy_mask, value_mask = loss_masks(exp, cfg)
    own = exp.old_logp is None  # single_pass: the old log-probs are this pass's own, and its entropy is logged
    if own:
        exp.old_logp, exp.entropy = torch.zeros_like(exp.mask), torch.zeros_like(exp.mask)
    model.train()  # dropout is off (disable_dropout); train mode lets gradient checkpointing work
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(B, device=exp.mask.device)
        normalizers = loss_normalizers((policy_mask, value_mask), order, cfg, accelerator)
        for start in range(0, B, micro):
            idx = order[start : start + micro]
            policy_units, value_tokens = normalizers[start // cfg.mini_batch_size]
            with accelerator.accumulate(model):
                (logp, entropy), values = model(
                    rollout.query_responses[idx],
                    rollout.attention_mask[idx],
                    R,
                    tokens=rollout.responses[idx],
                    temperature=cfg.temperature,
                    entropy=own,
                )
                if own:  # (ratio 1: the very policy that sampled them, before this step)
                    exp.old_logp[idx], exp.entropy[idx] = logp.detach() * exp.mask[idx], entropy
                mask = policy_mask[idx]
                pg_loss, pg_stats = policy_loss(
                    logp,
                    exp.old_logp[idx],
                    exp.advantages[idx],
                    mask,
                    cfg.cliprange,
                    how,
                    cfg.horizon,
                    policy_units,
                    cfg.cliprange_high,
                )
                losses = {"pg_loss": pg_loss}
                if values is not None:
                    vf_loss, vf_stats = value_loss(
                        values.float(),
                        exp.old_values[idx],
                        exp.returns[idx],
                        value_mask[idx],
                        cfg.cliprange_value,
                        value_tokens,
                    )
                    losses.update(vf_loss=vf_loss, vf_clipfrac=vf_stats["clipfrac"])
                    loss = pg_loss + cfg.vf_coef * vf_loss
                else:
                    loss = pg_loss
                if cfg.kl_in == "loss" and exp.ref_logp is not None:  # k3: 0 and no gradient while policy = reference
                    kl_loss = aggregate(
                        kl_per_token(logp, exp.ref_logp[idx], mask, "k3"), mask, how, cfg.horizon, policy_units
                    )
                    losses["kl_loss"] = kl_loss
                    pg_stats["kl_clamped"] = k3_clamped(logp.detach(), exp.ref_logp[idx], mask)
                    loss = loss + exp.kl_coef * kl_loss
                bad, stop_requested = agree(losses, stop is not None and stop.flag, accelerator)
                for name, process in bad.items():
                    raise NonFiniteLoss(
                        f"ppo: {LOSS_LABELS[name]} is not finite at {where}, epoch {epoch + 1} (on "
                        f"process {process}): stopping. Lower ppo.learning_rate, or check the rewards."
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    engine.clip_gradients(accelerator, model, cfg.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()  # not prepared by accelerate: once per optimiser step, whatever the world size
                optimizer.zero_grad()
            for k, v in {
                **losses,
                "pg_clipfrac": pg_stats["clipfrac"],
                "approxkl": pg_stats["approxkl"],
                "ratio": pg_stats["ratio"],
                **({"kl_clamped": pg_stats["kl_clamped"]} if "kl_clamped" in pg_stats else {}),
            }.items():
                stats[k].append(v.detach())
            if first is None:
                first = {
                    "ratio": pg_stats["ratio"].item(),
                    "approxkl": pg_stats["approxkl"].item(),
                    "clipfrac": pg_stats["clipfrac"].item(),
                }
            if accelerator.sync_gradients and stop_requested:
                interrupted = True
                break
        if interrupted:
            break
    model.eval()
    if own and exp.ref_logp is not None:  # the KL logged, as `with_advantages` computes it otherwise
        exp.kl = kl_per_token(exp.old_logp, exp.ref_logp, exp.mask, cfg.kl_estimator)
    return {"first": first, "interrupted": interrupted, **{k: torch.stack(v).mean() for k, v in stats.items() if v}}


def iteration_metrics(exp: Experience, stats: dict, kl_coef: float, cfg: PPOStage, accelerator) -> dict:
    """TRL's metric names, averaged over processes, and each reward source's and judge's mean.

    `objective/scores` is the reward optimised (normalised if asked, minus the missing-stop
    penalty); `objective/reward_raw` the weighted sum of the sources' own scores; `rewards/<name>` and
    `judges/<name>` each source's and judge's mean over the completions it scored (these three: of the
    first generation under dynamic sampling). `objective/rm_score_raw`
    (with a source named rm, as by default) is the reward model's own score, the quantity eval reports
    as `rm_score`; `objective/missing_stop_penalty` the mean penalty subtracted (unnormalised, one
    source: scores = rm_score_raw - missing_stop_penalty)."""
    mask = exp.mask
    seq_kl = exp.kl.sum(1) if exp.kl is not None else torch.zeros_like(exp.scores)  # (no KL term: not logged)
    seen = exp.watched or exp  # the policy's rewards on the prompts drawn (see `Experience.watched`)
    local = {
        "objective/entropy": masked_mean(exp.entropy, mask),
        "objective/rlhf_reward": (exp.scores - kl_coef * seq_kl).mean(),
        "objective/scores": exp.scores.mean(),
    }
    if exp.kl is not None:
        local.update({"objective/kl": seq_kl.mean(), "objective/non_score_reward": (-kl_coef * exp.kl).sum(1).mean()})
    if exp.rm_scores is not None:
        local["objective/rm_score_raw"] = exp.rm_scores.mean()
    local.update(
        {
            "objective/missing_stop_penalty": cfg.stop_penalty * (~exp.rollout.has_stop).float().mean(),
            "policy/approxkl_avg": stats["approxkl"],
            "policy/clipfrac_avg": stats["pg_clipfrac"],
            "loss/policy_avg": stats["pg_loss"],
        }
    )
    if exp.old_values is not None:
        local.update({"loss/value_avg": stats["vf_loss"], "val/clipfrac_avg": stats["vf_clipfrac"]})
    local["val/ratio"] = stats["ratio"]
    if exp.old_values is not None:  # (the whole batch's: the same on every process)
        local["val/explained_variance"] = explained_variance(exp.old_values, exp.returns, mask, batch_sum(accelerator))
    if cfg.kl_estimator == "k3" and exp.kl is not None:  # the KL in the reward, capped where far from the reference
        local["objective/kl_clamped"] = k3_clamped(exp.old_logp, exp.ref_logp, mask)
    local.update(
        {
            "val/num_eos_tokens": exp.rollout.has_stop.float().sum(),
            "response_length": mask.sum(1).mean(),
            "objective/reward_raw": seen.raw_scores.mean(),
            "objective/rewarded": exp.valid.float().mean(),
            # the reward's spread among the batch's rollouts (of every process: the same on each)
            "objective/reward_raw_std": masked_moments(
                seen.raw_scores[:, None], torch.ones_like(seen.raw_scores[:, None]), batch_sum(accelerator)
            )[1].sqrt(),
        }
    )
    if "kl_loss" in stats:
        local["loss/kl_avg"] = stats["kl_loss"]
        local["loss/kl_clamped"] = stats["kl_clamped"]  # share of tokens whose k3 term was clamped
    if exp.zero_variance_groups is not None:
        local["objective/zero_variance_groups"] = exp.zero_variance_groups
    local.update({k: torch.tensor(v, device=mask.device) for k, v in exp.sampling.items()})
    if exp.rollout.agent is not None:  # tool use: calls, errors, turns, exchanges cut
        local.update({k: torch.tensor(v, device=mask.device) for k, v in exp.rollout.agent.metrics().items()})
    metrics = {
        k: v.item()
        for k, v in accelerator.reduce({k: v.detach().float() for k, v in local.items()}, reduction="mean").items()
    }
    metrics["val/num_eos_tokens"] *= accelerator.num_processes  # a count: summed, not averaged
    if exp.rollout.agent is not None:  # failed calls over every process's calls (not a mean of shares)
        errors, calls = accelerator.reduce(
            torch.tensor(exp.rollout.agent.error_counts(), dtype=torch.float64, device=mask.device), reduction="sum"
        ).tolist()
        metrics["tools/error_share"] = errors / max(calls, 1)
    # each source's mean over the completions it scored, on every process together (sums and counts)
    scored = {f"rewards/{k}": v for k, v in seen.source_scores.items()}
    scored.update({f"judges/{k}": v for k, v in seen.judge_scores.items()})
    if scored:
        sums = accelerator.reduce(
            torch.stack([torch.stack([v.double().nansum(), (~v.isnan()).sum().double()]) for v in scored.values()]),
            reduction="sum",
        )
        metrics.update({k: s / n if n > 0 else None for k, (s, n) in zip(scored, sums.tolist())})
    # what reward functions logged (log_metric): the mean of every value logged, on every process together;
    # a process may have logged names the others did not, so the names are gathered first (in one order)
    names = exp.logged_metrics.keys()
    if accelerator.num_processes > 1:
        names = gather_object(list(names))
    names = sorted(set(names))
    if names:
        values = [exp.logged_metrics.get(name, []) for name in names]
        sums = accelerator.reduce(
            torch.tensor([[sum(v), len(v)] for v in values], dtype=torch.float64, device=exp.mask.device),
            reduction="sum",
        )
        metrics.update({name: s / n if n > 0 else None for name, (s, n) in zip(names, sums.tolist())})
    metrics["first_minibatch"] = stats["first"]
    return metrics
