"""Evaluate the run's policies on held-out prompts: `make eval`.

    make eval                     # the demo
    make eval RECIPE=my.yaml

For each policy present (base and sft, or `start` when the RL stage starts from `ppo.model`; ppo; best,
the RL policy at its judges' best iteration): responses to the held-out prompts, sampled at the
recorded temperature (top_k=0, top_p=1) and greedy; each score: every reward source the RL stage
optimised (`rm_score` for the reward model, `<name>_score` for the others), every judge (ppo.judges,
eval.judges) and the recipe's gold judge (`gold_score`); per-sequence KL from the RL stage's start,
response length, share ending with the stop token, distinct n-grams; win rates of the RL policies over
their start by each score, with 95% intervals. Writes
<runs_dir>/<run_name>/eval/: metrics.json, samples.jsonl (every sampled response with its scores),
report.md and PNG plots.
"""

from __future__ import annotations

import gc
import json
import math
import time
from pathlib import Path

from pipeline import process

if __name__ == "__main__":  # this stage's own process: before the libraries load
    process.before_libraries()

import torch
from transformers import AutoModelForCausalLM

from pipeline import artifacts, data, models, plans, report
from pipeline.dist import open_stage
from pipeline.errors import ConfigError
from pipeline.metrics import peak_memory_mb
from pipeline.rl.agent import Agent, dataset_rows, generate_exchanges, load_toolbox
from pipeline.rl.rewards import Rewards, check_columns, load_sources
from pipeline.rl.rollout import generate, response_logprobs, sampling_config
from pipeline.scoring import load_callable


def respond(model, tokenizer, prompts, cfg, temperature, stop_ids, seed, device, agent=None):
    """Responses to every prompt in batches of `eval.batch_size`, sampled at `temperature` (0: greedy)
    with temperature alone, stopping where PPO's rollouts stop. Returns one Rollout per batch. `agent`:
    (toolbox, the prompts' dataset rows, the PPO stage's settings) for exchanges with tools, as PPO runs them."""
    config = sampling_config(temperature, cfg.max_new_tokens, stop_ids, tokenizer.pad_token_id)
    torch.manual_seed(seed)
    batches = [range(i, min(i + cfg.batch_size, len(prompts))) for i in range(0, len(prompts), cfg.batch_size)]
    if agent is None:
        return [generate(model, tokenizer, [prompts[i] for i in b], config, device) for b in batches]
    toolbox, rows, ppo = agent
    return [
        generate_exchanges(
            model,
            tokenizer,
            [prompts[i] for i in b],
            [rows[i] for i in b],
            toolbox,
            config,
            device,
            ppo.max_tool_turns,
            ppo.exchange_tokens,
        )
        for b in batches
    ]


def batch_columns(columns: dict, batch, i: int, cfg) -> dict:
    """Batch `i`'s rows of the prompt dataset's other columns (and an agent's environments, as the RL
    stage passes them to reward functions)."""
    taken = {k: v[i * cfg.batch_size : (i + 1) * cfg.batch_size] for k, v in columns.items()}
    if batch.agent is not None and any(e is not None for e in batch.agent.environments):
        taken["environments"] = batch.agent.environments
    return taken


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
    grams = [tuple(t.split()[i : i + n]) for t in texts for i in range(len(t.split()) - n + 1)]
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
    """Over the responses that got a score (a reward function may give None)."""
    t = torch.tensor([x for x in xs if x is not None], dtype=torch.float64)
    return {"mean": t.mean().item() if len(t) else None, "std": t.std().item() if len(t) > 1 else 0.0}


def score_key(name: str) -> str:
    return f"{name}_score"


