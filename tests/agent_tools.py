"""Tools, an environment and a reward function for the agent tests (tests/test_agent.py)."""

from __future__ import annotations

import asyncio
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


ARRIVED: dict[str, int] = {}


async def meet(group: str, n: int) -> int:
    """Wait until n calls of one group have arrived (only calls that run together can all return).

    Args:
        group: the group's name
        n: how many calls to wait for
    """
    ARRIVED[group] = ARRIVED.get(group, 0) + 1
    while ARRIVED[group] < n:
        await asyncio.sleep(0.01)
    return ARRIVED[group]


async def note(entry: str, delay: float) -> str:
    """Write an entry in the log, after a delay.

    Args:
        entry: what to write
        delay: seconds to wait first
    """
    await asyncio.sleep(delay)
    LOG.append(entry)
    return ",".join(LOG)


LOG: list[str] = []


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
    """Writes what it was given (to the file AGENT_RECORD names, a line per call and process), rewards
    each exchange's length."""
    with open(os.environ["AGENT_RECORD"], "a") as f:
        f.write(
            json.dumps(
                {
                    "rank": int(os.environ.get("RANK", 0)),
                    "completions": completions,
                    "environments": [type(e).__name__ for e in environments] if environments else None,
                    "rows": [e.row for e in environments] if environments else None,
                }
            )
            + "\n"
        )
    return [float(len(c)) for c in completions]


def stars(title: str) -> str:
    """The agent demo's tool (pipeline/demo_agent.py), failing for the films of five of its ten colours.

    Args:
        title: the film's title, e.g. "red river"
    """
    from pipeline import demo_agent

    if title.split()[:1] in (["red"], ["blue"], ["green"], ["black"], ["white"]):
        raise LookupError("the ratings are unavailable")
    return demo_agent.stars(title)


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
