"""End-to-end reward-model training on the demo pairs, and the bad inputs it must refuse or count."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pipeline.artifacts import require
from pipeline.data import clean_preferences, load
from pipeline.errors import DataError, MissingArtifact
from pipeline.recipe import DatasetSpec
from pipeline.scoring import RewardScorer
from stages import rm
from tests.conftest import read_jsonl, rm_args


@pytest.mark.parametrize("finetune, lr", [("full", 1e-3), ("lora", 2e-3)])
def test_reward_model_learns_the_demo_judge(runs_with_sft, finetune, lr):
    rm.main(
        rm_args(
            runs_with_sft,
            f"rm.finetune={finetune}",
            f"rm.trainer.learning_rate={lr}",
            "rm.lora.r=16",
            "rm.trainer.num_train_epochs=3",
        )
    )
    out = runs_with_sft / "demo" / "rm"
    manifest = require(out, "rm")
    heldout = manifest["metrics"]["heldout"]
    assert heldout["accuracy"] > 0.65 and heldout["gold_accuracy"] > 0.65  # chance is 0.5
    assert manifest["inputs"]["sft_manifest"]["stage"] == "sft"  # the chain: rm names the sft it came from
    reference = manifest["metrics"]["reference"]
    assert reference["n"] == 64 and reference["std"] > 0
    assert any("loss" in r for r in read_jsonl(out / "metrics.jsonl"))

    # The artifact reloads with plain transformers and prefers chosen over rejected on held-out pairs.
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    pairs = [json.loads(line) for line in open("data/demo/preferences_test.jsonl")][:100]
    scorer = RewardScorer(model, tokenizer)
    prompts = [p["prompt"] for p in pairs]
    chosen, rejected = scorer(prompts, [p["chosen"] for p in pairs]), scorer(prompts, [p["rejected"] for p in pairs])
    assert (chosen > rejected).float().mean() > 0.65
    assert (out / "adapter").is_dir() == (finetune == "lora")


def test_scores_do_not_depend_on_padding(runs_with_sft):
    """The score is read at the last real token: padding a batch must not change it."""
    model = AutoModelForSequenceClassification.from_pretrained(runs_with_sft / "demo" / "sft", num_labels=1).eval()
    tokenizer = AutoTokenizer.from_pretrained(runs_with_sft / "demo" / "sft")
    model.config.pad_token_id = tokenizer.pad_token_id
    scorer = RewardScorer(model, tokenizer)
    prompts = [
        [{"role": "user", "content": "how was the plot ?"}],
        [{"role": "user", "content": "how was the music of star quest ?"}],
    ]
    responses = ["the plot was great .", "the music was really wonderful and the plot was fine ."]
    alone = torch.stack([scorer([p], [r])[0] for p, r in zip(prompts, responses)])
    assert torch.allclose(scorer(prompts, responses), alone, atol=1e-5)


def test_missing_sft_artifact_names_the_target(tmp_path):
    with pytest.raises(MissingArtifact, match="run `make sft` first"):
        rm.main(rm_args(tmp_path))


def rows_file(tmp_path, rows):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def msg(role, text):
    return [{"role": role, "content": text}]


def test_pairs_that_teach_nothing_are_dropped_and_counted(tmp_path):
    rows = [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"prompt": "q", "chosen": None, "rejected": "b"},
        {"prompt": "", "chosen": "a", "rejected": "b"},
    ]
    ds, dropped = clean_preferences(load(DatasetSpec(path=rows_file(tmp_path, rows))), "pairs.jsonl")
    assert len(ds) == 1 and dropped == {"missing_field": 2, "identical": 1}


def test_bad_preference_data_is_refused(tmp_path):
    mismatched = [
        {"chosen": msg("user", "q1") + msg("assistant", "a"), "rejected": msg("user", "q2") + msg("assistant", "b")}
    ]
    with pytest.raises(DataError, match=r"row 0: chosen and rejected conversations start differently"):
        clean_preferences(load(DatasetSpec(path=rows_file(tmp_path, mismatched))), "pairs.jsonl")
    useless = [{"prompt": "q", "chosen": "a", "rejected": "a"}]
    with pytest.raises(DataError, match=r"no usable preference pairs.*'identical': 1"):
        clean_preferences(load(DatasetSpec(path=rows_file(tmp_path, useless))), "pairs.jsonl")


def test_rm_stage_refuses_non_preference_data(runs_with_sft):
    with pytest.raises(DataError, match=r"prompt_completion data, but this stage needs preference"):
        rm.main(rm_args(runs_with_sft, "rm.dataset=data/demo/sft_train.jsonl"))
    assert not (runs_with_sft / "demo" / "rm" / "manifest.json").exists()


def test_the_same_recipe_gives_the_same_reward_model(runs_with_sft, tmp_path):
    """The new score head is initialised before the Trainer seeds anything: the stage must seed it."""
    weights = []
    for _ in range(2):
        rm.main(
            rm_args(
                runs_with_sft,
                "rm.dataset.limit=64",
                "rm.eval_dataset.limit=16",
                "rm.reference_limit=8",
                "rm.trainer.num_train_epochs=1",
                "--force",
            )
        )
        model = AutoModelForSequenceClassification.from_pretrained(runs_with_sft / "demo" / "rm")
        weights.append(model.score.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])
