"""The benchmark's real shapes: a model of a hub config's vocabulary and widths with a tokenizer of
exactly that vocabulary, prompts of RLVR lengths, and the bench recipe's GRPO running on them."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig, AutoTokenizer

import stages.ppo
from pipeline import bench_shapes
from pipeline.artifacts import read_manifest
from tests.conftest import REPO, read_jsonl

pytestmark = pytest.mark.e2e  # whole stages, several processes


def test_a_shape_has_its_vocabulary_widths_and_a_chat_tokenizer_and_the_bench_recipe_runs_on_it(tmp_path):
    model = bench_shapes.build("smollm2-135m", tmp_path / "model", layers=1)
    config, tokenizer = AutoConfig.from_pretrained(model), AutoTokenizer.from_pretrained(model)
    shape = bench_shapes.SHAPES["smollm2-135m"]
    assert len(tokenizer) == config.vocab_size == 49152
    assert (config.hidden_size, config.intermediate_size, config.num_key_value_heads, config.num_hidden_layers) == (
        shape["hidden_size"],
        shape["intermediate_size"],
        shape["num_key_value_heads"],
        1,
    )
    prompts = bench_shapes.prompts(tmp_path / "prompts.jsonl", 8, config.vocab_size)  # 100-200 words
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    lengths = [
        len(
            tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
        )
        for r in rows
    ]
    assert all(100 <= n <= 200 + 8 for n in lengths) and all(r["solution"].startswith("w") for r in rows)
    assert bench_shapes.solution_reward([[{"role": "assistant", "content": "w5 w999999 w12"}]], ["w12"]) == [2 / 3 + 1]

    stages.ppo.main(
        [
            "--recipe",
            str(REPO / "stages/recipes/bench-grpo.yaml"),
            f"runs_dir={tmp_path}",
            f"ppo.model={model}",
            f"ppo.prompts={prompts}",
            "ppo.max_new_tokens=6",
            "ppo.batch_size=16",
            "ppo.mini_batch_size=16",
            "ppo.total_episodes=32",
            "ppo.forward_batch_size=16",
        ]
    )
    history = read_jsonl(tmp_path / "bench-grpo" / "ppo" / "metrics.jsonl")
    assert [h["response_length"] for h in history] == [6.0, 6.0]  # a random model never stops: fixed work
    assert history[0]["first_minibatch"]["ratio"] == 1.0  # one pass: the update's own log-probs are the old ones
    assert read_manifest(tmp_path / "bench-grpo" / "ppo")["metrics"]["trainable_parameters"] > 0


def test_the_ppo_bench_builds_a_reward_model_of_the_shape_and_runs_ppo_against_it(tmp_path, monkeypatch):
    """`make bench SHAPE=... RECIPE=stages/recipes/bench-ppo.yaml`: the recipe reads a reward model, so
    one of the shape is built beside the policy (one output, the same vocabulary) and the run's
    rewards and value model come from it, with no SFT or RM stage."""
    from pipeline import bench

    monkeypatch.setattr(bench, "BENCH_MODELS", tmp_path / "models")
    overrides = bench.shape_inputs("smollm2-135m", 1, "stages/recipes/bench-ppo.yaml")
    reward_model = tmp_path / "models" / "smollm2-135m-1l-rm"
    assert f"ppo.reward_model={reward_model}" in overrides and "run_name=bench-ppo-smollm2-135m-1l" in overrides
    config = AutoConfig.from_pretrained(reward_model)
    assert (
        config.num_labels == 1
        and config.vocab_size == 49152
        and config.architectures == ["LlamaForSequenceClassification"]
    )
    assert not any(o.startswith("ppo.reward_model") for o in bench.shape_inputs("smollm2-135m", 1))  # GRPO: a function

    stages.ppo.main(
        [
            "--recipe",
            str(REPO / "stages/recipes/bench-ppo.yaml"),
            f"runs_dir={tmp_path}",
            *overrides,
            "ppo.max_new_tokens=4",
            "ppo.total_episodes=8",
            "ppo.batch_size=8",
            "ppo.mini_batch_size=8",
            "ppo.ppo_epochs=1",
        ]
    )
    history = read_jsonl(tmp_path / "bench-ppo-smollm2-135m-1l" / "ppo" / "metrics.jsonl")
    assert len(history) == 1 and "objective/kl" in history[0] and "rewards/rm" in history[0]
    assert history[0]["response_length"] == 4.0


def test_the_ppo_peer_asks_for_its_own_environment(monkeypatch, tmp_path):
    from pipeline import bench_peers

    monkeypatch.setenv("PEER_VENV", str(tmp_path))  # no trl 1.12 there
    with pytest.raises(SystemExit, match="set PEER_VENV to a virtual environment with trl==1.12.0"):
        bench_peers.peer_python()
