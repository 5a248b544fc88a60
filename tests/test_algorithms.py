"""PPO math against hand-computed numbers and plain-loop references."""

import math
import subprocess
import sys
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.rl.algorithms import (
    K3_MAX,
    KLController,
    aggregate,
    explained_variance,
    gae,
    k3_clamped,
    kl_per_token,
    logprobs_and_entropy,
    logprobs_of,
    loss_units,
    masked_mean,
    masked_whiten,
    policy_loss,
    token_rewards,
    truncate_after_stop,
    value_loss,
)
from tests.conftest import REPO


def test_masked_mean_and_whiten_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert masked_mean(x, mask).item() == 2.0
    w = masked_whiten(x, mask)
    assert w[0, 3] == 0 and abs(w[0, :3].mean().item()) < 1e-6
    assert torch.allclose(w[0, :3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-4)  # unbiased std of 1,2,3 is 1
    kept = masked_whiten(x, mask, shift_mean=False)
    assert torch.allclose(kept[0, :3], torch.tensor([1.0, 2.0, 3.0]), atol=1e-4)  # scale 1 here, mean kept


def test_logprobs_divide_by_temperature():
    logits = torch.tensor([[[math.log(1.0), math.log(3.0)]]])  # probabilities 1/4, 3/4 at T=1
    tokens = torch.tensor([[1]])
    assert logprobs_of(logits, tokens, 1.0).item() == pytest.approx(math.log(0.75))
    # at T=0.5 the logits double: p = 9 / (1 + 9)
    assert logprobs_of(logits, tokens, 0.5).item() == pytest.approx(math.log(0.9))
    assert logprobs_and_entropy(logits, tokens, 0.5)[0].item() == pytest.approx(math.log(0.9))
    entropy = logprobs_and_entropy(logits, tokens, 1.0)[1].item()
    assert entropy == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_probs_and_entropy_of_a_micro_batch_are_each_sequences_own(dtype):
    """One call per micro-batch gives each sequence what it gets alone, in float32 (bf16 logits on a
    CPU in float32 arithmetic: a bf16 log-softmax would be off by ~1e-2), and the update's gradient."""
    torch.manual_seed(0)
    logits, tokens = (torch.randn(5, 7, 50) * 4).to(dtype), torch.randint(0, 50, (5, 7))
    logp, entropy = logprobs_and_entropy(logits, tokens, 0.7)
    assert logp.dtype == entropy.dtype == torch.float32
    assert torch.equal(logp, logprobs_of(logits, tokens, 0.7))  # the rollout's and the update's: ratio exactly 1
    exact = (logits.double() / 0.7).log_softmax(-1)
    torch.testing.assert_close(logp.double(), exact.gather(-1, tokens[..., None])[..., 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy.double(), -(exact.exp() * exact).sum(-1), rtol=0, atol=1e-5)
    batch = logprobs_of(logits, tokens, 0.7)
    for i in range(5):  # a sequence alone
        torch.testing.assert_close(
            logprobs_of(logits[i : i + 1], tokens[i : i + 1], 0.7), batch[i : i + 1], rtol=0, atol=1e-6
        )
    leaf, exact_leaf = logits.float().requires_grad_(), logits.double().requires_grad_()
    (grad,) = torch.autograd.grad(logprobs_of(leaf, tokens, 0.7).sum(), leaf)
    (exact_grad,) = torch.autograd.grad(
        (exact_leaf / 0.7).log_softmax(-1).gather(-1, tokens[..., None]).sum(), exact_leaf
    )
    torch.testing.assert_close(grad.double(), exact_grad, rtol=0, atol=1e-5)


class LiveLogits(TorchDispatchMode):
    """Counts the float32 tensors of the logits' shape alive at once (besides the logits themselves)."""

    def __init__(self, logits):
        super().__init__()
        self.shape, self.own, self.live, self.peak = logits.shape, logits.untyped_storage().data_ptr(), {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.shape == self.shape and t.dtype == torch.float32:
                self.live[t.untyped_storage().data_ptr()] = weakref.ref(t)
        self.live = {k: r for k, r in self.live.items() if r() is not None and k != self.own}
        self.peak = max(self.peak, len(self.live))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_rollouts_log_probs_hold_at_most_two_copies_of_the_logits(dtype):
    """Off a GPU the rollout's log-probs and entropy work on the micro-batch's float32 logits: the
    scaled log-softmax and the probabilities, in place, never four (B, T, V) tensors at once."""
    logits, tokens = torch.randn(3, 4, 50).to(dtype), torch.randint(0, 50, (3, 4))
    expected = logprobs_of(logits, tokens, 0.7)
    with LiveLogits(logits) as live:
        logp, _ = logprobs_and_entropy(logits, tokens, 0.7)
    assert live.peak <= 2 and torch.equal(logp, expected)


def test_kl_estimators():
    logp = torch.tensor([[math.log(0.5), math.log(0.2), 0.0]])
    ref = torch.tensor([[math.log(0.25), math.log(0.4), 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    k1 = kl_per_token(logp, ref, mask, "k1")
    assert torch.allclose(k1, torch.tensor([[math.log(2), math.log(0.5), 0.0]]))
    k3 = kl_per_token(logp, ref, mask, "k3")
    # r = p_ref / p: 0.5 -> (0.5 - 1) - log 0.5; 2 -> (2 - 1) - log 2
    assert torch.allclose(k3, torch.tensor([[-0.5 + math.log(2), 1 - math.log(2), 0.0]]))
    assert (k3 >= 0).all()
    with pytest.raises(ValueError, match="k2"):
        kl_per_token(logp, ref, mask, "k2")


def test_token_rewards_put_the_score_on_the_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    r = token_rewards(torch.tensor([1.0, -2.0]), kl, mask, beta=0.5)
    assert torch.allclose(r, torch.tensor([[-0.05, -0.1, -0.15 + 1.0], [-0.25 - 2.0, 0.0, 0.0]]))


def gae_reference(values, rewards, mask, gamma, lam):
    """The textbook loop, one sequence and one step at a time."""
    adv = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + values) * mask


def test_gae_hand_computed():
    values = torch.tensor([[1.0, 2.0]])
    rewards = torch.tensor([[0.0, 3.0]])
    mask = torch.ones(1, 2)
    adv, ret = gae(values, rewards, mask, gamma=1.0, lam=0.5)
    # t=1: delta = 3 - 2 = 1, A = 1;  t=0: delta = 0 + 2 - 1 = 1, A = 1 + 0.5 * 1 = 1.5
    assert torch.allclose(adv, torch.tensor([[1.5, 1.0]]))
    assert torch.allclose(ret, torch.tensor([[2.5, 3.0]]))


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.5)])
def test_gae_matches_the_plain_loop_with_padding(gamma, lam):
    torch.manual_seed(0)
    values, rewards = torch.randn(4, 7), torch.randn(4, 7)
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] * 1 + [0] * 6, [1] * 6 + [0]]).float()
    rewards = rewards * mask
    adv, ret = gae(values, rewards, mask, gamma, lam)
    ref_adv, ref_ret = gae_reference(values, rewards, mask, gamma, lam)
    assert torch.allclose(adv, ref_adv, atol=1e-5) and torch.allclose(ret, ref_ret, atol=1e-5)


