"""The RL stage's math, as small pure tensor functions: log-probabilities and entropy, the KL to the
reference, token rewards, GAE, the critic-free estimators, the policy and value losses and their
aggregation, the adaptive KL controller. Everything here is a function of tensors; the stage's phases
that call it are in pipeline/rl/iteration.py.

Shapes: B = batch of sequences, T = response tokens. `mask` is 1 on real response tokens (up to and
including the stop token) and 0 on padding; every reduction ignores padded positions.

A run on N processes is the run on one process with N times the batch. So the statistics that define
the algorithm are the whole batch's: whitening takes a `reduce` that sums its moments over the
processes (one all-reduce of sum, sum of squares and count, in float64), and a loss is a sum over a
micro-batch divided by a `normalizer` that the update derives from the whole mini-batch's count of
tokens (or sequences) across its micro-batches and processes, so that no split of a mini-batch
changes its gradient (iteration.update).

Critic-free estimators see the batch as B / k groups of k consecutive responses to one prompt (the
schedule keeps a prompt's k samples together, on one process). `valid` (B,) marks responses that got a
reward from at least one source: the others get advantage 0 and take no part in their group's
statistics.

    grpo                   A_i = (r_i - mean) / (std + eps), std unbiased         (Shao et al. 2024)
    dr_grpo                A_i = r_i - mean                                        (Liu et al. 2025)
    rloo                   A_i = r_i - mean of the other k-1 = k/(k-1) (r_i - mean)  (Ahmadian et al. 2024)
    reinforce_pp           token rewards, returns-to-go, whitened over the batch  (Hu 2025)
    reinforce_pp_baseline  the same after subtracting the group mean from r

A sequence advantage applies to every token of its response.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over the processes (the identity on one)

K3_LOG_RATIO_MAX = 20.0  # the k3 estimate's log-ratio and value are clamped (verl's low_var_kl bounds): its
K3_MAX = 10.0  # gradient grows as exp(ref - logp) where the policy falls far below the reference


@functools.cache
def _fused_kernel():
    """trl's fused log-prob + entropy kernel, which the wrappers in trl.trainer.utils (selective_log_softmax,
    selective_log_softmax_and_entropy) call on a GPU; None without Triton (a CPU-only torch). Imported from
    trl.kernels, not through those wrappers: trl.trainer.utils imports peft and bitsandbytes in every
    process, which a full fine-tuning run never needs. Imported at the first GPU logits, as a CPU has no
    use for it. The wrappers' CPU paths are two lines each, below."""
    try:
        from trl.kernels import selective_log_softmax_and_entropy
    except ImportError:
        return None
    return selective_log_softmax_and_entropy


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the valid positions (of this tensor alone: a logged statistic)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    return ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)


def masked_moments(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce | None = None):
    """Mean and unbiased variance over the valid positions of the whole batch, float64: `reduce` sums
    the sum, sum of squares and count over the processes (one all-reduce). (The one-pass variance
    loses digits only where the mean is ~1e5 times the spread, far from any reward or return.)"""
    x, mask = x.double(), mask.double()
    moments = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()])
    total, squares, n = (reduce(moments) if reduce is not None else moments).unbind()
    mean = total / n.clamp(min=1)
    return mean, ((squares - total * mean) / (n - 1).clamp(min=1)).clamp(min=0)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, reduce: Reduce | None = None
) -> torch.Tensor:
    """Normalise to unit variance over the batch's valid positions (on every process, `reduce`);
    `shift_mean=False` keeps the mean (rewards)."""
    mean, var = masked_moments(x, mask, reduce)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return (whitened * mask).to(x.dtype)


def _fused(logits: torch.Tensor) -> bool:
    """trl's Triton kernel applies: logits on a GPU (it reads bf16 as is and computes in float32)."""
    return logits.device.type in ("cuda", "xpu") and logits.stride(-1) == 1 and _fused_kernel() is not None


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Off a GPU: the micro-batch's logits in float32 (a bf16 log-softmax, under CPU autocast, would
    round the small log-probs away), at the sampling temperature."""
    logits = logits.float()
    return logits / temperature if temperature != 1.0 else logits


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(token) under the sampling distribution: logits are divided by the temperature first,
    or the log-probs belong to a different distribution than the one the tokens were drawn from.
    logits (B, T, V), tokens (B, T) -> (B, T), float32, one call per micro-batch. Differentiable: the
    update's path. Off a GPU a gather minus a logsumexp of the scaled float32 logits (which autograd
    keeps for backward: one (B, T, V) copy per micro-batch; the GPU kernel keeps none)."""
    if _fused(logits):
        return _fused_kernel()(logits, tokens, temperature=temperature)[0]
    scaled = _scaled(logits, temperature)
    return scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - scaled.logsumexp(-1)


