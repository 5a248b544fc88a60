"""Training metrics: one JSON object per line in the artifact's metrics.jsonl."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA's allocator peak on a GPU, else the peak resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cut_jsonl(path: Path, key: str, last: float, drop: str | None = None) -> None:
    """Resuming: keep the lines of `path` whose `key` is at most `last` (and that do not contain `drop`),
    so what a killed run logged after its checkpoint appears once. A line torn by the kill is dropped."""
    if not path.exists():
        return

    def kept(line: str) -> bool:
        try:
            return json.loads(line)[key] <= last and (drop is None or drop not in line)
        except (json.JSONDecodeError, KeyError, TypeError):
            return False

    path.write_text("".join(line + "\n" for line in path.read_text().splitlines() if kept(line)))


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, default=_plain) + "\n")


def _plain(value):
    """JSON for what users log (through reward functions' log_extra): numpy and torch values as numbers
    or lists, anything else as its text."""
    for method in ("item", "tolist"):
        try:
            return getattr(value, method)()
        except (AttributeError, TypeError, ValueError, RuntimeError):
            pass
    return str(value)
