import json

import datasets
import pytest

from pipeline.data import detect_format, load, load_for, require_format, train_eval
from pipeline.errors import DataError
from pipeline.recipe import DatasetSpec

CONV_PROMPT = [{"role": "user", "content": "how was the plot ?"}]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    "columns, fmt",
    [
        (["text"], "language_modeling"),
        (["messages"], "language_modeling"),
        (["prompt", "completion"], "prompt_completion"),
        (["prompt", "chosen", "rejected"], "preference"),
        (["chosen", "rejected"], "preference"),  # implicit prompt
        (["prompt"], "prompt_only"),
        (["question", "answer"], None),
    ],
)
def test_detect_format(columns, fmt):
    assert detect_format(columns) == fmt


def test_local_files_in_every_supported_type_load_the_same(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "x.parquet"))
    ds.to_csv(str(tmp_path / "x.csv"), index=False)
    (tmp_path / "x.json").write_text(json.dumps(rows))
    ds.save_to_disk(str(tmp_path / "saved"))  # the layout of a downloaded hub dataset
    for name in ["x.parquet", "x.csv", "x.json", "saved"]:
        loaded, fmt = load_for(DatasetSpec(path=str(tmp_path / name)), ["prompt_completion"])
        assert fmt == "prompt_completion" and loaded.to_list() == rows, name
    assert load_for(DatasetSpec(path=jsonl(tmp_path / "x.jsonl", rows)), ["prompt_completion"])[0].to_list() == rows


def test_conversational_preference_file(tmp_path):
    path = jsonl(
        tmp_path / "p.jsonl",
        [
            {
                "prompt": CONV_PROMPT,
                "chosen": [{"role": "assistant", "content": "great ."}],
                "rejected": [{"role": "assistant", "content": "bad"}],
            }
        ],
    )
    ds, fmt = load_for(DatasetSpec(path=path), ["preference"])
    assert fmt == "preference" and ds[0]["prompt"] == CONV_PROMPT


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "broken"\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 3: not valid JSON"):
        load(DatasetSpec(path=str(path)))
    path.write_text('{"text": "ok"}\n["a list"]\n')
    with pytest.raises(DataError, match=r"line 2: expected a JSON object"):
        load(DatasetSpec(path=str(path)))


def test_wrong_columns_name_file_columns_and_accepted_formats(tmp_path):
    path = jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as err:
        load_for(DatasetSpec(path=path), ["language_modeling", "prompt_completion"])
    message = str(err.value)
    assert "qa.jsonl" in message and "['answer', 'question']" in message
    assert "prompt_completion (prompt + completion)" in message and "text or messages" in message
    prefs = jsonl(tmp_path / "p.jsonl", [{"chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"looks like preference data, but this stage needs"):
        load_for(DatasetSpec(path=prefs), ["prompt_completion"])


def test_bad_cell_types_are_refused(tmp_path):
    path = jsonl(tmp_path / "x.jsonl", [{"prompt": 3, "completion": "b"}])
    ds = load(DatasetSpec(path=path))
    with pytest.raises(DataError, match=r"column 'prompt' must hold strings or message lists"):
        require_format(ds, ["prompt_completion"], path)


def test_empty_missing_and_unsupported(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        load(DatasetSpec(path=str(empty)))
    with pytest.raises(DataError, match="not found"):
        load(DatasetSpec(path=str(tmp_path / "missing.jsonl")))
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match=r"unsupported file type '.txt'"):
        load(DatasetSpec(path=str(tmp_path / "x.txt")))


def test_hub_ids_go_to_the_hub_and_fail_clearly_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read at import: patch the live flags
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"'nobody/no-such-dataset' is no local file.*hub dataset"):
        load(DatasetSpec(path="nobody/no-such-dataset"))


def test_eval_split_and_limit(tmp_path):
    path = jsonl(tmp_path / "t.jsonl", [{"text": f"row {i}"} for i in range(40)])
    train, evaluation, fmt = train_eval(DatasetSpec(path=path, limit=20), None, 0.25, ["language_modeling"], 0)
    assert (len(train), len(evaluation)) == (15, 5)
    other = jsonl(tmp_path / "o.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError, match="use one format"):
        train_eval(DatasetSpec(path=path), DatasetSpec(path=other), 0, ["language_modeling", "prompt_completion"], 0)
