"""Reward-model training with trl's RewardTrainer: `make rm`.

    make rm                                   # the demo: starts from the SFT artifact
    make rm RECIPE=my.yaml NPROC=8
    accelerate launch stages/rm.py --recipe my.yaml rm.finetune=lora rm.trainer.center_rewards_coefficient=0.01

Trains a sequence-classification model with one output on preference pairs (chosen/rejected,
implicit or explicit prompt, plain or conversational; an optional `margin` column is used). By
default it starts from this run's SFT artifact; `rm.model` may also be any causal LM or an encoder
(BERT / RoBERTa / DeBERTa: trained on "prompt [SEP] response" pairs, see pipeline/scoring.py).
After training it reports pairwise accuracy on the
held-out pairs (and against the gold judge when the recipe names one), and records the reward's
mean and std on reference responses so that PPO can normalise scores. Writes
<runs_dir>/<run_name>/rm/ like the SFT stage (adapters merged; manifest last).
"""

from __future__ import annotations

import time

from pipeline import process

if __name__ == "__main__":  # this stage's own process: before the libraries load
    process.before_libraries()

import torch
from transformers import AutoModelForSequenceClassification, set_seed
from trl import RewardConfig, RewardTrainer
from trl.data_utils import extract_prompt

from pipeline import data, engine, models, plans, scoring, trainer_stage
from pipeline.dist import open_stage
from pipeline.scoring import RewardScorer, load_callable


def pairwise_report(scorer: RewardScorer, pairs, judge=None) -> dict:
    """Accuracy, margin and reward distribution on preference pairs (plus gold accuracy if judged)."""
    prompts = pairs["prompt"] if "prompt" in pairs.column_names else [None] * len(pairs)
    chosen, rejected = scorer(prompts, pairs["chosen"]).cpu(), scorer(prompts, pairs["rejected"]).cpu()
    rewards = torch.cat([chosen, rejected])
    report = {
        "accuracy": (chosen > rejected).float().mean().item(),
        "margin_mean": (chosen - rejected).mean().item(),
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std().item(),
        "reward_quantiles": dict(
            zip(
                ["p05", "p25", "p50", "p75", "p95"],
                torch.quantile(rewards, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])).tolist(),
            )
        ),
    }
    if judge is not None:
        # Against the gold judge's own preference, not the (noisy) labels; ties say nothing.
        # (an implicit prompt is the turns chosen and rejected share: trl's extract_prompt finds it)
        explicit = [
            (p, c, r) if p is not None else tuple(extract_prompt({"chosen": c, "rejected": r}).values())
            for p, c, r in zip(prompts, pairs["chosen"], pairs["rejected"])
        ]
        gold = [judge(p, c) - judge(p, r) for p, c, r in explicit]
        agree = [(d > 0) == (c > r) for d, c, r in zip(gold, chosen.tolist(), rejected.tolist()) if d != 0]
        report["gold_accuracy"] = sum(agree) / len(agree)
        report["label_gold_agreement"] = sum(d > 0 for d in gold if d != 0) / len(agree)
    return report