def test_policy_loss_clipping_by_hand():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))  # ratios 1.5, 0.5, 1.0
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3)
    loss, stats = policy_loss(logp, old, adv, mask, clip=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5; token 2: 1.0
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.0) / 3)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["ratio"].item() == pytest.approx(1.0)


def test_first_step_ratio_is_one():
    logp = torch.randn(2, 5)
    loss, stats = policy_loss(logp, logp.clone(), torch.randn(2, 5), torch.ones(2, 5), clip=0.2)
    assert stats["ratio"].item() == 1.0 and stats["approxkl"].item() == 0.0 and stats["clipfrac"].item() == 0.0


def test_value_loss_clipping_by_hand():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[1.0, 1.0]])
    loss, stats = value_loss(new, old, returns, torch.ones(1, 2), clip=0.2)
    # token 0: max((1-1)^2, (0.2-1)^2) = 0.64; token 1: max(0.81, 0.81) = 0.81
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0]])
    assert explained_variance(returns, returns, torch.ones(1, 3)).item() == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 3), 2.0), returns, torch.ones(1, 3)).item() == pytest.approx(0.0)


def test_adaptive_kl_controller_by_hand():
    fixed = KLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05
    ctl = KLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, 1000)  # error clipped to 0.2: beta *= 1 + 0.2 * 0.1
    assert ctl.value == pytest.approx(0.1 * 1.02)
    ctl.update(3.0, 1000)  # error = -0.5 -> -0.2
    assert ctl.value == pytest.approx(0.1 * 1.02 * 0.98)


