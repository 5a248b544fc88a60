"""Rewards for math answers, with trl's reward-function contract, for `grpo-instruct-lora-1gpu.yaml`
(found next to it: `math_rewards.py:correct`).

A completion is correct when the last `\\boxed{...}` in it holds the dataset's `solution`: compared with
math_verify where it is installed (`pip install math-verify`: equivalent expressions, as trl's
`accuracy_reward` does), else as normalised text (spaces, `\\left`/`\\right`, a trailing full stop and
`$` signs dropped; exact otherwise).
"""

from __future__ import annotations

import re


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} in `text`, braces balanced; None if there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth < 0:
            return text[i:j]
    return None


def normalised(answer: str) -> str:
    answer = re.sub(r"\\left|\\right|\\!|\\,|\$|\s", "", answer)
    return answer.rstrip(".")


def same(answer: str, solution: str) -> bool:
    try:
        from math_verify import parse, verify
    except ImportError:
        return normalised(answer) == normalised(solution)
    return bool(verify(parse(f"${solution}$"), parse(f"${answer}$")))


def correct(completions, solution, log_metric=None, **kwargs) -> list[float]:
    """1.0 when the completion's last \\boxed{} answer is the solution, else 0.0; also logs the share of
    completions that give a boxed answer at all (`answered`)."""
    answers = [last_boxed(c[-1]["content"] if isinstance(c, list) else c) for c in completions]
    if log_metric is not None:
        log_metric("answered", sum(a is not None for a in answers) / len(answers))
    return [float(a is not None and same(a, s)) for a, s in zip(answers, solution)]
