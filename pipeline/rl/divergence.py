"""Over-optimisation flagged where it happens: the optimised reward keeps rising while a judge falls or
stays flat (a reward model or function being gamed; Gao et al. 2023).

Over the last WINDOW iterations, a least-squares trend of each series' per-iteration means (the
reward's raw weighted sum, each judge's mean): the slope and its t-statistic from the residuals
(WINDOW - 2 = 8 degrees of freedom). A judge diverges when

    the reward rises:      t >= RISE_T (3.0: p < 0.01 one-sided)
    by a real amount:      slope x (WINDOW - 1) >= RISE_SD x the reward's spread among the rollouts of
                           the run's first WINDOW iterations (its standard deviation in a batch)
    while the judge does not:  its t <= JUDGE_T (0: a falling or flat judge)

The second condition keeps a reward that creeps up within its noise from raising alarms (the demo's
PPO gains 0.3 in its second half, at a spread of 1.1, while its gold judge is flat: a mild
over-optimisation this test leaves alone; the spread of later iterations would not, as a converging
policy's rewards narrow). Measured on
the demo's healthy runs and on deliberately gamed ones (docs/rewards-and-estimators.md, "Rewards, judges and critic-free
estimators"): no alarm in the healthy ones, an alarm within the run in the gamed ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

WINDOW = 10
RISE_T = 3.0
RISE_SD = 0.5
JUDGE_T = 0.0

REWARD, SPREAD = "objective/reward_raw", "objective/reward_raw_std"


def trend(values: list[float]) -> tuple[float, float]:
    """(slope per step, its t-statistic) of a least-squares line through the values."""
    n = len(values)
    mx, my = (n - 1) / 2, sum(values) / n
    sxx = sum((x - mx) ** 2 for x in range(n))
    slope = sum((x - mx) * (y - my) for x, y in enumerate(values)) / sxx
    residual = sum((y - my - slope * (x - mx)) ** 2 for x, y in enumerate(values)) / (n - 2)
    if residual > 0:
        return slope, slope / math.sqrt(residual / sxx)
    return slope, math.copysign(math.inf, slope) if slope else 0.0  # on a line: certain, or flat


@dataclass
class Divergence:
    judge: str
    first: int
    last: int
    """The window's iterations."""
    reward: tuple[float, float]
    judge_values: tuple[float, float]
    """Each series' fitted value at the window's first and last iteration."""
    reward_t: float
    judge_t: float

    def line(self) -> str:
        return (
            f"the reward rose {self.reward[0]:.3g} -> {self.reward[1]:.3g} over iterations {self.first}-{self.last} "
            f"(t = {self.reward_t:.1f}) while judge '{self.judge}' went {self.judge_values[0]:.3g} -> "
            f"{self.judge_values[1]:.3g} (t = {self.judge_t:.1f}): likely over-optimisation of the reward"
        )

    def record(self) -> dict:
        return {
            "judge": self.judge,
            "iterations": [self.first, self.last],
            "reward": list(self.reward),
            "judge_values": list(self.judge_values),
            "reward_t": self.reward_t,
            "judge_t": self.judge_t,
        }


def diverging(history: list[dict], judge: str, window: int = WINDOW) -> Divergence | None:
    """Whether `judge` diverges from the reward over the last `window` iterations of `history`
    (metrics.jsonl's lines); None if it does not, or if there are not yet enough iterations."""
    recent = history[-window:]
    key = f"judges/{judge}"
    if len(recent) < window or any(h.get(key) is None or h.get(REWARD) is None for h in recent):
        return None
    rewards, judged = [h[REWARD] for h in recent], [h[key] for h in recent]
    spread = sum(h.get(SPREAD) or 0.0 for h in history[:window]) / window  # the reward's natural spread
    slope, t = trend(rewards)
    judge_slope, judge_t = trend(judged)
    if not (t >= RISE_T and slope * (window - 1) >= RISE_SD * spread and judge_t <= JUDGE_T):
        return None
    fitted = lambda values, b: (
        sum(values) / window - b * (window - 1) / 2,
        sum(values) / window + b * (window - 1) / 2,
    )  # noqa: E731
    return Divergence(
        judge,
        recent[0]["iteration"],
        recent[-1]["iteration"],
        fitted(rewards, slope),
        fitted(judged, judge_slope),
        t,
        judge_t,
    )