def test_truncate_after_stop():
    responses = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8]])
    out, mask, has_stop = truncate_after_stop(responses, stop_ids=1, pad_id=0)
    assert out.tolist() == [[5, 1, 0, 0], [5, 6, 7, 8]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert has_stop.tolist() == [True, False]


# ---- the same numbers however the batch is split (batch-wide statistics, linear-memory returns) ----


def halves_reduce(x: torch.Tensor, mask: torch.Tensor, half: int):
    """What `reduce` (an all-reduce of sums) gives a process holding half `half` of (x, mask): its own
    moments plus the other half's, as the other process computes them."""
    other = slice(len(x) // 2, None) if half == 0 else slice(0, len(x) // 2)
    theirs = []
    masked_whiten(x[other], mask[other], reduce=lambda m: theirs.append(m) or m)
    return lambda mine: mine + theirs[0]


def test_whitening_spans_every_process_s_batch():
    """REINFORCE++'s baseline is the batch mean: scores [1, 1, 0.9, 1 | 0, 0.1, 0, 0] whitened together
    give the 0.9 response +0.78 (unbiased std); whitened by the process holding the first half alone
    it got -1.50. Split over two processes with the moments summed, each half gets what the whole
    batch gives."""
    scores = torch.tensor([[1.0], [1.0], [0.9], [1.0], [0.0], [0.1], [0.0], [0.0]])
    mask = torch.ones_like(scores)
    whole = masked_whiten(scores, mask)
    assert whole[2].item() == pytest.approx(0.4 / math.sqrt(1.82 / 7), abs=1e-5)  # +0.78
    assert masked_whiten(scores[:4], mask[:4])[2].item() == pytest.approx(-1.5, abs=1e-3)  # one process's alone
    split = torch.cat(
        [
            masked_whiten(scores[:4], mask[:4], reduce=halves_reduce(scores, mask, 0)),
            masked_whiten(scores[4:], mask[4:], reduce=halves_reduce(scores, mask, 1)),
        ]
    )
    assert torch.allclose(split, whole, atol=1e-6)


def test_a_mini_batch_s_token_mean_does_not_depend_on_how_it_is_cut():
    """Lengths 10, 10 | 1, 1 in two micro-batches: a token's weight is 1/22 (the two short ones 9% of
    the gradient), as in one micro-batch; a mean per micro-batch gave the short ones half of it."""
    mask = torch.zeros(4, 10)
    mask[0], mask[1], mask[2, 0], mask[3, 0] = 1, 1, 1, 1
    per_token = torch.ones(4, 10, requires_grad=True)
    # each micro-batch's loss over the mini-batch's count per micro-batch (22 / 2), then averaged over
    # the 2 accumulation steps, as accelerator.backward does
    share = loss_units(mask, "token_mean") / 2
    loss = (
        aggregate(per_token[:2], mask[:2], normalizer=share) + aggregate(per_token[2:], mask[2:], normalizer=share)
    ) / 2
    loss.backward()
    assert per_token.grad[2, 0].item() == pytest.approx(1 / 22) and per_token.grad[0, 0].item() == pytest.approx(1 / 22)
    short = (per_token.grad[2:] * mask[2:]).sum() / (per_token.grad * mask).sum()
    assert short.item() == pytest.approx(2 / 22)


def python_gae(values, rewards, mask, gamma, lam):
    advantages, last = torch.zeros_like(rewards), torch.zeros(rewards.shape[0])
    values = values * mask
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros(rewards.shape[0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages


@pytest.mark.parametrize("length", [1, 7, 256, 600])
def test_gae_matches_the_recursion_across_chunks(length):
    """The discounted sums are computed in chunks of 256 tokens (linear memory): equal to the recursion
    to 1e-5, within a chunk and across chunk boundaries."""
    g = torch.Generator().manual_seed(length)
    values, rewards = torch.randn(3, length, generator=g), torch.randn(3, length, generator=g) * 0.1
    mask = torch.ones(3, length)
    mask[1, length // 2 + 1 :] = 0  # a shorter response
    for gamma, lam in ((1.0, 0.95), (0.99, 0.9), (0.9, 0.0)):
        advantages, returns = gae(values, rewards, mask, gamma, lam)
        expected = python_gae(values, rewards, mask, gamma, lam)
        assert torch.allclose(advantages, expected, atol=1e-5), (gamma, lam)
        assert torch.allclose(returns, (expected + values * mask) * mask, atol=1e-5)


def test_gae_of_reasoning_length_responses_takes_memory_linear_in_their_length():
    """GAE at 16k tokens: a (T, T) discount matrix took several GiB of temporaries; chunked, the
    process grows by a few MB. Measured in a fresh process (its peak resident set)."""
    code = (
        "import resource, torch\n"
        "from pipeline.rl.algorithms import gae\n"
        "x = torch.randn(2, 16384)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "gae(x, x * 0.1, torch.ones_like(x), 1.0, 0.95)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    grew_mb = int(run.stdout.split()[-1])
    assert grew_mb < 200, f"GAE at 16k tokens grew the process by {grew_mb} MB"


def test_the_k3_term_is_bounded_where_the_policy_falls_far_below_the_reference():
    """Unbounded, k3 = e^(ref - logp) - 1 - (ref - logp) and its gradient grow exponentially: at a
    log-ratio of -30 the term is ~1e13. Clamped as verl clamps it (log-ratio to +-20, the term to 10),
    and the clamped share is reported."""
    logp = torch.tensor([[-30.0, -1.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[0.0, -1.0, -1.0]])
    mask = torch.ones(1, 3)
    kl = kl_per_token(logp, ref, mask, "k3")
    kl.sum().backward()
    assert kl[0, 0].item() == K3_MAX and torch.isfinite(logp.grad).all() and logp.grad[0, 0].item() == 0.0
    assert kl[0, 1].item() == 0.0 and kl[0, 2].item() == pytest.approx(math.exp(-0.5) - 1 + 0.5)
    assert k3_clamped(logp.detach(), ref, mask).item() == pytest.approx(1 / 3)
