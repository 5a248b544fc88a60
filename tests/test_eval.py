"""Evaluation on a small finished run made by the test itself."""

import json

import pytest

from pipeline.artifacts import read_manifest
from pipeline.errors import DataError
from stages import eval as evaluate
from stages import ppo
from tests.conftest import DEMO_RECIPE, ppo_args, read_jsonl

pytestmark = pytest.mark.e2e  # whole stages, several processes


def test_eval_writes_consistent_metrics_report_and_plots(runs_with_rm, base_model):
    """The figures are recomputed here from eval's own samples: gold scores with the judge, win rates
    with the Wilson formula, distinct-n by counting; and PPO (a run long enough to learn) beats SFT by
    the gold judge with the interval's lower bound above 0.5."""
    import math

    from pipeline.demo import score as judge

    ppo.main(ppo_args(runs_with_rm, "ppo.total_episodes=512", "ppo.kl_coef=0.2", "ppo.save_every=100"))
    evaluate.main(
        ["--recipe", DEMO_RECIPE, f"runs_dir={runs_with_rm}", f"sft.model={base_model}", "eval.prompts.limit=64"]
    )
    out = runs_with_rm / "demo" / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    # (the demo watches its gold judge: the RL stage kept the policy it scored best, and eval reports it)
    assert set(metrics) == {"settings", "peak_memory_mb", "base", "sft", "ppo", "best"}
    best = read_manifest(runs_with_rm / "demo" / "ppo")["metrics"]["best"]
    assert best["judge"] == "gold" and 1 <= best["iteration"] <= 16
    assert set(metrics["best"]["win_rate_vs_sft"]) == {"gold", "rm"}
    samples = {
        policy: [r for r in read_jsonl(out / "samples.jsonl") if r["policy"] == policy]
        for policy in ("base", "sft", "ppo")
    }
    for policy, rows in samples.items():
        sampled = metrics[policy]["sampled"]
        assert len(rows) == 64
        gold = [judge(r["prompt"], r["response"]) for r in rows]
        assert [r["gold_score"] for r in rows] == pytest.approx(gold)
        assert sampled["gold_score"]["mean"] == pytest.approx(sum(gold) / len(gold))
        assert sampled["rm_score"]["mean"] == pytest.approx(sum(r["rm_score"] for r in rows) / len(rows))
        for n in (1, 2):
            grams = []
            for r in rows:
                words = r["response"].split()
                grams += [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
            assert sampled[f"distinct_{n}"] == pytest.approx(len(set(grams)) / len(grams))
        assert 0 <= sampled["stop_token_share"] <= 1
    for key, column in (("gold", "gold_score"), ("rm", "rm_score")):
        ppo_scores, sft_scores = ([r[column] for r in samples[p]] for p in ("ppo", "sft"))
        wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ppo_scores, sft_scores))
        n, z = len(ppo_scores), 1.959964
        p = wins / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        win = metrics["ppo"]["win_rate_vs_sft"][key]
        assert win["rate"] == pytest.approx(p)
        assert win["ci95"] == pytest.approx([centre - half, centre + half], abs=1e-3)
    assert metrics["ppo"]["win_rate_vs_sft"]["gold"]["ci95"][0] > 0.5  # PPO beats SFT by the gold judge
    assert metrics["ppo"]["sampled"]["kl_from_sft"] > 0.1  # and moved away from it to do so
    report = (out / "report.md").read_text()
    assert "| ppo |" in report and "ppo_curves.png" in report and (out / "ppo_curves.png").is_file()


