"""The headline of an evaluation, for the terminal: `python -m pipeline.report [--recipe R] [overrides]`.

`make eval` prints it when it evaluates, `make demo` at the end even when nothing had to run. Reads
only metrics.json, so it needs neither torch nor the models.
"""

from __future__ import annotations

import json
import sys

from pipeline import artifacts, cli, process

COLUMNS = [
    "kl_from_sft",
    "kl_from_start",
    "response_length",
    "stop_token_share",
    "distinct_2",
    "tool_use",
    "tool_calls",
]
POLICIES = ("base", "sft", "start", "ppo", "best")


def score_order(names) -> list[str]:
    """Score names as reports list them: the gold judge, the reward model, then the rest as given."""
    names = list(names)
    return [n for n in ("gold", "rm") if n in names] + [n for n in names if n not in ("gold", "rm")]


def _value(m: dict, key: str) -> str:
    v = m.get(key)
    v = v["mean"] if isinstance(v, dict) else v
    return "-" if v is None else f"{v:.3f}"


def verdicts(metrics: dict, start: str = "sft") -> list[str]:
    """For each judge: when the RL policy's win rate over its start by the optimised reward is above 0.5
    (its interval's lower end) while the judge's interval covers 0.5 or lies below it, a line saying so
    (the `best` row, the policy the first judge preferred, is the way back)."""
    settings = metrics.get("settings", {})
    reward, judges = settings.get("reward"), settings.get("judges", [])
    wins = metrics.get("ppo", {}).get(f"win_rate_vs_{start}", {})
    if reward not in wins or wins[reward]["ci95"][0] <= 0.5:
        return []
    r = wins[reward]
    return [
        f"the reward ({reward}) improved, win rate {r['rate']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]; "
        f"{judge} did not, {wins[judge]['rate']:.2f} [{wins[judge]['ci95'][0]:.2f}, {wins[judge]['ci95'][1]:.2f}]: "
        f"likely over-optimisation of the reward"
        + ("; the `best` row is the policy before it" if "best" in metrics else "")
        for judge in judges
        if judge in wins and wins[judge]["ci95"][0] <= 0.5
    ]


def headline(metrics: dict, start: str = "sft") -> str:
    """A fixed-width table of the sampled-decoding figures per policy, then the RL policies' win rates
    over their start (`start`: sft, or the RL stage's own start)."""
    policies = [p for p in POLICIES if p in metrics]
    scores = score_order(k[: -len("_score")] for k in metrics[policies[0]]["sampled"] if k.endswith("_score"))
    columns = [f"{n}_score" for n in scores] + [c for c in COLUMNS if any(c in metrics[p]["sampled"] for p in policies)]
    rows = [["policy", *columns]] + [[p, *(_value(metrics[p]["sampled"], c) for c in columns)] for p in policies]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"  verdict: {v}" for v in verdicts(metrics, start)]
    lines += [
        "  " + "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    for trained in ("ppo", "best"):
        wins = metrics.get(trained, {}).get(f"win_rate_vs_{start}", {})
        if wins:
            lines.append(
                f"  {trained} win rate vs {start} (95% interval): "
                + ", ".join(
                    f"by {judge} {w['rate']:.2f} [{w['ci95'][0]:.2f}, {w['ci95'][1]:.2f}]" for judge, w in wins.items()
                )
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    recipe, _ = cli.parse(__doc__.splitlines()[0], argv)
    out = recipe.run_dir / "eval"
    artifacts.require(out, "eval")
    s = json.loads((out / "metrics.json").read_text())
    print(
        f"report: {out / 'report.md'} ({s['settings']['n_prompts']} held-out prompts, "
        f"temperature {s['settings']['temperature']})"
    )
    print(headline(s, "start" if "start" in s else "sft"))


if __name__ == "__main__":
    process.run_and_exit(lambda: main(sys.argv[1:]))
