"""Work the RL stage skips when its result is already known: the scoring forward before an update
that uses each batch once (`single_pass`: the update's own log-probs are the old ones), the
reference model and its forward when the run has no KL term (`uses_kl`), and the whole logits of a
real vocabulary (the LM head in chunks). Each leaves the step as it was, to float tolerance."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import LoraConfig, get_peft_model
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

import stages.ppo
from pipeline.artifacts import read_manifest
from pipeline.recipe import PPOStage, RewardSource
from pipeline.recipe_loader import load_recipe
from pipeline.rl import algorithms
from pipeline.rl import rollout as rollout_module
from pipeline.rl.algorithms import chunked_logprobs, logprobs_and_entropy, logprobs_of
from pipeline.rl.iteration import PolicyAndValue, Rewarded, batch_sum, disable_dropout, score, update, with_advantages
from pipeline.rl.rollout import Rollout, chunks_head, response_logprobs
from tests.conftest import REPO, read_jsonl

GRPO_RECIPE = str(REPO / "stages/recipes/demo-grpo.yaml")


def test_which_runs_skip_what():
    grpo = load_recipe(GRPO_RECIPE).ppo  # 4 epochs of 4 mini-batches, KL in the loss
    assert grpo.uses_kl and not grpo.single_pass
    once = load_recipe(GRPO_RECIPE, ["ppo.ppo_epochs=1", "ppo.mini_batch_size=64"]).ppo
    assert once.single_pass
    assert not load_recipe(GRPO_RECIPE, ["ppo.ppo_epochs=1", "ppo.mini_batch_size=16"]).ppo.single_pass  # 4 steps
    assert not load_recipe(
        GRPO_RECIPE, ["ppo.ppo_epochs=1", "ppo.mini_batch_size=64", "ppo.kl_in=reward"]
    ).ppo.single_pass
    assert load_recipe(
        GRPO_RECIPE, ["ppo.ppo_epochs=1", "ppo.mini_batch_size=64", "ppo.kl_in=reward", "ppo.kl_coef=0"]
    ).ppo.single_pass  # no KL at all: nothing to put in the reward
    assert not load_recipe(GRPO_RECIPE, ["ppo.kl_coef=0"]).ppo.uses_kl
    assert load_recipe(GRPO_RECIPE, ["ppo.kl_coef=0", "ppo.kl_target=6"]).ppo.uses_kl
    ppo = load_recipe(str(REPO / "stages/recipes/demo.yaml"), ["ppo.ppo_epochs=1", "ppo.mini_batch_size=64"]).ppo
    assert not ppo.single_pass  # GAE's advantages read the values and the KL before the update


def one_step(cfg: PPOStage, skip: bool):
    """One GRPO step (plain SGD) on 2 groups of 2 rollouts: with the scoring forward (`skip` False:
    the old log-probs from `score`, as a multi-pass run computes them) or without."""
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
    reference = LlamaForCausalLM(policy.config)
    reference.load_state_dict(policy.state_dict())
    model = PolicyAndValue(policy, None)
    disable_dropout(model)
    acc = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer = acc.prepare(model, optimizer)
    prompts = torch.tensor([[5, 6], [5, 6], [7, 8], [7, 8]])
    responses = torch.tensor([[9, 10, 1], [12, 3, 4], [11, 1, 0], [4, 4, 1]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1]])
    rollout = Rollout(
        prompts=[None] * 4,
        prompt_ids=prompts.tolist(),
        query_responses=torch.cat([prompts, responses], 1),
        attention_mask=torch.cat([torch.ones_like(prompts), mask], 1),
        responses=responses,
        response_mask=mask,
        has_stop=torch.ones(4, dtype=torch.bool),
        texts=[""] * 4,
    )
    scores = torch.tensor([1.0, 0.0, 0.2, 1.0])
    rewarded = Rewarded({}, {}, None, scores, torch.ones(4, dtype=torch.bool), scores, {}, {})
    scoring = cfg if skip else PPOStage(**{**cfg.__dict__, "ppo_epochs": 2})  # (two passes: scored first)
    exp = score(rollout, rewarded, model, reference if cfg.uses_kl else None, scoring, forward_batch_size=4)
    assert (exp.old_logp is None) == skip and (exp.ref_logp is None) == (not cfg.uses_kl)
    exp = with_advantages(exp, cfg, cfg.kl_coef, batch_sum(acc))
    stats = update(exp, model, optimizer, scheduler, acc, cfg, "the test step")
    return torch.cat([p.detach().flatten() for p in model.parameters()]), exp, stats


def test_a_single_pass_skips_the_scoring_forward_and_takes_the_same_step():
    for kl_coef in (0.1, 0.0):
        cfg = PPOStage(
            advantage_estimator="grpo",
            samples_per_prompt=2,
            batch_size=4,
            mini_batch_size=4,
            ppo_epochs=1,
            max_new_tokens=3,
            max_grad_norm=1e9,
            kl_in="loss",
            kl_coef=kl_coef,
            rewards=[RewardSource(function="f.py:f")],
        )
        assert cfg.single_pass
        skipped, lean, stats = one_step(cfg, skip=True)
        scored, full, _ = one_step(cfg, skip=False)
        assert torch.allclose(skipped, scored, atol=1e-6)
        assert torch.allclose(lean.old_logp, full.old_logp, atol=1e-6)  # filled in by the update
        assert torch.allclose(lean.entropy, full.entropy, atol=1e-5)
        assert stats["first"]["ratio"] == 1.0 and stats["first"]["clipfrac"] == 0.0
        if kl_coef:
            assert torch.allclose(lean.kl, full.kl, atol=1e-6)
        else:
            assert lean.kl is None and full.kl is None  # no reference, no KL


def test_a_run_without_kl_loads_no_reference_and_logs_no_kl(runs_with_sft, loaded_models):
    args = [
        "--recipe",
        GRPO_RECIPE,
        f"runs_dir={runs_with_sft}",
        "run_name=demo",
        "ppo.kl_coef=0",
        "ppo.ppo_epochs=1",
        "ppo.mini_batch_size=64",
        "ppo.total_episodes=128",
    ]
    stages.ppo.main(args)
    assert len(loaded_models) == 1  # the policy alone: no reference copy (with a KL term: 2)
    history = read_jsonl(runs_with_sft / "demo" / "ppo" / "metrics.jsonl")
    assert "objective/kl" not in history[-1] and history[-1]["objective/entropy"] > 0
    assert history[0]["first_minibatch"]["ratio"] == 1.0
    assert "objective/kl" not in read_manifest(runs_with_sft / "demo" / "ppo")["metrics"]


def test_chunked_logprobs_equal_the_whole_logits_ones_with_their_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(3, 7, 8, requires_grad=True)
    tokens = torch.randint(0, 50, (3, 7))
    weights = torch.randn(3, 7)  # any loss downstream
    for temperature in (1.0, 0.7):
        whole = logprobs_of(head(hidden), tokens, temperature)
        (whole * weights).sum().backward()
        expected = hidden.grad.clone(), head.weight.grad.clone()
        hidden.grad, head.weight.grad = None, None
        logp, entropy = chunked_logprobs(
            hidden, head, tokens, temperature, chunk=200, with_entropy=True
        )  # 4 positions: 6 chunks
        (logp * weights).sum().backward()
        assert torch.allclose(logp, whole, atol=1e-6)
        assert torch.allclose(entropy, logprobs_and_entropy(head(hidden).detach(), tokens, temperature)[1], atol=1e-5)
        assert torch.allclose(hidden.grad, expected[0], atol=1e-6) and torch.allclose(
            head.weight.grad, expected[1], atol=1e-6
        )
        hidden.grad, head.weight.grad = None, None


@pytest.mark.parametrize("lora", [False, True])
def test_the_policy_forward_in_chunks_equals_the_one_through_the_logits(lora, monkeypatch):
    """PolicyAndValue.forward(tokens=...) with `chunked` (the LM head on its own, tied to the
    embeddings; 3 positions a chunk here) gives the log-probs, entropy and gradients of the forward
    that builds the whole logits, under LoRA too; a model that caps its logits keeps the whole path."""
    monkeypatch.setattr(algorithms, "LM_HEAD_CHUNK", 3 * 64)
    monkeypatch.setattr(rollout_module, "CHUNKED_FROM_VOCAB", 64)
    set_seed(0)
    policy = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=32,
            tie_word_embeddings=True,
        )
    )
    if lora:
        policy = get_peft_model(
            policy, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        )
    model = PolicyAndValue(policy, None)
    assert chunks_head(policy)
    ids = torch.randint(3, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded prompt
    results = []
    for chunked in (False, True):
        model.chunked = chunked
        (logp, entropy), _ = model(ids, mask, 5, tokens=ids[:, -5:], temperature=0.7, entropy=True)
        logp.sum().backward()
        results.append((logp.detach(), entropy, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
        model.zero_grad()
    (logp, entropy, grads), (chunked_logp, chunked_entropy, chunked_grads) = results
    assert torch.allclose(logp, chunked_logp, atol=1e-5) and torch.allclose(entropy, chunked_entropy, atol=1e-5)
    assert grads and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, chunked_grads))
    capped = Gemma2ForCausalLM(
        Gemma2Config(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
        )
    )
    assert not chunks_head(capped)


def test_the_head_runs_once_per_chunk_and_once_more_in_backward():
    """Log-probs and entropy of a chunk come from one head output; backward recomputes the log-probs
    alone. Scoring (no grad) runs the head once per chunk."""
    head = torch.nn.Linear(8, 50, bias=False)
    calls = []
    head.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    hidden = torch.randn(3, 7, 8, requires_grad=True)
    tokens = torch.randint(0, 50, (3, 7))
    logp, _ = chunked_logprobs(hidden, head, tokens, 1.0, chunk=200, with_entropy=True)  # 4 positions: 6 chunks
    assert len(calls) == 6
    logp.sum().backward()
    assert len(calls) == 12 and sum(calls) == 2 * 21
    calls.clear()
    with torch.no_grad():
        chunked_logprobs(hidden, head, tokens, 1.0, chunk=200, with_entropy=True)
    assert len(calls) == 6


def test_frozen_models_log_probs_take_the_head_in_chunks(monkeypatch):
    """The reference's log-probs (and eval's KL) at a real vocabulary never hold a micro-batch's whole
    logits: the head sees one chunk of positions at a time, and the log-probs are the whole-logits
    ones. A model whose parameters an engine has sharded keeps the model's own forward."""
    monkeypatch.setattr(algorithms, "LM_HEAD_CHUNK", 4 * 64)  # 4 positions
    set_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
    )
    prompts = torch.tensor([[0, 6, 7], [5, 6, 7]])
    responses = torch.tensor([[9, 10, 1, 3], [12, 3, 4, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    rollout = Rollout(
        prompts=[None] * 2,
        prompt_ids=prompts.tolist(),
        query_responses=torch.cat([prompts, responses], 1),
        attention_mask=torch.cat([torch.tensor([[0, 1, 1], [1, 1, 1]]), mask], 1),
        responses=responses,
        response_mask=mask,
        has_stop=torch.tensor([True, False]),
        texts=["", ""],
    )
    whole = response_logprobs(model, rollout, 0.7, batch_size=2)
    rows = []
    model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[:-1].numel()))
    monkeypatch.setattr(rollout_module, "CHUNKED_FROM_VOCAB", 64)
    assert chunks_head(model)
    chunked = response_logprobs(model, rollout, 0.7, batch_size=2)
    assert rows == [4, 4] and torch.allclose(chunked, whole, atol=1e-5)
    for p in model.parameters():
        p.ds_id = 0  # as ZeRO-3 marks the parameters it partitions
    assert not chunks_head(model)
