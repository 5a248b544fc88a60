import re

import pytest
from trl import SFTConfig

from pipeline.errors import ConfigError
from pipeline.recipe import DatasetSpec
from pipeline.recipe_loader import load_recipe, trl_args
from tests.conftest import DEMO_RECIPE as DEMO


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_demo_recipe_loads_with_typed_sections():
    recipe = load_recipe("stages/recipes/demo.yaml")
    assert recipe.run_name == "demo"
    assert isinstance(recipe.sft.dataset, DatasetSpec)  # the string shorthand became a spec
    assert recipe.sft.dataset.path == "data/demo/sft_train.jsonl"
    assert recipe.sft.trainer["learning_rate"] == 3e-3  # YAML's "3.0e-3" is a number


def test_overrides_beat_the_recipe_and_reach_nested_keys(tmp_path):
    path = write(tmp_path, "sft:\n  dataset: a.jsonl\n  finetune: full\n")
    recipe = load_recipe(
        path, ["sft.finetune=lora", "sft.lora.r=4", "sft.dataset.limit=10", "sft.trainer.learning_rate=1e-4"]
    )
    assert recipe.sft.finetune == "lora"
    assert recipe.sft.lora.r == 4
    assert recipe.sft.dataset == DatasetSpec(path="a.jsonl", limit=10)
    assert recipe.sft.trainer["learning_rate"] == pytest.approx(1e-4)


def test_unknown_key_names_the_key_and_the_closest_valid_one(tmp_path):
    path = write(tmp_path, "sft:\n  finetun: lora\n")
    with pytest.raises(ConfigError, match=r"unknown key 'sft.finetun'.*did you mean 'finetune'"):
        load_recipe(path)
    with pytest.raises(ConfigError, match=r"unknown key 'sft.lora.rank'"):
        load_recipe(None, ["sft.lora.rank=8"])


def test_ill_typed_values_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"'sft.lora.r': expected an integer, got 'big'"):
        load_recipe(None, ["sft.lora.r=big"])
    with pytest.raises(ConfigError, match=r"'sft.finetune': 'qlora' is not one of"):
        load_recipe(None, ["sft.finetune=qlora"])
    with pytest.raises(ConfigError, match=r"'seed': expected an integer"):
        load_recipe(None, ["seed=1.5"])


def test_bad_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(write(tmp_path, "sft: [unclosed\n"))
    with pytest.raises(ConfigError, match="not of the form"):
        load_recipe(None, ["sft.finetune"])


def test_trainer_section_is_checked_against_trl_config(tmp_path):
    args = trl_args(
        SFTConfig,
        {"learning_rate": 1e-3, "max_length": 32},
        "sft.trainer",
        output_dir=str(tmp_path),
        report_to="none",
        bf16=False,
        learning_rate=5.0,
    )
    assert args.learning_rate == 1e-3 and args.max_length == 32  # the user's value beats the default
    with pytest.raises(ConfigError, match=r"unknown key 'sft.trainer.learning_rat'.*'learning_rate'"):
        trl_args(SFTConfig, {"learning_rat": 1e-3}, "sft.trainer", output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"'sft.trainer.num_train_epochs': expected a number"):
        trl_args(SFTConfig, {"num_train_epochs": "many"}, "sft.trainer", output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"^sft.trainer: .*logging_steps"):  # trl's own check, placed
        trl_args(SFTConfig, {"logging_steps": 0}, "sft.trainer", output_dir=str(tmp_path), bf16=False)


def test_the_shipped_7b_recipe_is_valid():
    from pipeline.recipe_loader import load_recipe

    recipe = load_recipe("stages/recipes/7b-lora-1gpu.yaml")
    assert recipe.ppo.finetune == "lora" and recipe.ppo.gradient_checkpointing and recipe.ppo.forward_batch_size == 4