def test_eval_of_any_run_without_judge_or_ppo(runs_with_rm, base_model, tmp_path):
    """A user's run: plain-string prompts, no gold judge, no PPO yet -> base and sft only, RM figures only."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": f"<|user|> how was the {a} ? <|end|> <|assistant|>"}) + "\n"
            for a in ("plot", "music", "acting", "ending")
        )
    )
    args = [
        "--recipe",
        DEMO_RECIPE,
        f"runs_dir={runs_with_rm}",
        f"sft.model={base_model}",
        "judge=null",
        "ppo.judges=[]",
        f"eval.prompts={prompts}",
        "eval.max_new_tokens=8",
    ]
    evaluate.main(args)
    out = runs_with_rm / "demo" / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"settings", "peak_memory_mb", "base", "sft"} and metrics["settings"]["n_prompts"] == 4
    assert "gold_score" not in metrics["sft"]["sampled"] and "rm_score" in metrics["sft"]["greedy"]
    assert not (out / "ppo_curves.png").exists() and (out / "score_distributions.png").is_file()
    assert "| sft |" in (out / "report.md").read_text()

    ppo.main(ppo_args(runs_with_rm, "ppo.total_episodes=32", "judge=null", "ppo.judges=[]"))
    evaluate.main(args)  # a new PPO artifact makes the evaluation out of date: it now includes PPO
    assert "ppo" in json.loads((out / "metrics.json").read_text())


def test_prompts_without_a_prompt_column_are_refused(runs_with_rm, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "how was the plot ?"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: columns \['question'\]: this stage needs a `prompt` column"):
        evaluate.main(["--recipe", DEMO_RECIPE, f"runs_dir={runs_with_rm}", f"eval.prompts={bad}"])
    assert not (runs_with_rm / "demo" / "eval").exists()


def test_eval_fits_where_ppo_fits(runs_with_rm, base_model, monkeypatch):
    """Policies in the recipe's compute dtype, one resident at a time next to the SFT reference and the
    reward model, KL forwards in PPO's micro-batches, and the peak memory reported. Old code: float32
    from_pretrained defaults, every policy kept alive, KL over whole generation batches."""
    import gc
    import weakref

    import torch

    import pipeline.rl.rollout

    ppo.main(ppo_args(runs_with_rm, "ppo.total_episodes=32", "ppo.save_every=100"))
    loads, alive_at_load, kl_forwards, dtypes = [], [], [], set()
    real_load = evaluate.AutoModelForCausalLM.from_pretrained
    real_logits = pipeline.rl.rollout.response_logits

    def load(path, *args, **kwargs):
        gc.collect()
        alive_at_load.append(sorted(name for name, ref in loads if ref() is not None and name != "sft"))
        model = real_load(path, *args, **kwargs)
        loads.append((str(path).rstrip("/").split("/")[-1], weakref.ref(model)))
        dtypes.add(next(model.parameters()).dtype)
        return model

    def logits(model, input_ids, *args, **kwargs):
        out = real_logits(model, input_ids, *args, **kwargs)
        kl_forwards.append((len(input_ids), out.dtype))
        return out

    monkeypatch.setattr(evaluate.AutoModelForCausalLM, "from_pretrained", load)
    monkeypatch.setattr(pipeline.rl.rollout, "response_logits", logits)
    evaluate.main(
        [
            "--recipe",
            DEMO_RECIPE,
            f"runs_dir={runs_with_rm}",
            f"sft.model={base_model}",
            "ppo.dtype=bfloat16",
            "ppo.forward_batch_size=2",
            "eval.batch_size=8",
            "eval.prompts.limit=16",
            "eval.max_new_tokens=8",
        ]
    )
    assert dtypes == {torch.bfloat16}
    assert [name for name, _ in loads] == ["sft", "base", "ppo", "best"]  # (best: the policy its gold judge preferred)
    assert alive_at_load == [[], [], [], []]  # each policy was released before the next one loaded
    assert kl_forwards and {n for n, _ in kl_forwards} == {2} and {d for _, d in kl_forwards} == {torch.bfloat16}
    metrics = json.loads((runs_with_rm / "demo" / "eval" / "metrics.json").read_text())
    assert metrics["peak_memory_mb"] > 0
    assert read_manifest(runs_with_rm / "demo" / "eval")["metrics"]["peak_memory_mb"] == metrics["peak_memory_mb"]