def scorers(recipe, dtype, device, batch_size) -> Rewards:
    """Every score eval reports: the RL stage's reward sources, the judges, and the recipe's gold judge
    `(prompt, response) -> float` as `gold` (unless a judge has that name)."""
    sources = load_sources(
        plans.eval_sources(recipe),
        lambda m: plans.model_path(recipe, m),
        dtype,
        device,
        batch_size,
        lambda model: model.to(device),
    )
    if recipe.judge and "gold" not in sources:
        judge = load_callable(recipe.judge)
        sources["gold"] = (lambda prompts, texts, ids, columns: [judge(p, t) for p, t in zip(prompts, texts)], 1.0)
    return Rewards(sources, device)


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

    prompts, columns = data.load_prompts(cfg.prompts)
    check_columns({"eval (its rewards and judges)": plans.eval_sources(recipe)}, columns)
    device, dtype = state.device, models.resolve_dtype(recipe.ppo.dtype)
    forward_batch = recipe.ppo.forward_batch  # KL forwards as PPO scores: bounded logits memory
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    scores = scorers(recipe, dtype, device, cfg.batch_size)  # what PPO optimised, the judges, the gold judge
    start = plans.start_label(recipe)  # the RL stage's start (sft, or ppo.model): the reference of every KL
    reference = load_policy(policies[start], dtype, device, recipe.ppo.stop_token)
    reference_model, kl_key = reference[0], f"kl_from_{start}"

    # ---- generate and score, per policy and decoding ----
    metrics, texts = {}, {}
    for name, path in policies.items():
        model, tokenizer, stop_ids = (
            reference if name == start else load_policy(path, dtype, device, recipe.ppo.stop_token)
        )
        metrics[name] = {}
        for decoding, temperature in (("sampled", cfg.temperature), ("greedy", 0.0)):
            agent = None
            if recipe.ppo.uses_tools:  # exchanges with the RL stage's tools, as its rollouts ran
                if recipe.judge or any(j.model or j.url for j in recipe.eval.judges):
                    raise ConfigError(
                        "eval: with ppo.tools, judges must be reward functions (they get each exchange "
                        "as messages); a text judge or a reward model would read one reply: remove it"
                    )
                agent = (
                    load_toolbox(recipe.ppo, tokenizer, prompts),
                    dataset_rows(prompts, columns, list(range(len(prompts)))),
                    recipe.ppo,
                )
            batches = respond(model, tokenizer, prompts, cfg, temperature, stop_ids, recipe.seed, device, agent)
            decoded = [t for b in batches for t in b.texts]
            scored = [
                scores.score(
                    b.prompts,
                    b.texts,
                    b.responses,
                    b.response_mask,
                    batch_columns(columns, b, i, cfg),
                    exchanges=b.agent.exchanges if b.agent is not None else None,
                )
                for i, b in enumerate(batches)
            ]
            scores.take_log()  # (what reward functions log is the RL stage's metric, not eval's)
            by_name = {
                score_key(name): [None if x != x else x for s in scored for x in s[name].tolist()]
                for name in scores.sources
            }  # NaN: no score from that source
            lengths = torch.cat([b.loss_mask.sum(1).float().cpu() for b in batches])  # (an agent's own tokens)
            m = {
                **{k: mean_std(v) for k, v in by_name.items()},
                "response_length": lengths.mean().item(),
                "stop_token_share": torch.cat([b.has_stop.float().cpu() for b in batches]).mean().item(),
                "distinct_1": distinct(decoded, 1),
                "distinct_2": distinct(decoded, 2),
            }
            if agent is not None:  # tool use next to the scores
                used = Agent.cat([b.agent for b in batches]).metrics()
                m.update(
                    {
                        "tool_use": used["tools/used_share"],
                        "tool_calls": used["tools/calls_per_episode"],
                        "tool_errors": used["tools/error_share"],
                    }
                )
            if decoding == "sampled":
                # KL(policy || start) per sequence, estimated on the policy's own samples at the same temperature
                if model is not reference_model:
                    kl = [
                        (
                            response_logprobs(model, b, temperature, forward_batch)
                            - response_logprobs(reference_model, b, temperature, forward_batch)
                        )
                        .sum(1)
                        .cpu()
                        for b in batches
                    ]
                    m[kl_key] = torch.cat(kl).mean().item()
                else:
                    m[kl_key] = 0.0
                texts[name] = {"text": decoded, **by_name}
            metrics[name][decoding] = m
        if model is not reference_model:
            del model  # one policy resident at a time (besides the reference): released before the next loads
            release_memory()
    for trained in ("ppo", "best"):  # by each score, on the prompts both policies got one for
        if trained in texts:
            pairs = {
                name: [
                    (a, b)
                    for a, b in zip(texts[trained][score_key(name)], texts[start][score_key(name)])
                    if a is not None and b is not None
                ]
                for name in report.score_order(scores.sources)
            }
            metrics[trained][f"win_rate_vs_{start}"] = {name: win_rate(*zip(*p)) for name, p in pairs.items() if p}
    metrics_peak = peak_memory_mb()
    settings = {
        "temperature": cfg.temperature,
        "top_k": 0,
        "top_p": 1.0,
        "max_new_tokens": cfg.max_new_tokens,
        "seed": recipe.seed,
        "prompts": cfg.prompts.path,
        "n_prompts": len(prompts),
        # what the RL stage optimised (its first reward source) and what only watched it: the verdicts
        "reward": recipe.ppo.rewards[0].label,
        "judges": list(
            dict.fromkeys([j.label for j in recipe.ppo.judges + cfg.judges] + (["gold"] if recipe.judge else []))
        ),
    }
    artifacts.write_json_atomic(out / "metrics.json", {"settings": settings, "peak_memory_mb": metrics_peak, **metrics})
    with open(out / "samples.jsonl", "w") as f:  # every sampled response with its scores
        for name, t in texts.items():
            for i, prompt in enumerate(prompts):
                f.write(
                    json.dumps(
                        {
                            "policy": name,
                            "prompt": prompt,
                            "response": t["text"][i],
                            **{k: v[i] for k, v in t.items() if k != "text"},
                        }
                    )
                    + "\n"
                )

    # ---- plots and report ----
    plots = write_plots(out, run, texts, report.score_order(scores.sources))
    write_report(out, {"settings": settings, **metrics}, texts, prompts, settings, plots, cfg.samples_in_report, start)
    summary = {
        name: {k: (v["mean"] if isinstance(v, dict) else v) for k, v in m["sampled"].items()}
        for name, m in metrics.items()
    }
    summary["peak_memory_mb"] = metrics_peak
    plan.stage.commit(plan.fingerprint, plan.config, plan.inputs, summary, started)
    print(f"eval: {len(prompts)} prompts in {time.time() - started:.0f}s, report at {plan.stage.final / 'report.md'}")
    print(report.headline({"settings": settings, **metrics}, start))
    state.wait_for_everyone()


