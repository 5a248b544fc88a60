"""Preference and reference data in the spellings of the most used hub datasets, written from their
dataset cards as fixtures (the demo's pairs re-spelled), normalised on load and trained on by the RM
stage:

- HuggingFaceH4/ultrafeedback_binarized: `prompt` (string), `prompt_id`, `chosen` / `rejected`
  (message lists that repeat the user turn), `messages`, `score_chosen`, `score_rejected`;
- Anthropic/hh-rlhf: `chosen` / `rejected` as raw text, "\\n\\nHuman: ...\\n\\nAssistant: ...";
- Dahoas/full-hh-rlhf: `prompt` as HH raw text ending in "Assistant:", `response`, and `chosen` /
  `rejected` as plain strings (and prompt-only sets in the same form, for PPO and eval);
- trl-lib/ultrafeedback_binarized: implicit prompt (`chosen` / `rejected` whole conversations),
  `score_chosen`, `score_rejected`;
- HuggingFaceH4/no_robots: `messages` next to a string `prompt`, `prompt_id`, `category` (SFT data);
- a dataset with its own column names (`question`, `pos`, `neg`), mapped with `columns:`;
- SFT data in `messages` form as the RM stage's reference set (the default is the SFT data).
"""

from __future__ import annotations

import json

import pytest

from pipeline.data import load_for, load_prompts, reference_pairs
from pipeline.errors import DataError
from pipeline.recipe import DatasetSpec
from stages import rm
from tests.conftest import REPO, read_jsonl, rm_args

DEMO_PAIRS = read_jsonl(REPO / "data/demo/preferences_train.jsonl")[:400]


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def ultrafeedback(path) -> str:
    rows = []
    for i, r in enumerate(DEMO_PAIRS):
        user = r["prompt"][0]["content"]
        chosen = [{"role": "user", "content": user}, *r["chosen"]]
        rows.append(
            {
                "prompt": user,
                "prompt_id": f"{i:064x}",
                "chosen": chosen,
                "rejected": [{"role": "user", "content": user}, *r["rejected"]],
                "messages": chosen,
                "score_chosen": 8.0,
                "score_rejected": 3.5,
            }
        )
    return write(path, rows)


def hh(path) -> str:
    text = lambda r, side: f"\n\nHuman: {r['prompt'][0]['content']}\n\nAssistant: {r[side][0]['content']}"  # noqa: E731
    return write(path, [{"chosen": text(r, "chosen"), "rejected": text(r, "rejected")} for r in DEMO_PAIRS])


def dahoas(path) -> str:
    return write(
        path,
        [
            {
                "prompt": f"\n\nHuman: {r['prompt'][0]['content']}\n\nAssistant:",
                "response": " " + r["chosen"][0]["content"],
                "chosen": " " + r["chosen"][0]["content"],
                "rejected": " " + r["rejected"][0]["content"],
            }
            for r in DEMO_PAIRS
        ],
    )


def trl_ultrafeedback(path) -> str:
    return write(
        path,
        [
            {
                "chosen": r["prompt"] + r["chosen"],
                "rejected": r["prompt"] + r["rejected"],
                "score_chosen": 8.0,
                "score_rejected": 3.5,
            }
            for r in DEMO_PAIRS
        ],
    )


def no_robots(path) -> str:
    rows = read_jsonl(REPO / "data/demo/sft_train.jsonl")[:50]
    return write(
        path,
        [
            {
                "prompt": r["prompt"][0]["content"],
                "prompt_id": f"{i:064x}",
                "messages": r["prompt"] + r["completion"],
                "category": "Open QA",
            }
            for i, r in enumerate(rows)
        ],
    )


def own_names(path) -> str:
    return write(
        path,
        [
            {
                "question": r["prompt"][0]["content"],
                "pos": r["chosen"][0]["content"],
                "neg": r["rejected"][0]["content"],
                "source": "demo",
            }
            for r in DEMO_PAIRS
        ],
    )


def sft_messages(path) -> str:
    rows = read_jsonl(REPO / "data/demo/sft_train.jsonl")[:200]
    return write(path, [{"messages": r["prompt"] + r["completion"], "id": i} for i, r in enumerate(rows)])


