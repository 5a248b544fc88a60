"""The peer on the benchmark's work: trl's GRPOTrainer, with the settings `pipeline.bench` gives our
GRPO (`python -m pipeline.bench_peers` runs both in alternating pairs).

    python -m pipeline.bench_trl_grpo MODEL PROMPTS --iterations 3 --max-new-tokens 128 [--lora] [--num-iterations 2]

The same model directory, prompts and reward function (`pipeline.bench_shapes.solution_reward`), k
samples a prompt, `batch` completions an optimiser step, float32 on the CPU, no gradient
checkpointing unless asked, beta 0 (trl's default: no reference model; our recipe sets kl_coef 0 too), plain
temperature-1 sampling, trl's default loss (`dapo`: token mean). Prints one JSON line: the
process's wall time from start to exit and its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

STARTED = time.time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("prompts")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="completions an optimiser step (one generation)")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--num-iterations", type=int, default=1, help="updates per generation (trl's mu)")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="(trl's default; ours: off)")
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    args = parser.parse_args()

    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from pipeline.bench_shapes import solution_reward

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="float32")
    dataset = load_dataset("json", data_files=args.prompts, split="train")
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    with tempfile.TemporaryDirectory(prefix="trl-grpo-") as out:
        config = GRPOConfig(
            output_dir=out,
            max_steps=args.iterations * args.num_iterations,
            learning_rate=args.learning_rate,
            per_device_train_batch_size=args.micro_batch,
            gradient_accumulation_steps=args.batch // args.micro_batch,
            num_generations=args.k,
            num_iterations=args.num_iterations,
            max_completion_length=args.max_new_tokens,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            beta=0.0,
            bf16=False,
            gradient_checkpointing=args.gradient_checkpointing,
            disable_dropout=True,
            use_vllm=False,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            seed=0,
            dataloader_num_workers=0,
            shuffle_dataset=True,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=solution_reward,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
        trained = time.time()
        trainer.train()
        train_s = time.time() - trained
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    print(
        json.dumps(
            {
                "peer": "trl GRPOTrainer",
                "wall_s": round(time.time() - STARTED, 1),
                "train_s": round(train_s, 1),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "rewards": rewards,
            }
        )
    )


if __name__ == "__main__":
    main()
