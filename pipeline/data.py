"""Datasets: load from a hub id or a local file, detect the TRL format, refuse what fits none.

Formats (as TRL documents them), each either plain strings or conversational message lists:
- language_modeling: `text` or `messages`
- prompt_completion: `prompt` + `completion`
- preference: `chosen` + `rejected`, with an explicit `prompt` or an implicit one (shared prefix)
- prompt_only: `prompt`

and the spellings of the most used hub datasets, normalised on load: other column names (the
recipe's `columns` mapping), Anthropic HH's raw "\n\nHuman: ... \n\nAssistant: ..." text, a prompt
repeated inside the chosen/rejected conversations (UltraFeedback: stripped as trl's data utilities
do), and extra columns (dropped, listed once).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import datasets
from datasets import Dataset
from datasets.arrow_dataset import Column

from pipeline.errors import DataError
from pipeline.recipe import DatasetSpec

# The columns each format uses; the rest of a dataset is dropped (UltraFeedback's prompt_id,
# score_chosen, messages, ...). `margin` is RewardTrainer's optional margin.
USED = {
    "preference": ["prompt", "chosen", "rejected", "margin"],
    "prompt_completion": ["prompt", "completion"],
    "language_modeling": ["messages", "text"],
    "prompt_only": ["prompt"],
}
HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")

FORMATS = {
    "preference": ({"chosen", "rejected"}, "chosen + rejected (optional prompt)"),
    "prompt_completion": ({"prompt", "completion"}, "prompt + completion"),
    "language_modeling": (None, "text or messages"),
    "prompt_only": ({"prompt"}, "prompt"),
}
LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _check_jsonl(path: Path) -> None:
    """datasets' JSON errors do not say where; report the first bad line by number."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")


def load(spec: DatasetSpec) -> Dataset:
    """Load a dataset from a local file, a local dataset directory, or the hub."""
    path = Path(spec.path)
    if path.is_file():
        loader = LOADERS.get(path.suffix.lower())
        if loader is None:
            raise DataError(f"{path}: unsupported file type '{path.suffix}' (use {', '.join(LOADERS)})")
        if path.suffix.lower() == ".jsonl":
            _check_jsonl(path)
        try:
            ds = datasets.load_dataset(loader, data_files=str(path), split="train")
        except Exception as e:  # pyarrow/pandas parse errors: keep their detail, name the file
            raise DataError(f"{path}: could not be read as {loader}: {e}") from None
    elif path.is_dir() and (path / "dataset_info.json").is_file():  # saved with save_to_disk
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[spec.split]
        ds = ds.with_format(None)  # a saved format (numpy, torch) would give arrays, not the rows as they are
    elif path.is_dir():  # a folder of data files
        ds = datasets.load_dataset(str(path), spec.name, split=spec.split)
    elif spec.path.startswith((".", "/")) or path.suffix.lower() in LOADERS:
        raise DataError(f"dataset file '{spec.path}' not found")
    else:
        try:
            ds = datasets.load_dataset(spec.path, spec.name, split=spec.split)
        except Exception as e:
            raise DataError(
                f"'{spec.path}' is no local file or directory, and loading it as a hub dataset failed: {e}"
            ) from None
    if spec.limit is not None:
        ds = ds.select(range(min(spec.limit, len(ds))))
    if len(ds) == 0:
        raise DataError(f"dataset '{spec.path}' is empty")
    return _hh_to_messages(_renamed(ds, spec))


def _renamed(ds: Dataset, spec: DatasetSpec) -> Dataset:
    """The recipe's column mapping applied: {chosen: pos} renames the dataset's `pos` to `chosen`."""
    if not spec.columns:
        return ds
    missing = [theirs for theirs in spec.columns.values() if theirs not in ds.column_names]
    if missing:
        raise DataError(
            f"{spec.path}: columns {missing} named in `columns` are not in the dataset "
            f"(it has {sorted(ds.column_names)})"
        )
    clashes = [ours for ours, theirs in spec.columns.items() if ours in ds.column_names and ours != theirs]
    return ds.remove_columns(clashes).rename_columns({theirs: ours for ours, theirs in spec.columns.items()})


