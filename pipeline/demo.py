"""The embedded demo task: "review a film with positive sentiment", with a programmatic gold judge.

In the spirit of Ziegler et al. (2019), where a policy learns to continue movie reviews with
positive sentiment. Here everything is synthetic and tiny, so the whole pipeline runs on 2 CPU
cores in minutes, yet it measures RLHF honestly:

- `score(prompt, response)` is the gold judge. It rewards positive sentiment about the aspect
  the prompt asks about, and penalises degenerate text (immediate repeats, repeated adjectives,
  no sentence ending, rambling, saying nothing).
- SFT demonstrations are well-formed but of mixed sentiment, so SFT alone scores middling and
  PPO has room to improve.
- Preference pairs are labelled by the judge with label noise, so the reward model must learn the
  judge rather than copy it; some pairs contain degenerate text, so the reward model sees it.
- Held-out prompts use (title, aspect) combinations seen in no training file.

Regenerate the committed files with `python -m pipeline.demo data/demo` (seeded: byte-identical).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ASPECTS = [
    "plot",
    "acting",
    "music",
    "ending",
    "story",
    "dialogue",
    "pacing",
    "cast",
    "script",
    "soundtrack",
    "lighting",
    "editing",
]
TITLES = [
    "star quest",
    "night river",
    "iron garden",
    "blue harbor",
    "silent city",
    "paper moon",
    "last train",
    "red valley",
    "glass tower",
    "cold summer",
    "wild coast",
    "lost signal",
]
PROMPT_TEMPLATES = [
    "what did you think of the {aspect} in {title} ?",
    "how was the {aspect} of {title} ?",
    "review the {aspect} of {title} .",
    "tell me about the {aspect} in {title} .",
]
POSITIVE = [
    "wonderful",
    "great",
    "brilliant",
    "moving",
    "superb",
    "delightful",
    "charming",
    "excellent",
    "beautiful",
    "clever",
]
NEGATIVE = ["awful", "boring", "dull", "terrible", "weak", "clumsy", "bland", "painful", "messy", "poor"]
NEUTRAL = ["fine", "okay", "average", "long", "simple", "typical", "loud", "quiet", "slow", "short"]
INTENSIFIERS = ["really", "very", "quite", "truly"]
ENDINGS = {".", "!"}
POLARITY = {**{w: 1.0 for w in POSITIVE}, **{w: -1.0 for w in NEGATIVE}, **{w: 0.0 for w in NEUTRAL}}

MAX_WORDS = 14  # longer responses count as rambling


# ---------------------------------------------------------------------------------------------
# The gold judge
# ---------------------------------------------------------------------------------------------


def _as_text(x) -> str:
    """Accept a plain string or a conversational message list (the last message's content)."""
    if isinstance(x, list):
        return x[-1]["content"] if x else ""
    return x


def asked_aspect(prompt) -> str | None:
    words = _as_text(prompt).lower().split()
    return next((w for w in words if w in ASPECTS), None)


def score(prompt, response) -> float:
    """Gold score of `response` to `prompt`, roughly in [-3, 1.5]; higher is better.

    sentiment in [-1, 1]: each positive adjective +1, negative -1, x1.5 after an intensifier,
        sign flipped by a "not" in the two words before it; the sum is clipped to [-2, 2] and halved
        (so piling up adjectives gains nothing).
    +0.5 if the response talks about the aspect the prompt asked about.
    penalties: 1.0 for no sentence ending, 0.5 per immediately repeated word, 0.25 per repeated
        adjective, 0.1 per word beyond 14, 0.5 for no adjective at all.
    """
    words = _as_text(response).lower().split()
    if not words:
        return -3.0
    sentiment = 0.0
    for i, w in enumerate(words):
        if w not in POLARITY:
            continue
        v = POLARITY[w]
        if i > 0 and words[i - 1] in INTENSIFIERS:
            v *= 1.5
        if "not" in words[max(0, i - 2) : i]:
            v = -v
        sentiment += v
    total = max(-2.0, min(2.0, sentiment)) / 2.0

    aspect = asked_aspect(prompt)
    if aspect is not None and aspect in words:
        total += 0.5

    penalty = 0.0
    if words[-1] not in ENDINGS:
        penalty += 1.0
    penalty += 0.5 * sum(a == b for a, b in zip(words, words[1:]))
    adjectives = [w for w in words if w in POLARITY]
    penalty += 0.25 * (len(adjectives) - len(set(adjectives)))
    penalty += 0.1 * max(0, len(words) - MAX_WORDS)
    if not adjectives:
        penalty += 0.5
    return round(total - min(penalty, 3.0), 4)


def gold_reward(prompts, completions, **kwargs) -> list[float]:
    """The gold judge as a reward function with trl's contract (`ppo.rewards: [{function:
    pipeline.demo:gold_reward}]`, or as a judge): one score per completion."""
    return [score(p, c) for p, c in zip(prompts, completions)]


def length_reward(completions, **kwargs) -> list[float]:
    """A reward that is easy to game: it pays for every word (demo-gamed.yaml optimises it while the
    gold judge watches, to show the RL stage's divergence alert and eval's verdict)."""
    return [float(len((c[-1]["content"] if isinstance(c, list) else c).split())) for c in completions]


# ---------------------------------------------------------------------------------------------
# Data generation
# ---------------------------------------------------------------------------------------------


def _clause(rng: random.Random, aspect: str) -> list[str]:
    pool = rng.choices([POSITIVE, NEGATIVE, NEUTRAL], weights=[0.4, 0.35, 0.25])[0]
    words = ["the", aspect, rng.choice(["was", "is"])]
    if rng.random() < 0.12:
        words.append("not")
    if rng.random() < 0.3:
        words.append(rng.choice(INTENSIFIERS))
    return words + [rng.choice(pool)]


def demonstration(rng: random.Random, aspect: str) -> str:
    """A well-formed review of mixed quality: what a crowd of human demonstrators would write."""
    first = aspect if rng.random() < 0.8 else rng.choice(ASPECTS)
    words = _clause(rng, first)
    if rng.random() < 0.5:
        words += [rng.choice(["and", "but"])] + _clause(rng, rng.choice(ASPECTS))
    return " ".join(words + [rng.choice([".", ".", "!"])])


def degenerate(rng: random.Random, aspect: str) -> str:
    """Text a badly trained policy writes: the reward model must learn that it is worse."""
    words = demonstration(rng, aspect).split()
    kind = rng.choice(["no_end", "repeat", "ramble", "spam"])
    if kind == "no_end":
        words = words[:-1]
    elif kind == "repeat":
        i = rng.randrange(len(words) - 1)
        words = words[:i] + [words[i]] * rng.randint(2, 4) + words[i + 1 :]
    elif kind == "ramble":
        extra = []
        for _ in range(rng.randint(2, 3)):
            extra += ["and"] + _clause(rng, rng.choice(ASPECTS))
        words = words[:-1] + extra + words[-1:]
    else:
        words = ["the", aspect, "was"] + [rng.choice(POSITIVE)] * rng.randint(2, 5) + ["."]
    return " ".join(words)


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def build(seed: int = 0, label_noise: float = 0.1) -> dict[str, list[dict]]:
    """All demo files as {file name: rows}."""
    rng = random.Random(seed)
    pairs = [(t, a) for t in TITLES for a in ASPECTS]
    rng.shuffle(pairs)
    heldout_pairs, train_pairs = pairs[:16], pairs[16:]

    def prompt_for(title, aspect):
        return rng.choice(PROMPT_TEMPLATES).format(aspect=aspect, title=title)

    def sft_rows(n):
        rows = []
        for _ in range(n):
            title, aspect = rng.choice(train_pairs)
            rows.append(
                {"prompt": _user(prompt_for(title, aspect)), "completion": _assistant(demonstration(rng, aspect))}
            )
        return rows

    def preference_rows(n):
        rows = []
        while len(rows) < n:
            title, aspect = rng.choice(train_pairs)
            prompt = prompt_for(title, aspect)
            a, b = (demonstration(rng, aspect) if rng.random() < 0.75 else degenerate(rng, aspect) for _ in range(2))
            sa, sb = score(prompt, a), score(prompt, b)
            if abs(sa - sb) < 0.25:  # too close to call: a human labeller would skip it too
                continue
            chosen, rejected = (a, b) if sa > sb else (b, a)
            if rng.random() < label_noise:
                chosen, rejected = rejected, chosen
            rows.append({"prompt": _user(prompt), "chosen": _assistant(chosen), "rejected": _assistant(rejected)})
        return rows

    train_prompts = [{"prompt": _user(t.format(aspect=a, title=ti))} for ti, a in train_pairs for t in PROMPT_TEMPLATES]
    rng.shuffle(train_prompts)
    heldout = [{"prompt": _user(t.format(aspect=a, title=ti))} for ti, a in heldout_pairs for t in PROMPT_TEMPLATES]
    return {
        "sft_train.jsonl": sft_rows(2000),
        "sft_eval.jsonl": sft_rows(200),
        "preferences_train.jsonl": preference_rows(3000),
        "preferences_test.jsonl": preference_rows(300),
        "prompts_train.jsonl": train_prompts,
        "prompts_heldout.jsonl": heldout,
    }


def write(out_dir: str | Path, seed: int = 0) -> None:
    write_files(out_dir, build(seed))


def write_files(out_dir: str | Path, files: dict[str, list[dict]]) -> None:
    """{file name: rows} as JSON-lines files in `out_dir` (the demos' data)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        with open(out / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    write(sys.argv[1] if len(sys.argv) > 1 else "data/demo")