def main(argv=None):
    recipe, state, plan, out = open_stage("rm", __doc__, argv, resume=True)
    if out is None:  # up to date
        return
    rm = recipe.rm
    model_source, reference = plans.rm_model(recipe), plans.rm_reference(recipe)
    started = time.time()

    # ---- data ----
    train_ds, eval_ds, fmt = data.train_eval(rm.dataset, rm.eval_dataset, rm.eval_fraction, ["preference"], recipe.seed)
    train_ds, dropped = data.clean_preferences(train_ds, rm.dataset.path)
    if eval_ds is not None:
        eval_ds, eval_dropped = data.clean_preferences(eval_ds, (rm.eval_dataset or rm.dataset).path)
        dropped = {k: dropped[k] + eval_dropped[k] for k in dropped}
    # read now, not after training: a reference set the scorer cannot use must fail before the work
    reference_set = data.reference_pairs(reference, rm.reference_limit)

    # ---- model ----
    # Seeded before loading: the new score head is initialised here,
    # before the Trainer seeds, and the same recipe should give the same reward model.
    set_seed(recipe.seed)
    tokenizer = models.load_tokenizer(model_source, reward=True)
    dtype = models.resolve_dtype(rm.dtype)
    resume = trainer_stage.resume_point(out, "rm", state.is_main_process)  # an interrupted run goes on
    training_args = trainer_stage.arguments(  # (before the model: see trainer_stage.arguments)
        RewardConfig, rm.trainer, "rm", out, recipe.seed, dtype, eval_strategy="epoch" if eval_ds is not None else "no"
    )
    model = models.load_trained(AutoModelForSequenceClassification, model_source, rm.finetune, rm.dtype, num_labels=1)
    models.align_special_tokens(model, tokenizer)
    # An encoder reads "[CLS] prompt [SEP] response [SEP]": rendered here, as the scorer will read it
    # (RewardTrainer would append an EOS or apply a chat template, which an encoder does not have).
    train_rows, eval_rows = train_ds, eval_ds
    if models.is_encoder(tokenizer):
        models.bound_encoder_length(tokenizer, model.config)  # saved with the tokenizer: PPO and eval cut alike
        train_rows = scoring.encoder_pairs(train_ds, tokenizer)
        eval_rows = scoring.encoder_pairs(eval_ds, tokenizer) if eval_ds is not None else None
    trainer, stop = trainer_stage.trainer(
        RewardTrainer,
        model,
        training_args,
        train_rows,
        eval_rows,
        tokenizer,
        out,
        rm.finetune,
        rm.lora,
        "SEQ_CLS",
        state.device,
    )
    # trl drops pairs longer than max_length while preparing the data: count them
    dropped["too_long"] = len(train_ds) - len(trainer.train_dataset)
    if eval_ds is not None:
        dropped["too_long"] += len(eval_ds) - len(trainer.eval_dataset)

    # ---- train ----
    result = trainer_stage.train(trainer, resume, stop, "rm", out)
    after = trainer.evaluate() if eval_ds is not None else {}

    # ---- save ----
    trainer_stage.save_model(trainer, out, rm.finetune)
    if state.is_main_process:
        # The report reads the artifact as PPO will, on this process alone: the merged adapter, or the
        # saved full model (under ZeRO-3 / FSDP2 the trained model is sharded over all ranks).
        final = trainer_stage.merged(
            AutoModelForSequenceClassification, model_source, out, tokenizer, rm.finetune, rm.dtype, num_labels=1
        )
        if final is None:
            with engine.single_process_loading():
                final = AutoModelForSequenceClassification.from_pretrained(out)
        final.to(state.device)
        trainer_stage.finish(out, tokenizer, recipe)

        # ---- held-out report and reference statistics (for PPO's reward normalisation) ----
        scorer = RewardScorer(final, tokenizer, state.device)
        judge = load_callable(recipe.judge) if recipe.judge else None
        heldout = pairwise_report(scorer, eval_ds, judge) if eval_ds is not None else {}
        ref_scores = scorer(*reference_set)
        metrics = {
            "format": fmt,
            "train_pairs": len(trainer.train_dataset),
            "dropped": dropped,
            "train_loss": result.training_loss,
            "train_runtime_s": result.metrics["train_runtime"],
            "eval_accuracy": after.get("eval_accuracy"),
            "heldout": heldout,
            "reference": {
                "dataset": reference.path,
                "n": len(ref_scores),
                "mean": ref_scores.mean().item(),
                "std": ref_scores.std().item(),
            },
        }
        plan.stage.commit(plan.fingerprint, plan.config, plan.inputs, metrics, started)
        gold = f", gold-judge accuracy {heldout['gold_accuracy']:.3f}" if "gold_accuracy" in heldout else ""
        print(
            f"rm: {rm.finetune} on {metrics['train_pairs']} pairs in {time.time() - started:.0f}s, "
            f"held-out accuracy {heldout.get('accuracy', float('nan')):.3f}{gold}, "
            f"dropped {dropped} -> {plan.stage.final}"
        )
    state.wait_for_everyone()


if __name__ == "__main__":
    process.run_and_exit(main)