def write_plots(out: Path, run: Path, texts: dict, names: list[str]) -> list[str]:
    import matplotlib  # here, not at the top: the stage's other processes and imports never draw

    matplotlib.use("Agg")  # files, no display
    import matplotlib.pyplot as plt

    plots = []
    ppo_metrics = run / "ppo" / "metrics.jsonl"
    if ppo_metrics.exists():
        history = [json.loads(line) for line in ppo_metrics.read_text().splitlines()]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        steps = [h["iteration"] for h in history]
        # the raw reward (the quantity eval's score columns report; PPO optimises it minus penalties) and
        # each judge's: a reward that climbs while a judge stays flat is being over-optimised
        raw = "objective/reward_raw" if "objective/reward_raw" in history[0] else "objective/rm_score_raw"
        axes[0].plot(steps, [h[raw] for h in history], label="reward (raw)")
        axes[0].plot(steps, [h["objective/rlhf_reward"] for h in history], label="rlhf reward (reward - beta KL)")
        for key in [k for k in history[0] if k.startswith("judges/") and k.count("/") == 1]:  # (not what they log)
            axes[0].plot(steps, [h[key] for h in history], linestyle="--", label=f"judge: {key[len('judges/') :]}")
        axes[0].set(xlabel="RL iteration", ylabel="reward", title="Reward and judges over the RL stage")
        axes[0].legend()
        axes[1].plot(steps, [h.get("objective/kl", math.nan) for h in history], color="tab:red")  # (no KL term: none)
        axes[1].set(xlabel="RL iteration", ylabel="nats", title="KL(policy || SFT) per sequence")
        fig.tight_layout()
        fig.savefig(out / "ppo_curves.png", dpi=100)
        plt.close(fig)
        plots.append("ppo_curves.png")
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        key = score_key(name)
        scores = [x for t in texts.values() for x in t[key] if x is not None]
        if not scores:
            continue
        bins = torch.linspace(min(scores), max(scores) + 1e-6, 31).tolist()  # shared, so bars compare
        for policy, t in texts.items():
            ax.hist([x for x in t[key] if x is not None], bins=bins, alpha=0.5, label=policy)
        ax.set(xlabel=f"{name} score", ylabel="responses", title=f"{name} scores per policy")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "score_distributions.png", dpi=100)
    plt.close(fig)
    plots.append("score_distributions.png")
    return plots


