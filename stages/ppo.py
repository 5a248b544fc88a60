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
import shutil
import signal
import time

import torch
import torch.nn as nn
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import get_peft_model
from tqdm.auto import tqdm
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          GenerationConfig, get_scheduler)

from pipeline import cli, data, models
from pipeline.config import ConfigError, to_dict
from pipeline.dist import open_stage
from pipeline.metrics import append_jsonl
from pipeline.ppo_math import (KLController, entropy_of, explained_variance, gae, kl_per_token, logprobs_of,
                               masked_mean, masked_whiten, policy_loss, token_rewards, truncate_after_stop,
                               value_loss)
from pipeline.scoring import conversation_text, position_ids, reward_scores

RANK_SEED_STRIDE = 100003  # ranks sample different rollouts from the same global seed


class PolicyAndValue(nn.Module):
    """The trainable modules as one, so one optimiser and one DDP wrapper cover both."""

    def __init__(self, policy: nn.Module, value_model: nn.Module | None):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        hidden = policy.config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden, 1) if value_model is None else None

    def forward(self, input_ids, attention_mask, response_len: int):
        """Logits for the response tokens only (B, R, V), and per-token values (B, R)."""
        pos = position_ids(attention_mask)
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False,
                          logits_to_keep=response_len + 1, output_hidden_states=self.value_head is not None)
        logits = out.logits[:, :-1]  # position t predicts token t + 1: keep the predictions of the response
        if self.value_head is not None:
            hidden = out.hidden_states[-1][:, -response_len - 1:-1]
            values = self.value_head(hidden).squeeze(-1)
        else:
            values = token_values(self.value_model, input_ids, attention_mask, pos)[:, -response_len - 1:-1]
        return logits, values


def token_values(model, input_ids, attention_mask, pos):
    """A sequence-classification model's score head applied at every position: (B, L)."""
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos).last_hidden_state
    return model.score(hidden).squeeze(-1)


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


