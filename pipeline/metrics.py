"""Training metrics: one JSON object per line in the artifact's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


class JsonlLogger(TrainerCallback):
    """Every Trainer log (losses, learning rate, eval metrics) also goes to metrics.jsonl."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            append_jsonl(self.path, {"step": state.global_step, "epoch": state.epoch, **logs})
