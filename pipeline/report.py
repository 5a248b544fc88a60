"""The headline of an evaluation, for the terminal: `python -m pipeline.report [--recipe R] [overrides]`.

`make eval` prints it when it evaluates, `make demo` at the end even when nothing had to run. Reads
only metrics.json, so it needs neither torch nor the models.
"""

from __future__ import annotations

import json
import sys

from pipeline import artifacts, cli

COLUMNS = ["kl_from_sft", "response_length", "stop_token_share", "distinct_2"]


def score_order(names) -> list[str]:
    """Score names as reports list them: the gold judge, the reward model, then the rest as given."""
    names = list(names)
    return [n for n in ("gold", "rm") if n in names] + [n for n in names if n not in ("gold", "rm")]


def _value(m: dict, key: str) -> str:
    v = m.get(key)
    v = v["mean"] if isinstance(v, dict) else v
    return "-" if v is None else f"{v:.3f}"


def headline(metrics: dict) -> str:
    """A fixed-width table of the sampled-decoding figures per policy, then PPO's win rates."""
    policies = [p for p in ("base", "sft", "ppo") if p in metrics]
    scores = score_order(k[:-len("_score")] for k in metrics[policies[0]]["sampled"] if k.endswith("_score"))
    columns = [f"{n}_score" for n in scores] + [c for c in COLUMNS if any(c in metrics[p]["sampled"] for p in policies)]
    rows = [["policy", *columns]] + [[p, *(_value(metrics[p]["sampled"], c) for c in columns)] for p in policies]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  " + "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    wins = metrics.get("ppo", {}).get("win_rate_vs_sft", {})
    if wins:
        lines.append("  ppo win rate vs sft (95% interval): " + ", ".join(
            f"by {judge} {w['rate']:.2f} [{w['ci95'][0]:.2f}, {w['ci95'][1]:.2f}]" for judge, w in wins.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    recipe, _ = cli.parse(__doc__.splitlines()[0], argv)
    out = recipe.run_dir / "eval"
    artifacts.require(out, "eval")
    s = json.loads((out / "metrics.json").read_text())
    print(f"report: {out / 'report.md'} ({s['settings']['n_prompts']} held-out prompts, "
          f"temperature {s['settings']['temperature']})")
    print(headline(s))


if __name__ == "__main__":
    cli.run_and_exit(lambda: main(sys.argv[1:]))