def main(argv=None):
    recipe, _, plan, out = open_stage("ppo", __doc__, argv, resume=True)  # an interrupted run goes on
    if out is None:  # up to date
        return
    cfg = recipe.ppo
    sft_dir, rm_dir = recipe.run_dir / "sft", recipe.run_dir / "rm"
    started = time.time()

    accelerator = Accelerator(cpu=not torch.cuda.is_available(),  # see pipeline.dist.process_state
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              log_with=cfg.report_to or None, project_dir=str(out))
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(recipe.seed)  # identical model initialisation on every rank

    # ---- data ----
    prompts = data.load_prompts(cfg.prompts)

    # ---- models: policy (+ reference), reward, value ----
    dtype = models.resolve_dtype(cfg.dtype)
    tokenizer = AutoTokenizer.from_pretrained(sft_dir, padding_side="left")
    stop_id = tokenizer.convert_tokens_to_ids(cfg.stop_token) if cfg.stop_token else tokenizer.eos_token_id
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == stop_id:
        raise ConfigError(f"the SFT tokenizer's pad token must exist and differ from the stop token ({stop_id})")
    policy = AutoModelForCausalLM.from_pretrained(sft_dir, **models.load_kwargs(cfg))
    lora = models.lora_config(cfg.finetune, cfg.lora, "CAUSAL_LM")
    reference = None
    if lora is not None:
        # A fresh adapter on the merged SFT weights: with the adapter disabled the policy IS the reference.
        policy = get_peft_model(policy, lora)
    else:
        reference = AutoModelForCausalLM.from_pretrained(sft_dir, dtype=dtype).requires_grad_(False)
    reward_model = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=dtype).requires_grad_(False)
    rm_tokenizer = AutoTokenizer.from_pretrained(rm_dir, padding_side="left")
    score_by_text = not same_tokenizer(tokenizer, rm_tokenizer)
    value_model = None
    if cfg.value_model == "reward":
        if score_by_text:
            raise ConfigError("the reward model has its own tokenizer, so it cannot initialise the value model: "
                              "set ppo.value_model=sft or ppo.value_model=head")
        value_model = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=dtype)
    elif cfg.value_model == "sft":
        value_model = AutoModelForSequenceClassification.from_pretrained(sft_dir, num_labels=1, dtype=dtype)
        value_model.config.pad_token_id = tokenizer.pad_token_id
    model = PolicyAndValue(policy, value_model)
    # Dropout off everywhere, always: with dropout the first PPO step's ratio is not 1.
    for m in (model, reference, reward_model):
        if m is not None:
            m.eval()

    iterations = math.ceil(cfg.total_episodes / (cfg.batch_size * world))
    updates_per_iteration = cfg.ppo_epochs * (cfg.batch_size // cfg.mini_batch_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate, eps=1e-5)
    scheduler = get_scheduler(cfg.lr_schedule, optimizer, num_warmup_steps=0,
                              num_training_steps=iterations * updates_per_iteration)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    for m in (reference, reward_model):
        if m is not None:
            m.to(accelerator.device)
    kl_ctl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    reference_stats = plan.upstream["rm"]["metrics"]["reference"]
    score_norm = (reference_stats["mean"], reference_stats["std"])
    generation = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=cfg.temperature,
                                  top_k=0, top_p=1.0, eos_token_id=stop_id, pad_token_id=tokenizer.pad_token_id)

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

    def save_checkpoint(iteration: int) -> None:
        tmp = out / "checkpoint.tmp"
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            (tmp / "ppo_state.json").write_text(json.dumps({"iteration": iteration,
                                                            "kl_controller": kl_ctl.state_dict()}))
            if checkpoint.exists():
                shutil.rmtree(checkpoint)
            tmp.rename(checkpoint)
        accelerator.wait_for_everyone()

    stop_requested = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop_requested.append(True))
    accelerator.init_trackers("ppo", config=None)

    unwrapped = accelerator.unwrap_model(model)
    bar = tqdm(range(start_iteration, iterations), initial=start_iteration, total=iterations,
               disable=not accelerator.is_main_process, desc="ppo")
    for iteration in bar:
        t0 = time.time()
        # ---- rollout: one batched generation with KV cache ----
        batch_prompts = [prompts[i] for i in prompt_indices(len(prompts), iteration, cfg.batch_size, rank, world,
                                                             recipe.seed)]
        enc = tokenizer([data.prompt_text(tokenizer, p) for p in batch_prompts], return_tensors="pt",
                        padding=True, add_special_tokens=False).to(accelerator.device)
        context_len = enc["input_ids"].shape[1]
        with torch.inference_mode():
            sequences = unwrapped.policy.generate(**enc, generation_config=generation)
        responses, response_mask, has_stop = truncate_after_stop(sequences[:, context_len:], stop_id,
                                                                 tokenizer.pad_token_id)
        query_responses = torch.cat([enc["input_ids"], responses], 1)
        attention_mask = torch.cat([enc["attention_mask"], response_mask], 1)
        R = responses.shape[1]
        t_generate = time.time() - t0

        # ---- score: old log-probs and values, reference log-probs, reward-model scores ----
        t0 = time.time()
        with torch.inference_mode():
            logits, old_values = model(query_responses, attention_mask, R)
            old_logp = logprobs_of(logits, responses, cfg.temperature)
            entropy = masked_mean(entropy_of(logits, cfg.temperature), response_mask)
            del logits
            pos = position_ids(attention_mask)
            if reference is None:
                with unwrapped.policy.disable_adapter():
                    ref_logits = unwrapped.policy(input_ids=query_responses, attention_mask=attention_mask,
                                                  position_ids=pos, logits_to_keep=R + 1).logits[:, :-1]
            else:
                ref_logits = reference(input_ids=query_responses, attention_mask=attention_mask, position_ids=pos,
                                       logits_to_keep=R + 1).logits[:, :-1]
            ref_logp = logprobs_of(ref_logits, responses, cfg.temperature)
            del ref_logits
            if score_by_text:  # the reward model reads the text with its own tokenizer and chat template
                texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
                raw_scores = reward_scores(reward_model, rm_tokenizer,
                                           [conversation_text(rm_tokenizer, p, t) for p, t in zip(batch_prompts, texts)]
                                           ).to(accelerator.device)
            else:
                raw_scores = reward_model(input_ids=query_responses, attention_mask=attention_mask,
                                          position_ids=pos).logits[:, 0].float()
        scores = (raw_scores - score_norm[0]) / score_norm[1] if cfg.normalize_scores else raw_scores.clone()
        scores = torch.where(has_stop, scores, scores - cfg.missing_stop_penalty)
        t_score = time.time() - t0

        # ---- advantages: KL-penalised rewards, GAE, whitening ----
        mask = response_mask.float()
        old_logp, ref_logp, old_values = old_logp * mask, ref_logp * mask, old_values.float() * mask
        kl = kl_per_token(old_logp, ref_logp, mask, cfg.kl_estimator)
        rewards = token_rewards(scores, kl, mask, kl_ctl.value)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(old_values, rewards, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask)

        # ---- optimise: PPO epochs over shuffled minibatches ----
        t0 = time.time()
        stats = {k: [] for k in ["pg_loss", "vf_loss", "pg_clipfrac", "vf_clipfrac", "approxkl", "ratio"]}
        first = None
        micro = cfg.mini_batch_size // cfg.gradient_accumulation_steps
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(cfg.batch_size, device=accelerator.device)
            for start in range(0, cfg.batch_size, cfg.mini_batch_size):
                for mstart in range(start, start + cfg.mini_batch_size, micro):
                    idx = order[mstart:mstart + micro]
                    with accelerator.accumulate(model):
                        logits, values = model(query_responses[idx], attention_mask[idx], R)
                        logp = logprobs_of(logits, responses[idx], cfg.temperature)
                        del logits
                        pg_loss, pg_stats = policy_loss(logp, old_logp[idx], advantages[idx], mask[idx], cfg.cliprange)
                        vf_loss, vf_stats = value_loss(values.float(), old_values[idx], returns[idx], mask[idx],
                                                       cfg.cliprange_value)
                        loss = pg_loss + cfg.vf_coef * vf_loss
                        for name, value in (("loss/policy", pg_loss), ("loss/value", vf_loss)):
                            if not torch.isfinite(value):
                                raise FloatingPointError(
                                    f"ppo: {name} is {value.item()} at iteration {iteration + 1}, epoch {epoch + 1}; "
                                    f"stopping. The last good checkpoint is kept in {checkpoint}")
                        accelerator.backward(loss)
                        if accelerator.sync_gradients:
                            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                        optimizer.step()
                        scheduler.step() if accelerator.sync_gradients else None
                        optimizer.zero_grad()
                    for k, v in (("pg_loss", pg_loss), ("vf_loss", vf_loss), ("pg_clipfrac", pg_stats["clipfrac"]),
                                 ("vf_clipfrac", vf_stats["clipfrac"]), ("approxkl", pg_stats["approxkl"]),
                                 ("ratio", pg_stats["ratio"])):
                        stats[k].append(v.detach())
                    if first is None:  # the health check: ratio 1, approx-KL 0 on the very first minibatch
                        first = {"ratio": pg_stats["ratio"].item(), "approxkl": pg_stats["approxkl"].item(),
                                 "clipfrac": pg_stats["clipfrac"].item()}
        t_optimise = time.time() - t0

        # ---- log: metrics gathered over processes ----
        seq_kl = kl.sum(1)
        local = {
            "objective/kl": seq_kl.mean(), "objective/entropy": entropy,
            "objective/non_score_reward": (-kl_ctl.value * kl).sum(1).mean(),
            "objective/rlhf_reward": (scores - kl_ctl.value * seq_kl).mean(), "objective/scores": scores.mean(),
            "objective/rm_score_raw": raw_scores.mean(),
            "policy/approxkl_avg": torch.stack(stats["approxkl"]).mean(),
            "policy/clipfrac_avg": torch.stack(stats["pg_clipfrac"]).mean(),
            "loss/policy_avg": torch.stack(stats["pg_loss"]).mean(), "loss/value_avg": torch.stack(stats["vf_loss"]).mean(),
            "val/clipfrac_avg": torch.stack(stats["vf_clipfrac"]).mean(), "val/ratio": torch.stack(stats["ratio"]).mean(),
            "val/explained_variance": explained_variance(old_values, returns, mask),
            "val/num_eos_tokens": has_stop.float().sum(), "response_length": mask.sum(1).mean(),
        }
        metrics = {k: v.item() for k, v in accelerator.reduce({k: v.detach().float() for k, v in local.items()},
                                                               reduction="mean").items()}
        metrics["val/num_eos_tokens"] *= world  # a count: summed, not averaged
        kl_ctl.update(metrics["objective/kl"], cfg.batch_size * world)
        episodes = (iteration + 1) * cfg.batch_size * world
        elapsed = t_generate + t_score + t_optimise
        metrics.update({"iteration": iteration + 1, "episodes": episodes, "objective/kl_coef": kl_ctl.value,
                        "lr": scheduler.get_last_lr()[0], "first_minibatch": first,
                        "time/generate_s": t_generate, "time/score_s": t_score, "time/optimise_s": t_optimise,
                        "episodes_per_s": cfg.batch_size * world / elapsed,
                        "tokens_per_s": metrics["response_length"] * cfg.batch_size * world / elapsed})
        if accelerator.is_main_process:
            append_jsonl(out / "metrics.jsonl", metrics)
            if (iteration + 1) % cfg.sample_every == 0 or iteration == 0:
                texts = tokenizer.batch_decode(responses[:4], skip_special_tokens=True)
                for p, t, s in zip(batch_prompts, texts, scores.tolist()):
                    append_jsonl(out / "samples.jsonl", {"iteration": iteration + 1, "prompt": p, "response": t,
                                                         "score": s})
        accelerator.log({k: v for k, v in metrics.items() if isinstance(v, float)}, step=iteration + 1)
        bar.set_postfix(score=f"{metrics['objective/scores']:.2f}", kl=f"{metrics['objective/kl']:.2f}")

        # ---- checkpoint; stop on request (all ranks agree) ----
        stop = accelerator.reduce(torch.tensor(float(bool(stop_requested)), device=accelerator.device), "sum").item() > 0
        if (iteration + 1) % cfg.save_every == 0 or stop:
            save_checkpoint(iteration + 1)
        if stop:
            accelerator.print(f"ppo: interrupted; checkpoint saved at iteration {iteration + 1}/{iterations}. "
                              f"Run `make ppo` again (same recipe) to resume.")
            accelerator.end_training()
            raise SystemExit(130)

    # ---- save the artifact ----
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final_policy = unwrapped.policy
        if lora is not None:
            final_policy.save_pretrained(out / "adapter")
            final_policy = models.merge_adapter(AutoModelForCausalLM, str(sft_dir), out / "adapter", tokenizer, dtype)
        final_policy.save_pretrained(out)
        tokenizer.save_pretrained(out)
        if unwrapped.value_model is not None:
            unwrapped.value_model.save_pretrained(out / "value_model")
        else:
            torch.save(unwrapped.value_head.state_dict(), out / "value_head.pt")
        (out / "recipe.yaml").write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        summary = {k: history[-1][k] for k in ("objective/scores", "objective/kl", "objective/rlhf_reward",
                                               "response_length", "episodes")}
        summary.update({"score_first": history[0]["objective/scores"], "iterations": len(history),
                        "episodes_per_s_median": sorted(h["episodes_per_s"] for h in history)[len(history) // 2],
                        "time_split_s": {k: round(sum(h[f"time/{k}_s"] for h in history), 1)
                                         for k in ("generate", "score", "optimise")},
                        "reward_model_tokenizer": "own (scored by text)" if score_by_text else "shared"})
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
