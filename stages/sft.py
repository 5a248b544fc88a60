"""Supervised fine-tuning with trl's SFTTrainer: `make sft`.

    make sft                                         # the demo recipe, one process
    make sft RECIPE=my.yaml NPROC=8                  # 8 GPUs through accelerate launch
    accelerate launch stages/sft.py --recipe my.yaml sft.finetune=lora sft.trainer.learning_rate=2e-4

Full fine-tuning, LoRA, or QLoRA (4-bit NF4 / 8-bit) from the recipe's model (a hub id or a
local path). Writes <runs_dir>/<run_name>/sft/: the model (adapters merged, so it loads with
plain `AutoModelForCausalLM.from_pretrained`; the adapter itself in `adapter/`), the tokenizer,
the resolved recipe, metrics.jsonl and, last, manifest.json.
"""

from __future__ import annotations

import time

from pipeline import process

if __name__ == "__main__":  # this stage's own process: before the libraries load
    process.before_libraries()

from transformers import AutoModelForCausalLM, set_seed
from trl import SFTConfig, SFTTrainer

from pipeline import data, models, trainer_stage
from pipeline.dist import open_stage

ACCEPTED = ["language_modeling", "prompt_completion"]


def end_of_turn(tokenizer, train_ds, trainer_settings: dict) -> dict:
    """SFTConfig's `eos_token` for conversations on a base whose EOS does not end a chat turn.

    trl appends EOS only to plain text; a conversation ends with whatever the chat template closes a
    turn with (Qwen2.5 base: `<|im_end|>`, EOS `<|endoftext|>`; Llama 3 base: `<|eot_id|>`, EOS
    `<|end_of_text|>`). trl's `eos_token` makes that token the saved tokenizer's EOS and puts it first in
    the generation config's EOS list, so PPO, eval and any `generate` stop where the model learned to.
    A recipe that sets `sft.trainer.eos_token` itself keeps its choice."""
    first = train_ds[0]
    conversational = any(data.is_conversational(first.get(c)) for c in ("messages", "prompt", "completion"))
    turn_end = models.turn_end_token(tokenizer)
    if "eos_token" in trainer_settings or not conversational or turn_end in (None, tokenizer.eos_token):
        return {}
    return {"eos_token": turn_end}


def main(argv=None):
    recipe, state, plan, out = open_stage("sft", __doc__, argv, resume=True)
    if out is None:  # up to date
        return
    sft = recipe.sft
    started = time.time()

    # ---- data ----
    train_ds, eval_ds, fmt = data.train_eval(sft.dataset, sft.eval_dataset, sft.eval_fraction, ACCEPTED, recipe.seed)

    # ---- model ----
    set_seed(recipe.seed)
    tokenizer = models.load_tokenizer(sft.model)
    dtype = models.resolve_dtype(sft.dtype)
    resume = trainer_stage.resume_point(out, "sft", state.is_main_process)  # an interrupted run goes on
    training_args = trainer_stage.arguments(  # (before the model: see trainer_stage.arguments)
        SFTConfig,
        sft.trainer,
        "sft",
        out,
        recipe.seed,
        dtype,
        **end_of_turn(tokenizer, train_ds, sft.trainer),
        eval_strategy="epoch" if eval_ds is not None else "no",
        # the loss before training, on the engine-prepared model (a resumed run has it in its history)
        eval_on_start=eval_ds is not None and resume is None,
    )
    model = models.load_trained(AutoModelForCausalLM, sft.model, sft.finetune, sft.dtype)
    models.align_special_tokens(model, tokenizer)
    trainer, stop = trainer_stage.trainer(
        SFTTrainer,
        model,
        training_args,
        train_ds,
        eval_ds,
        tokenizer,
        out,
        sft.finetune,
        sft.lora,
        "CAUSAL_LM",
        state.device,
    )

    # ---- train ----
    result = trainer_stage.train(trainer, resume, stop, "sft", out)
    # the first evaluation (eval_on_start) is the loss before training: under FSDP2 / ZeRO-3 the model
    # must be prepared with its optimizer first, so no evaluation may run before `train`
    before = next((h for h in trainer.state.log_history if "eval_loss" in h), {})
    after = trainer.evaluate() if eval_ds is not None else {}

    # ---- save ----
    trainer_stage.save_model(trainer, out, sft.finetune)
    metrics = {
        "format": fmt,
        "train_rows": len(train_ds),
        "eval_rows": len(eval_ds) if eval_ds is not None else 0,
        "train_loss": result.training_loss,
        "train_runtime_s": result.metrics["train_runtime"],
        "eval_loss_before": before.get("eval_loss"),
        "eval_loss_after": after.get("eval_loss"),
    }
    if state.is_main_process:
        trainer_stage.merged(AutoModelForCausalLM, sft.model, out, tokenizer, sft.finetune, sft.dtype)
        trainer_stage.finish(out, tokenizer, recipe)
        plan.stage.commit(plan.fingerprint, plan.config, plan.inputs, metrics, started)
        print(
            f"sft: {sft.finetune} on {len(train_ds)} {fmt} rows in {time.time() - started:.0f}s, "
            f"eval loss {metrics['eval_loss_before']:.3f} -> {metrics['eval_loss_after']:.3f} -> {plan.stage.final}"
            if eval_ds is not None
            else f"sft: done in {time.time() - started:.0f}s -> {plan.stage.final}"
        )
    state.wait_for_everyone()


if __name__ == "__main__":
    process.run_and_exit(main)
