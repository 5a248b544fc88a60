"""Tools, an environment and a reward function for the agent tests (tests/test_agent.py)."""

from __future__ import annotations

import json
import os
import time


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: the first factor
        b: the second factor
    """
    return a * b


def broken(x: int) -> int:
    """A tool that always fails.

    Args:
        x: anything
    """
    raise ValueError(f"cannot handle {x}")


def hangs(x: int) -> int:
    """A tool that never answers in time.

    Args:
        x: anything
    """
    time.sleep(30)
    return x


class Counter:
    """An environment: each rollout counts its own calls; reset's row is kept for the reward."""

    def reset(self, **row):
        self.row, self.count = row, 0
        return f" (start at {row.get('a', 0)})"

    def increment(self, by: int) -> int:
        """Add to the counter.

        Args:
            by: how much to add
        """
        self.count += by
        return self.count


def record(completions, environments=None, **kwargs) -> list[float]:
    """Writes what it was given (to the file AGENT_RECORD names), rewards each exchange's length."""
    with open(os.environ["AGENT_RECORD"], "a") as f:
        f.write(json.dumps({"completions": completions,
                            "environments": [type(e).__name__ for e in environments] if environments else None,
                            "rows": [e.row for e in environments] if environments else None}) + "\n")
    return [float(len(c)) for c in completions]


class NoRow:
    """An environment whose reset takes no row (trl's contract passes it one)."""

    def reset(self):
        return None

    def look(self, x: int) -> int:
        """Look.

        Args:
            x: where
        """
        return x
