"""Encoder reward models (BERT / RoBERTa / DeBERTa-v2 classifiers with their own tokenizers, no EOS
or chat template on BERT, tiny and built from their configs): rendered as a text pair, trained by
the RM stage, and scored by PPO and eval through the reward model's own tokenizer."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pipeline.artifacts import read_manifest
from pipeline.errors import ConfigError
from pipeline.scoring import RewardScorer, reward_input_ids
from stages import eval as evaluate
from stages import ppo, rm, sft
from tests import families
from tests.conftest import DEMO_RECIPE, assert_learned, assert_scored_by, control_run, ppo_args, read_jsonl

KINDS = ["bert", "roberta", "deberta"]
PROMPTS = [
    [{"role": "user", "content": "Write about the sea."}],
    "Describe a cat.",
    [{"role": "user", "content": "Write a short note about rain, please."}],
]
RESPONSES = [[{"role": "assistant", "content": "The sea is wide."}], "It sleeps all day long, mostly.", "Rain falls."]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return {kind: families.encoder_reward_model(kind, root / kind) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_an_encoder_reads_prompt_and_response_as_a_text_pair(encoders, kind):
    """[CLS] prompt [SEP] response [SEP] (RoBERTa: <s> prompt </s></s> response </s>), whether prompt and
    response are strings or messages, and a batch scores as each pair alone: right padding, so the first
    token (the one encoders pool) is [CLS], and the model's own positions."""
    tokenizer = AutoTokenizer.from_pretrained(encoders[kind])
    model = AutoModelForSequenceClassification.from_pretrained(encoders[kind]).eval()
    ids = reward_input_ids(tokenizer, PROMPTS[0], RESPONSES[0])
    assert ids == tokenizer("Write about the sea.", "The sea is wide.")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    scorer = RewardScorer(model, tokenizer)
    together = scorer(PROMPTS, RESPONSES)
    alone = torch.cat([scorer([p], [r]) for p, r in zip(PROMPTS, RESPONSES)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    direct = model(input_ids=torch.tensor([ids])).logits[0, 0]
    torch.testing.assert_close(together[0], direct)


def test_an_over_long_pair_loses_the_start_of_the_prompt(encoders):
    tokenizer = AutoTokenizer.from_pretrained(encoders["bert"])
    response = "the cat sleeps all day"
    ids = reward_input_ids(tokenizer, "write about a dog and " * 100 + "then a cat", response)
    assert len(ids) == tokenizer.model_max_length == 128
    tail = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
    assert ids[-len(tail) :] == tail
    assert tokenizer.truncation_side == "right"  # the tokenizer is left as it was
    prompt = "write about a dog"
    ids = reward_input_ids(tokenizer, prompt, "the cat sleeps all day and " * 60)  # the response alone overflows
    assert len(ids) == 128 and tokenizer.decode(ids).startswith("[CLS] write about a dog [SEP]")


def test_a_tokenizer_without_a_length_is_bounded_by_the_position_table(encoders):
    """Many saved tokenizers leave model_max_length unset (1e30): the scorer caps it to the positions the
    model has (RoBERTa: 130 - 2, its positions start after the padding index), so a long pair is cut,
    not run past the position embeddings. An empty response still makes a pair."""
    tokenizer = AutoTokenizer.from_pretrained(encoders["roberta"])
    tokenizer.model_max_length = int(1e30)
    model = AutoModelForSequenceClassification.from_pretrained(encoders["roberta"]).eval()
    scorer = RewardScorer(model, tokenizer)
    assert tokenizer.model_max_length == 128
    scores = scorer(["write about the music in star quest . " * 50], ["the music is great ."])
    assert scores.isfinite().all()
    bert = AutoTokenizer.from_pretrained(encoders["bert"])
    assert reward_input_ids(bert, "write about the music", "").count(bert.sep_token_id) == 2


def test_an_implicit_conversation_is_split_at_its_last_turn(encoders):
    tokenizer = AutoTokenizer.from_pretrained(encoders["bert"])
    conversation = PROMPTS[0] + RESPONSES[0]
    assert reward_input_ids(tokenizer, None, conversation) == reward_input_ids(tokenizer, PROMPTS[0], RESPONSES[0])


@pytest.mark.parametrize("kind", KINDS)
def test_the_rm_stage_trains_an_encoder(encoders, kind, runs_with_sft, base_model, tmp_path):
    rm.main(
        [
            "--recipe",
            DEMO_RECIPE,
            f"runs_dir={runs_with_sft}",
            f"rm.model={encoders[kind]}",
            "judge=null",
            "rm.dataset.limit=1000",
            "rm.eval_dataset.limit=100",
            "rm.reference_limit=16",
            "rm.trainer.num_train_epochs=8",
            "rm.trainer.learning_rate=3e-4",
        ]
    )
    metrics = read_manifest(runs_with_sft / "demo" / "rm")["metrics"]
    print(f"{kind}: held-out accuracy {metrics['heldout']['accuracy']:.3f}, trainer {metrics['eval_accuracy']:.3f}")
    assert metrics["heldout"]["accuracy"] > 0.65
    # the report scored the saved artifact as the trainer evaluated the model: the same pairs, the same ids
    assert metrics["heldout"]["accuracy"] == pytest.approx(metrics["eval_accuracy"], abs=0.05)
    assert AutoModelForSequenceClassification.from_pretrained(runs_with_sft / "demo" / "rm").config.model_type == (
        "deberta-v2" if kind == "deberta" else kind
    )
    if kind == "bert":  # the rest of the chain once: PPO raises the encoder's score, eval reports it
        ppo.main(ppo_args(runs_with_sft, "ppo.value_model=sft", "ppo.learning_rate=1e-3"))
        history = read_jsonl(runs_with_sft / "demo" / "ppo" / "metrics.jsonl")
        control = control_run(runs_with_sft, tmp_path / "control", "ppo.value_model=sft")
        print(
            f"ppo against the bert reward model: raw score {history[0]['objective/rm_score_raw']:.3f} -> "
            f"{history[-1]['objective/rm_score_raw']:.3f} "
            f"(untrained control {control[-1]['objective/rm_score_raw']:.3f})"
        )
        assert_learned(history, control, margin=0.15)
        assert read_manifest(runs_with_sft / "demo" / "ppo")["metrics"]["reward_model_tokenizer"] == "own"
        evaluate.main(
            [
                "--recipe",
                DEMO_RECIPE,
                f"runs_dir={runs_with_sft}",
                f"sft.model={base_model}",
                "eval.prompts.limit=8",
                "eval.max_new_tokens=8",
                "judge=null",
            ]
        )
        for stage, key in (("ppo", "rm_score_raw"), ("eval", "rm_score")):  # through BERT's own tokenizer
            assert_scored_by(
                read_jsonl(runs_with_sft / "demo" / stage / "samples.jsonl"), runs_with_sft / "demo" / "rm", key
            )


def test_an_untrained_encoder_as_ppo_reward_model_and_bert_as_a_policy(encoders, runs_with_sft):
    """`ppo.reward_model` a hub-style BERT classifier (no EOS, no RM stage) runs through its own
    tokenizer; a BERT model as the policy is refused in one line."""
    bert = encoders["bert"]
    ppo.main(ppo_args(runs_with_sft, f"ppo.reward_model={bert}", "ppo.value_model=sft", "ppo.total_episodes=64"))
    assert read_manifest(runs_with_sft / "demo" / "ppo")["metrics"]["reward_model_tokenizer"] == "own"
    assert_scored_by(read_jsonl(runs_with_sft / "demo" / "ppo" / "samples.jsonl"), bert, "rm_score_raw")
    with pytest.raises(ConfigError, match="encoder's tokenizer.*a policy must be a causal language model"):
        sft.main(["--recipe", DEMO_RECIPE, f"runs_dir={runs_with_sft}", f"sft.model={bert}", "--force"])
