"""The RL stage: PPO (or a critic-free estimator) of the SFT policy against its rewards: `make ppo`.

    make ppo                                    # the demo, one process
    make ppo NPROC=2                            # two processes (GPUs, or gloo on CPUs)
    make ppo ACCELERATE_CONFIG=accelerate_configs/zero3.yaml   # DeepSpeed ZeRO-3 (or fsdp2.yaml, ...)
    accelerate launch stages/ppo.py --recipe my.yaml ppo.finetune=lora ppo.kl_target=6

    make ppo ARGS="ppo.advantage_estimator=rloo ppo.samples_per_prompt=4"     # critic-free
    make ppo RECIPE=stages/recipes/demo-grpo.yaml                              # GRPO on a reward function

Policy and reference come from this run's SFT artifact, or from any model (`ppo.model`: a hub id, a
directory, a PEFT adapter); the rewards from `ppo.rewards` (default:
this run's RM artifact; also Python functions and reward servers, pipeline/rl/rewards.py); for gae
the value function from the reward model, the SFT model, or a head on the policy. Each iteration:
sample k responses per prompt (KV cache, temperature T, top_k=0, top_p=1), truncate after the stop
token, score them with every source and judge, compute advantages (GAE on KL-penalised token
rewards, or a critic-free estimator), then run several epochs of the clipped policy loss over
shuffled minibatches. Ctrl-C / SIGTERM end the iteration at the
next minibatch and save a checkpoint; interrupted runs (also crashes) resume from the last checkpoint
when `make ppo` is run again with the same recipe. Engine-specific work: pipeline/engine.py.
"""

from __future__ import annotations

import time

from pipeline import process

if __name__ == "__main__":  # this stage's own process: before the libraries load
    process.before_libraries()

from accelerate.utils import set_seed
from tqdm.auto import tqdm

from pipeline import artifacts, data, engine, models, plans
from pipeline.dist import StopRequest, open_stage
from pipeline.errors import Diverged
from pipeline.rl.agent import dataset_rows, generate_exchanges, load_toolbox
from pipeline.rl.algorithms import KLController
from pipeline.rl.iteration import batch_sum, iteration_metrics, reward, score, update, with_advantages
from pipeline.rl.rewards import check_columns
from pipeline.rl.rollout import PromptIds, generate, sampling_config
from pipeline.rl.run_setup import RANK_SEED_STRIDE, Schedule, Start, disk_need, load_models, optimizer_and_schedule
from pipeline.rl.run_state import PPORun
from pipeline.rl.sampling import with_signal