def write_report(out, metrics, texts, prompts, settings, plots, n_samples, start: str = "sft"):
    names = report.score_order([k[: -len("_score")] for k in next(iter(texts.values())) if k.endswith("_score")])
    cols = [score_key(n) for n in names] + [f"kl_from_{start}", "response_length", "stop_token_share", "distinct_2"]
    cols += [c for c in ("tool_use", "tool_calls") if any(c in m.get("sampled", {}) for m in metrics.values())]
    verdicts = report.verdicts(metrics, start)
    lines = [
        "# Evaluation report",
        "",
        *[f"**Verdict**: {v}." for v in verdicts],
        *([""] if verdicts else []),
        f"{settings['n_prompts']} held-out prompts from `{settings['prompts']}`, sampled at temperature "
        f"{settings['temperature']} (top_k=0, top_p=1, max {settings['max_new_tokens']} new tokens, seed "
        f"{settings['seed']}); greedy figures in metrics.json. Scores: "
        + ", ".join(f"`{score_key(n)}`" for n in names)
        + " (each over the responses it scored).",
        "",
        "| policy | " + " | ".join(cols) + " | " + " | ".join(f"win rate vs {start} ({n})" for n in names) + " |",
        "|---" * (len(cols) + len(names) + 1) + "|",
    ]
    for name, m in metrics.items():
        if name == "settings":
            continue
        s = m["sampled"]
        cells = [
            f"{s[c]['mean']:.3f} ± {s[c]['std']:.2f}"
            if isinstance(s.get(c), dict) and s[c]["mean"] is not None
            else f"{s[c]:.3f}"
            if isinstance(s.get(c), float)
            else "-"
            for c in cols
        ]
        wins = m.get(f"win_rate_vs_{start}", {})
        cells += [
            f"{wins[k]['rate']:.2f} [{wins[k]['ci95'][0]:.2f}, {wins[k]['ci95'][1]:.2f}]" if k in wins else "-"
            for k in names
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", *[f"![{p}]({p})" for p in plots], "", "## Samples", ""]
    policies = [n for n in (start, "ppo") if n in texts]
    lines.append("| prompt | " + " | ".join(f"{n} response ({' / '.join(names)})" for n in policies) + " |")
    lines.append("|---" * (len(policies) + 1) + "|")
    for i in range(min(n_samples, len(prompts))):
        prompt = prompts[i][-1]["content"] if data.is_conversational(prompts[i]) else prompts[i]
        cells = []
        for n in policies:
            values = [texts[n][score_key(k)][i] for k in names]
            cells.append(f"{texts[n]['text'][i]} ({' / '.join('-' if v is None else f'{v:.2f}' for v in values)})")
        lines.append(f"| {prompt} | " + " | ".join(cells) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    process.run_and_exit(main)
