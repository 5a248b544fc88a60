"""Evaluate the run's policies on held-out prompts: `make eval`.

    make eval                     # the demo
    make eval RECIPE=my.yaml

For each policy present (base, sft, ppo): responses to the held-out prompts, sampled at the
recorded temperature (top_k=0, top_p=1) and greedy; reward-model score, gold-judge score (if the
recipe names a judge), per-sequence KL from the SFT policy, response length, share ending with the
stop token, distinct n-grams; win rate of PPO over SFT with a 95% interval. Writes
<runs_dir>/<run_name>/eval/: metrics.json, samples.jsonl (every sampled response with its scores),
report.md and PNG plots.
"""

from __future__ import annotations

import gc
import json
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from pipeline import artifacts, cli, data, models, plans, report  # noqa: E402
from pipeline.dist import open_stage  # noqa: E402
from pipeline.rl.rollout import generate, response_logprobs, sampling_config  # noqa: E402
from pipeline.metrics import peak_memory_mb  # noqa: E402
from pipeline.scoring import RewardScorer, load_callable, load_reward_model  # noqa: E402


def respond(model, tokenizer, prompts, cfg, temperature, stop_ids, seed, device):
    """Responses to every prompt in batches of `eval.batch_size`, sampled at `temperature` (0: greedy)
    with temperature alone, stopping where PPO's rollouts stop. Returns one Rollout per batch."""
    config = sampling_config(temperature, cfg.max_new_tokens, stop_ids, tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return [generate(model, tokenizer, prompts[i:i + cfg.batch_size], config, device)
            for i in range(0, len(prompts), cfg.batch_size)]


def load_policy(path, dtype, device, stop_token):
    """A policy for evaluation: in the compute dtype PPO trained under (float32 artifacts would
    double a 7B's memory), with its tokenizer (a base without a pad token gets one as SFT gave it)
    and the ids its responses stop at, as in PPO's rollouts."""
    tokenizer, stop_ids = models.policy_tokenizer(path, stop_token)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    models.align_special_tokens(model, tokenizer)
    return model, tokenizer, stop_ids


def release_memory() -> None:
    """Return a released policy's memory (Python's cycles, then CUDA's cache) before the next loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def distinct(texts, n):
    grams = [tuple(t.split()[i:i + n]) for t in texts for i in range(len(t.split()) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def win_rate(a, b):
    """Share of prompts where a beats b (ties count half), with a 95% Wilson interval (which, unlike
    the normal approximation, does not collapse to a point at 0 or 1)."""
    wins = [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]
    n, p, z = len(wins), sum(wins) / len(wins), 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"rate": p, "ci95": [centre - half, centre + half]}


def mean_std(xs):
    t = torch.tensor(xs, dtype=torch.float64)
    return {"mean": t.mean().item(), "std": t.std().item() if len(xs) > 1 else 0.0}


def main(argv=None):
    recipe, state, plan, out = open_stage("eval", __doc__, argv)  # a new PPO (or SFT, RM) re-runs it
    if out is None:  # up to date
        return
    cfg = recipe.eval
    if not state.is_main_process:  # generation for a few hundred prompts: one process is enough
        state.wait_for_everyone()
        return
    started = time.time()
    run, policies = recipe.run_dir, plans.eval_policies(recipe)

    prompts = data.load_prompts(cfg.prompts)
    judge = load_callable(recipe.judge) if recipe.judge else None
    device, dtype = state.device, models.resolve_dtype(recipe.ppo.dtype)
    forward_batch = recipe.ppo.forward_batch  # KL forwards in PPO's micro-batches: bounded logits memory
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    reward_model, rm_tokenizer = load_reward_model(plans.reward_model(recipe), dtype)  # the one PPO optimised
    scorer = RewardScorer(reward_model.to(device), rm_tokenizer, device, batch_size=cfg.batch_size)
    sft = load_policy(run / "sft", dtype, device, recipe.ppo.stop_token)  # the reference of every KL
    sft_model = sft[0]

    # ---- generate and score, per policy and decoding ----
    metrics, texts = {}, {}
    for name, path in policies.items():
        model, tokenizer, stop_ids = sft if name == "sft" else load_policy(path, dtype, device, recipe.ppo.stop_token)
        metrics[name] = {}
        for decoding, temperature in (("sampled", cfg.temperature), ("greedy", 0.0)):
            batches = respond(model, tokenizer, prompts, cfg, temperature, stop_ids, recipe.seed, device)
            decoded = [t for b in batches for t in b.texts]
            rm = scorer(prompts, decoded).tolist()
            lengths = torch.cat([b.response_mask.sum(1).float().cpu() for b in batches])
            m = {"rm_score": mean_std(rm), "response_length": lengths.mean().item(),
                 "stop_token_share": torch.cat([b.has_stop.float().cpu() for b in batches]).mean().item(),
                 "distinct_1": distinct(decoded, 1), "distinct_2": distinct(decoded, 2)}
            gold = [judge(p, t) for p, t in zip(prompts, decoded)] if judge is not None else None
            if gold is not None:
                m["gold_score"] = mean_std(gold)
            if decoding == "sampled":
                # KL(policy || sft) per sequence, estimated on the policy's own samples at the same temperature
                if model is not sft_model:
                    kl = [(response_logprobs(model, b, temperature, forward_batch)
                           - response_logprobs(sft_model, b, temperature, forward_batch)).sum(1).cpu()
                          for b in batches]
                    m["kl_from_sft"] = torch.cat(kl).mean().item()
                else:
                    m["kl_from_sft"] = 0.0
                texts[name] = {"text": decoded, "rm": rm, "gold": gold}
            metrics[name][decoding] = m
        del model  # one policy resident at a time: released before the next one loads
        release_memory()
    if "ppo" in texts:
        metrics["ppo"]["win_rate_vs_sft"] = {"rm": win_rate(texts["ppo"]["rm"], texts["sft"]["rm"])}
        if judge is not None:
            metrics["ppo"]["win_rate_vs_sft"]["gold"] = win_rate(texts["ppo"]["gold"], texts["sft"]["gold"])
    metrics_peak = peak_memory_mb()
    settings = {"temperature": cfg.temperature, "top_k": 0, "top_p": 1.0, "max_new_tokens": cfg.max_new_tokens,
                "seed": recipe.seed, "prompts": cfg.prompts.path, "n_prompts": len(prompts)}
    artifacts.write_json_atomic(out / "metrics.json", {"settings": settings, "peak_memory_mb": metrics_peak,
                                                         **metrics})
    with open(out / "samples.jsonl", "w") as f:  # every sampled response with its scores
        for name, t in texts.items():
            for i, prompt in enumerate(prompts):
                f.write(json.dumps({"policy": name, "prompt": prompt, "response": t["text"][i], "rm_score": t["rm"][i],
                                    "gold_score": t["gold"][i] if t["gold"] else None}) + "\n")

    # ---- plots and report ----
    plots = write_plots(out, run, texts, judge is not None)
    write_report(out, metrics, texts, prompts, settings, plots, cfg.samples_in_report)
    summary = {name: {k: (v["mean"] if isinstance(v, dict) else v) for k, v in m["sampled"].items()}
               for name, m in metrics.items()}
    summary["peak_memory_mb"] = metrics_peak
    plan.stage.commit(plan.fingerprint, plan.config, plan.inputs, summary, started)
    print(f"eval: {len(prompts)} prompts in {time.time() - started:.0f}s, report at {plan.stage.final / 'report.md'}")
    print(report.headline(metrics))
    state.wait_for_everyone()


def write_plots(out: Path, run: Path, texts: dict, has_gold: bool) -> list[str]:
    plots = []
    ppo_metrics = run / "ppo" / "metrics.jsonl"
    if ppo_metrics.exists():
        history = [json.loads(line) for line in ppo_metrics.read_text().splitlines()]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        steps = [h["iteration"] for h in history]
        # the raw score: the quantity eval's rm_score column reports (PPO optimises it minus penalties)
        axes[0].plot(steps, [h["objective/rm_score_raw"] for h in history], label="reward-model score (raw)")
        axes[0].plot(steps, [h["objective/rlhf_reward"] for h in history], label="rlhf reward (score - beta KL)")
        axes[0].set(xlabel="PPO iteration", ylabel="reward", title="Reward over PPO")
        axes[0].legend()
        axes[1].plot(steps, [h["objective/kl"] for h in history], color="tab:red")
        axes[1].set(xlabel="PPO iteration", ylabel="nats", title="KL(policy || SFT) per sequence")
        fig.tight_layout()
        fig.savefig(out / "ppo_curves.png", dpi=100)
        plt.close(fig)
        plots.append("ppo_curves.png")
    keys = ["rm"] + (["gold"] if has_gold else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        scores = [x for t in texts.values() for x in t[key]]
        bins = torch.linspace(min(scores), max(scores) + 1e-6, 31).tolist()  # shared, so bars compare
        for name, t in texts.items():
            ax.hist(t[key], bins=bins, alpha=0.5, label=name)
        ax.set(xlabel=f"{'reward-model' if key == 'rm' else 'gold-judge'} score", ylabel="responses",
               title=f"{'Reward-model' if key == 'rm' else 'Gold-judge'} scores per policy")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "score_distributions.png", dpi=100)
    plt.close(fig)
    plots.append("score_distributions.png")
    return plots


def write_report(out, metrics, texts, prompts, settings, plots, n_samples):
    cols = ["gold_score", "rm_score", "kl_from_sft", "response_length", "stop_token_share", "distinct_2"]
    lines = ["# Evaluation report", "",
             f"{settings['n_prompts']} held-out prompts from `{settings['prompts']}`, sampled at temperature "
             f"{settings['temperature']} (top_k=0, top_p=1, max {settings['max_new_tokens']} new tokens, seed "
             f"{settings['seed']}); greedy figures in metrics.json.", "",
             "| policy | " + " | ".join(cols) + " | win rate vs sft (rm) | win rate vs sft (gold) |",
             "|---" * (len(cols) + 3) + "|"]
    for name, m in metrics.items():
        s = m["sampled"]
        cells = [f"{s[c]['mean']:.3f} ± {s[c]['std']:.2f}" if isinstance(s.get(c), dict) else
                 f"{s[c]:.3f}" if c in s else "-" for c in cols]
        wins = m.get("win_rate_vs_sft", {})
        cells += [f"{wins[k]['rate']:.2f} [{wins[k]['ci95'][0]:.2f}, {wins[k]['ci95'][1]:.2f}]" if k in wins else "-"
                  for k in ("rm", "gold")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", *[f"![{p}]({p})" for p in plots], "", "## Samples", ""]
    names = [n for n in ("sft", "ppo") if n in texts]
    lines.append("| prompt | " + " | ".join(f"{n} response (rm / gold)" for n in names) + " |")
    lines.append("|---" * (len(names) + 1) + "|")
    for i in range(min(n_samples, len(prompts))):
        prompt = prompts[i][-1]["content"] if data.is_conversational(prompts[i]) else prompts[i]
        cells = []
        for n in names:
            gold = f" / {texts[n]['gold'][i]:.2f}" if texts[n]["gold"] else ""
            cells.append(f"{texts[n]['text'][i]} ({texts[n]['rm'][i]:.2f}{gold})")
        lines.append(f"| {prompt} | " + " | ".join(cells) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    cli.run(main)
