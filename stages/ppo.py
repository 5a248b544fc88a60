"""PPO of the SFT policy against the reward model: `make ppo`.

    make ppo                                    # the demo, one process
    make ppo NPROC=2                            # two processes (GPUs, or gloo on CPUs)
    accelerate launch stages/ppo.py --recipe my.yaml ppo.finetune=lora ppo.kl_target=6

Policy and reference come from this run's SFT artifact, the frozen reward model from its RM
artifact, and the value function from the reward model (default), the SFT model, or a head on the
policy. Each iteration: sample one batch of responses (KV cache, temperature T, top_k=0, top_p=1),
truncate after the stop token, score them, add a per-token KL penalty, compute GAE advantages,
then run several PPO epochs over shuffled minibatches. Interrupted runs (Ctrl-C, SIGTERM, a crash)
resume from the last checkpoint when `make ppo` is run again with the same recipe.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import signal
import time

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import get_peft_model
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, get_scheduler

from pipeline import cli, data, models
from pipeline.config import ConfigError, to_dict
from pipeline.dist import open_stage
from pipeline.metrics import append_jsonl
from pipeline.ppo import PolicyAndValue, disable_dropout, iteration_metrics, score, update, with_advantages
from pipeline.ppo_math import KLController
from pipeline.rollout import generate, sampling_config
from pipeline.scoring import RewardScorer

RANK_SEED_STRIDE = 100003  # ranks sample different rollouts from the same global seed


def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.chat_template == b.chat_template


def prompt_indices(n_prompts: int, iteration: int, batch_size: int, rank: int, world: int, seed: int) -> list[int]:
    """The prompts of one process in one iteration: a deterministic function of the iteration,
    so a resumed run sees exactly the prompts the uninterrupted run would have."""
    per_iter = batch_size * world
    start = (iteration * per_iter + rank * batch_size)
    out = []
    for k in range(start, start + batch_size):
        epoch, i = divmod(k, n_prompts)
        perm = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed + epoch))
        out.append(int(perm[i]))
    return out


def load_models(cfg, sft_dir, rm_dir, tokenizer, device):
    """Policy (+ reference), value model and reward scorer, each in its precision (pipeline/models.py).

    Full fine-tuning: float32 policy and value model, a frozen reference in the compute dtype. LoRA /
    QLoRA: a fresh adapter on the SFT weights, so with the adapter disabled the policy IS the
    reference; the value model then gets its own adapter (its score head trained in full), so a
    LoRA run never trains a whole second network.
    """
    dtype = models.resolve_dtype(cfg.dtype)
    policy = AutoModelForCausalLM.from_pretrained(sft_dir, **models.load_kwargs(cfg.finetune, cfg.dtype))
    reference = None
    if cfg.finetune == "full":
        reference = AutoModelForCausalLM.from_pretrained(sft_dir, dtype=dtype).requires_grad_(False).to(device).eval()
    else:
        policy = get_peft_model(policy, models.lora_config(cfg.finetune, cfg.lora, "CAUSAL_LM"))
    reward_model = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=dtype).requires_grad_(False)
    rm_tokenizer = AutoTokenizer.from_pretrained(rm_dir)
    scorer = RewardScorer(reward_model.to(device), rm_tokenizer, device, batch_size=cfg.forward_batch)
    if cfg.value_model == "reward" and not same_tokenizer(tokenizer, rm_tokenizer):
        raise ConfigError("the reward model has its own tokenizer, so it cannot initialise the value model: "
                          "set ppo.value_model=sft or ppo.value_model=head")
    value_model = None
    if cfg.value_model != "head":
        source = rm_dir if cfg.value_model == "reward" else sft_dir
        value_model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=1, **models.load_kwargs(cfg.finetune, cfg.dtype))
        value_model.config.pad_token_id = tokenizer.pad_token_id
        if cfg.finetune != "full":
            value_model = get_peft_model(value_model, models.lora_config(cfg.finetune, cfg.lora, "SEQ_CLS"))
    model = PolicyAndValue(policy, value_model)
    models.upcast_trainable(model)
    disable_dropout(model)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model.eval(), reference, scorer


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA's allocator peak on a GPU, else the peak resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv=None):
    recipe, _, plan, out = open_stage("ppo", __doc__, argv, resume=True)  # an interrupted run goes on
    if out is None:  # up to date
        return
    cfg = recipe.ppo
    sft_dir, rm_dir = recipe.run_dir / "sft", recipe.run_dir / "rm"
    started = time.time()

    dtype = models.resolve_dtype(cfg.dtype)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),  # see pipeline.dist.process_state
                              mixed_precision=models.mixed_precision(dtype),
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              log_with=cfg.report_to or None, project_dir=str(out))
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    set_seed(recipe.seed)  # identical model initialisation on every rank

    # ---- data and models ----
    prompts = data.load_prompts(cfg.prompts)
    tokenizer = AutoTokenizer.from_pretrained(sft_dir, padding_side="left")
    stop_id = tokenizer.convert_tokens_to_ids(cfg.stop_token) if cfg.stop_token else tokenizer.eos_token_id
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == stop_id:
        raise ConfigError(f"the SFT tokenizer's pad token must exist and differ from the stop token ({stop_id})")
    model, reference, scorer = load_models(cfg, sft_dir, rm_dir, tokenizer, device)
    generation = sampling_config(cfg.temperature, cfg.max_new_tokens, stop_id, tokenizer.pad_token_id)

    iterations = math.ceil(cfg.total_episodes / (cfg.batch_size * world))
    updates_per_iteration = cfg.ppo_epochs * (cfg.batch_size // cfg.mini_batch_size)
    # fused: one kernel for all parameters instead of a loop of small ones (5% of the demo's update time)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate, eps=1e-5,
                                  fused=True)
    scheduler = get_scheduler(cfg.lr_schedule, optimizer, num_warmup_steps=0,
                              num_training_steps=iterations * updates_per_iteration)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    unwrapped = accelerator.unwrap_model(model)
    reference = reference if reference is not None else unwrapped.policy  # LoRA: the adapter disabled
    kl_ctl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    reference_stats = plan.upstream["rm"]["metrics"]["reference"]
    score_norm = (reference_stats["mean"], reference_stats["std"])

    # ---- resume ----
    checkpoint = out / "checkpoint"
    start_iteration = 0
    if (checkpoint / "ppo_state.json").is_file():
        saved = json.loads((checkpoint / "ppo_state.json").read_text())
        accelerator.load_state(str(checkpoint))
        kl_ctl.load_state_dict(saved["kl_controller"])
        start_iteration = saved["iteration"]
        if accelerator.is_main_process and (out / "metrics.jsonl").exists():  # drop lines past the checkpoint
            lines = (out / "metrics.jsonl").read_text().splitlines()
            kept = [line for line in lines if json.loads(line)["iteration"] <= start_iteration]
            (out / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
        accelerator.print(f"ppo: resuming from the checkpoint at iteration {start_iteration}/{iterations}")
    set_seed(recipe.seed + rank * RANK_SEED_STRIDE + start_iteration)

    t_saving = 0.0

    def save_checkpoint(iteration: int) -> None:
        nonlocal t_saving
        t0 = time.time()
        tmp = out / "checkpoint.tmp"
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            (tmp / "ppo_state.json").write_text(json.dumps({"iteration": iteration,
                                                            "kl_controller": kl_ctl.state_dict()}))
            if checkpoint.exists():
                shutil.rmtree(checkpoint)
            tmp.rename(checkpoint)
        accelerator.wait_for_everyone()
        t_saving += time.time() - t0

    stop_requested = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop_requested.append(True))
    accelerator.init_trackers("ppo", config=None)
    t_startup = time.time() - started

    bar = tqdm(range(start_iteration, iterations), initial=start_iteration, total=iterations,
               disable=not accelerator.is_main_process, desc="ppo")
    for iteration in bar:
        # ---- rollout: one batched generation with KV cache ----
        t0 = time.time()
        batch_prompts = [prompts[i] for i in prompt_indices(len(prompts), iteration, cfg.batch_size, rank, world,
                                                             recipe.seed)]
        with accelerator.autocast():
            rollout = generate(unwrapped.policy, tokenizer, batch_prompts, generation, device)
        t_generate = time.time() - t0

        # ---- score: old log-probs and values, reference log-probs, reward-model scores ----
        t0 = time.time()
        with accelerator.autocast():
            exp = score(rollout, model, reference, scorer, cfg, score_norm, cfg.forward_batch)
        t_score = time.time() - t0

        # ---- advantages and PPO epochs ----
        t0 = time.time()
        exp = with_advantages(exp, cfg, kl_ctl.value)
        stats = update(exp, model, optimizer, scheduler, accelerator, cfg, where=f"iteration {iteration + 1}")
        t_optimise = time.time() - t0

        # ---- log: metrics gathered over processes ----
        metrics = iteration_metrics(exp, stats, kl_ctl.value, accelerator)
        kl_ctl.update(metrics["objective/kl"], cfg.batch_size * world)
        elapsed = t_generate + t_score + t_optimise
        metrics.update({"iteration": iteration + 1, "episodes": (iteration + 1) * cfg.batch_size * world,
                        "objective/kl_coef": kl_ctl.value, "lr": scheduler.get_last_lr()[0],
                        "time/generate_s": t_generate, "time/score_s": t_score, "time/optimise_s": t_optimise,
                        "episodes_per_s": cfg.batch_size * world / elapsed,
                        "tokens_per_s": metrics["response_length"] * cfg.batch_size * world / elapsed,
                        "peak_memory_mb": peak_memory_mb()})
        if accelerator.is_main_process:
            append_jsonl(out / "metrics.jsonl", metrics)
            if (iteration + 1) % cfg.sample_every == 0 or iteration == 0:
                for p, t, s in zip(batch_prompts[:4], rollout.texts, exp.scores.tolist()):
                    append_jsonl(out / "samples.jsonl", {"iteration": iteration + 1, "prompt": p, "response": t,
                                                         "score": s})
        accelerator.log({k: v for k, v in metrics.items() if isinstance(v, float)}, step=iteration + 1)
        bar.set_postfix(score=f"{metrics['objective/scores']:.2f}", kl=f"{metrics['objective/kl']:.2f}")

        # ---- checkpoint; stop on request (all ranks agree) ----
        stop = accelerator.reduce(torch.tensor(float(bool(stop_requested)), device=device), "sum").item() > 0
        if (iteration + 1) % cfg.save_every == 0 or stop:
            save_checkpoint(iteration + 1)
        if stop:
            accelerator.print(f"ppo: interrupted; checkpoint saved at iteration {iteration + 1}/{iterations}. "
                              f"Run `make ppo` again (same recipe) to resume.")
            accelerator.end_training()
            raise SystemExit(130)

    # ---- save the artifact ----
    t0 = time.time()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final_policy = unwrapped.policy
        if cfg.finetune != "full":
            final_policy.save_pretrained(out / "adapter")
            final_policy = models.merge_adapter(AutoModelForCausalLM, str(sft_dir), out / "adapter", tokenizer)
        final_policy.save_pretrained(out)
        tokenizer.save_pretrained(out)
        if unwrapped.value_model is not None:
            unwrapped.value_model.save_pretrained(out / "value_model")
        else:
            torch.save(unwrapped.value_head.state_dict(), out / "value_head.pt")
        (out / "recipe.yaml").write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        summary = {k: history[-1][k] for k in ("objective/scores", "objective/rm_score_raw", "objective/kl",
                                               "objective/rlhf_reward", "response_length", "episodes")}
        t_saving += time.time() - t0
        summary.update({"score_first": history[0]["objective/scores"], "iterations": len(history),
                        "episodes_per_s_median": sorted(h["episodes_per_s"] for h in history)[len(history) // 2],
                        "tokens_per_s_median": sorted(h["tokens_per_s"] for h in history)[len(history) // 2],
                        "time_split_s": {"startup": round(t_startup, 1), "saving": round(t_saving, 1),
                                         **{k: round(sum(h[f"time/{k}_s"] for h in history), 1)
                                            for k in ("generate", "score", "optimise")}},
                        "peak_memory_mb": round(max(h["peak_memory_mb"] for h in history), 1),
                        "trainable_parameters": sum(p.numel() for p in unwrapped.parameters() if p.requires_grad),
                        "parameters": sum(p.numel() for p in unwrapped.parameters()),
                        "reward_model_tokenizer": "shared" if same_tokenizer(tokenizer, scorer.tokenizer) else "own"})
        shutil.rmtree(checkpoint, ignore_errors=True)
        plan.stage.commit(plan.fingerprint, plan.config, plan.inputs, summary, started)
        print(f"ppo: {summary['iterations']} iterations, {summary['episodes']} episodes in "
              f"{time.time() - started:.0f}s ({summary['episodes_per_s_median']:.1f} episodes/s), score "
              f"{summary['score_first']:.2f} -> {summary['objective/scores']:.2f}, KL {summary['objective/kl']:.2f} "
              f"-> {plan.stage.final}")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # also tears down the process group: nothing collective after this


if __name__ == "__main__":
    cli.run(main)