def hh_messages(text: str) -> list[dict]:
    """Anthropic HH's raw text ("\n\nHuman: ... \n\nAssistant: ...") as a message list."""
    parts = HH_TURN.split(text)
    return [
        {"role": "user" if who == "Human" else "assistant", "content": said.strip()}
        for who, said in zip(parts[1::2], parts[2::2])
    ]


def _is_hh_text(value) -> bool:
    return isinstance(value, str) and value.lstrip(" ").startswith("\n\nHuman:")


def _hh_to_messages(ds: Dataset) -> Dataset:
    """Anthropic HH's raw text form becomes conversations, in both of its hub spellings: whole
    dialogues in chosen/rejected (Anthropic/hh-rlhf: the shared turns are then the implicit prompt,
    which RewardTrainer extracts), or a dialogue prompt ending in "Assistant:" next to plain-string
    responses (Dahoas/full-hh-rlhf, and prompt-only sets in the same form)."""
    first = ds[0]
    if _is_hh_text(first.get("chosen")):
        return ds.map(lambda row: {"chosen": hh_messages(row["chosen"]), "rejected": hh_messages(row["rejected"])})
    if not _is_hh_text(first.get("prompt")):
        return ds
    responses = [c for c in ("chosen", "rejected", "completion") if c in ds.column_names]

    def convert(row):
        turns = [m for m in hh_messages(row["prompt"]) if m["content"] or m["role"] == "user"]
        return {"prompt": turns, **{c: [{"role": "assistant", "content": row[c].strip()}] for c in responses}}

    return ds.map(convert)


