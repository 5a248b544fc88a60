"""The PPO peer on the benchmark's work: TRL 1.12's PPOTrainer (the last trl release with one), with
the settings stages/recipes/bench-ppo.yaml gives our PPO (`python -m pipeline.bench_peers SHAPE --ppo`
runs both in alternating pairs).

    PEER/bin/python pipeline/bench_trl_ppo.py MODEL REWARD_MODEL PROMPTS [--episodes 32] [--batch 16] ...

It runs in its own virtual environment (trl==1.12.0 pins other library versions than ours:
`python3 -m venv PEER && PEER/bin/pip install torch==2.13.0 && PEER/bin/pip install trl==1.12.0`), so it
imports nothing from this package. The same policy, reward model (and value model initialised from
it), prompts (chat-templated, tokenised without special tokens as our rollouts are), batch, mini-batch,
epochs, response length, temperature, k1 KL coefficient, missing-stop penalty and learning rate;
full fine-tuning in float32 on the CPU. What TRL 1.12 cannot match: it never clips gradients, steps
the learning-rate schedule once per batch, and runs a micro-batch the size of the mini-batch. Prints
one JSON line: the scores per iteration and the process's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

STARTED = time.time()
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("reward_model")
    parser.add_argument("prompts")
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16, help="rollouts an iteration")
    parser.add_argument("--mini-batch", type=int, default=8, help="rollouts an optimiser step")
    parser.add_argument("--forward-batch", type=int, default=8, help="rollouts a scoring forward")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--missing-stop-penalty", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    with open(args.prompts) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    texts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in rows]
    dataset = Dataset.from_dict({"input_ids": [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]})

    scores = []

    class Scores(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kwargs):
            if logs and "objective/scores" in logs:
                scores.append(logs["objective/scores"])

    load = lambda cls, path: cls.from_pretrained(path, dtype=torch.float32)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="trl-ppo-") as out:
        config = PPOConfig(
            output_dir=out,
            seed=0,
            total_episodes=args.episodes,
            # TRL 1.12's micro-batch is per_device_train_batch_size cut to the mini-batch, and it steps the
            # optimiser every gradient_accumulation_steps micro-batches: one micro-batch a mini-batch
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=1,
            num_mini_batches=args.batch // args.mini_batch,
            num_ppo_epochs=args.epochs,
            local_rollout_forward_batch_size=args.forward_batch,
            learning_rate=args.learning_rate,
            lr_scheduler_type="linear",
            adam_epsilon=1e-5,
            response_length=args.max_new_tokens,
            temperature=args.temperature,
            stop_token_id=tokenizer.eos_token_id,
            missing_eos_penalty=args.missing_stop_penalty,
            kl_coef=args.kl_coef,
            kl_estimator="k1",
            use_cpu=True,
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            num_sample_generations=0,
            eval_strategy="no",
            save_strategy="no",
            report_to=[],
            logging_steps=1,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = PPOTrainer(
            args=config,
            processing_class=tokenizer,
            model=load(AutoModelForCausalLM, args.model),
            ref_model=load(AutoModelForCausalLM, args.model),
            reward_model=load(AutoModelForSequenceClassification, args.reward_model),
            value_model=load(AutoModelForSequenceClassification, args.reward_model),
            train_dataset=dataset,
            eval_dataset=dataset.select(range(args.batch)),
            callbacks=[Scores()],
        )
        trained = time.time()
        trainer.train()
        train_s = time.time() - trained
    print(
        json.dumps(
            {
                "peer": "TRL 1.12 PPOTrainer",
                "wall_s": round(time.time() - STARTED, 1),
                "train_s": round(train_s, 1),
                "scores": scores,
            }
        )
    )


if __name__ == "__main__":
    main()
