"""What the Trainer stages (SFT and RM) share: trl's training arguments over the pipeline's checkpoint
and precision settings, the trainer with the pipeline's callbacks, training that resumes after a crash,
a kill or Ctrl-C (the Trainer's side of `dist.StopRequest`; PPO's loop asks it directly), and the
common ending (the model saved, adapters merged, checkpoints discarded, tokenizer and recipe written).
stages/sft.py and stages/rm.py keep what differs: their data, model class and report. Apart from the
rest of the pipeline because importing transformers' Trainer callbacks imports peft and bitsandbytes.

The Trainer checkpoints into `<work dir>/checkpoints/` (only the latest is kept). The work directory
is stamped with the stage's fingerprint, so running the same stage again with the same recipe finds
them and the Trainer resumes (`resume_from_checkpoint`: weights, optimiser, scheduler, RNG states and
the position in the data), while a changed recipe starts clean (artifacts.StageDir.begin). The
checkpoints are removed before the artifact is committed: only the final model goes into it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from transformers import TrainerCallback

from pipeline import artifacts, engine, models
from pipeline.artifacts import MAKE_TARGET
from pipeline.dist import StopRequest
from pipeline.metrics import append_jsonl, cut_jsonl
from pipeline.recipe import LoraSettings, Recipe
from pipeline.recipe_loader import to_dict, trl_args

DIR = "checkpoints"


def trainer_args(out: Path) -> dict:
    """Checkpoint settings for the Trainer; the recipe's trainer section may override any of them
    (e.g. `sft.trainer.save_steps=200`; the Trainer's default is every 500 steps)."""
    return {"output_dir": str(out / DIR), "save_strategy": "steps", "save_total_limit": 1}


def resume_point(out: Path, stage: str, is_main_process: bool) -> str | None:
    """The latest checkpoint of an interrupted run of this stage (None: start from step 0), with the
    metrics logged after it cut off, so every step appears once in metrics.jsonl."""
    # The Trainer writes trainer_state.json last, and removes the older checkpoint only after it: a
    # checkpoint without it was cut short by the kill (transformers' get_last_checkpoint would take it).
    complete = sorted(
        (int(p.name.rsplit("-", 1)[1]), p)
        for p in (out / DIR).glob("checkpoint-*")
        if (p / "trainer_state.json").is_file()
    )
    step, last = complete[-1] if complete else (0, None)
    if is_main_process:  # (an interrupted run's own end-of-training summary goes too: the finished run logs one)
        cut_jsonl(out / "metrics.jsonl", "step", step if last else -1, drop='"train_runtime"')
    if last and is_main_process:
        print(f"{stage}: resuming from the checkpoint at step {step}")
    return str(last) if last else None


class StopOnSignal(TrainerCallback):
    """A StopRequest for the Trainer: it saves a checkpoint at the end of the current step and stops."""

    def __init__(self, device):
        self.request, self.stopped_at = StopRequest(device), None

    def on_step_end(self, args, state, control, **kwargs):
        if self.request.requested():
            control.should_save, control.should_training_stop = True, True
            self.stopped_at = state.global_step
        return control


def arguments(config_cls, settings: dict, stage: str, out: Path, seed: int, dtype, **defaults):
    """trl's `config_cls` (SFTConfig, RewardConfig) from the recipe's `<stage>.trainer` section, over the
    pipeline's checkpoints (`trainer_args`), precision and `defaults`. Built before the model: under
    ZeRO-3 it registers the DeepSpeed config with transformers, and `from_pretrained` then loads each
    rank's shard only (zero.Init), not the whole model on every rank."""
    return trl_args(
        config_cls,
        settings,
        f"{stage}.trainer",
        seed=seed,
        report_to="none",
        **trainer_args(out),
        **models.trainer_precision(dtype),
        **defaults,
    )


def trainer(
    trainer_cls,
    model,
    args,
    train_ds,
    eval_ds,
    tokenizer,
    out: Path,
    finetune: str,
    lora: LoraSettings,
    task: str,
    device,
):
    """`trainer_cls` (SFTTrainer, RewardTrainer) with the pipeline's callbacks (`callbacks`) and, for
    adapters, peft's config for `task`; and its stop request."""
    stop = StopOnSignal(device)
    built = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=callbacks(out, stop),
        peft_config=models.lora_config(finetune, lora, task),
    )
    # trl stores QLoRA adapters in bf16 (its reading of the QLoRA paper); trained weights are float32
    # here, as everywhere in the pipeline (pipeline/models.py); the optimizer is built in `train`
    if finetune.startswith("qlora"):
        models.upcast_trainable(built.model)
    return built, stop


def train(trainer, resume: str | None, stop: StopOnSignal, stage: str, out: Path):
    """`trainer.train`, resumed if there is a checkpoint, once the disk is known to hold the artifact
    and its checkpoints (a resumed run's are on it already); after a stop request: exit 130 saying how
    to go on."""
    artifacts.check_free_space(
        out, models.trainer_disk_need(trainer.model) - artifacts.size(out), f"the {stage} artifact and its checkpoints"
    )
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    finally:
        stop.request.restore()
    if stop.stopped_at is not None:
        if trainer.is_world_process_zero():
            print(
                f"{stage}: interrupted; checkpoint saved at step {stop.stopped_at}. Run `{MAKE_TARGET[stage]}` "
                f"again (same recipe) to resume.",
                flush=True,
            )
        raise SystemExit(130)
    return result


def save_model(trainer, out: Path, finetune: str) -> None:
    """The trained weights, consolidated from every rank (all take part): the model, or the adapter in
    `adapter/`."""
    engine.save_trainer_model(trainer, str(out if finetune == "full" else out / "adapter"))


def merged(model_cls, source, out: Path, tokenizer, finetune: str, dtype, **kwargs):
    """On the main process, after `save_model`: an adapter run's model with its adapter merged, saved as
    the artifact's weights (loads with plain `from_pretrained`), and returned; None for full fine-tuning."""
    if finetune == "full":
        return None
    model = models.merge_adapter(model_cls, source, out / "adapter", tokenizer, finetune, dtype, **kwargs)
    model.save_pretrained(out)
    return model


def finish(out: Path, tokenizer, recipe: Recipe) -> None:
    """The artifact's last files, on the main process once its weights are in: the checkpoints go (only
    now: a failed merge keeps them), the tokenizer and the resolved recipe are written."""
    shutil.rmtree(out / DIR, ignore_errors=True)
    tokenizer.save_pretrained(out)
    (out / "recipe.yaml").write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))


class RecipeCadence(TrainerCallback):
    """A resumed Trainer takes its logging, evaluation and save intervals from the checkpoint's state
    (it only warns that the arguments differ); the recipe's, which may have changed since
    (plans.RESUMABLE_ACROSS), apply from the resumed step on."""

    def on_train_begin(self, args, state, control, **kwargs):
        state.compute_steps(args, state.max_steps)


def callbacks(out: Path, stop: StopOnSignal) -> list[TrainerCallback]:
    """What the Trainer stages add to the Trainer: metrics.jsonl, the recipe's cadence, the stop request."""
    return [JsonlLogger(out / "metrics.jsonl"), RecipeCadence(), stop]


class JsonlLogger(TrainerCallback):
    """Every Trainer log (losses, learning rate, eval metrics) also goes to metrics.jsonl."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            append_jsonl(self.path, {"step": state.global_step, "epoch": state.epoch, **logs})
