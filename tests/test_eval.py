"""Evaluation on a small finished run made by the test itself."""

import json

from pipeline.artifacts import read_manifest
from stages import eval as evaluate
from stages import ppo
from tests.conftest import DEMO_RECIPE, ppo_args


def test_eval_writes_consistent_metrics_report_and_plots(runs_with_rm, base_model):
    ppo.main(ppo_args(runs_with_rm, "ppo.learning_rate=1e-3"))
    evaluate.main(["--recipe", DEMO_RECIPE, f"runs_dir={runs_with_rm}", f"sft.model={base_model}",
                   "eval.prompts.limit=32", "eval.max_new_tokens=16"])
    out = runs_with_rm / "demo" / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"settings", "base", "sft", "ppo"}
    for policy in ("base", "sft", "ppo"):
        sampled = metrics[policy]["sampled"]
        assert {"gold_score", "rm_score", "kl_from_sft", "response_length", "stop_token_share",
                "distinct_1", "distinct_2"} <= set(sampled)
        assert 0 <= sampled["stop_token_share"] <= 1 and 0 < sampled["distinct_2"] <= 1
    assert metrics["sft"]["sampled"]["kl_from_sft"] == 0.0  # a policy against itself
    assert metrics["ppo"]["sampled"]["kl_from_sft"] > -0.5
    for judge in ("rm", "gold"):
        win = metrics["ppo"]["win_rate_vs_sft"][judge]
        assert 0 <= win["ci95"][0] <= win["rate"] <= win["ci95"][1] <= 1
    report = (out / "report.md").read_text()
    assert "| ppo |" in report and "## Samples" in report
    for png in ("ppo_curves.png", "score_distributions.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG" and (out / png).stat().st_size > 5000
    assert read_manifest(out)["stage"] == "eval"
