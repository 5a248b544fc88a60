"""The embedded agent task: "how many stars does <film> have?", where a tool is the only way to be right.

Every film's rating (one to five stars) is in a table only the `stars` tool reads. The held-out
prompts ask about films no training file names, so a policy that answers from memory is right one time
in five, and one that calls the tool and repeats its result is always right. SFT demonstrations call
the tool in a third of the cases and guess in the rest, so SFT alone calls it sometimes and guesses
often; RL with the `correct` reward has to learn when the tool pays (always). The files and the table
are seeded: `python -m pipeline.demo_agent data/demo` writes them byte-identical.

The demo's word-level tokenizer splits on whitespace, so the demo's chat template (stages/base.py)
writes a call as JSON with a space between its tokens (`call_text`), which any JSON parser reads; the
tool strips the spaces around a value.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

COLORS = ["red", "blue", "green", "black", "white", "golden", "silver", "dark", "bright", "quiet"]
PLACES = ["river", "garden", "harbor", "city", "moon", "train", "valley", "tower", "summer", "coast"]
STARS = ["one", "two", "three", "four", "five"]
PROMPT_TEMPLATES = [
    "how many stars does {title} have ?",
    "what is the rating of {title} ?",
    "how many stars did {title} get ?",
]
TOOL_SHARE = 1 / 3  # of the SFT demonstrations that call the tool (the rest guess)
SEED = 0


def ratings(seed: int = SEED) -> dict[str, str]:
    """Every film's rating: the table behind the `stars` tool."""
    rng = random.Random(seed)
    return {f"{c} {p}": rng.choice(STARS) for c in COLORS for p in PLACES}


RATINGS = ratings()


def stars(title: str) -> str:
    """Look up how many stars a film has.

    Args:
        title: the film's title, e.g. "red river"
    """
    rating = RATINGS.get(title.strip().lower())
    return f"{rating} stars" if rating else f"no film is called {title}"


def answer_of(completion) -> str:
    """The exchange's final answer (its last assistant message), or the text itself."""
    if isinstance(completion, list):
        said = [m for m in completion if m.get("role") == "assistant"]
        return said[-1]["content"] if said else ""
    return completion


def correct(completions, rating, **kwargs) -> list[float]:
    """1 where the final answer states the film's rating ("<n> stars") and no other, else 0."""
    scores = []
    for completion, right in zip(completions, rating):
        said = answer_of(completion).split()
        claimed = {w for w, nxt in zip(said, said[1:] + [""]) if w in STARS and nxt == "stars"}
        scores.append(float(claimed == {right}))
    return scores


def call_text(name: str, arguments: dict[str, str]) -> str:
    """A call as the demo's template writes it: JSON with a space between its tokens, a value's words
    apart from its quotes too (so a title in a call is the same tokens as in the prompt)."""
    args = " , ".join(f'"{k}" : " {str(v).strip()} "' for k, v in arguments.items())
    return f'<tool_call> {{ "name" : "{name}" , "arguments" : {{ {args} }} }} </tool_call>'


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def build(seed: int = SEED) -> dict[str, list[dict]]:
    """All agent demo files as {file name: rows}."""
    rng = random.Random(seed + 1)
    titles = sorted(RATINGS)
    rng.shuffle(titles)
    heldout, train = titles[:30], titles[30:]

    def demonstration(title: str) -> list[dict]:
        if rng.random() < TOOL_SHARE:
            call = {"type": "function", "function": {"name": "stars", "arguments": {"title": title}}}
            return [
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "name": "stars", "content": stars(title)},
                {"role": "assistant", "content": f"{title} has {RATINGS[title]} stars ."},
            ]
        return [{"role": "assistant", "content": f"{title} has {rng.choice(STARS)} stars ."}]

    def prompts(names: list[str]) -> list[dict]:
        rows = [{"prompt": _user(t.format(title=n)), "rating": RATINGS[n]} for n in names for t in PROMPT_TEMPLATES]
        rng.shuffle(rows)
        return rows

    return {
        "agent_sft_train.jsonl": [
            {"prompt": _user(rng.choice(PROMPT_TEMPLATES).format(title=n)), "completion": demonstration(n)}
            for n in (rng.choice(train) for _ in range(1500))
        ],
        "agent_prompts_train.jsonl": prompts(train),
        "agent_prompts_heldout.jsonl": prompts(heldout),
    }


def write(out_dir: str | Path, seed: int = SEED) -> None:
    from pipeline.demo import write_files

    write_files(out_dir, build(seed))


if __name__ == "__main__":
    write(sys.argv[1] if len(sys.argv) > 1 else "data/demo")