def main(argv=None):
    recipe, _, plan, out = open_stage("ppo", __doc__, argv, resume=True)  # an interrupted run goes on
    if out is None:  # up to date
        return
    started, cfg = time.time(), recipe.ppo
    acc = engine.accelerator(
        models.mixed_precision(models.resolve_dtype(cfg.dtype)),
        cfg.gradient_accumulation_steps,
        log_with=cfg.report_to or None,
        project_dir=str(out),
    )
    engine.configure(acc, cfg.mini_batch_size // cfg.gradient_accumulation_steps, cfg.max_grad_norm)
    rank, world = acc.process_index, acc.num_processes
    set_seed(recipe.seed)  # identical model initialisation on every rank

    # ---- data, models, optimiser ----
    prompts, columns = data.load_prompts(cfg.prompts)  # the other columns go to reward functions
    check_columns({"ppo.rewards": cfg.rewards, "ppo.judges": cfg.judges}, columns)
    schedule = Schedule(cfg, world, len(prompts), recipe.seed)
    origin = Start(plans.policy_start(recipe), out, cfg, acc)  # this run's SFT artifact, or ppo.model
    tokenizer, stop_ids = models.policy_tokenizer(origin.dir, cfg.stop_token)
    prompt_ids = PromptIds(tokenizer, prompts)  # each rendered and tokenized once
    toolbox = load_toolbox(cfg, tokenizer, prompts) if cfg.uses_tools else None  # an agent's tools, environment
    model, reference, rewards, judges = load_models(cfg, origin, lambda m: plans.model_path(recipe, m), tokenizer, acc)
    artifacts.check_free_space(
        out,
        disk_need(model, cfg) - artifacts.size(out),  # (less what is there)
        "the ppo artifact and its checkpoints",
    )
    generation = sampling_config(cfg.temperature, cfg.max_new_tokens, stop_ids, tokenizer.pad_token_id)
    optimizer, scheduler = optimizer_and_schedule(model, cfg, schedule.optimizer_steps)
    model, optimizer = acc.prepare(model, optimizer)
    if reference is None and cfg.uses_kl:  # LoRA: the policy with its adapter disabled
        reference = engine.unwrap(acc, model).policy
    kl_ctl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    reference_stats = plan.upstream["rm"]["metrics"]["reference"] if "rm" in plan.upstream else None
    score_norm = (reference_stats["mean"], reference_stats["std"]) if reference_stats else None

    # ---- resume ----
    set_seed(recipe.seed + rank * RANK_SEED_STRIDE)  # each rank samples its own rollouts
    run = PPORun(out, acc, model, scheduler, kl_ctl, started)
    start = run.resume(schedule.iterations)  # a checkpoint's RNG states replace the seed's
    stop = StopRequest(acc.device)
    acc.init_trackers("ppo", config=None)
    run.seconds["startup"] = time.time() - run.started

    best_by = cfg.judges[0].label if cfg.keep_best and cfg.judges else None
    bar = tqdm(
        range(start, schedule.iterations),
        initial=start,
        total=schedule.iterations,
        disable=not acc.is_main_process,
        desc="ppo",
    )
    for iteration in bar:
        with run.saved_on_failure(iteration, schedule.iterations):  # a reward that fails loses no iteration
            state = schedule.trainer_state(iteration, acc)

            def sample(round_: int):
                """This iteration's prompts (round 0, or dynamic sampling's next ones), answered and rewarded."""
                with run.timed("generate"):  # one batched generation with KV cache, the sharded policy gathered once
                    indices = schedule.prompt_indices(iteration, rank, round_)  # each prompt k times in a row
                    with engine.for_generation(model, acc) as unwrapped, acc.autocast():
                        if toolbox is None:
                            rollout = generate(
                                unwrapped.policy,
                                tokenizer,
                                data.take(prompts, indices),
                                generation,
                                acc.device,
                                prompt_ids(indices),
                            )
                        else:  # multi-turn: the policy calls tools and reads their results until it answers
                            rollout = generate_exchanges(
                                unwrapped.policy,
                                tokenizer,
                                data.take(prompts, indices),
                                dataset_rows(prompts, columns, indices),
                                toolbox,
                                generation,
                                acc.device,
                                cfg.max_tool_turns,
                                cfg.exchange_tokens,
                            )
                with run.timed("score"), acc.autocast():  # every reward source and judge, agreed by every process
                    return rollout, run.agree(
                        lambda: reward(
                            rollout,
                            {k: data.take(v, indices) for k, v in columns.items()},
                            rewards,
                            judges,
                            cfg,
                            score_norm,
                            state,
                        )
                    )

            rollout, rewarded = first = sample(0)
            sampling = {}
            if cfg.dynamic_sampling:  # groups without signal out, more prompts in, until the batch is full
                rollout, rewarded, sampling = with_signal(
                    first, sample, cfg.samples_per_prompt, cfg.max_sampling_rounds, acc, tokenizer.pad_token_id
                )
            with run.timed("score"), acc.autocast():  # old log-probs and values, reference log-probs
                exp = score(rollout, rewarded, model, reference, cfg, cfg.forward_batch)
            exp.sampling, exp.watched = sampling, first[1] if cfg.dynamic_sampling else None
        if best_by:  # the policy now sampled these rollouts: kept if the first judge scored them best so far
            run.keep_best(iteration + 1, exp, best_by, tokenizer)
        with run.timed("optimise"):  # advantages (GAE or critic-free), then the policy-loss epochs
            exp = with_advantages(exp, cfg, kl_ctl.value, batch_sum(acc))  # whitened over every process's batch
            stats = update(exp, model, optimizer, scheduler, acc, cfg, f"iteration {iteration + 1}", stop)

        metrics = iteration_metrics(exp, stats, kl_ctl.value, cfg, acc)  # averaged over processes
        if cfg.uses_kl:
            kl_ctl.update(metrics["objective/kl"], cfg.batch_size * world)
        metrics.update(
            {
                "iteration": iteration + 1,
                "episodes": (iteration + 1) * cfg.batch_size * world,
                "objective/kl_coef": kl_ctl.value,
                "lr": optimizer.param_groups[0]["lr"],
            }
        )
        diverging = run.watch(metrics, [j.label for j in cfg.judges])  # a judge falling behind a rising reward
        run.log(
            iteration + 1,
            metrics,
            cfg.batch_size * world,
            exp,
            sample=(iteration + 1) % cfg.sample_every == 0 or iteration == 0,
        )
        bar.set_postfix(
            score=f"{metrics['objective/scores']:.2f}",
            **({"kl": f"{metrics['objective/kl']:.2f}"} if cfg.uses_kl else {}),
        )

        diverged = bool(diverging) and cfg.on_divergence == "stop"
        interrupted = stats["interrupted"] or stop.requested()
        if (iteration + 1) % cfg.save_every == 0 or interrupted or diverged:
            run.save_checkpoint(iteration + 1)
        if diverged:
            run.end_trackers()
            kept = (
                f"; the policy judge '{run.best['judge']}' scored best (iteration {run.best['iteration']}) is in "
                f"{out / 'best'}"
                if run.best
                else ""
            )
            raise Diverged(
                f"ppo: stopped (ppo.on_divergence: stop): {diverging[0].line()}; checkpoint saved at "
                f"iteration {iteration + 1}/{schedule.iterations}{kept}; to go on regardless: make ppo "
                f"ARGS=ppo.on_divergence=warn"
            )
        if interrupted:
            acc.print(
                f"ppo: interrupted; checkpoint saved at iteration {iteration + 1}/{schedule.iterations}. "
                f"Run `make ppo` again (same recipe) to resume."
            )
            run.end_trackers()
            raise SystemExit(130)

    stop.restore()
    reward_models = rewards.models()
    run.save_artifact(
        recipe,
        plan,
        tokenizer,
        origin,
        {
            "engine": engine.name(acc),
            "advantage_estimator": cfg.advantage_estimator,
            **(
                {"reward_model_tokenizer": "shared" if reward_models[0].policy_tokenizer else "own"}
                if reward_models
                else {}
            ),
        },
    )
    run.end_trackers()


if __name__ == "__main__":
    process.run_and_exit(main)