def test_ultrafeedback_pairs_lose_the_repeated_prompt_and_the_extra_columns(tmp_path, capsys):
    ds, fmt = load_for(DatasetSpec(ultrafeedback(tmp_path / "uf.jsonl")), ["preference"])
    assert fmt == "preference" and ds.column_names == ["prompt", "chosen", "rejected"]
    row, demo = ds[0], DEMO_PAIRS[0]
    assert row["prompt"] == demo["prompt"] and row["chosen"] == demo["chosen"] and row["rejected"] == demo["rejected"]
    assert "ignoring columns ['prompt_id', 'messages', 'score_chosen', 'score_rejected']" in capsys.readouterr().out


def test_hh_raw_text_becomes_conversations(tmp_path):
    ds, fmt = load_for(DatasetSpec(hh(tmp_path / "hh.jsonl")), ["preference"])
    demo = DEMO_PAIRS[0]
    assert fmt == "preference" and ds[0]["chosen"] == demo["prompt"] + demo["chosen"]
    assert ds[0]["rejected"] == demo["prompt"] + demo["rejected"]  # the shared turns: RewardTrainer's implicit prompt


def test_hh_prompts_with_plain_responses_become_conversations(tmp_path):
    """Dahoas/full-hh-rlhf: the dialogue prompt becomes its turns (the empty "Assistant:" dropped),
    the string responses assistant turns; `response` is dropped. A multi-turn HH prompt keeps its
    history, and a prompt-only set in this form gives conversational prompts."""
    ds, fmt = load_for(DatasetSpec(dahoas(tmp_path / "dahoas.jsonl")), ["preference"])
    demo = DEMO_PAIRS[0]
    assert fmt == "preference" and ds[0] == {
        "prompt": demo["prompt"],
        "chosen": demo["chosen"],
        "rejected": demo["rejected"],
    }
    multi = "\n\nHuman: hi\n\nAssistant: hello !\n\nHuman: and the music ?\n\nAssistant:"
    path = write(tmp_path / "prompts.jsonl", [{"prompt": multi}])
    assert load_prompts(DatasetSpec(path))[0] == [
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello !"},
            {"role": "user", "content": "and the music ?"},
        ]
    ]


def test_implicit_conversations_with_scores_and_messages_with_a_prompt_column(tmp_path):
    """trl-lib/ultrafeedback_binarized keeps its implicit prompt (RewardTrainer extracts it), scores
    dropped; no_robots is SFT conversation data whatever its string `prompt` column says."""
    ds, fmt = load_for(DatasetSpec(trl_ultrafeedback(tmp_path / "uf.jsonl")), ["preference"])
    assert fmt == "preference" and ds.column_names == ["chosen", "rejected"]
    assert ds[0]["chosen"] == DEMO_PAIRS[0]["prompt"] + DEMO_PAIRS[0]["chosen"]
    ds, fmt = load_for(DatasetSpec(no_robots(tmp_path / "nr.jsonl")), ["prompt_completion", "language_modeling"])
    assert fmt == "language_modeling" and ds.column_names == ["messages"]
    assert load_prompts(DatasetSpec(str(tmp_path / "nr.jsonl")))[0][0] == ds[0]["messages"][0]["content"]


def test_a_batch_of_prompts_and_their_columns_is_one_read_each(tmp_path, monkeypatch):
    """PPO takes an iteration's prompts, each other column's values and the ids of prompts drawn for
    the first time from the arrow-backed columns in one read each (`data.take`): read row by row, every
    access pays arrow's overhead (0.3 s of a demo PPO run, 2,560 reads)."""
    from datasets.arrow_dataset import Column

    import pipeline.rl.rollout as rollout
    from pipeline.data import take

    path = write(tmp_path / "p.jsonl", [{"prompt": f"p{i}", "solution": i} for i in range(10)])
    prompts, columns = load_prompts(DatasetSpec(path))
    reads, read = [], Column.__getitem__
    monkeypatch.setattr(Column, "__getitem__", lambda self, key: reads.append(key) or read(self, key))
    assert take(prompts, [3, 1, 3]) == ["p3", "p1", "p3"] and take(columns["solution"], [3, 1, 3]) == [3, 1, 3]
    assert take(prompts, []) == [] and take(["a", "b"], [1, 1]) == ["b", "b"]
    assert reads == [[3, 1, 3], [3, 1, 3]]
    monkeypatch.setattr(rollout, "prompt_ids", lambda tokenizer, prompt: [int(prompt[1:])])
    ids = rollout.PromptIds(None, prompts)
    assert ids([4, 4, 5]) == [[4], [4], [5]] and ids([5, 6, 4]) == [[5], [6], [4]] and ids([6]) == [[6]]
    assert reads[2:] == [[4, 5], [6]]  # the new prompts of each call, once