@torch.no_grad()
def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, temperature: float):
    """`logprobs_of` and the entropy of the sampling distribution at each position ((B, T), float32)
    in one pass over the logits, without gradient (the rollout's old log-probs and entropy)."""
    if _fused(logits):
        return _fused_kernel()(logits, tokens, temperature=temperature)
    scaled = _scaled(logits, temperature)
    # the arithmetic of `logprobs_of` (ratio 1 before an update), in place where the tensor is ours: at
    # most two (B, T, V) float32 tensors besides the logits
    lse = scaled.logsumexp(-1, keepdim=True)
    logp = scaled.sub_(lse) if scaled is not logits else scaled - lse
    p = logp.exp()
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), p.mul_(logp).sum(-1).neg_()


LM_HEAD_CHUNK = 2**24  # logits that exist at once in `chunked_logprobs`: 64 MB in float32 (110 positions of a
# 152k vocabulary, 341 of a 49k one), a few copies of it while the log-softmax is taken


def _chunk_logprobs(
    hidden: torch.Tensor, head: torch.nn.Module, tokens: torch.Tensor, temperature: float, with_entropy: bool
):
    """`logprobs_of` of one chunk from its hidden states, and its entropy (no gradient) from the same head output."""
    logits = head(hidden)
    if with_entropy and not torch.is_grad_enabled():  # (scoring: both from one log-softmax)
        return logprobs_and_entropy(logits, tokens, temperature)
    logp = logprobs_of(logits, tokens, temperature)
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        return logp, logprobs_and_entropy(logits.detach(), tokens, temperature)[1]


