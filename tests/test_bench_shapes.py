"""The benchmark's real shapes: a model of a hub config's vocabulary and widths with a tokenizer of
exactly that vocabulary, prompts of RLVR lengths, and the bench recipe's GRPO running on them."""

from __future__ import annotations

import json

from transformers import AutoConfig, AutoTokenizer

import stages.ppo
from pipeline import bench_shapes
from pipeline.artifacts import read_manifest
from tests.conftest import REPO, read_jsonl


def test_a_shape_has_its_vocabulary_widths_and_a_chat_tokenizer_and_the_bench_recipe_runs_on_it(tmp_path):
    model = bench_shapes.build("smollm2-135m", tmp_path / "model", layers=1)
    config, tokenizer = AutoConfig.from_pretrained(model), AutoTokenizer.from_pretrained(model)
    shape = bench_shapes.SHAPES["smollm2-135m"]
    assert len(tokenizer) == config.vocab_size == 49152
    assert (config.hidden_size, config.intermediate_size, config.num_key_value_heads, config.num_hidden_layers) == \
        (shape["hidden_size"], shape["intermediate_size"], shape["num_key_value_heads"], 1)
    prompts = bench_shapes.prompts(tmp_path / "prompts.jsonl", 8, config.vocab_size)  # 100-200 words
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    lengths = [len(tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]) for r in rows]
    assert all(100 <= n <= 200 + 8 for n in lengths) and all(r["solution"].startswith("w") for r in rows)
    assert bench_shapes.solution_reward([[{"role": "assistant", "content": "w5 w999999 w12"}]], ["w12"]) == [2 / 3 + 1]

    stages.ppo.main(["--recipe", str(REPO / "stages/recipes/bench-grpo.yaml"), f"runs_dir={tmp_path}",
                     f"ppo.model={model}", f"ppo.prompts={prompts}", "ppo.max_new_tokens=6", "ppo.batch_size=16",
                     "ppo.mini_batch_size=16", "ppo.total_episodes=32", "ppo.forward_batch_size=16"])
    history = read_jsonl(tmp_path / "bench-grpo" / "ppo" / "metrics.jsonl")
    assert [h["response_length"] for h in history] == [6.0, 6.0]  # a random model never stops: fixed work
    assert history[0]["first_minibatch"]["ratio"] == 1.0  # one pass: the update's own log-probs are the old ones
    assert read_manifest(tmp_path / "bench-grpo" / "ppo")["metrics"]["trainable_parameters"] > 0