def _strip_repeated_prompt(row: dict) -> dict:
    """UltraFeedback-style rows: an explicit prompt that chosen/rejected repeat as their first turns.
    A string prompt: trl's `maybe_extract_prompt` takes the shared turns as the prompt. A message-list
    prompt: its turns are cut off the front of both sides."""
    from trl.data_utils import maybe_extract_prompt

    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if is_conversational(chosen) and not is_conversational(prompt):
        return maybe_extract_prompt({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    if is_conversational(prompt) and chosen[: len(prompt)] == prompt and rejected[: len(prompt)] == prompt:
        return {"prompt": prompt, "chosen": chosen[len(prompt) :], "rejected": rejected[len(prompt) :]}
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _only_used(ds: Dataset, fmt: str, source: str) -> Dataset:
    extra = [c for c in ds.column_names if c not in USED[fmt]]
    if extra:
        if os.environ.get("RANK", "0") == "0":
            print(f"{source}: {fmt} data; ignoring columns {extra}")
        ds = ds.remove_columns(extra)
    return ds


def is_conversational(value) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    )


def detect_format(columns) -> str | None:
    cols = set(columns)
    if {"chosen", "rejected"} <= cols:
        return "preference"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "text" in cols or "messages" in cols:
        return "language_modeling"
    if "prompt" in cols:
        return "prompt_only"
    return None


def require_format(ds: Dataset, accepted: list[str], source: str) -> str:
    """The dataset's format if it is one of `accepted`, else an error saying what would fit."""
    fmt = detect_format(ds.column_names)
    if fmt not in accepted:
        wanted = "; ".join(f"{name} ({FORMATS[name][1]})" for name in accepted)
        found = f"it looks like {fmt} data" if fmt else "it fits no known format"
        raise DataError(f"{source}: columns {sorted(ds.column_names)}: {found}, but this stage needs {wanted}")
    first = ds[0]
    for column in ("prompt", "completion", "chosen", "rejected", "messages", "text"):
        if column in first and not isinstance(first[column], str) and not is_conversational(first[column]):
            raise DataError(
                f"{source}: column '{column}' must hold strings or message lists "
                f"([{{'role': ..., 'content': ...}}]), got {type(first[column]).__name__}"
            )
    return fmt


def load_for(spec: DatasetSpec, accepted: list[str]) -> tuple[Dataset, str]:
    ds = load(spec)
    fmt = require_format(ds, accepted, spec.path)
    ds = _only_used(ds, fmt, spec.path)
    if fmt == "preference" and "prompt" in ds.column_names:
        ds = ds.map(_strip_repeated_prompt)
    return ds, fmt


def reference_pairs(spec: DatasetSpec, limit: int) -> tuple[list, list]:
    """(prompts, responses) of a reference set in any format with a response: prompt-completion,
    preference (the chosen side), or language modelling (a conversation's last turn given the rest;
    plain text as a whole, prompt None)."""
    ds, fmt = load_for(spec, ["prompt_completion", "preference", "language_modeling"])
    ds = ds.select(range(min(limit, len(ds))))
    if fmt == "prompt_completion":
        return ds["prompt"], ds["completion"]
    if fmt == "preference":
        return (ds["prompt"] if "prompt" in ds.column_names else [None] * len(ds)), ds["chosen"]
    if "messages" in ds.column_names:
        return [m[:-1] for m in ds["messages"]], [m[-1:] for m in ds["messages"]]
    return [None] * len(ds), ds["text"]


def load_prompts(spec: DatasetSpec) -> tuple[Column, dict[str, Column]]:
    """The `prompt` column of any dataset that has one (prompt-only, prompt-completion, preference),
    and its other columns by name (a reference `solution`, test cases, ...), which reward functions
    receive with each completion. A batch of rows is read with `take`."""
    ds = load(spec)
    if "prompt" not in ds.column_names:
        raise DataError(
            f"{spec.path}: columns {sorted(ds.column_names)}: this stage needs a `prompt` column "
            f"(prompt-only data, or any data with an explicit prompt)"
        )
    require_format(ds, [detect_format(ds.column_names)], spec.path)  # strings or message lists
    return ds["prompt"], {c: ds[c] for c in ds.column_names if c != "prompt"}


def take(column, indices: list[int]) -> list:
    """Rows `indices` of a column (`load_prompts`' columns stay datasets' arrow-backed `Column`s, which
    a large prompt set needs: as Python objects it would take several times the memory) in one read.
    Read row by row, a Column pays arrow's per-access cost each time: 0.3 s of a demo PPO run."""
    return column[indices] if isinstance(column, Column) and indices else [column[i] for i in indices]


def train_eval(
    spec: DatasetSpec, eval_spec: DatasetSpec | None, eval_fraction: float, accepted: list[str], seed: int
) -> tuple[Dataset, Dataset | None, str]:
    """Training data and evaluation data (a given file, or a held-out fraction of training)."""
    train, fmt = load_for(spec, accepted)
    if eval_spec is not None:
        evaluation, eval_fmt = load_for(eval_spec, accepted)
        if eval_fmt != fmt:
            raise DataError(f"{eval_spec.path} is {eval_fmt} data but {spec.path} is {fmt}: use one format")
        return train, evaluation, fmt
    if eval_fraction <= 0:
        return train, None, fmt
    n_eval = max(1, int(len(train) * eval_fraction))
    if n_eval >= len(train):
        raise DataError(
            f"{spec.path}: {len(train)} rows are too few to hold out {eval_fraction:.0%} for "
            f"evaluation (lower eval_fraction or give an eval_dataset)"
        )
    split = train.train_test_split(test_size=n_eval, seed=seed)
    return split["train"], split["test"], fmt


def _empty(value) -> bool:
    return value is None or (isinstance(value, (str, list)) and len(value) == 0)


def clean_preferences(ds: Dataset, source: str) -> tuple[Dataset, dict[str, int]]:
    """Drop pairs that teach nothing (a missing side, chosen == rejected) and count them; refuse
    data that is wrong throughout (conversations whose prompts differ between chosen and rejected)."""
    explicit = "prompt" in ds.column_names
    dropped = {"missing_field": 0, "identical": 0}
    keep = []
    for i, row in enumerate(ds):
        if _empty(row["chosen"]) or _empty(row["rejected"]) or (explicit and _empty(row["prompt"])):
            dropped["missing_field"] += 1
        elif row["chosen"] == row["rejected"]:
            dropped["identical"] += 1
        else:
            if not explicit and is_conversational(row["chosen"]) and row["chosen"][:-1] != row["rejected"][:-1]:
                raise DataError(
                    f"{source}, row {i}: chosen and rejected conversations start differently; with an "
                    f"implicit prompt every message but the last must be the same in both"
                )
            keep.append(i)
    if not keep:
        raise DataError(f"{source}: no usable preference pairs ({len(ds)} rows; dropped {dropped})")
    return (ds.select(keep) if len(keep) < len(ds) else ds), dropped