def chunked_logprobs(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    tokens: torch.Tensor,
    temperature: float,
    chunk: int | None = None,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`logprobs_of(head(hidden), tokens, temperature)` and the entropy if asked, (B, T) each, without the
    (B, T, V) logits: `head` (the LM head) runs on `chunk` logits (chunk / V positions) at a time, and each chunk is
    recomputed in backward (activation checkpointing) instead of keeping its logits, so at most one
    chunk's logits exist at once, forward or backward. The gradient reaches `hidden` and the head's
    weights as through the whole logits (as fused linear cross-entropy kernels do, in plain torch).
    What it costs: the head's forward once more in backward (the recompute stops before the entropy)."""
    from torch.utils.checkpoint import checkpoint

    B, T = tokens.shape
    flat_hidden, flat_tokens = hidden.reshape(B * T, -1), tokens.reshape(B * T)
    chunk = max(
        1, (chunk or LM_HEAD_CHUNK) // (getattr(head, "out_features", None) or head.weight.shape[0])
    )  # positions
    pieces = [
        (flat_hidden[i : i + chunk], head, flat_tokens[i : i + chunk], temperature, with_entropy)
        for i in range(0, B * T, chunk)
    ]
    if torch.is_grad_enabled():
        parts = [checkpoint(_chunk_logprobs, *piece, use_reentrant=False) for piece in pieces]
    else:
        parts = [_chunk_logprobs(*piece) for piece in pieces]
    entropy = torch.cat([p[1] for p in parts]).view(B, T) if with_entropy else None
    return torch.cat([p[0] for p in parts]).view(B, T), entropy


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy.

    k1 = log p - log p_ref (unbiased, can be negative per token);
    k3 = (r - 1) - log r with r = p_ref / p (unbiased, always >= 0, lower variance), its log-ratio
         clamped to +-K3_LOG_RATIO_MAX and its value to K3_MAX (`k3_clamped` counts where).
    """
    log_ratio = logp - ref_logp
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k3":  # also the KL term of the loss (kl_in: loss): it and its gradient are 0 at p = p_ref
        kl = _k3(log_ratio.clamp(-K3_LOG_RATIO_MAX, K3_LOG_RATIO_MAX)).clamp(max=K3_MAX)
    else:
        raise ValueError(f"unknown KL estimator '{estimator}' (use k1 or k3)")
    return kl * mask


def _k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """(r - 1) - log r with r = p_ref / p = exp(-log_ratio)."""
    return torch.expm1(-log_ratio) + log_ratio


def k3_clamped(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of the valid tokens whose k3 estimate `kl_per_token` caps at K3_MAX (from p_ref / p of
    about 13.6 on, or log p - log p_ref of about 11; the log-ratio clamp only keeps exp finite)."""
    return masked_mean((_k3(logp - ref_logp) > K3_MAX).float(), mask)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token reward: -beta * KL everywhere, plus the sequence's score on its last real token."""
    rewards = -beta * kl
    rewards[torch.arange(len(scores)), last_positions(mask)] += scores
    return rewards * mask


def last_positions(mask: torch.Tensor) -> torch.Tensor:
    """(B,) the index of each row's last 1 in `mask` (0 in a row without one): the response's last token,
    also where a multi-turn exchange's mask has holes (the tokens its tools inserted)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (mask.bool() * positions).amax(1)


def discounted_returns(rewards: torch.Tensor, gamma: float, chunk: int = 256) -> torch.Tensor:
    """G_t = sum_{s >= t} gamma^(s - t) r_s over the token axis, without a Python loop over tokens:
    a reversed cumulative sum for gamma = 1; else, for each `chunk` of tokens from the last, one
    (chunk, chunk) matrix product plus the next chunk's first return, discounted. Memory linear in T
    (a (T, T) product would take 1.5 GiB of temporaries at 8k tokens); one product up to 256 tokens."""
    T = rewards.shape[1]
    if gamma == 1.0 or T == 0:
        return rewards.flip(1).cumsum(1).flip(1)
    n = min(T, chunk)
    t = torch.arange(n, device=rewards.device)
    lag = t[:, None] - t[None, :]  # s - t at [s, t]
    g = torch.tensor(gamma, dtype=rewards.dtype, device=rewards.device)
    weights = torch.where(lag >= 0, g ** lag.clamp(min=0), torch.zeros((), dtype=rewards.dtype, device=rewards.device))
    returns = torch.empty_like(rewards)
    carry = torch.zeros_like(rewards[:, :1])  # G at the first token after the chunk
    for start in reversed(range(0, T, n)):
        end = min(start + n, T)
        size = end - start
        returns[:, start:end] = rewards[:, start:end] @ weights[:size, :size] + carry * g ** (size - t[:size])
        carry = returns[:, start : start + 1]
    return returns


def over_model_tokens(fn, mask: torch.Tensor, *tensors: torch.Tensor):
    """`fn(*tensors)` for a recursion along the token axis, run over each row's masked-in tokens as if
    adjacent. A multi-turn exchange's mask has holes (the tokens its tools inserted): the model's tokens
    are moved to the front of their row (a stable sort keeps their order), `fn` runs, and its outputs
    (a tensor or a tuple of them) go back to where they came from, 0 on the holes. Without holes:
    `fn(*tensors)`."""
    if not (mask[:, 1:] > mask[:, :-1]).any():
        return fn(*tensors)
    order = torch.sort((mask == 0).to(torch.int8), dim=1, stable=True).indices
    out = fn(*(x.gather(1, order) for x in tensors))
    back = lambda x: torch.zeros_like(x).scatter(1, order, x)  # noqa: E731
    return tuple(back(x) for x in out) if isinstance(out, tuple) else back(out)


def gae(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over response tokens (Schulman et al. 2016).

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1};
    values after the last real token count as 0. Returns (advantages, returns = A + V).
    The recursion unrolled, A_t = sum_{s >= t} (gamma lam)^(s - t) delta_s over the response's own
    tokens (the mask is 1 up to the stop token, then 0): one discounted sum, no loop over tokens.
    A mask with holes (a multi-turn exchange) runs over the model's tokens as if adjacent
    (`over_model_tokens`): a turn's last token bootstraps from the value of the model's next token,
    not of the tool's text.
    """

    def contiguous(values, rewards, mask):
        values = values * mask
        next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1)
        deltas = (rewards + gamma * next_values - values) * mask
        advantages = discounted_returns(deltas, gamma * lam) * mask
        return advantages, (advantages + values) * mask

    return over_model_tokens(contiguous, mask, values, rewards, mask)


AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def loss_units(mask: torch.Tensor, how: str) -> torch.Tensor:
    """What a batch's loss under `aggregate` is a mean over: its valid tokens (token_mean) or its
    sequences (the others)."""
    return mask.sum() if how == "token_mean" else torch.tensor(float(len(mask)), device=mask.device)


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    how: str = "token_mean",
    horizon: int = 1,
    normalizer: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """One loss from per-token losses (B, T): a sum over this batch divided by `normalizer`, the count
    of `loss_units` the mean is over (default: this batch's own; the update passes the mini-batch's, so
    the micro-batches' losses add up to the mini-batch's mean).

    token_mean: the mean over every valid token (trl's default `dapo`, verl's `token-mean`);
    seq_mean_token_mean: each sequence's token mean, then the mean over sequences (GRPO's: a token of a
    short response weighs more); seq_mean_token_sum_norm: each sequence's token sum over a constant
    `horizon` (max_new_tokens), then the mean over sequences (Dr. GRPO's: no length bias)."""
    if how == "token_mean":
        total = (per_token * mask).sum()
    elif how == "seq_mean_token_mean":
        total = masked_mean(per_token, mask, dim=1).sum()
    elif how == "seq_mean_token_sum_norm":
        total = (per_token * mask).sum() / horizon
    else:
        raise ValueError(f"unknown loss aggregation '{how}'")
    return total / (normalizer if normalizer is not None else loss_units(mask, how).clamp(min=1))


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    aggregation: str = "token_mean",
    horizon: int = 1,
    normalizer: torch.Tensor | float | None = None,
    clip_high: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate objective: max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high)) per token
    (eps_high: `clip_high`, DAPO's clip-higher; default eps), aggregated (`aggregate`). `advantages`
    (B, T), or (B, 1) for one advantage per sequence."""
    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + (clip if clip_high is None else clip_high))
    loss = aggregate(torch.max(pg_loss1, pg_loss2), mask, aggregation, horizon, normalizer)
    stats = {
        "clipfrac": masked_mean((pg_loss2 > pg_loss1).float(), mask),
        "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
        "ratio": masked_mean(ratio, mask),
    }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    normalizer: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict]:
    """Clipped value loss: 0.5 * the token mean (`aggregate`) of max((v - R)^2, (clip(v, v_old +- eps) - R)^2)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    vf_loss1 = (values - returns) ** 2
    vf_loss2 = (clipped - returns) ** 2
    loss = 0.5 * aggregate(torch.max(vf_loss1, vf_loss2), mask, "token_mean", normalizer=normalizer)
    return loss, {"clipfrac": masked_mean((vf_loss2 > vf_loss1).float(), mask)}


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, reduce: Reduce | None = None
) -> torch.Tensor:
    """1 - Var(R - V) / Var(R) over the whole batch (`reduce`): 1 is a perfect value function, 0 no
    better than a constant."""
    return 1 - masked_moments(returns - values, mask, reduce)[1] / masked_moments(returns, mask, reduce)[1].clamp(
        min=1e-8
    )


class KLController:
    """The KL coefficient beta: fixed, or adapted towards a target KL (Ziegler et al. 2019).

    error = clip(KL / target - 1, -0.2, 0.2);  beta *= 1 + error * n_episodes / horizon
    """

    def __init__(self, beta: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n_episodes: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_episodes / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def truncate_after_stop(
    responses: torch.Tensor, stop_ids: int | list[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Everything after the first stop token (any of `stop_ids`) becomes padding. The pad id may be a
    stop id itself (SmolLM2, GPT-2): the mask, not the id, says where the response ends.

    Returns (responses, mask with the stop token included, has_stop per sequence).
    """
    is_stop = torch.isin(responses, torch.tensor(stop_ids, device=responses.device).reshape(-1))
    has_stop = is_stop.any(1)
    # index of the first stop token, or T if none
    first = torch.where(
        has_stop, is_stop.int().argmax(1), torch.full_like(has_stop, responses.shape[1], dtype=torch.long)
    )
    positions = torch.arange(responses.shape[1], device=responses.device).unsqueeze(0)
    mask = (positions <= first.unsqueeze(1)).long()
    return torch.where(mask.bool(), responses, torch.full_like(responses, pad_id)), mask, has_stop


# ---- critic-free advantage estimators ----

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
        std = ((centred**2).sum(1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
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


def reinforce_pp_advantages(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float, gamma: float, reduce: Reduce | None = None
) -> torch.Tensor:
    """REINFORCE++: per-token rewards (-beta * KL, plus the score on the last token), returns-to-go,
    whitened over every valid token of the whole batch, on every process (`reduce`; not per group:
    OpenRLHF #830). (B, T). The whitening shifts every token by the batch's mean, so after
    `baseline_subtracted` a group whose rewards are all equal still gets -mean/std on its tokens (as
    in OpenRLHF's reinforce_baseline and verl's reinforce_plus_plus_baseline). With gamma < 1, an
    exchange's tool tokens (holes in `mask`) are skipped, not discounted over (`over_model_tokens`)."""
    returns = over_model_tokens(lambda r: discounted_returns(r, gamma), mask, token_rewards(scores, kl, mask, beta))
    return masked_whiten(returns, mask, reduce=reduce)