OUT_OF_RANGE = [  # every ranged field once, at a value just outside its range
    ("ppo.lam=1.5", "in [0, 1]"),
    ("ppo.gamma=-0.1", "in [0, 1]"),
    ("ppo.learning_rate=-1e-5", "> 0"),
    ("ppo.learning_rate=0", "> 0"),
    ("ppo.batch_size=0", ">= 1"),
    ("ppo.mini_batch_size=0", ">= 1"),
    ("ppo.total_episodes=0", ">= 1"),
    ("ppo.temperature=0", "> 0"),
    ("eval.temperature=0", "> 0"),
    ("ppo.cliprange=0", "> 0"),
    ("ppo.cliprange_value=-0.2", "> 0"),
    ("ppo.ppo_epochs=0", ">= 1"),
    ("ppo.max_new_tokens=0", ">= 1"),
    ("ppo.kl_coef=-0.1", ">= 0"),
    ("ppo.kl_target=0", "> 0"),
    ("ppo.kl_horizon=0", ">= 1"),
    ("ppo.vf_coef=-1", ">= 0"),
    ("ppo.max_grad_norm=0", "> 0"),
    ("ppo.gradient_accumulation_steps=0", ">= 1"),
    ("ppo.forward_batch_size=0", ">= 1"),
    ("ppo.missing_stop_penalty=-1", ">= 0"),
    ("ppo.save_every=0", ">= 1"),
    ("ppo.sample_every=0", ">= 1"),
    ("ppo.lora.r=0", ">= 1"),
    ("sft.lora.alpha=0", ">= 1"),
    ("rm.lora.dropout=1.0", "in [0, 1)"),
    ("sft.eval_fraction=1.0", "in [0, 1)"),
    ("rm.reference_limit=0", ">= 1"),
    ("sft.dataset.limit=0", ">= 1"),
    ("eval.max_new_tokens=0", ">= 1"),
    ("eval.batch_size=0", ">= 1"),
    ("eval.samples_in_report=-1", ">= 0"),
    ("base.hidden_size=0", ">= 1"),
    ("seed=-1", ">= 0"),
    ("sft.trainer.learning_rate=-2e-5", "> 0"),
    ("rm.trainer.per_device_train_batch_size=0", ">= 1"),
    ("sft.trainer.num_train_epochs=0", "> 0"),
    ("rm.trainer.gradient_accumulation_steps=0", ">= 1"),
    ("sft.trainer.warmup_ratio=1.5", "in [0, 1]"),
    ("rm.trainer.max_length=0", ">= 1"),
]


@pytest.mark.parametrize("override,rule", OUT_OF_RANGE, ids=[o for o, _ in OUT_OF_RANGE])
def test_out_of_range_values_are_refused_when_the_recipe_is_read(override, rule):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^'{re.escape(key)}': .* is out of range: it must be {re.escape(rule)}$"):
        load_recipe(DEMO, [override])


def test_values_at_the_edge_of_their_range_are_accepted():
    recipe = load_recipe(
        DEMO,
        [
            "ppo.lam=1",
            "ppo.gamma=0",
            "ppo.kl_coef=0",
            "ppo.vf_coef=0",
            "sft.eval_fraction=0",
            "ppo.kl_target=null",
            "ppo.batch_size=1",
            "ppo.mini_batch_size=1",
            "seed=0",
        ],
    )
    assert recipe.ppo.lam == 1 and recipe.ppo.batch_size == 1 and recipe.sft.eval_fraction == 0


def test_a_stage_given_an_out_of_range_value_stops_in_one_line_before_loading_anything(tmp_path):
    """eval.temperature=0 used to run and report a NaN KL with exit code 0."""
    from pipeline import process
    from stages import eval as evaluate

    with pytest.raises(SystemExit) as e:  # as the script's __main__ runs it (test_make checks a real process)
        process.run(lambda: evaluate.main([f"runs_dir={tmp_path}", "eval.temperature=0"]))
    assert e.value.code == "error: 'eval.temperature': 0.0 is out of range: it must be > 0"
    assert not any(tmp_path.iterdir())


def test_the_recipe_reference_is_generated_from_the_schema_and_names_every_key():
    """docs/recipe-reference.md is what `make docs` writes from pipeline/recipe.py (a schema change without
    it fails here), and it documents every key of the default recipe, nested ones included."""
    from pipeline import recipe_reference
    from pipeline.recipe_loader import to_dict

    written = recipe_reference.OUT.read_text()
    assert written == recipe_reference.reference(), "docs/recipe-reference.md is stale: run `make docs`"

    def keys(d: dict, prefix: str = "") -> list[str]:
        out = []
        for k, v in d.items():
            is_section = isinstance(v, dict) and v and k != "trainer" and k != "columns"
            out += keys(v, f"{prefix}{k}.") if is_section else [f"{prefix}{k}"]
        return out

    documented = [k for k in keys(to_dict(load_recipe(None))) if f"**`{k}`**" in written]
    assert documented == keys(to_dict(load_recipe(None))) and len(documented) > 90
    assert "**`ppo.rewards[].function`**" in written and "must be > 0" in written