def test_columns_are_mapped_and_a_wrong_mapping_is_named(tmp_path):
    path = own_names(tmp_path / "own.jsonl")
    ds, fmt = load_for(
        DatasetSpec(path, columns={"prompt": "question", "chosen": "pos", "rejected": "neg"}), ["preference"]
    )
    assert fmt == "preference" and ds[0] == {
        "prompt": DEMO_PAIRS[0]["prompt"][0]["content"],
        "chosen": DEMO_PAIRS[0]["chosen"][0]["content"],
        "rejected": DEMO_PAIRS[0]["rejected"][0]["content"],
    }
    with pytest.raises(DataError, match=r"columns \['better'\] named in `columns` are not in the dataset"):
        load_for(DatasetSpec(path, columns={"chosen": "better"}), ["preference"])


def test_a_messages_reference_set_gives_prompts_and_last_turns(tmp_path):
    prompts, responses = reference_pairs(DatasetSpec(sft_messages(tmp_path / "msgs.jsonl")), limit=5)
    demo = read_jsonl(REPO / "data/demo/sft_train.jsonl")[0]
    assert len(prompts) == 5 and prompts[0] == demo["prompt"] and responses[0] == demo["completion"]


def train_rm_on(pairs: str, runs, tmp_path) -> dict:
    rm.main(
        rm_args(
            runs,
            f"rm.dataset={pairs}",
            "rm.eval_dataset=null",
            "rm.eval_fraction=0.1",
            f"rm.reference_dataset={sft_messages(tmp_path / 'msgs.jsonl')}",
            "rm.trainer.num_train_epochs=2",
            "--force",
        )
    )
    return json.loads((runs / "demo" / "rm" / "manifest.json").read_text())["metrics"]


@pytest.fixture(scope="module")
def demo_schema_rm(sft_run, tmp_path_factory) -> dict:
    """The same 400 pairs in the demo's own spelling, trained the same way: what each hub spelling
    must reproduce (a fixed sentiment lexicon scores 0.62 on these pairs, so a bare threshold would not
    show a prompt lost in the conversion)."""
    import shutil

    tmp = tmp_path_factory.mktemp("demo_schema")
    shutil.copytree(sft_run / "demo" / "sft", tmp / "demo" / "sft")
    return train_rm_on(write(tmp / "pairs.jsonl", DEMO_PAIRS), tmp, tmp)


@pytest.mark.parametrize("schema", ["ultrafeedback", "hh", "dahoas"])
def test_the_rm_stage_trains_on_hub_schemas_with_a_messages_reference(schema, runs_with_sft, tmp_path, demo_schema_rm):
    data = {"ultrafeedback": ultrafeedback, "hh": hh, "dahoas": dahoas}[schema](tmp_path / "pairs.jsonl")
    metrics = train_rm_on(data, runs_with_sft, tmp_path)
    assert metrics["train_pairs"] == 360 and metrics["reference"]["n"] == 64
    # the same conversations, so the same reward model as from the demo's spelling
    assert metrics["heldout"]["accuracy"] == pytest.approx(demo_schema_rm["heldout"]["accuracy"], abs=1e-6)
    assert metrics["reference"]["mean"] == pytest.approx(demo_schema_rm["reference"]["mean"], rel=1e-4, abs=1e-5)


def test_multi_turn_histories_with_a_system_turn_repeated_in_both_sides(tmp_path):
    """An explicit conversational prompt (system + earlier turns) that chosen/rejected repeat: cut off."""
    history = [
        {"role": "system", "content": "you review films ."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello !"},
        *DEMO_PAIRS[0]["prompt"],
    ]
    rows = [
        {
            "prompt": history,
            "chosen": history + DEMO_PAIRS[0]["chosen"],
            "rejected": history + DEMO_PAIRS[0]["rejected"],
        }
    ] * 3
    ds, _ = load_for(DatasetSpec(write(tmp_path / "multi.jsonl", rows)), ["preference"])
    assert ds[0] == {"prompt": history, "chosen": DEMO_PAIRS[0]["chosen"], "rejected": DEMO_PAIRS[0]["rejected"]}


def test_a_text_reference_set_is_scored_as_whole_texts(tmp_path):
    path = write(tmp_path / "text.jsonl", [{"text": "the music is great ."}, {"text": "the story is dull ."}])
    assert reference_pairs(DatasetSpec(path), limit=10) == (
        [None, None],
        ["the music is great .", "the story is dull ."],
    )
